-- USD moved between the two USD buffers (broker_operational and
-- system_buffer_fiat) is a transfer, not a conversion: the planner sends it as
-- a `usd_transfer` command when an active provider row offers transfers, and
-- routes the money through USDC (two conversions) when none does. No seeded
-- row offers transfers: an operator adds the row of their transfer rail.
ALTER TABLE conversion_providers
    ADD COLUMN IF NOT EXISTS supports_usd_transfer BOOLEAN NOT NULL DEFAULT FALSE;

ALTER TABLE conversion_jobs DROP CONSTRAINT IF EXISTS conversion_jobs_direction_check;
ALTER TABLE conversion_jobs ADD CONSTRAINT conversion_jobs_direction_check
    CHECK (direction IN ('usdc_to_usd', 'usd_to_usdc', 'usd_transfer'));

ALTER TABLE planned_commands DROP CONSTRAINT IF EXISTS planned_commands_direction_check;
ALTER TABLE planned_commands ADD CONSTRAINT planned_commands_direction_check
    CHECK (direction IN ('usdc_to_usd', 'usd_to_usdc', 'usd_transfer'));
