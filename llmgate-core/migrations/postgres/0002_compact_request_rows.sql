-- The shape of the SQLite schema: request rows name their key, method, path and model
-- by number, from one table of names, so that a row and its index entry are a fraction
-- of the size and writing a row binds no text. `usage_requests` stays, as a view with
-- the columns it had.
CREATE TABLE usage_names (
    id   BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
INSERT INTO usage_names (name)
    SELECT key_id FROM usage_requests
    UNION SELECT method FROM usage_requests
    UNION SELECT path FROM usage_requests
    UNION SELECT model FROM usage_requests WHERE model IS NOT NULL;

-- key, method, path and model are ids in usage_names (not declared as foreign keys, so
-- that an insert does not look each one up again).
CREATE TABLE usage_rows (
    id                BIGSERIAL PRIMARY KEY,
    at                BIGINT NOT NULL,
    key               BIGINT NOT NULL,
    method            BIGINT NOT NULL,
    path              BIGINT NOT NULL,
    model             BIGINT,
    status            BIGINT NOT NULL,
    prompt_tokens     BIGINT,
    completion_tokens BIGINT,
    latency_ms        BIGINT NOT NULL,
    first_byte_ms     BIGINT
);
INSERT INTO usage_rows
    (id, at, key, method, path, model, status, prompt_tokens, completion_tokens, latency_ms, first_byte_ms)
SELECT r.id, r.at, k.id, m.id, p.id, mo.id, r.status, r.prompt_tokens, r.completion_tokens,
       r.latency_ms, r.first_byte_ms
FROM usage_requests r
JOIN usage_names k ON k.name = r.key_id
JOIN usage_names m ON m.name = r.method
JOIN usage_names p ON p.name = r.path
LEFT JOIN usage_names mo ON mo.name = r.model;
-- The rows kept their ids: new ones continue after them.
SELECT setval(pg_get_serial_sequence('usage_rows', 'id'), COALESCE(MAX(id), 0) + 1, false)
FROM usage_rows;
DROP TABLE usage_requests;
CREATE INDEX usage_rows_key_at ON usage_rows (key, at);

CREATE VIEW usage_requests AS
SELECT r.id, r.at, k.name AS key_id, m.name AS method, p.name AS path, mo.name AS model,
       r.status, r.prompt_tokens, r.completion_tokens, r.latency_ms, r.first_byte_ms
FROM usage_rows r
JOIN usage_names k ON k.id = r.key
JOIN usage_names m ON m.id = r.method
JOIN usage_names p ON p.id = r.path
LEFT JOIN usage_names mo ON mo.id = r.model;
