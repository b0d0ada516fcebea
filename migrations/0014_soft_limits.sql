-- A soft threshold beside the limits: `limits.soft_limit_percent`, an
-- integer from 1 to 100 (absent or null: none). It limits nothing; the
-- settings API shows it and the alert webhook is called when usage reaches
-- it. The check accepts it from now on; every other rule is unchanged.
CREATE OR REPLACE FUNCTION llmgw_limits_valid(l jsonb) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT l IS NULL OR (
        jsonb_typeof(l) = 'object'
        AND NOT EXISTS (
            SELECT 1 FROM jsonb_each(l) AS e(k, v)
            WHERE jsonb_typeof(v) <> 'null' AND NOT CASE
                WHEN k IN ('requests_per_minute', 'tokens_per_minute', 'max_concurrent_requests',
                           'tokens_per_day', 'tokens_per_month')
                    THEN jsonb_typeof(v) = 'number' AND (v #>> '{}') ~ '^[0-9]+$'
                WHEN k = 'budget_per_month_usd'
                    THEN jsonb_typeof(v) = 'string' AND (v #>> '{}') ~ '^[0-9]+(\.[0-9]+)?$'
                WHEN k = 'soft_limit_percent'
                    -- Nested, so only digits are ever cast.
                    THEN CASE WHEN jsonb_typeof(v) = 'number' AND (v #>> '{}') ~ '^[0-9]{1,3}$'
                        THEN (v #>> '{}')::int BETWEEN 1 AND 100 ELSE false END
                ELSE false
            END
        )
    )
$$;
