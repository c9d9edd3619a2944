#!/usr/bin/env bash
# Smoke test of the built binary (make smoke; CI runs it after make test).
#
#   installer/smoke.sh [BINARY]        default: dist/etims-agent
#
# Starts `BINARY run` on a throwaway config (data in a temp dir, a free loopback port, logfmt logs;
# KRA and TSMS are the built-in simulators, so nothing leaves 127.0.0.1), posts the README's sample
# sale, checks it is signed, waits for head office (the TSMS simulator) to hold it, stops the agent
# with SIGTERM and checks it stopped cleanly. Also runs `version`, `config check`, `serial list`.
# Needs bash, curl and jq. Exit 0 only if every check passed.
#
# SMOKE_WRAPPER="cmd args": run every agent command through a wrapper that execs its arguments,
# e.g. installer/linux/mdwe-exec.py (the systemd unit's MemoryDenyWriteExecute filter).
set -euo pipefail

cd "$(dirname "$0")/.."
BIN=${1:-dist/etims-agent}
START_TIMEOUT_S=${SMOKE_START_TIMEOUT_S:-60}   # a one-file binary unpacks itself first
SYNC_TIMEOUT_S=${SMOKE_SYNC_TIMEOUT_S:-60}
STOP_TIMEOUT_S=${SMOKE_STOP_TIMEOUT_S:-30}

fail() { echo "smoke: FAIL: $*" >&2; exit 1; }
for tool in curl jq; do
    command -v "$tool" >/dev/null || fail "$tool is needed (apt-get install $tool)"
