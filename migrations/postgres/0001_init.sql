-- Hubbub history schema (PostgreSQL), shared by every node.
-- `channel` is '#<room>' for rooms and '@["<user a>","<user b>"]' (sorted) for direct
-- message pairs, as in the SQLite schema.
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- One row per channel: the last `seq` stored. A commit locks the rows of its channels
-- (FOR UPDATE, in key order), takes the next numbers and stores the messages in the
-- same transaction, so `seq` is gapless across nodes and a crash leaves no hole.
CREATE TABLE IF NOT EXISTS channels (
    key      TEXT PRIMARY KEY,
    last_seq BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS messages (
    channel   TEXT   NOT NULL,
    seq       BIGINT NOT NULL,
    ts        BIGINT NOT NULL,
    sender    TEXT   NOT NULL,
    name      TEXT   NOT NULL,
    text      TEXT   NOT NULL,
    meta      TEXT,
    client_id TEXT,
    PRIMARY KEY (channel, seq)
);

-- `client_id` idempotency is checked inside the commit, under the channel's lock.
CREATE INDEX IF NOT EXISTS messages_client_id
    ON messages (channel, sender, client_id)
    WHERE client_id IS NOT NULL;
