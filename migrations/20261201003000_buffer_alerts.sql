-- The status last announced on treasury.buffer-alerts for each buffer, so a
-- settlement announces a crossing once, including one caused by a conversion
-- that completed between windows.
CREATE TABLE IF NOT EXISTS buffer_alert_state (
    account_type TEXT PRIMARY KEY REFERENCES buffer_thresholds (account_type),
    status       TEXT NOT NULL CHECK (status IN ('CRITICAL_LOW', 'BELOW_TARGET', 'HEALTHY', 'OVER_CAPITALIZED')),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
