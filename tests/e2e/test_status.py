"""`GET /status` and `mcp-broker status` (issue 15, item 4): each server's state, last error with its time, restarts,
next retry, counts, connections and calls in flight; sessions by protocol version; the reload generation. Who may
read it: anyone on a broker without `[auth]` and on `metrics_listen`; on the main listener under `[auth]`, only a
token holding one of `[auth] admin_scopes`."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import httpx2
import pytest

import corelib as C
import helpers as H
import opslib as O


def status(b: H.Broker, *args: str) -> subprocess.CompletedProcess:
    # The config listens on port 0, so the CLI is told the URL (its default comes from `listen`).
    return subprocess.run([str(H.BROKER_BIN), "status", "--url", b.base + "/status", *args], capture_output=True,
                          text=True, timeout=30)


def report(b: H.Broker) -> dict:
    p = status(b, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def server(r: dict, name: str) -> dict:
    return next(s for s in r["servers"] if s["name"] == name)


def test_status_follows_a_killed_server_and_counts_sessions(tmp_path):
    C.require(H.LEDGER_BIN)
    b = H.start_broker(tmp_path, {"ledger": H.example_stdio_spec(H.LEDGER_BIN)}, name="broker-status")
    try:
        H.wait_for_tools(b.url, ["ledger__list_accounts"], 30)
        with H.RawSession(b.url, None) as s:
            s.initialize()
            r = report(b)
            led = server(r, "ledger")
            assert led["state"] == "ready" and led["tools"] > 0 and led["connections"] == 1, led
            assert led["restarts"] == 0 and led["last_error"] is None and led["next_retry_ms"] is None, led
            assert led["failed_attempts"] == 0, led
            assert r["sessions"]["total"] == 1 and r["sessions"]["by_protocol"] == {"2025-11-25": 1}, r["sessions"]
            assert r["generation"] == 0 and r["draining"] is False, r
            # The table, for a person.
            t = status(b)
            assert t.returncode == 0, t.stderr
            row = next(ln for ln in t.stdout.splitlines() if ln.startswith("ledger"))
            assert "stdio" in row and "ready" in row, t.stdout
        # Kill the child: the server is seen backing off (with why and when), then ready again, one restart.
        child = next(iter(C.children_matching(b.proc.pid, "ledger")))
        os.kill(child, signal.SIGKILL)
        seen = {}

        def backing_off():
            r = server(report(b), "ledger")
            if r["state"] in ("backing_off", "connecting") and r["last_error"]:
                seen.update(r)
                return True
            return False

        H.poll_until(backing_off, 15, "ledger backing off after its child was killed")
        assert seen["last_error_at"] and seen["last_error_at"].endswith("Z"), seen
        H.poll_until(lambda: server(report(b), "ledger")["state"] == "ready", 30, "ledger ready again")
        assert server(report(b), "ledger")["restarts"] == 1
        # A reload counts in the generation.
        b.config_path.write_text(b.config_path.read_text() + "\n# touched\n")
        b.proc.popen.send_signal(signal.SIGHUP)
        H.poll_until(lambda: report(b)["generation"] >= 1, 10, "the reload generation after SIGHUP")
    finally:
        b.stop()


def test_status_access_under_auth(tmp_path):
    C.require(H.LEDGER_BIN)
    minter = O.Minter()
    b = None
    try:
        auth = {**minter.auth_config(), "admin_scopes": ["mcp:admin"]}
        b = H.start_broker(tmp_path, {"ledger": H.example_stdio_spec(H.LEDGER_BIN)}, name="broker-status-auth",
                           auth=auth, policies=[{"effect": "allow"}])
        url = b.base + "/status"
        with httpx2.Client(timeout=10) as hc:
            assert hc.get(url).status_code == 401
            user = minter.token(b, "alice")
            assert hc.get(url, headers=H.bearer(user)).status_code == 403
            admin = minter.token(b, "ops", scope="mcp:tools mcp:admin")
            r = hc.get(url, headers=H.bearer(admin))
            assert r.status_code == 200 and any(s["name"] == "ledger" for s in r.json()["servers"]), r.text
        # The CLI with the admin token (from the environment).
        p = subprocess.run([str(H.BROKER_BIN), "status", "--url", url, "--json"], capture_output=True, text=True,
                           timeout=30, env={**os.environ, "MCP_BROKER_TOKEN": admin})
        assert p.returncode == 0 and json.loads(p.stdout)["servers"], p.stderr
        p = subprocess.run([str(H.BROKER_BIN), "status", "--url", url], capture_output=True, text=True, timeout=30,
                           env={k: v for k, v in os.environ.items() if k != "MCP_BROKER_TOKEN"})
        assert p.returncode != 0 and "401" in p.stderr, (p.returncode, p.stderr)
    finally:
        if b:
            b.stop()
        minter.stop()


def test_status_shows_a_crashing_childs_exit_status_and_stderr(tmp_path):
    """A stdio server whose child prints a line to stderr and exits 3 before `initialize`: `status` shows it backing
    off with both in its last error; one whose executable is missing shows as failed (not retried)."""
    crash = tmp_path / "crash.sh"
    crash.write_text("#!/bin/sh\necho 'fatal: no API key configured (set FOO_KEY)' >&2\nexit 3\n")
    crash.chmod(0o755)
    missing = tmp_path / "gone.sh"
    missing.write_text("#!/bin/sh\nexit 0\n")
    missing.chmod(0o755)
    b = H.start_broker(tmp_path, {"crashy": {"transport": "stdio", "command": str(crash)},
                                  "gone": {"transport": "stdio", "command": str(missing)}}, name="broker-status-crash")
    missing.unlink()  # `check` saw it at start-up; it is gone when the broker spawns it
    try:
        def crashed() -> bool:
            s = server(report(b), "crashy")
            return s["state"] == "backing_off" and "exit status 3" in (s["last_error"] or "")

        H.poll_until(crashed, 20, "crashy backing off with its exit status")
        s = server(report(b), "crashy")
        assert "fatal: no API key configured (set FOO_KEY)" in s["last_error"], s
        assert s["next_retry_ms"] is not None and s["tools"] == 0, s
        # It never connected: no restart, but its failed attempts are counted.
        assert s["restarts"] == 0 and s["failed_attempts"] >= 1, s
        H.poll_until(lambda: server(report(b), "gone")["state"] == "failed", 20, "gone failed for good")
        assert "not found" in (server(report(b), "gone")["last_error"] or "").lower() or \
            "no such file" in (server(report(b), "gone")["last_error"] or "").lower(), server(report(b), "gone")
        t = status(b)
        row = next(ln for ln in t.stdout.splitlines() if ln.startswith("crashy"))
        assert "backing off" in row and "exit status 3" in row, t.stdout
    finally:
        b.stop()
