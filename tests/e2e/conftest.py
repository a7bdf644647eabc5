"""Fixtures for the mcp-broker end-to-end suite.

Real upstreams: @modelcontextprotocol/server-everything over stdio, SSE and Streamable HTTP, and the
project's own examples (ledger over stdio, identity_directory over Streamable HTTP). Every process is
started on a free port, waited for by polling, and killed (as a process group) on teardown.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers as H  # noqa: E402

# Lines that tests want shown at the end of every run (e.g. the conformance totals).
SUMMARY_LINES: list[str] = []

# The base tools server-everything registers for every client.
EVERYTHING_BASE_TOOLS = [
    "echo", "get-annotated-message", "get-env", "get-resource-links", "get-resource-reference",
    "get-structured-content", "get-sum", "get-tiny-image", "gzip-file-as-resource",
    "toggle-simulated-logging", "toggle-subscriber-updates", "trigger-long-running-operation",
]
EVERYTHING_SERVERS = ["evstdio", "evsse", "evhttp"]
LEDGER_TOOLS = ["list_accounts", "get_account", "list_transactions", "update_account_status",
                "get_customer_pii", "get_audit_log", "reconcile_ledger"]
IDENTITY_TOOLS = ["lookup_user", "list_users", "disable_user", "activate_user"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    if SUMMARY_LINES:
        terminalreporter.section("mcp-broker e2e summary")
        for line in SUMMARY_LINES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session", autouse=True)
def _harness_present():
    missing = [p for p in (H.EVERYTHING_BIN, H.NODE22, H.CONFORMANCE_JS) if not p.exists()]
    if missing:
        pytest.exit(f"harness not installed (run scripts/test.sh --harness-only): missing {missing}", returncode=3)


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


def require_broker() -> None:
    if not H.BROKER_BIN.exists():
        pytest.fail(f"broker binary {H.BROKER_BIN} is missing (cargo build)")


def require_example(binary: Path) -> None:
    if not binary.exists():
        pytest.fail(f"example binary {binary} is missing (cargo build --examples); it must exist")


@pytest.fixture(scope="session")
def ev_sse(logs_dir):
    up = H.start_everything("sse", logs_dir)
    yield up
    up.stop()


@pytest.fixture(scope="session")
def ev_http(logs_dir):
    up = H.start_everything("streamableHttp", logs_dir)
    yield up
    up.stop()


@pytest.fixture(scope="session")
def identity_http(logs_dir):
    """identity_directory over Streamable HTTP, or None when the example is not built."""
    if not H.IDENTITY_BIN.exists():
        yield None
        return
    up = H.start_example_http(H.IDENTITY_BIN, logs_dir, "identity-http")
    yield up
    up.stop()


@pytest.fixture
def ledger_bin() -> Path:
    require_example(H.LEDGER_BIN)
    return H.LEDGER_BIN


@pytest.fixture
def identity(identity_http):
    require_example(H.IDENTITY_BIN)
    return identity_http


def main_servers(ev_sse, ev_http, identity_http) -> dict:
    servers = {
        "evstdio": H.everything_stdio_spec(),
        "evsse": {"transport": "sse", "url": ev_sse.url},
        "evhttp": {"transport": "http", "url": ev_http.url, "timeout": "30s"},
    }
    if H.LEDGER_BIN.exists():
        servers["ledger"] = H.example_stdio_spec(H.LEDGER_BIN)
    if identity_http is not None:
        servers["identity"] = {"transport": "http", "url": identity_http.url}
    return servers


@pytest.fixture(scope="session")
def broker_state(tmp_path_factory, ev_sse, ev_http, identity_http):
    """The main broker with all five upstreams (those that exist). Yields (broker, readiness-note)."""
    if not H.BROKER_BIN.exists():
        yield None, f"broker binary {H.BROKER_BIN} is missing"
        return
    work = tmp_path_factory.mktemp("broker-main")
    servers = main_servers(ev_sse, ev_http, identity_http)
    try:
        broker = H.start_broker(work, servers)
    except Exception as e:  # noqa: BLE001 - reported by every test that needs it
        yield None, f"broker failed to start: {e}"
        return
    required = [f"{s}__echo" for s in EVERYTHING_SERVERS]
    if "ledger" in servers:
        required.append("ledger__list_accounts")
    if "identity" in servers:
        required.append("identity__list_users")
    note = ""
    try:
        H.wait_for_tools(broker.url, required, timeout=30)
    except Exception as e:  # noqa: BLE001 - tests assert on the details; keep going
        note = f"broker not fully ready: {e}"
    yield broker, note
    broker.stop()


@pytest.fixture
def broker(broker_state):
    b, note = broker_state
    if b is None:
        pytest.fail(note)
    return b


def broker_log_tail(b: H.Broker) -> str:
    return b.proc.stderr_tail(60)


@pytest.fixture
def artifacts() -> Path:
    H.ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return H.ARTIFACTS


# --------------------------------------------------------------------------- inbound OAuth (test_auth*.py)

AUTH_SCOPES_SUPPORTED = ["mcp:tools", "pii:read", "audit:read", "ledger:write"]
MSG_PII = "PII access requires the pii:read scope."
MSG_AUDIT = "The audit log requires the audit:read scope."
MSG_WRITE = "Changing an account's status requires the ledger:write scope."
MSG_PROMPT = "Account summaries include PII and require the pii:read scope."
MSG_RETENTION = "The retention policy is for auditors (audit:read)."
MSG_BOB_IDENTITY = "bob-agent may not change user status."
# The broker's policy in the auth tests: the README's example rules plus rules that exercise a write scope, the
# prompts and resources selectors and a `deny` rule with a claim condition. Order matters (first applying rule wins).
AUTH_POLICIES = [
    {"servers": ["ledger"], "tools": ["get_customer_pii"], "require_scopes": ["pii:read"], "message": MSG_PII},
    {"servers": ["ledger"], "tools": ["get_audit_log"], "require_scopes": ["audit:read"], "message": MSG_AUDIT,
     "step_up": True},
    {"servers": ["ledger"], "tools": ["update_account_status"], "require_scopes": ["ledger:write"], "message": MSG_WRITE},
    {"servers": ["ledger"], "prompts": ["summarize_account"], "require_scopes": ["pii:read"], "message": MSG_PROMPT},
    {"servers": ["ledger"], "resources": ["ledger://policies/*"], "require_scopes": ["audit:read"],
     "message": MSG_RETENTION},
    {"servers": ["identity"], "tools": ["disable_user", "activate_user"], "effect": "deny",
     "claims": {"client_id": "bob-agent"}, "message": MSG_BOB_IDENTITY},
    {"effect": "allow"},
]
# Who calls, with which client and scopes (the AS fixture lets alice-agent have all four, bob-agent only mcp:tools).
AUTH_CALLERS = {
    "alice": ("alice-agent", "alice-secret", "mcp:tools pii:read audit:read"),
    "bob": ("bob-agent", "bob-secret", "mcp:tools"),
    "svc": ("svc", "svc-secret", "mcp:tools ledger:write"),
}
ALL_AUTH_TOOLS = {f"ledger__{t}" for t in LEDGER_TOOLS} | {f"identity__{t}" for t in IDENTITY_TOOLS}
# What each caller may call under AUTH_POLICIES, and the refusal each other tool gets.
REFUSALS = {
    "ledger__get_customer_pii": MSG_PII,
    "ledger__get_audit_log": MSG_AUDIT,
    "ledger__update_account_status": MSG_WRITE,
    "identity__disable_user": MSG_BOB_IDENTITY,
    "identity__activate_user": MSG_BOB_IDENTITY,
}
EXPECTED_TOOLS = {
    "alice": ALL_AUTH_TOOLS - {"ledger__update_account_status"},
    "bob": ALL_AUTH_TOOLS - {"ledger__get_customer_pii", "ledger__get_audit_log", "ledger__update_account_status",
                             "identity__disable_user", "identity__activate_user"},
    "svc": ALL_AUTH_TOOLS - {"ledger__get_customer_pii", "ledger__get_audit_log"},
}


class AuthEnv:
    """The real AS plus a broker with `[auth]` (issuer = that AS) in front of ledger and identity_directory (stdio).

    Every token handed out is remembered in `issued`, so the log test can look for each one."""

    def __init__(self, auth_server: H.AuthServer, broker: H.Broker):
        self.auth_server = auth_server
        self.broker = broker
        self.issued: list[str] = []
        self._cache: dict[tuple, str] = {}

    @property
    def prm_url(self) -> str:
        return self.broker.base + "/.well-known/oauth-protected-resource/mcp"

    def token(self, who: str, scope: str | None = None, resource: str | None = None, fresh: bool = False) -> str:
        client_id, secret, default_scope = AUTH_CALLERS[who]
        key = (who, scope or default_scope, resource or self.broker.url)
        if fresh or key not in self._cache:
            tok = self.auth_server.token(client_id, secret, scope=key[1], resource=key[2])
            self.issued.append(tok)
            self._cache[key] = tok
        return self._cache[key]

    def headers(self, who: str) -> dict[str, str]:
        return H.bearer(self.token(who))


@pytest.fixture(scope="session")
def auth_server(logs_dir):
    if not H.AS_FIXTURE.exists() or not (H.HARNESS_DIR / "node_modules" / "oidc-provider").exists():
        pytest.fail("oidc-provider harness missing (run scripts/test.sh --harness-only)")
    a = H.start_auth_server(logs_dir / "as")
    yield a
    a.stop()


def auth_servers_spec() -> dict:
    return {"ledger": H.example_stdio_spec(H.LEDGER_BIN), "identity": H.example_stdio_spec(H.IDENTITY_BIN)}


def auth_section(issuer: str, **extra) -> dict:
    return {"issuer": issuer, "required_scopes": ["mcp:tools"], "scopes_supported": AUTH_SCOPES_SUPPORTED, **extra}


# The auth broker logs at debug level for its own crate: a token that leaks at any level is found by the log test.
AUTH_BROKER_LOG = "info,mcp_broker=debug,rmcp=warn"


@pytest.fixture(scope="session")
def auth_env_state(tmp_path_factory, auth_server):
    for b in (H.BROKER_BIN, H.LEDGER_BIN, H.IDENTITY_BIN):
        if not b.exists():
            yield None, f"{b} is missing (cargo build --all-targets)"
            return
    work = tmp_path_factory.mktemp("broker-auth")
    # A fixed free port (not :0) so the config file's default public_url -- and with it the token audience --
    # is the same for `serve` and for `mcp-broker tools --config F --token T`.
    port = H.free_port()
    try:
        broker = H.start_broker(work, auth_servers_spec(), broker={"listen": f"127.0.0.1:{port}"},
                                name="broker-auth", auth=auth_section(auth_server.issuer), policies=AUTH_POLICIES,
                                env={"RUST_LOG": AUTH_BROKER_LOG})
    except Exception as e:  # noqa: BLE001 - reported by every test that needs it
        yield None, f"broker with [auth] failed to start: {e}"
        return
    env = AuthEnv(auth_server, broker)
    note = ""
    try:
        H.wait_for_tools(broker.url, ["ledger__list_accounts", "identity__list_users"], timeout=30,
                         headers=env.headers("alice"))
    except Exception as e:  # noqa: BLE001 - tests assert on the details
        note = f"auth broker not ready: {e}"
    yield env, note
    broker.stop()


@pytest.fixture
def auth_env(auth_env_state) -> AuthEnv:
    """The auth broker, for tests that need no accepted token (metadata, challenges, refusals)."""
    env, note = auth_env_state
    if env is None:
        pytest.fail(note)
    return env


@pytest.fixture
def authed_env(auth_env_state) -> AuthEnv:
    """The auth broker, for tests that need it to accept the real AS's tokens: fails fast, with the readiness
    check's error, when it did not (instead of every test waiting for its own timeout)."""
    env, note = auth_env_state
    if env is None or note:
        pytest.fail(note)
    return env


def pytest_runtest_makereport(item, call):
    """On failure, attach the broker's stderr tail to the report (as a section)."""
    if call.when != "call" or call.excinfo is None:
        return
    state = item.funcargs.get("broker_state") if hasattr(item, "funcargs") else None
    b = item.funcargs.get("broker") if hasattr(item, "funcargs") else None
    if b is None and state:
        b = state[0]
    if b is None and hasattr(item, "funcargs"):
        env = item.funcargs.get("auth_env") or item.funcargs.get("authed_env")
        b = getattr(env, "broker", None)
    if isinstance(b, H.Broker):
        item.add_report_section("call", "broker stderr", broker_log_tail(b))
    cluster = item.funcargs.get("cluster") if hasattr(item, "funcargs") else None
    if cluster is not None and hasattr(cluster, "logs"):  # test_cluster.py: every instance's and HAProxy's log
        item.add_report_section("call", "cluster logs", cluster.logs())


os.environ.setdefault("PYTHONUNBUFFERED", "1")
