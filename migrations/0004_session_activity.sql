-- When each session was last used, for the idle timeout (LLMGW_SESSION_IDLE_MINUTES).
-- Existing sessions count as used now, so an upgrade signs nobody out.
ALTER TABLE sessions ADD COLUMN last_seen_at timestamptz NOT NULL DEFAULT now();
