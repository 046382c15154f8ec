-- State the exactly-once pipeline commits together with each batch:
-- consumed offsets, processed event ids, window state and the outbox.

-- The next offset to read, per consumer group and partition. The consumer seeks
-- here on every assignment; the group's offsets in Kafka are not trusted.
CREATE TABLE IF NOT EXISTS consumer_offsets (
    consumer_group TEXT NOT NULL,
    topic          TEXT NOT NULL,
    partition      INTEGER NOT NULL,
    next_offset    BIGINT NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- Event-time progress of each input partition, for the settlement watermark.
CREATE TABLE IF NOT EXISTS partition_progress (
    topic           TEXT NOT NULL,
    partition       INTEGER NOT NULL,
    watermark       TIMESTAMPTZ,
    caught_up       BOOLEAN NOT NULL DEFAULT FALSE,
    caught_up_since TIMESTAMPTZ,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- Every counted event id; a second copy of an id is a duplicate.
CREATE TABLE IF NOT EXISTS processed_events (
    event_id     UUID PRIMARY KEY,
    source_topic TEXT NOT NULL,
    partition    INTEGER NOT NULL,
    "offset"     BIGINT NOT NULL,
    window_start TIMESTAMPTZ NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS processed_events_age_idx ON processed_events (processed_at);

-- One row per settlement window (event-time, tumbling).
CREATE TABLE IF NOT EXISTS settlement_windows (
    window_start     TIMESTAMPTZ PRIMARY KEY,
    window_end       TIMESTAMPTZ NOT NULL,
    event_count      BIGINT NOT NULL DEFAULT 0,
    late_event_count BIGINT NOT NULL DEFAULT 0,
    status           TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    closed_at        TIMESTAMPTZ,
    watermark        TIMESTAMPTZ,
    result           JSONB
);

-- Net buffer flows counted in each window.
CREATE TABLE IF NOT EXISTS window_flows (
    window_start TIMESTAMPTZ NOT NULL REFERENCES settlement_windows (window_start),
    account_type TEXT NOT NULL,
    inflow       NUMERIC(28, 6) NOT NULL DEFAULT 0,
    outflow      NUMERIC(28, 6) NOT NULL DEFAULT 0,
    PRIMARY KEY (window_start, account_type)
);

-- Gross conversion demand per direction in each window (before netting).
CREATE TABLE IF NOT EXISTS window_demand (
    window_start TIMESTAMPTZ NOT NULL REFERENCES settlement_windows (window_start),
    direction    TEXT NOT NULL,
    amount       NUMERIC(28, 6) NOT NULL DEFAULT 0,
    event_count  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (window_start, direction)
);

-- The settlement clock: windows before next_window_start are closed.
CREATE TABLE IF NOT EXISTS settlement_state (
    id                INTEGER PRIMARY KEY CHECK (id = 1),
    next_window_start TIMESTAMPTZ,
    auto_rebalance_paused BOOLEAN NOT NULL DEFAULT FALSE,
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

INSERT INTO settlement_state (id) VALUES (1) ON CONFLICT (id) DO NOTHING;

-- Operator requests for an immediate settlement cycle (`treasury trigger`).
CREATE TABLE IF NOT EXISTS settlement_triggers (
    id           BIGSERIAL PRIMARY KEY,
    requested_by TEXT NOT NULL,
    requested_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    handled_at   TIMESTAMPTZ,
    result       JSONB
);

-- Messages to publish, written in the same transaction as the state that
-- caused them; the relay sends them with an idempotent producer.
CREATE TABLE IF NOT EXISTS outbox (
    id          UUID PRIMARY KEY,
    seq         BIGSERIAL UNIQUE,
    topic       TEXT NOT NULL,
    message_key TEXT,
    payload     BYTEA NOT NULL,
    headers     JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at     TIMESTAMPTZ
);

CREATE INDEX IF NOT EXISTS outbox_unsent_idx ON outbox (seq) WHERE sent_at IS NULL;

-- Conversions the planner decided on. A command counts as in flight (its
-- amount already promised to its destination) until its job is final.
CREATE TABLE IF NOT EXISTS planned_commands (
    command_id          UUID PRIMARY KEY,
    cycle_id            TEXT NOT NULL,
    direction           TEXT NOT NULL CHECK (direction IN ('usdc_to_usd', 'usd_to_usdc')),
    trigger_reason      TEXT NOT NULL,
    currency            TEXT NOT NULL,
    amount              NUMERIC(28, 6) NOT NULL CHECK (amount > 0),
    source_account      TEXT NOT NULL,
    destination_account TEXT NOT NULL,
    emitted             BOOLEAN NOT NULL,
    created_at          TIMESTAMPTZ NOT NULL
);
