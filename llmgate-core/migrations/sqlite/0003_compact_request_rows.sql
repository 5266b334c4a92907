-- Request rows name their key, method, path and model by number, from one table of
-- names: a row and its index entry are a fraction of the size, and writing a row binds
-- no text. `usage_requests` stays, as a view with the columns it had.
CREATE TABLE usage_names (
    id   INTEGER PRIMARY KEY,
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
    id                INTEGER PRIMARY KEY,
    at                INTEGER NOT NULL,
    key               INTEGER NOT NULL,
    method            INTEGER NOT NULL,
    path              INTEGER NOT NULL,
    model             INTEGER,
    status            INTEGER NOT NULL,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    latency_ms        INTEGER NOT NULL,
    first_byte_ms     INTEGER
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