done
[[ -x $BIN ]] || fail "$BIN is missing or not executable; build it with: make dist"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
read -r -a WRAP <<<"${SMOKE_WRAPPER:-}"
agent() { "${WRAP[@]}" "$BIN" "$@"; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/etims-smoke.XXXXXX")
AGENT_PID=""
cleanup() {
    if [[ -n $AGENT_PID ]] && kill -0 "$AGENT_PID" 2>/dev/null; then
        kill -KILL "$AGENT_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
LOG=$TMP/agent.log
show_log() { echo "---- agent log ($LOG) ----" >&2; cat "$LOG" >&2 || true; echo "----" >&2; }
now() { echo "$EPOCHREALTIME"; }
since_ms() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%d", (b - a) * 1000 }'; }

# Relative data_dir resolves against the config file's folder: $TMP/data.
cat >"$TMP/agent.toml" <<'EOF'
data_dir = "data"

[http]
host = "127.0.0.1"
port = 0

[log]
level = "info"
format = "logfmt"
EOF

# 1. The simple commands.
VERSION=$(agent version) || fail "etims-agent version exited $?"
[[ $VERSION =~ ^[0-9]+\.[0-9]+ ]] || fail "etims-agent version printed '$VERSION'"
CHECK=$(agent config check --config "$TMP/agent.toml") || fail "config check exited $?: $CHECK"
grep -q '^config OK' <<<"$CHECK" || fail "config check did not say OK: $CHECK"
grep -q "^data_dir  *$TMP/data\$" <<<"$CHECK" || fail "config check shows another data_dir: $CHECK"
agent serial list --json | jq -e 'type == "array"' >/dev/null || fail "serial list --json is not a JSON list"

# 2. Start the agent and wait for its listening line.
T0=$(now)
"${WRAP[@]}" "$BIN" run --config "$TMP/agent.toml" >"$LOG" 2>&1 &
AGENT_PID=$!
URL=""
deadline=$((SECONDS + START_TIMEOUT_S))
while [[ -z $URL ]]; do
    if ! kill -0 "$AGENT_PID" 2>/dev/null; then
        show_log; wait "$AGENT_PID" && rc=0 || rc=$?
        AGENT_PID=""; fail "the agent exited with code $rc before it listened"
    fi
    (( SECONDS < deadline )) || { show_log; fail "no 'event=listening' line within ${START_TIMEOUT_S}s"; }
    URL=$(sed -n 's/.* event=listening url=\(http:\/\/127\.0\.0\.1:[0-9][0-9]*\).*/\1/p' "$LOG" | head -n 1)
    [[ -n $URL ]] || sleep 0.05
done
LISTEN_MS=$(since_ms "$T0")

# 3. The README's quick-start sale (installer/examples/sale.json), dated now (in Nairobi's +03:00)
# so no clock rule refuses it.
ISSUED_AT=$(date -u -d '+3 hours' '+%Y-%m-%dT%H:%M:%S+03:00')
SALE=$(jq -c --arg at "$ISSUED_AT" '.issued_at = $at' installer/examples/sale.json) \
    || fail "installer/examples/sale.json is not a JSON sale"
T_POST=$(now)
CODE=$(curl -sS --max-time 30 -o "$TMP/sale.json" -w '%{http_code}' -X POST "$URL/v1/sales" \
    -H 'Content-Type: application/json' --data-binary "$SALE") || { show_log; fail "POST /v1/sales failed"; }
SALE_MS=$(since_ms "$T_POST")
FIRST_SALE_MS=$(since_ms "$T0")
[[ $CODE == 201 ]] || { show_log; fail "POST /v1/sales answered $CODE: $(cat "$TMP/sale.json")"; }
grep -Eq '"status": ?"signed"' "$TMP/sale.json" || fail "the sale is not signed: $(cat "$TMP/sale.json")"
grep -Eq '"qr_url": ?"[^"]+' "$TMP/sale.json" || fail "no qr_url in the answer: $(cat "$TMP/sale.json")"
INVOICE=$(jq -r '.receipt.scu.cu_invoice_no // .receipt.kra.cu_invoice_no // empty' "$TMP/sale.json" 2>/dev/null || true)

# The receipt renderers: HTML carries segno's QR code as inline SVG, text mentions the total.
curl -sS --max-time 10 -f "$URL/v1/sales/R-0001/receipt?format=html" -o "$TMP/receipt.html" \
    || fail "GET the HTML receipt failed"
grep -q '<svg' "$TMP/receipt.html" || fail "the HTML receipt has no QR code (<svg>)"
curl -sS --max-time 10 -f "$URL/v1/sales/R-0001/receipt?format=text&width=42" | grep -q '171\.00' \
    || fail "the text receipt does not show the total 171.00"

# 4. Head office (the built-in TSMS simulator) must take the sale: backlog 0 and one synced sale.
T_SYNC=$(now)
deadline=$((SECONDS + SYNC_TIMEOUT_S))
while :; do
    curl -sS --max-time 10 -f "$URL/v1/status" -o "$TMP/status.json" || fail "GET /v1/status failed"
    if jq -e '.lanes.tsms.backlog == 0 and .outbox.sales == 1 and .lanes.kra.backlog == 0' \
            "$TMP/status.json" >/dev/null; then
        break
    fi
    (( SECONDS < deadline )) || { show_log; fail "TSMS backlog not 0 after ${SYNC_TIMEOUT_S}s: $(cat "$TMP/status.json")"; }
    sleep 0.2
done
SYNC_MS=$(since_ms "$T_SYNC")
TSMS_STATES=$(jq -c '.lanes.tsms.by_state' "$TMP/status.json")

# The fast native parts the binary must have loaded (a missing one would silently fall back or fail):
# uvloop (uvicorn's loop="auto" falls back to asyncio without a word), httptools, cryptography.
# A one-file binary runs Python in a child of the unpacking bootloader: look at both.
MAPS=$(cat "/proc/$AGENT_PID/maps" $(pgrep -P "$AGENT_PID" | sed 's|.*|/proc/&/maps|') 2>/dev/null || true)
for lib in uvloop/loop httptools/parser/parser cryptography/hazmat/bindings/_rust; do
    grep -q "/$lib\.[^/]*\.so" <<<"$MAPS" || { show_log; fail "the running agent has not loaded $lib"; }
done

# 5. SIGTERM: a clean stop with exit code 0 and the stopped line.
T_STOP=$(now)
kill -TERM "$AGENT_PID"
rc=0
deadline=$((SECONDS + STOP_TIMEOUT_S))
while kill -0 "$AGENT_PID" 2>/dev/null; do
    (( SECONDS < deadline )) || { show_log; fail "the agent did not stop within ${STOP_TIMEOUT_S}s of SIGTERM"; }
    sleep 0.05
done
wait "$AGENT_PID" || rc=$?
AGENT_PID=""
STOP_MS=$(since_ms "$T_STOP")
[[ $rc == 0 ]] || { show_log; fail "the agent exited with code $rc after SIGTERM"; }
grep -q ' event=stopped ' "$LOG" || { show_log; fail "no 'event=stopped' line in the log"; }
if grep -Eq ' level=(error|critical) ' "$LOG"; then show_log; fail "the log has error lines"; fi
STORE=$(sed -n 's/.* event=receipt_key_created .*store=\(.*\)$/\1/p' "$LOG" | head -n 1 | tr -d '"')

echo "smoke: OK  $BIN ($(du -h "$BIN" | cut -f1), version $VERSION)${WRAP[*]:+ under ${WRAP[*]}}"
printf '  %-34s %s\n' \
    "listening at" "$URL after ${LISTEN_MS} ms" \
    "first sale accepted (201 signed)" "${FIRST_SALE_MS} ms after start (the POST itself: ${SALE_MS} ms)" \
    "KRA invoice" "${INVOICE:-(see receipt)}" \
    "synced to TSMS (backlog 0)" "${SYNC_MS} ms after the sale, $TSMS_STATES" \
    "secret store" "${STORE:-(not logged)}" \
    "SIGTERM to exit 0 + stopped" "${STOP_MS} ms"
