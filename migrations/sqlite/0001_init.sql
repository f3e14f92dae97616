-- Hubbub history schema (SQLite).
-- `channel` is '#<room>' for rooms and '@["<user a>","<user b>"]' (sorted) for direct
-- message pairs, so the two can never collide.
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS messages (
    channel   TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    ts        INTEGER NOT NULL,
    sender    TEXT    NOT NULL,
    name      TEXT    NOT NULL,
    text      TEXT    NOT NULL,
    meta      TEXT,
    client_id TEXT,
    PRIMARY KEY (channel, seq)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS messages_client_id
    ON messages (channel, ts)
    WHERE client_id IS NOT NULL;
