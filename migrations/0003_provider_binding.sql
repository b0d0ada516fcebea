-- Provider tokens are sealed with associated data that names the base URL
-- they may be sent to (format 2), besides their org and row (format 1).
-- Existing rows keep format 1 until the application re-seals them at start
-- (it holds the keys; SQL cannot). The default stays 1 so a row written by
-- an older replica during a rolling upgrade is labelled for what it is:
-- the serving code refuses format 1, the re-seal upgrades it.
ALTER TABLE provider_keys
    ADD COLUMN aad_version smallint NOT NULL DEFAULT 1
        CONSTRAINT provider_keys_aad_version_check CHECK (aad_version IN (1, 2));

-- The start-up re-seal looks for format-1 rows on every start.
CREATE INDEX provider_keys_legacy_aad_idx ON provider_keys (id) WHERE aad_version = 1;
