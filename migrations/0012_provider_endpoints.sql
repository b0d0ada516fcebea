-- Several endpoints per provider, static extra headers and timeouts.
--
-- A provider key's own base_url and token are its first endpoint: the row
-- itself is that endpoint (its id is the endpoint's id) and carries its
-- weight. Its token is sealed with associated data naming this row and this
-- base URL, which SQL cannot re-seal, so it stays where it is; every
-- existing provider is an endpoint of weight 1 without any rewrite.
-- Further endpoints live in provider_endpoints, each token sealed to its own
-- row, org and base URL (in the endpoint format, which no provider_keys
-- ciphertext authenticates under, and the other way round).

-- A provider's timeouts: an object whose fields connect_ms, first_byte_ms
-- and total_ms are each absent, null (the gateway's setting) or an integer
-- from 1 to 600000. The application parses them into a type that cannot
-- hold a bad value (and checks their order); this keeps psql edits honest.
CREATE FUNCTION llmgw_timeouts_valid(t jsonb) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_typeof(t) = 'object'
        AND NOT EXISTS (
            SELECT 1 FROM jsonb_each(t) AS e(k, v)
            WHERE k NOT IN ('connect_ms', 'first_byte_ms', 'total_ms')
               OR NOT CASE
                   WHEN jsonb_typeof(v) = 'null' THEN true
                   WHEN jsonb_typeof(v) = 'number' AND (v #>> '{}') ~ '^[1-9][0-9]{0,5}$'
                       THEN (v #>> '{}')::integer <= 600000
                   ELSE false
               END)
$$;

ALTER TABLE provider_keys
    ADD COLUMN weight integer NOT NULL DEFAULT 1
        CONSTRAINT provider_keys_weight_check CHECK (weight BETWEEN 1 AND 1000),
    -- Static extra upstream headers: their names in plain text (the API
    -- shows them), name and value together sealed as one JSON object bound
    -- to the org and the row. The gateway sends what the ciphertext holds.
    ADD COLUMN header_names text[] NOT NULL DEFAULT '{}'
        CONSTRAINT provider_keys_header_names_check CHECK (
            cardinality(header_names) <= 32 AND array_position(header_names, NULL) IS NULL),
    ADD COLUMN headers_ciphertext bytea,
    ADD COLUMN headers_nonce bytea,
    ADD COLUMN headers_key_id integer,
    ADD CONSTRAINT provider_keys_headers_check CHECK (
        (headers_ciphertext IS NULL AND headers_nonce IS NULL AND headers_key_id IS NULL
            AND cardinality(header_names) = 0)
        -- IS NOT NULL spelled out: a NULL would make the whole check NULL, which passes.
        OR (headers_ciphertext IS NOT NULL AND headers_nonce IS NOT NULL AND headers_key_id IS NOT NULL
            AND octet_length(headers_ciphertext) > 16 AND octet_length(headers_nonce) = 12
            AND headers_key_id > 0 AND cardinality(header_names) > 0)),
    -- {"connect_ms","first_byte_ms","total_ms"}: see llmgw_timeouts_valid.
    ADD COLUMN timeouts jsonb NOT NULL DEFAULT '{}'::jsonb
        CONSTRAINT provider_keys_timeouts_check CHECK (llmgw_timeouts_valid(timeouts));

-- Rotation finds rows sealed under an old key by either column.
CREATE INDEX provider_keys_headers_key_id_idx ON provider_keys (headers_key_id)
    WHERE headers_key_id IS NOT NULL;

CREATE TABLE provider_endpoints (
    id               uuid PRIMARY KEY,
    org_id           uuid NOT NULL,
    provider_key_id  uuid NOT NULL,
    base_url         text NOT NULL CHECK ((base_url LIKE 'https://_%' OR base_url LIKE 'http://_%') AND base_url NOT LIKE '%/'),
    token_ciphertext bytea NOT NULL CHECK (octet_length(token_ciphertext) > 16),
    token_nonce      bytea NOT NULL CHECK (octet_length(token_nonce) = 12),
    key_id           integer NOT NULL CHECK (key_id > 0),
    -- Endpoints were never sealed without their URL: only the current format.
    aad_version      smallint NOT NULL DEFAULT 2 CHECK (aad_version = 2),
    token_hint       text NOT NULL CHECK (length(token_hint) <= 4),
    weight           integer NOT NULL DEFAULT 1 CHECK (weight BETWEEN 1 AND 1000),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- Same org as its provider; gone with it.
    CONSTRAINT provider_endpoints_provider_fkey FOREIGN KEY (provider_key_id, org_id)
        REFERENCES provider_keys (id, org_id) ON DELETE CASCADE
);
-- A provider's endpoints in the order they are listed (the gateway's read,
-- the cascade, the per-provider count).
CREATE INDEX provider_endpoints_provider_idx
    ON provider_endpoints (org_id, provider_key_id, created_at, id);
CREATE INDEX provider_endpoints_key_id_idx ON provider_endpoints (key_id);

-- Gateways cache a provider with all its endpoints: an endpoint change is
-- announced on the cache channel with the provider it belongs to (both,
-- should an UPDATE in SQL move it), so the provider is dropped.
CREATE FUNCTION llmgw_notify_endpoint() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    PERFORM pg_notify('llmgw_cache', json_build_object(
        'table', TG_TABLE_NAME, 'op', TG_OP, 'org_id', r.org_id, 'id', r.id,
        'provider_key_id', r.provider_key_id)::text);
    IF TG_OP = 'UPDATE' AND (OLD.provider_key_id, OLD.org_id) IS DISTINCT FROM (NEW.provider_key_id, NEW.org_id) THEN
        PERFORM pg_notify('llmgw_cache', json_build_object(
            'table', TG_TABLE_NAME, 'op', TG_OP, 'org_id', OLD.org_id, 'id', OLD.id,
            'provider_key_id', OLD.provider_key_id)::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER provider_endpoints_notify AFTER INSERT OR UPDATE OR DELETE ON provider_endpoints
    FOR EACH ROW EXECUTE FUNCTION llmgw_notify_endpoint();

-- Which endpoint answered (a provider_keys id for the provider's own, a
-- provider_endpoints id otherwise) and how many upstream attempts the
-- request took, retries and fallbacks included. NULL: not recorded (rows
-- written before these columns, or by a gateway that does not know them).
ALTER TABLE request_logs
    ADD COLUMN endpoint_id uuid,
    ADD COLUMN attempts smallint CONSTRAINT request_logs_attempts_check CHECK (attempts >= 1);
