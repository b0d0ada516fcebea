-- llmgw initial schema. Every tenant-owned table carries org_id; constraints
-- live here so the database refuses what application code forgot.

CREATE TABLE users (
    id            uuid PRIMARY KEY,
    email         text NOT NULL CHECK (length(email) BETWEEN 3 AND 320 AND email LIKE '%_@_%'),
    password_hash text NOT NULL CHECK (password_hash LIKE '$argon2id$%'),
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));

CREATE TABLE organizations (
    id         uuid PRIMARY KEY,
    name       text NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE memberships (
    org_id     uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role       text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, user_id)
);
CREATE INDEX memberships_user_idx ON memberships (user_id);

CREATE TABLE sessions (
    id           uuid PRIMARY KEY,
    token_digest bytea NOT NULL UNIQUE CHECK (octet_length(token_digest) = 32),
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX sessions_user_idx ON sessions (user_id);

CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    org_id       uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    name         text NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 200),
    digest       bytea NOT NULL UNIQUE CHECK (octet_length(digest) = 32),
    prefix       text NOT NULL CHECK (prefix LIKE 'llmgw\_%'),
    created_by   uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz
);
CREATE INDEX api_keys_org_idx ON api_keys (org_id, created_at DESC, id DESC);

CREATE TABLE provider_keys (
    id               uuid PRIMARY KEY,
    org_id           uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    name             text NOT NULL CHECK ((name COLLATE "C") ~ '^[a-z]+$' AND length(name) <= 64),
    base_url         text NOT NULL CHECK (base_url LIKE 'https://_%' AND base_url NOT LIKE '%/'),
    token_ciphertext bytea NOT NULL CHECK (octet_length(token_ciphertext) > 16),
    token_nonce      bytea NOT NULL CHECK (octet_length(token_nonce) = 12),
    key_id           integer NOT NULL CHECK (key_id > 0),
    token_hint       text NOT NULL CHECK (length(token_hint) <= 4),
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT provider_keys_org_name_key UNIQUE (org_id, name)
);
CREATE INDEX provider_keys_key_id_idx ON provider_keys (key_id);

-- Usage rows are historical facts: they keep the ids of keys that were later
-- deleted, so they carry no foreign keys to api_keys/provider_keys. The
-- primary key includes created_at so the table can become a range-partitioned
-- table (PARTITION BY RANGE (created_at)) without changing its key.
CREATE TABLE request_logs (
    id                uuid NOT NULL,
    request_id        text NOT NULL CHECK (length(request_id) <= 200),
    org_id            uuid NOT NULL,
    api_key_id        uuid,
    provider_key_id   uuid,
    provider_name     text,
    requested_model   text,
    upstream_model    text,
    status_code       smallint NOT NULL CHECK (status_code BETWEEN 100 AND 599),
    streamed          boolean NOT NULL DEFAULT false,
    canceled          boolean NOT NULL DEFAULT false,
    prompt_tokens     bigint CHECK (prompt_tokens >= 0),
    completion_tokens bigint CHECK (completion_tokens >= 0),
    total_tokens      bigint CHECK (total_tokens >= 0),
    latency_ms        integer NOT NULL CHECK (latency_ms >= 0),
    ttfb_ms           integer CHECK (ttfb_ms >= 0),
    error_class       text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, created_at)
);
CREATE INDEX request_logs_org_time_idx ON request_logs (org_id, created_at DESC, id DESC);

CREATE TABLE audit_log (
    id            uuid PRIMARY KEY,
    org_id        uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    actor_user_id uuid REFERENCES users (id) ON DELETE SET NULL,
    action        text NOT NULL,
    target_type   text NOT NULL,
    target_id     uuid,
    details       jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_org_time_idx ON audit_log (org_id, created_at DESC, id DESC);

-- Cache invalidation for gateways: every change to a provider or an API key
-- (whoever makes it: the API, the CLI, or an operator in psql) is announced on
-- channel `llmgw_cache` with payload {"table","op","org_id","id"}.
CREATE FUNCTION llmgw_notify_cache() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    PERFORM pg_notify('llmgw_cache', json_build_object(
        'table', TG_TABLE_NAME, 'op', TG_OP, 'org_id', r.org_id, 'id', r.id)::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER provider_keys_notify AFTER INSERT OR UPDATE OR DELETE ON provider_keys
    FOR EACH ROW EXECUTE FUNCTION llmgw_notify_cache();
-- last_used_at changes on every request batch and does not affect auth.
CREATE TRIGGER api_keys_notify AFTER INSERT OR DELETE OR UPDATE OF digest, org_id, expires_at, revoked_at ON api_keys
    FOR EACH ROW EXECUTE FUNCTION llmgw_notify_cache();
