-- Chat state (protocol 1.1). Edits, deletes and reactions are entries of a channel's
-- seq stream, stored beside its messages: `kind` 0 message, 1 edit, 2 delete,
-- 3 reaction; `target` the seq of the message they act on; `emoji` and `react_on`
-- (1 on, 0 off) for reactions. A delete wipes the text and meta of its target and of
-- the target's edits and sets `deleted` on them (the tombstone history keeps).
ALTER TABLE messages ADD COLUMN kind INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN target INTEGER;
ALTER TABLE messages ADD COLUMN emoji TEXT;
ALTER TABLE messages ADD COLUMN react_on INTEGER;
ALTER TABLE messages ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;

-- The edits and reactions of a message (`history` with `current: true`).
CREATE INDEX IF NOT EXISTS messages_target
    ON messages (channel, target)
    WHERE target IS NOT NULL;

-- Per user and channel: the read position (never moves backwards) and whether the
-- channel is one of the user's (a room joined with `persist`, or any DM peer).
CREATE TABLE IF NOT EXISTS read_state (
    user_id  TEXT    NOT NULL,
    channel  TEXT    NOT NULL,
    read_seq INTEGER NOT NULL DEFAULT 0,
    member   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, channel)
) WITHOUT ROWID;

-- Direct-message pairs that exist already are both users' channels, read up to
-- their latest message (history from before the upgrade does not show as unread).
INSERT OR IGNORE INTO read_state (user_id, channel, read_seq, member)
    SELECT json_extract(substr(channel, 2), '$[0]'), channel, MAX(seq), 1
    FROM messages WHERE substr(channel, 1, 1) = '@' GROUP BY channel;
INSERT OR IGNORE INTO read_state (user_id, channel, read_seq, member)
    SELECT json_extract(substr(channel, 2), '$[1]'), channel, MAX(seq), 1
    FROM messages WHERE substr(channel, 1, 1) = '@' GROUP BY channel;

-- A DM peer's read position (the read receipt listed with the user's DMs).
CREATE INDEX IF NOT EXISTS read_state_channel ON read_state (channel);
