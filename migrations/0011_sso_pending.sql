-- Single sign-on flows in progress: what `GET /api/v1/auth/oidc/start` keeps
-- for the issuer's callback, which may reach any API replica. A row is keyed
-- by the SHA-256 of the flow's `state` (the value itself only travels in the
-- browser's URLs), holds the ID token's expected nonce, the PKCE verifier and
-- the SHA-256 of the browser id cookie (`llmgw_oidc`) that binds the flow to
-- the browser that started it. The callback takes it with DELETE … RETURNING,
-- so a state works once; an expired row is refused and pruned by the next
-- start, which also refuses to add rows past the application's cap.
CREATE TABLE sso_pending (
    state_digest   bytea PRIMARY KEY CHECK (octet_length(state_digest) = 32),
    nonce          text NOT NULL CHECK (length(nonce) BETWEEN 1 AND 255),
    -- RFC 7636: 43 to 128 characters.
    pkce_verifier  text NOT NULL CHECK (length(pkce_verifier) BETWEEN 43 AND 128),
    browser_digest bytea NOT NULL CHECK (octet_length(browser_digest) = 32),
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    CONSTRAINT sso_pending_expiry_check CHECK (expires_at > created_at)
);
-- For pruning and for counting the rows still live.
CREATE INDEX sso_pending_expires_idx ON sso_pending (expires_at);
