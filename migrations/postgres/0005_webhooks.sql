-- Webhooks (SERVER-API.md): the durable queue of events for the app's backend,
-- written in the same transaction as the entries it names, delivered by one node
-- (the holder of an advisory lock), deleted once the backend answered 2xx.
CREATE TABLE IF NOT EXISTS webhook_queue (
    id         BIGSERIAL PRIMARY KEY,
    channel    TEXT   NOT NULL,
    seq        BIGINT NOT NULL,
    body       TEXT,
    created_ms BIGINT NOT NULL
);
