-- Users banned through the server API: refused at hello until `until_ms` (NULL: until
-- unbanned).
CREATE TABLE IF NOT EXISTS bans (
    user_id  TEXT PRIMARY KEY NOT NULL,
    until_ms INTEGER,
    reason   TEXT NOT NULL DEFAULT ''
);
