-- Which OpenAI endpoint a usage row is for: the path after `/v1/`
-- (`chat/completions`, `embeddings`, `responses`, ...).
-- Rows written before this column existed were all chat completions: the
-- default labels them without rewriting the table, and is dropped so that a
-- writer that does not know the endpoint leaves it NULL rather than wrong.
ALTER TABLE request_logs
    ADD COLUMN endpoint text DEFAULT 'chat/completions'
    CONSTRAINT request_logs_endpoint_check CHECK (endpoint IS NULL OR length(endpoint) BETWEEN 1 AND 64);
ALTER TABLE request_logs ALTER COLUMN endpoint DROP DEFAULT;
