-- How many events took money out of each buffer in each window: a burst of
-- withdrawals shows in their number before their sum can tell it from one
-- large withdrawal. Windows counted before this column existed read 0, which
-- only makes the burst watch fall back to judging the sum alone.
ALTER TABLE window_flows
    ADD COLUMN IF NOT EXISTS outflow_events BIGINT NOT NULL DEFAULT 0;
