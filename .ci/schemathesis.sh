#!/usr/bin/env bash
# Schemathesis against the settings API's own document (/api/openapi.json):
# no input may get a 5xx, and every answer must have a documented status,
# content type, headers and body schema. Bounded by example count, not time.
# Runs the debug binary that `cargo test --workspace` built, on a fresh
# database of the CI PostgreSQL, with a signed-up user, an org, providers and
# an API key so that authenticated routes are exercised on real rows.
set -euo pipefail
cd "$(dirname "$0")/.."

ST_VERSION=4.32.5
EXAMPLES="${LLMGW_SCHEMATHESIS_EXAMPLES:-50}"
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET/debug/llmgw"
[ -x "$BIN" ] || cargo build --bin llmgw
VENV="${LLMGW_SCHEMATHESIS_VENV:-$TARGET/schemathesis-venv}"
if [ "$("$VENV/bin/schemathesis" --version 2>/dev/null)" != "schemathesis, version $ST_VERSION" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$ST_VERSION"
fi
PY="$VENV/bin/python"

ADMIN_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
DB="llmgw_schemathesis_$$"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/llmgw-schemathesis.XXXXXX")"
SERVER_PID=""
cleanup() {
  local status=$?
  if [ "$status" -ne 0 ] && [ -s "$WORK/server.log" ]; then
    echo "schemathesis run failed (exit $status); the server's log ends with:" >&2
    tail -n 50 "$WORK/server.log" >&2
  fi
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  psql "$ADMIN_URL" -q -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
psql "$ADMIN_URL" -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE $DB"

PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
BASE="http://127.0.0.1:$PORT"
# Short upstream timeouts: provider tests schemathesis triggers must not wait on unroutable hosts.
DATABASE_URL="${ADMIN_URL%/*}/$DB" \
  LLMGW_ENCRYPTION_KEYS="1:$("$BIN" keys generate 2>/dev/null)" \
  LLMGW_API_ADDR="127.0.0.1:$PORT" \
  LLMGW_UPSTREAM_CONNECT_TIMEOUT_MS=500 \
  LLMGW_UPSTREAM_TIMEOUT_MS=1000 \
  LLMGW_LOG_FORMAT=json RUST_LOG=warn \
  "$BIN" serve --only api >"$WORK/server.log" 2>&1 &
SERVER_PID=$!

# Sign up, make the rows the run works on, and write the run's configuration.
"$PY" - "$BASE" "$WORK/schemathesis.toml" "$WORK/ids" <<'EOF'
import json, sys, time, urllib.error, urllib.request

base, config, ids = sys.argv[1:4]

def call(method, path, token=None, body=None):
    req = urllib.request.Request(base + path, method=method,
                                 data=None if body is None else json.dumps(body).encode())
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", "Bearer " + token)
    with urllib.request.urlopen(req, timeout=10) as res:
        return json.load(res)

for _ in range(100):
    try:
        urllib.request.urlopen(base + "/healthz", timeout=1)
        break
    except (urllib.error.URLError, ConnectionError):
        time.sleep(0.1)
else:
    sys.exit("llmgw did not start")

password = "schemathesis password"
signup = call("POST", "/api/v1/auth/signup", body={"email": "st@example.com", "password": password})
token, user = signup["token"], signup["user"]["id"]
# logout ends the session it is called with: it gets a session of its own.
logout = call("POST", "/api/v1/auth/login", body={"email": "st@example.com", "password": password})["token"]
# Signing out everywhere ends every session of its caller: another account's.
everywhere = call("POST", "/api/v1/auth/signup", body={"email": "st-other@example.com", "password": password})["token"]
org = call("POST", "/api/v1/orgs", token, {"name": "schemathesis"})["id"]
spare_org = call("POST", "/api/v1/orgs", token, {"name": "deleted by schemathesis"})["id"]
def provider(name):
    return call("POST", f"/api/v1/orgs/{org}/provider-keys", token,
                {"name": name, "base_url": "https://llm.example.com", "token": "sk-schemathesis-0000"})["id"]
kept, deleted = provider("kept"), provider("deleted")
def endpoint(host):
    return call("POST", f"/api/v1/orgs/{org}/provider-keys/{kept}/endpoints", token,
                {"base_url": f"https://{host}.example.com", "token": "sk-schemathesis-0001", "weight": 2})["id"]
kept_endpoint, deleted_endpoint = endpoint("gpu2"), endpoint("gpu3")
api_key = call("POST", f"/api/v1/orgs/{org}/api-keys", token, {"name": "schemathesis"})["id"]

def op(ids, **params):
    ids = ", ".join(f'"{i}"' for i in ids)
    values = ", ".join(f'"{k}" = "{v}"' for k, v in params.items())
    return f"[[operations]]\ninclude-operation-id = [{ids}]\nparameters = {{ {values} }}\n\n"

with open(config, "w") as f:
    f.write(f'headers = {{ Authorization = "Bearer {token}" }}\ncache = {{ enabled = false }}\n\n')
    f.write(f'[[operations]]\ninclude-operation-id = "logout"\nheaders = {{ Authorization = "Bearer {logout}" }}\n\n')
    f.write(f'[[operations]]\ninclude-operation-id = "signOutEverywhere"\nheaders = {{ Authorization = "Bearer {everywhere}" }}\n\n')
    f.write(op(["getOrg", "renameOrg", "listMembers", "addMember", "listProviderKeys",
                "createProviderKey", "listApiKeys", "createApiKey", "listLogs", "usage", "auditLog"],
               org_id=org))
    f.write(op(["deleteOrg"], org_id=spare_org))
    f.write(op(["setMemberRole", "removeMember"], org_id=org, user_id=user))
    f.write(op(["getProviderKey", "updateProviderKey", "testProviderKey", "listProviderEndpoints",
                "createProviderEndpoint"], org_id=org, id=kept))
    f.write(op(["updateProviderEndpoint"], org_id=org, id=kept, endpoint_id=kept_endpoint))
    f.write(op(["deleteProviderEndpoint"], org_id=org, id=kept, endpoint_id=deleted_endpoint))
    f.write(op(["deleteProviderKey"], org_id=org, id=deleted))
    f.write(op(["revokeApiKey"], org_id=org, id=api_key))
with open(ids, "w") as f:
    f.write(f"{org} {api_key} {kept}\n")
EOF

# Request logs as the gateway writes them, so the logs and usage answers
# carry rows for their schemas to be checked against.
read -r ORG API_KEY PROVIDER <"$WORK/ids"
psql "${ADMIN_URL%/*}/$DB" -q -v ON_ERROR_STOP=1 <<SQL
INSERT INTO request_logs (id, request_id, org_id, api_key_id, provider_key_id, provider_name,
    requested_model, upstream_model, status_code, streamed, canceled, prompt_tokens,
    completion_tokens, total_tokens, latency_ms, ttfb_ms, error_class, created_at, cost_usd)
VALUES
  (gen_random_uuid(), 'st-1', '$ORG', '$API_KEY', '$PROVIDER', 'kept', 'kept/llama', 'llama',
   200, false, false, 12, 30, 42, 250, 40, NULL, now() - interval '1 hour', 0.0000720),
  (gen_random_uuid(), 'st-2', '$ORG', '$API_KEY', '$PROVIDER', 'kept', 'kept/llama', 'llama',
   200, true, true, NULL, NULL, NULL, 900, 35, NULL, now() - interval '2 days', NULL),
  (gen_random_uuid(), 'st-3', '$ORG', '$API_KEY', NULL, NULL, 'nowhere/x', NULL,
   404, false, false, NULL, NULL, NULL, 1, NULL, 'model_not_found', now() - interval '3 days', NULL);
SQL

# One worker: hypothesis's lambda-source parsing is not thread-safe on Python 3.11.
"$VENV/bin/schemathesis" --config-file "$WORK/schemathesis.toml" run "$BASE/api/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance,unsupported_method,allow_header_conformance \
  --phases examples,coverage,fuzzing \
  --max-examples "$EXAMPLES" --seed 1 --workers 1 --request-timeout 10 \
  --generation-database none --no-color
