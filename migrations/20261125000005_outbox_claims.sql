-- Outbox rows are claimed by one relay at a time, so several pods share the
-- publishing instead of each sending every row.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS claimed_until TIMESTAMPTZ;
