-- Operator views, with the original engine's names and words.

CREATE OR REPLACE VIEW v_buffer_status AS
SELECT
    t.account_type,
    t.currency,
    b.balance AS current_balance,
    t.min_threshold,
    t.target_threshold,
    t.max_threshold,
    t.conversion_batch_size,
    CASE
        WHEN b.balance < t.min_threshold THEN 'CRITICAL_LOW'
        WHEN b.balance < t.target_threshold THEN 'BELOW_TARGET'
        WHEN b.balance <= t.max_threshold THEN 'HEALTHY'
        ELSE 'OVER_CAPITALIZED'
    END AS buffer_status,
    GREATEST(t.target_threshold - b.balance, 0) AS amount_to_target,
    b.updated_at AS balance_updated_at
FROM buffer_thresholds t
JOIN buffer_balances b USING (account_type);

CREATE OR REPLACE VIEW v_provider_health AS
SELECT
    id,
    name,
    provider_type,
    status,
    priority,
    success_count,
    failure_count,
    CASE
        WHEN success_count + failure_count = 0 THEN NULL
        ELSE ROUND(100.0 * success_count / (success_count + failure_count), 2)
    END AS success_rate_pct,
    daily_volume_used,
    daily_volume_limit,
    CASE
        WHEN daily_volume_limit IS NULL THEN NULL
        ELSE daily_volume_limit - daily_volume_used
    END AS daily_volume_remaining,
    last_success_at,
    last_failure_at
FROM conversion_providers;

CREATE OR REPLACE VIEW v_active_conversion_jobs AS
SELECT
    id,
    idempotency_key,
    direction,
    trigger_reason,
    status,
    amount,
    source_account,
    destination_account,
    provider_name,
    provider_tx_id,
    retry_count,
    created_at,
    submitted_at,
    updated_at,
    now() - created_at AS age
FROM conversion_jobs
WHERE status NOT IN ('completed', 'failed', 'cancelled');
