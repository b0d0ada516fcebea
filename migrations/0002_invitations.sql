-- Members are invited, not added: an invitation names an email and a role
-- and is accepted by the signed-in owner of that email with a one-time token,
-- stored here only as its SHA-256 digest. A row exists while the invitation
-- is pending; accepting or cancelling it deletes the row (the audit log keeps
-- the history).
CREATE TABLE invitations (
    id           uuid PRIMARY KEY,
    org_id       uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    email        text NOT NULL CHECK (length(email) BETWEEN 3 AND 320 AND email LIKE '%_@_%'),
    role         text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    token_digest bytea NOT NULL UNIQUE CHECK (octet_length(token_digest) = 32),
    invited_by   uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    CHECK (expires_at > created_at)
);
-- One pending invitation per address and organization.
CREATE UNIQUE INDEX invitations_org_email_key ON invitations (org_id, lower(email));
-- GET /me/invitations looks invitations up by the signed-in user's email.
CREATE INDEX invitations_email_idx ON invitations (lower(email));

-- Removal revokes (or transfers) the keys a member created: find them by creator.
CREATE INDEX api_keys_org_creator_idx ON api_keys (org_id, created_by) WHERE revoked_at IS NULL;
