-- The same model as the SQLite schema, for several gateway replicas sharing one database.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('user', 'admin')),
    prefix      TEXT NOT NULL,
    key_hash    BYTEA NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT,
    revoked_at  BIGINT
);
CREATE UNIQUE INDEX api_keys_active_name ON api_keys (name) WHERE revoked_at IS NULL;

CREATE TABLE usage_requests (
    id                BIGSERIAL PRIMARY KEY,
    at                BIGINT NOT NULL,
    key_id            TEXT NOT NULL,
    method            TEXT NOT NULL,
    path              TEXT NOT NULL,
    model             TEXT,
    status            BIGINT NOT NULL,
    prompt_tokens     BIGINT,
    completion_tokens BIGINT,
    latency_ms        BIGINT NOT NULL,
    first_byte_ms     BIGINT
);
CREATE INDEX usage_requests_key_at ON usage_requests (key_id, at);

CREATE TABLE usage_totals (
    key_id                 TEXT PRIMARY KEY,
    requests               BIGINT NOT NULL,
    prompt_tokens          BIGINT NOT NULL,
    completion_tokens      BIGINT NOT NULL,
    requests_without_usage BIGINT NOT NULL,
    last_request_at        BIGINT
);

CREATE TABLE usage_endpoints (
    key_id   TEXT NOT NULL,
    path     TEXT NOT NULL,
    requests BIGINT NOT NULL,
    PRIMARY KEY (key_id, path)
);
