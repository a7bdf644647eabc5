#!/usr/bin/env bash
# Soak mcp-broker with faults: steady load from two callers over several sessions against N ledger upstreams
# over stdio, while children are killed at random, the config is rewritten every 30 s and sessions open and
# close. Reports calls, failures by message (explained or not), RSS and fds at start and end; exits non-zero on
# growth beyond the bounds (default RSS +50 MB, fds +50) or on an unexplained failure. Loopback only.
#
#   scripts/soak.sh                      10 minutes, debug build (target/debug)
#   scripts/soak.sh --release            use target/release (cargo build --release --bin mcp-broker --examples)
#   scripts/soak.sh --seconds 60 --rate 300 --sessions 4 --servers 4 --kill-every 10 --json out.json
#
# Every other argument goes to scripts/soak.py (--help lists them). Needs the e2e harness venv
# (scripts/test.sh --harness-only installs it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROFILE=debug
ARGS=()
for a in "$@"; do
  case "$a" in
    --release) PROFILE=release ;;
    --debug) PROFILE=debug ;;
    *) ARGS+=("$a") ;;
  esac
done
PY="${HARNESS_DIR:-$ROOT/target/harness}/venv/bin/python"
[[ -x "$PY" ]] || { echo "soak.sh: $PY missing (scripts/test.sh --harness-only)" >&2; exit 2; }
export MCP_BROKER_BIN="${MCP_BROKER_BIN:-$ROOT/target/$PROFILE/mcp-broker}"
export MCP_EXAMPLES_DIR="${MCP_EXAMPLES_DIR:-$ROOT/target/$PROFILE/examples}"
for f in "$MCP_BROKER_BIN" "$MCP_EXAMPLES_DIR/ledger"; do
  [[ -x "$f" ]] || { echo "soak.sh: $f missing (cargo build $([[ $PROFILE == release ]] && echo --release) --bin mcp-broker --examples)" >&2; exit 2; }
done
exec "$PY" "$ROOT/scripts/soak.py" "${ARGS[@]+"${ARGS[@]}"}"
