-- `request_logs` becomes range-partitioned by day (UTC), and hourly rollups
-- (`usage_hourly`) are kept beside it for the usage API.
--
-- Expand/contract: `request_logs` keeps its name, columns, defaults and
-- checks, so a binary of the previous release still inserts into it by
-- column name and reads it; the rollups are written by a trigger, whoever
-- inserts.
--
-- The conversion copies no row: the existing table is renamed to
-- `request_logs_before_YYYYMMDD` and attached as the partition of every
-- time before that day, behind a CHECK that makes the attach skip its scan.
-- Every replica runs migrations at start: the migration runs in one
-- transaction under an advisory lock, and writers wait for it: about 7 s
-- per million existing rows on a 2-core machine, mostly their rollups.

SELECT pg_advisory_xact_lock(hashtext('llmgw:request_logs'));

-- Latency histograms: 128 buckets. Bucket 0 holds latencies below 1 ms;
-- bucket k (1..127) holds [1.12^(k-1), 1.12^k) ms, bucket 127 everything
-- from 1.12^126 ms (about 26 minutes) on. A bucket's representative value is
-- its geometric middle, within 6 % of any latency in it.
CREATE FUNCTION llmgw_latency_bucket(ms integer) RETURNS integer
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $f$
    SELECT CASE WHEN ms < 1 THEN 0
                ELSE least(127, 1 + floor(ln(ms::float8) / ln(1.12::float8))::integer) END
$f$;

-- The representative latency of bucket `b`, milliseconds.
CREATE FUNCTION llmgw_latency_of_bucket(b integer) RETURNS float8
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $f$
    SELECT CASE WHEN b <= 0 THEN 0 ELSE power(1.12::float8, b - 0.5) END
$f$;

CREATE FUNCTION llmgw_histogram_step(h integer[], ms integer) RETURNS integer[]
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    b integer;
BEGIN
    IF ms IS NULL THEN
        RETURN h;
    END IF;
    b := llmgw_latency_bucket(ms) + 1;
    h[b] := h[b] + 1;
    RETURN h;
END;
$$;

CREATE FUNCTION llmgw_histogram_put(h integer[], bucket integer, n bigint) RETURNS integer[]
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF bucket IS NULL OR n IS NULL THEN
        RETURN h;
    END IF;
    h[bucket + 1] := h[bucket + 1] + n;
    RETURN h;
END;
$$;

-- Element-wise sum of two histograms, integer[] or bigint[] alike (upserts
-- of rollups, sums of rollups, parallel aggregation).
CREATE FUNCTION llmgw_histogram_add(a anyarray, b anyarray) RETURNS anyarray
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF a IS NULL THEN
        RETURN b;
    ELSIF b IS NULL THEN
        RETURN a;
    END IF;
    FOR i IN 1..128 LOOP
        a[i] := a[i] + b[i];
    END LOOP;
    RETURN a;
END;
$$;

-- The histogram of a set of latencies (ms).
CREATE AGGREGATE llmgw_histogram(integer) (
    SFUNC = llmgw_histogram_step,
    STYPE = integer[],
    INITCOND = '{0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0}',
    COMBINEFUNC = llmgw_histogram_add,
    PARALLEL = SAFE
);

