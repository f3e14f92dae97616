-- Webhooks (SERVER-API.md): the durable queue of events for the app's backend.
-- A row names a stored entry (message, edit or delete) by channel and seq; it is
-- written in the same transaction as the entry and deleted once the backend has
-- answered 2xx. `id` orders delivery and is the event's `event_id`.
CREATE TABLE IF NOT EXISTS webhook_queue (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    channel    TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);
