-- Plain-http base URLs (self-hosted vLLM, Ollama, llama.cpp on a private
-- network). Whether they may be saved or called is the operator's choice
-- (LLMGW_UPSTREAM_ALLOW_HTTP, checked by the service when saving and when
-- connecting); the database still refuses any other scheme.
ALTER TABLE provider_keys DROP CONSTRAINT provider_keys_base_url_check;
ALTER TABLE provider_keys ADD CONSTRAINT provider_keys_base_url_check
    CHECK ((base_url LIKE 'https://_%' OR base_url LIKE 'http://_%') AND base_url NOT LIKE '%/');
