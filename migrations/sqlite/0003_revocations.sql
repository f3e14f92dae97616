-- Revoked tokens (server API): key 'j:<jti>' (one token) or 'u:<user>' (every token
-- of the user issued before issued_before, Unix seconds). Kept until keep_until_ms,
-- when the tokens it names have expired anyway.
CREATE TABLE IF NOT EXISTS revocations (
    key           TEXT PRIMARY KEY NOT NULL,
    issued_before INTEGER,
    keep_until_ms INTEGER NOT NULL
);
