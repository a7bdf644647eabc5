#!/usr/bin/env bash
# The one benchmark command for mcp-broker (examples/bench.rs says what is measured).
#
#   scripts/bench.sh                 install the peer gateways (once), build in release, run the bench
#   scripts/bench.sh --quick         a short smoke run
#   scripts/bench.sh ARGS...         extra arguments go to the bench (see: scripts/bench.sh --help)
#   scripts/bench.sh --cluster-only  only the [cluster] cells (one Redis; one instance without and with
#                                    [cluster], with Redis-backed limits; HAProxy in front of one and of
#                                    three instances): about 1.5 minutes; --no-cluster leaves them out.
#                                    They need redis-server and haproxy on PATH, else they are skipped
#   scripts/bench.sh --profile [CELL]
#                                    only profile one tools/call cell (FRONT:TRANSPORT:CONCURRENCY,
#                                    default broker+auth+exchange:http:8) with `perf record -g`
#                                    (DWARF call graphs, --profile-seconds 5) and print the top 25
#                                    symbols by self and by cumulative time, also written to
#                                    target/bench/profile.txt; without perf (or permission to use it)
#                                    it says so and still measures the cell
#
# The peer gateways it compares against are installed into the git-ignored target/bench-peers/
# (a venv for PyPI mcp-proxy, an npm prefix for supergateway), pinned below; a stamp file records
# the pinned set, and when it matches installation is skipped. A peer that cannot be installed
# (no python3 or npm) is skipped by the bench with a note. Figures go to target/bench/results.json.
# Env overrides: PEERS_DIR, CARGO, PYTHON (interpreter used to create the venv).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY_PKGS=("mcp-proxy==0.13.0")
NPM_PKGS=("supergateway@4.0.0")

PEERS_DIR="${PEERS_DIR:-$ROOT/target/bench-peers}"
mkdir -p "$PEERS_DIR"
PEERS_DIR="$(cd "$PEERS_DIR" && pwd)"
STAMP="$PEERS_DIR/.stamp"
WANT_STAMP="v1 py:${PY_PKGS[*]} npm:${NPM_PKGS[*]}"

log() { printf '\n== %s\n' "$*" >&2; }

install_peers() {
  local ok=1
  local py="${PYTHON:-python3}"
  if command -v "$py" >/dev/null; then
    log "installing ${PY_PKGS[*]} into $PEERS_DIR/venv"
    { [[ -x "$PEERS_DIR/venv/bin/python" ]] || "$py" -m venv "$PEERS_DIR/venv"; } &&
      "$PEERS_DIR/venv/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_PKGS[@]}" ||
      { echo "bench.sh: mcp-proxy install failed; the bench will skip it" >&2; ok=0; }
  else
    echo "bench.sh: $py not found; the bench will skip mcp-proxy" >&2; ok=0
  fi
  if command -v npm >/dev/null; then
    log "installing ${NPM_PKGS[*]} into $PEERS_DIR"
    # a package.json keeps npm from walking up to a parent project
    [[ -f "$PEERS_DIR/package.json" ]] || echo '{"name":"mcp-broker-bench-peers","private":true}' > "$PEERS_DIR/package.json"
    npm install --prefix "$PEERS_DIR" --no-audit --no-fund --loglevel=error --save-exact "${NPM_PKGS[@]}" >/dev/null ||
      { echo "bench.sh: supergateway install failed; the bench will skip it" >&2; ok=0; }
  else
    echo "bench.sh: npm not found; the bench will skip supergateway" >&2; ok=0
  fi
  # only a complete install is stamped, so a partial one is retried next time
  [[ "$ok" == 1 ]] && printf '%s\n' "$WANT_STAMP" > "$STAMP"
  return 0
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" ]]; then
  log "peer gateways up to date ($PEERS_DIR)"
else
  install_peers
fi

CARGO="${CARGO:-cargo}"
log "cargo build --release --bin mcp-broker --example ledger --example bench"
"$CARGO" build --release --bin mcp-broker --example ledger --example bench

BENCH="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/bench"
log "$BENCH $*"
exec "$BENCH" --peers-dir "$PEERS_DIR" "$@"
