CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('user', 'admin')),
    prefix      TEXT NOT NULL,
    key_hash    BLOB NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    revoked_at  INTEGER
);
-- A name points at one active key, so `llmgate keys revoke NAME` is unambiguous.
CREATE UNIQUE INDEX api_keys_active_name ON api_keys (name) WHERE revoked_at IS NULL;

CREATE TABLE usage_requests (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    at                INTEGER NOT NULL,
    key_id            TEXT NOT NULL,
    method            TEXT NOT NULL,
    path              TEXT NOT NULL,
    model             TEXT,
    status            INTEGER NOT NULL,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    latency_ms        INTEGER NOT NULL
);
CREATE INDEX usage_requests_key_at ON usage_requests (key_id, at);

-- Running totals, kept in the same transaction as the rows so reads stay cheap.
CREATE TABLE usage_totals (
    key_id                 TEXT PRIMARY KEY,
    requests               INTEGER NOT NULL,
    prompt_tokens          INTEGER NOT NULL,
    completion_tokens      INTEGER NOT NULL,
    requests_without_usage INTEGER NOT NULL,
    last_request_at        INTEGER
);

CREATE TABLE usage_endpoints (
    key_id   TEXT NOT NULL,
    path     TEXT NOT NULL,
    requests INTEGER NOT NULL,
    PRIMARY KEY (key_id, path)
);
