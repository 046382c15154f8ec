-- Treasury Engine: buffers, providers, conversion jobs and their audit trail.
-- Money is NUMERIC everywhere; every statement is safe to run twice.

CREATE TABLE IF NOT EXISTS buffer_thresholds (
    account_type          TEXT PRIMARY KEY
        CHECK (account_type IN ('system_buffer_usdc', 'system_buffer_fiat', 'broker_operational')),
    currency              TEXT NOT NULL CHECK (currency IN ('USD', 'USDC')),
    min_threshold         NUMERIC(28, 6) NOT NULL,
    target_threshold      NUMERIC(28, 6) NOT NULL,
    max_threshold         NUMERIC(28, 6) NOT NULL,
    conversion_batch_size NUMERIC(28, 6) NOT NULL CHECK (conversion_batch_size > 0),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT thresholds_ordered
        CHECK (0 < min_threshold AND min_threshold < target_threshold AND target_threshold < max_threshold)
);

INSERT INTO buffer_thresholds
    (account_type, currency, min_threshold, target_threshold, max_threshold, conversion_batch_size)
VALUES
    ('system_buffer_usdc', 'USDC', 10000, 50000, 100000, 20000),
    ('system_buffer_fiat', 'USD', 20000, 100000, 200000, 50000),
    ('broker_operational', 'USD', 50000, 200000, 500000, 100000)
ON CONFLICT (account_type) DO NOTHING;

