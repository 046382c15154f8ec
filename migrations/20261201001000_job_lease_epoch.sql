-- Fenced job leases and provider health over a sliding window.
--
-- lease_epoch: incremented on every new lease of a job; every write of a
-- leased job must carry the current epoch (and an unexpired lease), so a
-- worker whose lease lapsed can no longer change the job.
-- provider_called_at: when the job's provider was last called, recorded
-- under the lease before the call, so a worker taking the job over sees the
-- call and holds at that provider instead of choosing another.
ALTER TABLE conversion_jobs ADD COLUMN IF NOT EXISTS lease_epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE conversion_jobs ADD COLUMN IF NOT EXISTS provider_called_at TIMESTAMPTZ;

-- Jobs already at a provider when this runs may have called it.
UPDATE conversion_jobs SET provider_called_at = COALESCE(submitted_at, updated_at, created_at)
 WHERE provider_id IS NOT NULL AND provider_called_at IS NULL
   AND status NOT IN ('completed', 'failed', 'cancelled');

-- One outcome per job attempt at a provider (a held job that is asked again
-- every monitor cycle still counts once), for health over a sliding window.
CREATE TABLE IF NOT EXISTS provider_attempt_outcomes (
    job_id      UUID NOT NULL REFERENCES conversion_jobs (id),
    provider_id UUID NOT NULL REFERENCES conversion_providers (id),
    succeeded   BOOLEAN NOT NULL,
    decided_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (job_id, provider_id)
);
CREATE INDEX IF NOT EXISTS provider_attempt_outcomes_decided_idx
    ON provider_attempt_outcomes (decided_at);

-- What selection judges: each provider's job attempts that ended in the last
-- hour (the default TREASURY_PROVIDER_HEALTH_WINDOW), one outcome per job.
CREATE OR REPLACE VIEW v_provider_recent_health AS
SELECT
    p.id,
    p.name,
    p.status,
    count(o.job_id) FILTER (WHERE o.succeeded) AS successes_last_hour,
    count(o.job_id) FILTER (WHERE NOT o.succeeded) AS failures_last_hour,
    CASE
        WHEN count(o.job_id) = 0 THEN NULL
        ELSE ROUND(100.0 * count(o.job_id) FILTER (WHERE o.succeeded) / count(o.job_id), 2)
    END AS success_rate_pct_last_hour
FROM conversion_providers p
LEFT JOIN provider_attempt_outcomes o
       ON o.provider_id = p.id AND o.decided_at > now() - INTERVAL '1 hour'
GROUP BY p.id, p.name, p.status;
