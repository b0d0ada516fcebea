#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind (repeatable where
# wall-clock numbers are not): llmgw's gateway under valgrind, a local HTTPS
# upstream, N keep-alive requests per mode after a warm-up, counters zeroed
# before and dumped after each mode.
#   crates/bench/callgrind/run.sh path/to/llmgw [N]
# Needs valgrind, python3, openssl, psql and curl; DATABASE_URL names a server
# where it may create a database (default: the local one).
set -euo pipefail
BIN="$(realpath "$1")"
N="${2:-500}"
HERE="$(cd "$(dirname "$0")" && pwd)"
ADMIN_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
W="$(mktemp -d)"
DB="llmgw_callgrind_$$"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql "$ADMIN_URL" -q -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
  [ -n "${KEEP:-}" ] || rm -rf "$W"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 600); do curl -s -o /dev/null "$1" && return 0; sleep 0.2; done; echo "no answer from $1" >&2; return 1; }

# A CA and a certificate for 127.0.0.1 signed by it.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=callgrind-ca -keyout "$W/ca.key" -out "$W/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout "$W/up.key" -out "$W/up.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\n' >"$W/ext"
openssl x509 -req -in "$W/up.csr" -CA "$W/ca.pem" -CAkey "$W/ca.key" -CAcreateserial -days 2 -extfile "$W/ext" -out "$W/up.pem" 2>/dev/null

UP=$(port); GW=$(port); API=$(port)
python3 "$HERE/upstream.py" "$UP" "$W/up.pem" "$W/up.key" & PIDS+=($!)
psql "$ADMIN_URL" -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE $DB"
export DATABASE_URL="${ADMIN_URL%/*}/$DB"
LLMGW_ENCRYPTION_KEYS="1:$("$BIN" keys generate 2>/dev/null)"
export LLMGW_ENCRYPTION_KEYS LLMGW_UPSTREAM_ALLOW_PRIVATE=true LLMGW_UPSTREAM_CA_FILE="$W/ca.pem"
export LLMGW_GATEWAY_ADDR="127.0.0.1:$GW" LLMGW_API_ADDR="127.0.0.1:$API" LLMGW_GATEWAY_WORKERS=1
export LLMGW_LOG_FORMAT=json RUST_LOG="${RUST_LOG:-info}"

# Provision through the settings API of a plain run.
"$BIN" serve --only api 2>"$W/api.log" & APIPID=$!; PIDS+=($APIPID)
wait_http "http://127.0.0.1:$API/healthz"
j() { curl -sS -H 'content-type: application/json' "$@"; }
TOKEN=$(j "http://127.0.0.1:$API/api/v1/auth/signup" -d '{"email":"cg@example.com","password":"callgrind password"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
AUTH="authorization: Bearer $TOKEN"
ORG=$(j -H "$AUTH" "http://127.0.0.1:$API/api/v1/orgs" -d '{"name":"cg"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
j -H "$AUTH" "http://127.0.0.1:$API/api/v1/orgs/$ORG/provider-keys" -d "{\"name\":\"mock\",\"base_url\":\"https://127.0.0.1:$UP\",\"token\":\"sk-callgrind-token-0000\"}" >/dev/null
KEY=$(j -H "$AUTH" "http://127.0.0.1:$API/api/v1/orgs/$ORG/api-keys" -d '{"name":"cg"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
# A key with every kind of limit set, none reached: what spend controls cost.
LIMITS='{"requests_per_minute":1000000000,"tokens_per_minute":1000000000000,"max_concurrent_requests":1000000,"tokens_per_day":1000000000000,"tokens_per_month":1000000000000,"budget_per_month_usd":"1000000"}'
LKEY=$(j -H "$AUTH" "http://127.0.0.1:$API/api/v1/orgs/$ORG/api-keys" -d "{\"name\":\"cg-limited\",\"limits\":$LIMITS}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
kill "$APIPID"; wait "$APIPID" 2>/dev/null || true

# REDIS=redis://…: limits counted on Redis (else in process).
[ -z "${REDIS:-}" ] || export LLMGW_REDIS_URL="$REDIS"
valgrind --tool=callgrind --callgrind-out-file="$W/cg.%p.out" "$BIN" serve --only gateway 2>"$W/gw.log" & VG=$!; PIDS+=($VG)
wait_http "http://127.0.0.1:$GW/healthz"
MODES="json stream json-limited stream-limited"
for mode in $MODES; do
  k="$KEY"; [ "${mode%-limited}" = "$mode" ] || k="$LKEY"
  python3 "$HERE/client.py" "$GW" "$k" 50 "${mode%-limited}"   # warm-up: caches, pools, allocator
  callgrind_control -z "$VG" >/dev/null 2>&1
  python3 "$HERE/client.py" "$GW" "$k" "$N" "${mode%-limited}"
  callgrind_control -d "$mode" "$VG" >/dev/null 2>&1
done
sleep 1
for mode in $MODES; do
  f=$(grep -l "^desc: Trigger: dump $mode\$" "$W"/cg.*.out* | head -n1)
  ir=$(awk '/^summary:/ {print $2}' "$f")
  echo "$mode: $((ir / N)) instructions per request ($N requests)"
done