CREATE FUNCTION llmgw_histogram_sum_step(acc bigint[], h integer[]) RETURNS bigint[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $f$
    SELECT llmgw_histogram_add(acc, h::bigint[])
$f$;

-- The histogram of (bucket, count) pairs: what the hot paths build, so
-- that the rows are counted by native aggregation and only each bucket
-- that holds some goes through this function.
CREATE AGGREGATE llmgw_histogram_of(integer, bigint) (
    SFUNC = llmgw_histogram_put,
    STYPE = integer[],
    INITCOND = '{0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0}',
    COMBINEFUNC = llmgw_histogram_add,
    PARALLEL = SAFE
);

-- The sum of many histograms, in bigint (a month of a busy key's hours
-- passes 2^31 requests).
CREATE AGGREGATE llmgw_histogram_sum(integer[]) (
    SFUNC = llmgw_histogram_sum_step,
    STYPE = bigint[],
    COMBINEFUNC = llmgw_histogram_add,
    PARALLEL = SAFE
);

-- Quantile `q` (0..1) of a histogram, as percentile_cont computes it over
-- the latencies (interpolating between the two nearest ranks), each latency
-- taken as its bucket's representative: within 6 % of the exact value.
-- NULL for an empty histogram.
CREATE FUNCTION llmgw_histogram_quantile(h bigint[], q float8) RETURNS float8
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    total bigint := 0;
    rank float8;
    lo_rank bigint;
    hi_rank bigint;
    seen bigint := 0;
    lo float8;
    hi float8;
BEGIN
    FOR i IN 1..128 LOOP
        total := total + h[i];
    END LOOP;
    IF total = 0 THEN
        RETURN NULL;
    END IF;
    -- 1-based rank of the quantile among the sorted latencies.
    rank := 1 + greatest(0, least(1, q)) * (total - 1);
    lo_rank := floor(rank)::bigint;
    hi_rank := ceil(rank)::bigint;
    FOR i IN 1..128 LOOP
        seen := seen + h[i];
        IF lo IS NULL AND seen >= lo_rank THEN
            lo := llmgw_latency_of_bucket(i - 1);
        END IF;
        IF seen >= hi_rank THEN
            hi := llmgw_latency_of_bucket(i - 1);
            EXIT;
        END IF;
    END LOOP;
    RETURN lo + (rank - lo_rank) * (hi - lo);
END;
$$;

-- What the usage sums call an error, and an answered request without token
-- counts: one definition for the rollups and for reads of raw rows.
CREATE FUNCTION llmgw_is_error(status_code smallint, error_class text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $f$
    SELECT status_code >= 400 OR error_class IS NOT NULL
$f$;

CREATE FUNCTION llmgw_without_usage(status_code smallint, prompt_tokens bigint,
        completion_tokens bigint, total_tokens bigint) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $f$
    SELECT status_code < 400 AND prompt_tokens IS NULL
        AND completion_tokens IS NULL AND total_tokens IS NULL
$f$;

-- Usage per hour (UTC) and (org, API key, provider, requested model,
-- endpoint). A NULL dimension of the rows is stored as the nil UUID or ''
-- so that it can be part of the key; readers turn them back into NULL.
CREATE TABLE usage_hourly (
    org_id            uuid NOT NULL,
    hour              timestamptz NOT NULL CHECK (date_trunc('hour', hour, 'UTC') = hour),
    api_key_id        uuid NOT NULL,
    provider_name     text NOT NULL,
    requested_model   text NOT NULL,
    endpoint          text NOT NULL,
    requests          bigint NOT NULL CHECK (requests >= 0),
    errors            bigint NOT NULL CHECK (errors >= 0),
    without_usage     bigint NOT NULL CHECK (without_usage >= 0),
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    total_tokens      bigint NOT NULL,
    cost_usd          numeric NOT NULL,
    -- llmgw_histogram of the rows' latency_ms.
    latency           integer[] NOT NULL CHECK (cardinality(latency) = 128),
    PRIMARY KEY (org_id, hour, api_key_id, provider_name, requested_model, endpoint)
) WITH (fillfactor = 70);

-- The statement that adds the rows of `source` (a relation with
-- request_logs' columns) to usage_hourly. The keys are taken in the primary
-- key's order, so replicas writing at once wait for each other and never
-- deadlock. Shared by the insert trigger (which cannot hand its transition
-- table to another function, so it executes this text) and the backfill.
CREATE FUNCTION llmgw_roll_up_statement(source text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $f$
    SELECT format($s$
INSERT INTO usage_hourly AS u (org_id, hour, api_key_id, provider_name, requested_model, endpoint,
        requests, errors, without_usage, prompt_tokens, completion_tokens, total_tokens,
        cost_usd, latency)
SELECT org_id, hour, api_key_id, provider_name, requested_model, endpoint,
       sum(requests), sum(errors), sum(without_usage), sum(prompt_tokens)::bigint,
       sum(completion_tokens)::bigint, sum(total_tokens)::bigint, sum(cost_usd),
       llmgw_histogram_of(bucket, requests)
FROM (
    SELECT org_id, date_trunc('hour', created_at, 'UTC') AS hour,
           coalesce(api_key_id, '00000000-0000-0000-0000-000000000000'::uuid) AS api_key_id,
           coalesce(provider_name, '') AS provider_name,
           coalesce(requested_model, '') AS requested_model,
           coalesce(endpoint, '') AS endpoint,
           llmgw_latency_bucket(latency_ms) AS bucket,
           count(*) AS requests,
           count(*) FILTER (WHERE llmgw_is_error(status_code, error_class)) AS errors,
           count(*) FILTER (WHERE llmgw_without_usage(status_code, prompt_tokens,
               completion_tokens, total_tokens)) AS without_usage,
           coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
           coalesce(sum(completion_tokens), 0) AS completion_tokens,
           coalesce(sum(total_tokens), 0) AS total_tokens,
           coalesce(sum(cost_usd), 0) AS cost_usd
    FROM %s
    GROUP BY 1, 2, 3, 4, 5, 6, 7
) per_bucket
GROUP BY 1, 2, 3, 4, 5, 6
ORDER BY 1, 2, 3, 4, 5, 6
ON CONFLICT (org_id, hour, api_key_id, provider_name, requested_model, endpoint) DO UPDATE SET
    requests = u.requests + EXCLUDED.requests,
    errors = u.errors + EXCLUDED.errors,
    without_usage = u.without_usage + EXCLUDED.without_usage,
    prompt_tokens = u.prompt_tokens + EXCLUDED.prompt_tokens,
    completion_tokens = u.completion_tokens + EXCLUDED.completion_tokens,
    total_tokens = u.total_tokens + EXCLUDED.total_tokens,
    cost_usd = u.cost_usd + EXCLUDED.cost_usd,
    latency = llmgw_histogram_add(u.latency, EXCLUDED.latency)
$s$, source)
$f$;

-- Rolls up the rows one INSERT statement inserted (not those ON CONFLICT
-- skipped), in that statement's transaction: a batch that rolls back or is
-- retried never counts twice.
CREATE FUNCTION llmgw_roll_up_inserted() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE llmgw_roll_up_statement('inserted');
    RETURN NULL;
END;
$$;

-- Creates and attaches the partition of one UTC day when missing; false
-- when it exists or another partition (the one of the rows before
-- partitioning) already covers the day. The table is created first and
-- attached after, so writers are not held up. Also called by the writer for
-- the days of rows that found no partition (a gateway's clock far off, or
-- rows held through a long outage).
CREATE FUNCTION llmgw_create_log_partition(day date) RETURNS boolean
    LANGUAGE plpgsql AS $$
DECLARE
    name text := 'request_logs_' || to_char(day, 'YYYYMMDD');
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('llmgw:request_logs'));
    IF to_regclass(quote_ident(name)) IS NOT NULL THEN
        RETURN false;
    END IF;
    BEGIN
        EXECUTE format('CREATE TABLE %I (LIKE request_logs INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', name);
        EXECUTE format('ALTER TABLE request_logs ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
            name, day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
    EXCEPTION WHEN invalid_object_definition THEN
        -- "would overlap partition": the day is already covered.
        RETURN false;
    END;
    RETURN true;
END;
$$;

-- The partitions of the days from `back` days ago to `ahead` days on (UTC):
-- rows carry the gateways' clocks and arrive late after an outage. Returns
-- how many were made. Called by every replica at start and hourly.
CREATE FUNCTION llmgw_create_log_partitions(back integer DEFAULT 2, ahead integer DEFAULT 7)
    RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    made integer := 0;
BEGIN
    FOR i IN -back..ahead LOOP
        IF llmgw_create_log_partition(today + i) THEN
            made := made + 1;
        END IF;
    END LOOP;
    RETURN made;
END;
$$;

DO $$
DECLARE
    bound date;
    old text;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'request_logs'::regclass) = 'p' THEN
        RETURN;
    END IF;
    -- Writers wait from here; readers go on until the rename.
    LOCK TABLE request_logs IN SHARE ROW EXCLUSIVE MODE;
    -- The old table holds every time before `bound`, the day after today
    -- (today's rows keep going there until midnight UTC). Rows dated later
    -- (a clock far ahead) are set aside, and go to their days' partitions
    -- once those exist.
    bound := (now() AT TIME ZONE 'UTC')::date + 1;
    CREATE TEMP TABLE request_logs_later ON COMMIT DROP AS
        SELECT * FROM request_logs WITH NO DATA;
    WITH later AS (
        DELETE FROM request_logs WHERE created_at >= bound::timestamp AT TIME ZONE 'UTC' RETURNING *
    )
    INSERT INTO request_logs_later SELECT * FROM later;
    EXECUTE llmgw_roll_up_statement('request_logs');
    old := 'request_logs_before_' || to_char(bound, 'YYYYMMDD');
    EXECUTE format('ALTER TABLE request_logs RENAME TO %I', old);
    EXECUTE format('ALTER TABLE %I RENAME CONSTRAINT request_logs_pkey TO %I', old, old || '_pkey');
    EXECUTE format('ALTER INDEX request_logs_org_time_idx RENAME TO %I', old || '_org_time_idx');

    -- The same columns, defaults and checks (by the same names, as
    -- partitions need), partitioned by time.
    EXECUTE format('CREATE TABLE request_logs (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
        PARTITION BY RANGE (created_at)', old);
    ALTER TABLE request_logs ADD PRIMARY KEY (id, created_at);
    CREATE INDEX request_logs_org_time_idx ON request_logs (org_id, created_at DESC, id DESC);

    -- Validated before the attach, so the attach does not scan the table;
    -- the partition bound holds it after.
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT request_logs_before_bound CHECK (created_at < %L)',
        old, bound::timestamp AT TIME ZONE 'UTC');
    EXECUTE format('ALTER TABLE request_logs ATTACH PARTITION %I FOR VALUES FROM (MINVALUE) TO (%L)',
        old, bound::timestamp AT TIME ZONE 'UTC');
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT request_logs_before_bound', old);

    CREATE TRIGGER request_logs_roll_up AFTER INSERT ON request_logs
        REFERENCING NEW TABLE AS inserted
        FOR EACH STATEMENT EXECUTE FUNCTION llmgw_roll_up_inserted();
    PERFORM llmgw_create_log_partitions();
    -- The rows set aside: rolled up by the trigger, as any insert.
    PERFORM llmgw_create_log_partition(day)
        FROM (SELECT DISTINCT (created_at AT TIME ZONE 'UTC')::date AS day FROM request_logs_later) d;
    INSERT INTO request_logs SELECT * FROM request_logs_later;
END;
$$;
