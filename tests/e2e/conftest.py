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


def pytest_runtest_makereport(item, call):
    """On failure, attach the broker's stderr tail to the report (as a section)."""
    if call.when != "call" or call.excinfo is None:
        return
    state = item.funcargs.get("broker_state") if hasattr(item, "funcargs") else None
    b = item.funcargs.get("broker") if hasattr(item, "funcargs") else None
    if b is None and state:
        b = state[0]
    if isinstance(b, H.Broker):
        item.add_report_section("call", "broker stderr", broker_log_tail(b))


os.environ.setdefault("PYTHONUNBUFFERED", "1")
