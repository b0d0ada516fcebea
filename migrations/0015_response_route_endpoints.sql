-- The endpoint of its provider that created each Responses API object, so
-- follow-ups and `previous_response_id` reach the server that holds it. NULL
-- for routes written before, or when that endpoint is gone (then the
-- provider's balancer chooses).
ALTER TABLE response_routes ADD COLUMN endpoint_id uuid;
