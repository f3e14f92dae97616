-- Webhooks (SERVER-API.md): the durable queue of events for the app's backend.
-- A row names a stored entry (message, edit or delete) by channel and seq, written
-- in the same transaction as the entry, or carries a presence event in `body`
-- (`member` join/leave, `user` online/offline; `seq` 0); deleted once the
-- backend has answered 2xx. `id` orders delivery and is the event's `event_id`.
CREATE TABLE IF NOT EXISTS webhook_queue (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    channel    TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    body       TEXT,
    created_ms INTEGER NOT NULL
);
