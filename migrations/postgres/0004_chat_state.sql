-- Chat state (protocol 1.1), as in the SQLite schema: edits, deletes and reactions
-- are entries of a channel's seq stream (`kind` 0 message, 1 edit, 2 delete,
-- 3 reaction; `target` the seq they act on); a delete wipes its target's text.
ALTER TABLE messages ADD COLUMN IF NOT EXISTS kind SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS target BIGINT;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS emoji TEXT;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS react_on SMALLINT;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS deleted SMALLINT NOT NULL DEFAULT 0;

CREATE INDEX IF NOT EXISTS messages_target
    ON messages (channel, target)
    WHERE target IS NOT NULL;

-- Per user and channel: the read position (never backwards) and membership (a room
-- joined with `persist`, or any DM peer).
CREATE TABLE IF NOT EXISTS read_state (
    user_id  TEXT     NOT NULL,
    channel  TEXT     NOT NULL,
    read_seq BIGINT   NOT NULL DEFAULT 0,
    member   SMALLINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, channel)
);

-- A DM peer's read position (the read receipt listed with the user's DMs).
CREATE INDEX IF NOT EXISTS read_state_channel ON read_state (channel);
