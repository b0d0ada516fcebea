-- Which provider created each Responses API object, per organization, so
-- that follow-ups (`GET|DELETE /v1/responses/{id}`, `/cancel`,
-- `/input_items`), which name no model, reach the same provider. Written by
-- the gateway when a `POST /v1/responses` answer carries an `id`.
-- The provider must belong to the same organization: the foreign key is on
-- (provider_key_id, org_id), which needs that pair to be unique.
ALTER TABLE provider_keys ADD CONSTRAINT provider_keys_id_org_key UNIQUE (id, org_id);

CREATE TABLE response_routes (
    org_id          uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    response_id     text NOT NULL CHECK (length(response_id) BETWEEN 1 AND 256),
    provider_key_id uuid NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, response_id),
    CONSTRAINT response_routes_provider_fkey FOREIGN KEY (provider_key_id, org_id)
        REFERENCES provider_keys (id, org_id) ON DELETE CASCADE
);
-- For the cascade from provider_keys, and for pruning old routes by age.
CREATE INDEX response_routes_provider_idx ON response_routes (provider_key_id);
CREATE INDEX response_routes_created_idx ON response_routes (created_at);