-- Each buffer's balance as the engine knows it: opening balance plus settled
-- window flows plus completed conversions. Opening balances are the targets;
-- set them from the real ledger before the first run.
CREATE TABLE IF NOT EXISTS buffer_balances (
    account_type TEXT PRIMARY KEY REFERENCES buffer_thresholds (account_type),
    currency     TEXT NOT NULL CHECK (currency IN ('USD', 'USDC')),
    balance      NUMERIC(28, 6) NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

INSERT INTO buffer_balances (account_type, currency, balance)
SELECT account_type, currency, target_threshold FROM buffer_thresholds
ON CONFLICT (account_type) DO NOTHING;

CREATE TABLE IF NOT EXISTS conversion_providers (
    id                       UUID PRIMARY KEY,
    name                     TEXT NOT NULL UNIQUE,
    provider_type            TEXT NOT NULL,
    priority                 INTEGER NOT NULL CHECK (priority >= 0),
    status                   TEXT NOT NULL DEFAULT 'active'
        CHECK (status IN ('active', 'inactive', 'degraded')),
    supports_usdc_to_usd     BOOLEAN NOT NULL DEFAULT TRUE,
    supports_usd_to_usdc     BOOLEAN NOT NULL DEFAULT TRUE,
    min_conversion_amount    NUMERIC(28, 6) NOT NULL CHECK (min_conversion_amount > 0),
    max_conversion_amount    NUMERIC(28, 6) NOT NULL,
    daily_volume_limit       NUMERIC(28, 6),
    daily_volume_used        NUMERIC(28, 6) NOT NULL DEFAULT 0,
    daily_volume_date        DATE NOT NULL DEFAULT CURRENT_DATE,
    success_count            BIGINT NOT NULL DEFAULT 0,
    failure_count            BIGINT NOT NULL DEFAULT 0,
    last_success_at          TIMESTAMPTZ,
    last_failure_at          TIMESTAMPTZ,
    fee_percentage           NUMERIC(12, 8) NOT NULL DEFAULT 0,
    fee_fixed                NUMERIC(28, 6) NOT NULL DEFAULT 0,
    spread_bps               NUMERIC(12, 4) NOT NULL DEFAULT 0,
    -- Names of environment variables or secret keys, never the secrets themselves.
    credentials_ref          TEXT,
    webhook_secret_ref       TEXT,
    base_url                 TEXT,
    created_at               TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at               TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT provider_amounts_ordered CHECK (min_conversion_amount <= max_conversion_amount)
);

INSERT INTO conversion_providers
    (id, name, provider_type, priority, status, supports_usdc_to_usd, supports_usd_to_usdc,
     min_conversion_amount, max_conversion_amount, daily_volume_limit,
     fee_percentage, fee_fixed, spread_bps, credentials_ref, webhook_secret_ref)
VALUES
    ('6a1f0b2e-3d4c-4e5f-8a9b-0c1d2e3f4a51', 'Due', 'due', 1, 'active', TRUE, TRUE,
     100.00, 500000.00, 5000000.00, 0.00100000, 0, 5, 'DUE_API_KEY', 'DUE_WEBHOOK_SECRET'),
    ('7b2e1c3f-4e5d-4f60-9b8c-1d2e3f4a5b62', 'ZeroHash', 'zerohash', 2, 'active', TRUE, TRUE,
     100.00, 1000000.00, 10000000.00, 0.00150000, 0, 5, 'ZEROHASH_API_KEY', 'ZEROHASH_WEBHOOK_SECRET')
ON CONFLICT (name) DO NOTHING;

CREATE TABLE IF NOT EXISTS conversion_jobs (
    id                        UUID PRIMARY KEY,
    -- The command id: a redelivered or replayed command never makes a second job.
    idempotency_key           TEXT NOT NULL UNIQUE,
    direction                 TEXT NOT NULL CHECK (direction IN ('usdc_to_usd', 'usd_to_usdc')),
    trigger_reason            TEXT NOT NULL
        CHECK (trigger_reason IN ('buffer_replenishment', 'scheduled_rebalance', 'manual', 'emergency')),
    status                    TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'provider_submitted', 'provider_processing', 'provider_completed',
                          'ledger_updating', 'completed', 'failed', 'cancelled', 'needs_review')),
    amount                    NUMERIC(28, 6) NOT NULL CHECK (amount > 0),
    source_account            TEXT NOT NULL,
    source_currency           TEXT NOT NULL,
    source_amount             NUMERIC(28, 6) NOT NULL,
    destination_account       TEXT NOT NULL,
    destination_currency      TEXT NOT NULL,
    destination_amount        NUMERIC(28, 6),
    exchange_rate             NUMERIC(28, 10),
    fees_amount               NUMERIC(28, 6),
    fees_currency             TEXT,
    provider_id               UUID REFERENCES conversion_providers (id),
    provider_name             TEXT,
    provider_tx_id            TEXT,
    provider_response         JSONB,
    selection_reason          TEXT,
    cycle_id                  TEXT,
    error_message             TEXT,
    error_code                TEXT,
    retry_count               INTEGER NOT NULL DEFAULT 0,
    created_at                TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at                TIMESTAMPTZ NOT NULL DEFAULT now(),
    submitted_at              TIMESTAMPTZ,
    processing_at             TIMESTAMPTZ,
    provider_completed_at     TIMESTAMPTZ,
    ledger_updating_at        TIMESTAMPTZ,
    completed_at              TIMESTAMPTZ,
    failed_at                 TIMESTAMPTZ,
    cancelled_at              TIMESTAMPTZ,
    needs_review_at           TIMESTAMPTZ
);

CREATE INDEX IF NOT EXISTS conversion_jobs_open_idx ON conversion_jobs (status)
    WHERE status NOT IN ('completed', 'failed', 'cancelled');

CREATE TABLE IF NOT EXISTS conversion_job_history (
    id          BIGSERIAL PRIMARY KEY,
    job_id      UUID NOT NULL REFERENCES conversion_jobs (id),
    from_status TEXT,
    to_status   TEXT NOT NULL,
    note        TEXT,
    changed_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS conversion_job_history_job_idx ON conversion_job_history (job_id, id);

-- One posting set per completed job, ever.
CREATE TABLE IF NOT EXISTS ledger_postings (
    posting_id UUID PRIMARY KEY,
    job_id     UUID NOT NULL UNIQUE REFERENCES conversion_jobs (id),
    posting    JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
