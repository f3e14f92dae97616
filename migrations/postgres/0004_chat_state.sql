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

-- Direct-message pairs that exist already are both users' channels, read up to
-- their latest message (history from before the upgrade does not show as unread).
INSERT INTO read_state (user_id, channel, read_seq, member)
    SELECT (substr(channel, 2)::json ->> 0), channel, MAX(seq), 1
    FROM messages WHERE substr(channel, 1, 1) = '@' GROUP BY channel
    ON CONFLICT DO NOTHING;
INSERT INTO read_state (user_id, channel, read_seq, member)
    SELECT (substr(channel, 2)::json ->> 1), channel, MAX(seq), 1
    FROM messages WHERE substr(channel, 1, 1) = '@' GROUP BY channel
    ON CONFLICT DO NOTHING;

-- A DM peer's read position (the read receipt listed with the user's DMs).
CREATE INDEX IF NOT EXISTS read_state_channel ON read_state (channel);
