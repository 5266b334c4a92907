-- The same as SQLite's 0004_models.sql.
-- Usage per key and model, kept like usage_endpoints: in the same transaction as the
-- rows. A request that named no model (or an empty one) counts under 'none'; a key keeps
-- at most 100 models apart (MAX_MODELS_PER_KEY), the rest count under 'other'.
CREATE TABLE usage_models (
    key_id                 TEXT NOT NULL,
    model                  TEXT NOT NULL,
    requests               BIGINT NOT NULL,
    prompt_tokens          BIGINT NOT NULL,
    completion_tokens      BIGINT NOT NULL,
    requests_without_usage BIGINT NOT NULL,
    PRIMARY KEY (key_id, model)
);

-- Past requests, from their rows, so that an upgraded gateway shows its history split by
-- model: each key's 100 most requested models apart, the rest as 'other'. A token count
-- no request can have (negative, or above MAX_TOKENS_PER_REQUEST) is unknown, as when
-- the rows are read back.
INSERT INTO usage_models
    (key_id, model, requests, prompt_tokens, completion_tokens, requests_without_usage)
SELECT k.name,
       CASE WHEN ranked.n <= 100 THEN ranked.model ELSE 'other' END,
       SUM(ranked.requests), SUM(ranked.prompt_tokens), SUM(ranked.completion_tokens),
       SUM(ranked.requests_without_usage)
FROM (
    SELECT per_model.*,
           ROW_NUMBER() OVER (PARTITION BY per_model.key
                              ORDER BY per_model.requests DESC, per_model.model) AS n
    FROM (
        SELECT r.key,
               COALESCE(NULLIF(mo.name, ''), 'none') AS model,
               COUNT(*) AS requests,
               SUM(CASE WHEN r.prompt_tokens BETWEEN 0 AND 1000000000
                        THEN r.prompt_tokens ELSE 0 END) AS prompt_tokens,
               SUM(CASE WHEN r.completion_tokens BETWEEN 0 AND 1000000000
                        THEN r.completion_tokens ELSE 0 END) AS completion_tokens,
               SUM(CASE WHEN r.prompt_tokens BETWEEN 0 AND 1000000000
                         AND r.completion_tokens BETWEEN 0 AND 1000000000
                        THEN 0 ELSE 1 END) AS requests_without_usage
        FROM usage_rows r
        LEFT JOIN usage_names mo ON mo.id = r.model
        GROUP BY r.key, COALESCE(NULLIF(mo.name, ''), 'none')
    ) per_model
) ranked
JOIN usage_names k ON k.id = ranked.key
GROUP BY k.name, CASE WHEN ranked.n <= 100 THEN ranked.model ELSE 'other' END;

-- Model settings an admin changed at run time, over the configuration file's: the
-- ModelConfig as JSON, or NULL for a model an admin removed (so that it stays removed).
CREATE TABLE model_settings (
    name       TEXT PRIMARY KEY,
    settings   TEXT,
    updated_at BIGINT NOT NULL
);
