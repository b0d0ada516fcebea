#!/usr/bin/env bash
# Browser test of the admin UI: headless Debian Chromium driven by playwright-core,
# against the debug `llmgw` binary (built by `cargo test --workspace`) on the local PostgreSQL.
# Screenshots land in target/ui-screenshots/. Under CI=true a missing tool fails the run.
set -euo pipefail
cd "$(dirname "$0")"
ROOT="$(cd ../../../.. && pwd)"
missing() {
  if [ "${CI:-}" = "true" ]; then echo "ui browser test: $1 is missing" >&2; exit 1; fi
  echo "ui browser test skipped: $1 is missing (CI=true makes this a failure)"; exit 0
}
if ! command -v chromium >/dev/null; then
  { apt-get update -qq && apt-get install -y -qq chromium; } || true
fi
command -v chromium >/dev/null || missing chromium
command -v node >/dev/null || missing node
command -v psql >/dev/null || missing psql
command -v openssl >/dev/null || missing openssl
[ -d node_modules/playwright-core ] && [ -d node_modules/axe-core ] || npm ci --no-audit --no-fund
BIN="${LLMGW_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/llmgw}"
[ -x "$BIN" ] || (cd "$ROOT" && cargo build -p server --bin llmgw)
export LLMGW_BIN="$BIN"
export LLMGW_UI_SCREENSHOTS="${LLMGW_UI_SCREENSHOTS:-$ROOT/target/ui-screenshots}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
node --test --test-concurrency=1 e2e.test.mjs
