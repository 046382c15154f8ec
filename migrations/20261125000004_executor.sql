-- The executor: job leases (one worker drives a job at a time) and stale flags.

ALTER TABLE conversion_jobs ADD COLUMN IF NOT EXISTS lease_owner TEXT;
ALTER TABLE conversion_jobs ADD COLUMN IF NOT EXISTS lease_until TIMESTAMPTZ;
ALTER TABLE conversion_jobs ADD COLUMN IF NOT EXISTS stale_flagged_at TIMESTAMPTZ;
ALTER TABLE conversion_jobs ADD COLUMN IF NOT EXISTS attempted_providers UUID[] NOT NULL DEFAULT '{}';

CREATE INDEX IF NOT EXISTS conversion_jobs_lease_idx ON conversion_jobs (lease_until)
    WHERE status NOT IN ('completed', 'failed', 'cancelled', 'needs_review');

CREATE OR REPLACE VIEW v_stale_conversion_jobs AS
SELECT id, status, provider_name, provider_tx_id, amount, submitted_at,
       now() - submitted_at AS waiting, stale_flagged_at
FROM conversion_jobs
WHERE status IN ('provider_submitted', 'provider_processing')
  AND submitted_at < now() - INTERVAL '30 minutes';
