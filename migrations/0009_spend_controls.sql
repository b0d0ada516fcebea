-- Spend controls: limits on API keys and organizations, model scoping of
-- API keys, prices per provider and model, and the cost of each usage row.
--
-- `limits` is an object whose fields are all optional (absent or null: no
-- limit): requests_per_minute, tokens_per_minute, max_concurrent_requests,
-- tokens_per_day, tokens_per_month (integers >= 0) and budget_per_month_usd
-- (a decimal string, never a float). The application parses it into a type
-- that cannot hold a bad value; the checks here keep psql edits honest.
CREATE FUNCTION llmgw_limits_valid(l jsonb) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
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
                ELSE false
            END
        )
    )
$$;

ALTER TABLE api_keys
    ADD COLUMN limits jsonb NOT NULL DEFAULT '{}'::jsonb
        CONSTRAINT api_keys_limits_check CHECK (llmgw_limits_valid(limits)),
    -- NULL: every model; an empty array: none.
    ADD COLUMN allowed_models text[]
        CONSTRAINT api_keys_allowed_models_check CHECK (
            allowed_models IS NULL
            OR (cardinality(allowed_models) <= 100
                AND array_position(allowed_models, NULL) IS NULL));

ALTER TABLE organizations
    ADD COLUMN limits jsonb NOT NULL DEFAULT '{}'::jsonb
        CONSTRAINT organizations_limits_check CHECK (llmgw_limits_valid(limits));

-- [{"model": "llama-3-8b" | "pattern*" | "*", "input_per_million_usd": "0.10",
--   "output_per_million_usd": "0.20"}]; amounts are decimal strings.
ALTER TABLE provider_keys
    ADD COLUMN prices jsonb NOT NULL DEFAULT '[]'::jsonb
        CONSTRAINT provider_keys_prices_check CHECK (jsonb_typeof(prices) = 'array');

-- NULL: no price applied (none set, or no token counts known).
ALTER TABLE request_logs
    ADD COLUMN cost_usd numeric CONSTRAINT request_logs_cost_usd_check CHECK (cost_usd >= 0);

-- Gateways cache limits and model scopes: a change to them must reach every
-- replica as fast as a revocation does. last_used_at still does not notify.
DROP TRIGGER api_keys_notify ON api_keys;
CREATE TRIGGER api_keys_notify
    AFTER INSERT OR DELETE OR UPDATE OF digest, org_id, name, expires_at, revoked_at, limits, allowed_models
    ON api_keys
    FOR EACH ROW EXECUTE FUNCTION llmgw_notify_cache();

-- Organizations have no org_id column: the payload names the org twice.
CREATE FUNCTION llmgw_notify_org() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    PERFORM pg_notify('llmgw_cache', json_build_object(
        'table', TG_TABLE_NAME, 'op', TG_OP, 'org_id', r.id, 'id', r.id)::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER organizations_notify AFTER UPDATE OF limits ON organizations
    FOR EACH ROW EXECUTE FUNCTION llmgw_notify_org();
