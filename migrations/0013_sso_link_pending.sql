-- Account links in progress: after a single sign-on callback finds an
-- existing account with the issuer's verified email, the page that asks for
-- that account's password may be answered by any API replica. A row is keyed
-- by the SHA-256 of the link token (the value itself only travels in the
-- form), names the account and the identity to link to it, and holds the
-- SHA-256 of the browser id cookie (`llmgw_oidc`) of the browser that signed
-- in, the only one that may answer. Each password tried is counted first
-- with UPDATE … SET attempts = attempts + 1 … RETURNING, which refuses past
-- the application's limit; the row is deleted when the password is right
-- (in the transaction that links the identity, so a link works once) or the
-- last attempt was wrong. Expired rows are refused and pruned by the next
-- callback that adds one, which also refuses to add rows past the
-- application's cap.
CREATE TABLE sso_link_pending (
    link_digest    bytea PRIMARY KEY CHECK (octet_length(link_digest) = 32),
    user_id        uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    issuer         text NOT NULL CHECK (length(issuer) BETWEEN 1 AND 2048),
    subject        text NOT NULL CHECK (length(subject) BETWEEN 1 AND 255),
    -- The account's email, for the form and the per-email throttle.
    email          text NOT NULL CHECK (length(email) BETWEEN 3 AND 320),
    browser_digest bytea NOT NULL CHECK (octet_length(browser_digest) = 32),
    attempts       smallint NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    CONSTRAINT sso_link_pending_expiry_check CHECK (expires_at > created_at)
);
-- For pruning and for counting the rows still live.
CREATE INDEX sso_link_pending_expires_idx ON sso_link_pending (expires_at);
