-- A key's own limits: KeyLimits as JSON, NULL when it sets none (then the configured
-- defaults apply).
ALTER TABLE api_keys ADD COLUMN limits TEXT;
-- The secret a key had before its last rotation, and until when (ms) it still works.
ALTER TABLE api_keys ADD COLUMN previous_hash BLOB;
ALTER TABLE api_keys ADD COLUMN previous_valid_until INTEGER;
CREATE INDEX api_keys_previous_hash ON api_keys (previous_hash)
    WHERE previous_hash IS NOT NULL;

-- The end user a request was for (one of the people sharing a key), an id in
-- usage_names; NULL when the client did not say. Indexed for a token quota's start:
-- the sum of an end user's tokens since the period began.
ALTER TABLE usage_rows ADD COLUMN end_user INTEGER;
CREATE INDEX usage_rows_key_end_user_at ON usage_rows (key, end_user, at)
    WHERE end_user IS NOT NULL;

DROP VIEW usage_requests;
CREATE VIEW usage_requests AS
SELECT r.id, r.at, k.name AS key_id, m.name AS method, p.name AS path, mo.name AS model,
       r.status, r.prompt_tokens, r.completion_tokens, r.latency_ms, r.first_byte_ms,
       eu.name AS end_user
FROM usage_rows r
JOIN usage_names k ON k.id = r.key
JOIN usage_names m ON m.id = r.method
JOIN usage_names p ON p.id = r.path
LEFT JOIN usage_names mo ON mo.id = r.model
LEFT JOIN usage_names eu ON eu.id = r.end_user;

-- Usage per key and end user, kept like usage_models: in the same transaction as the
-- rows. A key keeps at most 1000 end users apart (MAX_END_USERS_PER_KEY), the rest
-- count under 'other'; requests without an end user are not in it.
CREATE TABLE usage_end_users (
    key_id                 TEXT NOT NULL,
    end_user               TEXT NOT NULL,
    requests               INTEGER NOT NULL,
    prompt_tokens          INTEGER NOT NULL,
    completion_tokens      INTEGER NOT NULL,
    requests_without_usage INTEGER NOT NULL,
    PRIMARY KEY (key_id, end_user)
);
