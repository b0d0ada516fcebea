-- Single sign-on identities: one row per (issuer, subject) an OpenID provider
-- vouches for, pointing at the llmgw account it signs in. Accounts made on a
-- first SSO sign-in keep users.password_hash NOT NULL with the hash of a
-- random secret nobody knows, so password login cannot succeed for them and
-- every reader of users stays unchanged.
CREATE TABLE oidc_identities (
    issuer        text NOT NULL CHECK (length(issuer) BETWEEN 1 AND 2048),
    subject       text NOT NULL CHECK (length(subject) BETWEEN 1 AND 255),
    user_id       uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- The email the issuer gave at the last sign-in, for operators.
    email         text CHECK (length(email) <= 320),
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_login_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (issuer, subject)
);
CREATE INDEX oidc_identities_user_idx ON oidc_identities (user_id);
