"""A dead upstream, reconnection, and process hygiene (tests 7-8)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import anyio
import pytest
from mcp import types as T
from mcp.shared.exceptions import MCPError

import helpers as H

pytestmark = pytest.mark.anyio


class Notes:
    def __init__(self):
        self.tools_changed = 0

    async def __call__(self, message):
        if isinstance(message, T.ToolListChangedNotification) or \
                getattr(message, "method", None) == "notifications/tools/list_changed":
            self.tools_changed += 1


async def test_dead_upstream_then_recovery(tmp_path, ev_http):
    """7. Kill the SSE upstream mid-session: its tools stay listed and answer `unavailable` (no hang, no -32602),
    others work; restart -> calls work again."""
    sse = H.start_everything("sse", tmp_path, name="everything-sse-victim")
    broker = None
    try:
        broker = H.start_broker(tmp_path, {
            "evsse": {"transport": "sse", "url": sse.url},
            "evhttp": {"transport": "http", "url": ev_http.url},
        })
        await anyio.to_thread.run_sync(lambda: H.wait_for_tools(broker.url, ["evsse__echo", "evhttp__echo"], 30))
        notes = Notes()
        async with H.http_session(broker.url, message_handler=notes) as s:
            r = await s.call_tool("evsse__echo", {"message": "before"})
            assert not r.is_error and "before" in r.content[0].text

            sse.stop()
            assert not sse.proc.alive()

            # a call to the dead upstream's tool answers "unavailable" promptly (an isError result,
            # never -32602 "unknown tool"): the server keeps its last-known catalog entries
            async def unavailable():
                with anyio.fail_after(20):
                    r = await s.call_tool("evsse__echo", {"message": "while-dead"})
                assert r.is_error, f"call to a dead upstream succeeded: {H.dump(r)}"
                return "unavailable" in r.content[0].text
            await H.apoll_until(unavailable, 20, "an `unavailable` answer from the dead upstream's tool")
            assert "evsse__echo" in {t.name for t in await H.list_all_tools(s)}, \
                "a reconnecting server's tools must stay listed"
            # other upstreams keep working in the same session
            with anyio.fail_after(10):
                r = await s.call_tool("evhttp__echo", {"message": "others-fine"})
            assert not r.is_error and "others-fine" in r.content[0].text

            # restart on the same port: the broker reconnects (backoff <= 30 s) and calls work again
            sse2 = H.start_everything("sse", tmp_path, port=sse.port, name="everything-sse-reborn")
            try:
                async def back():
                    with anyio.fail_after(10):
                        r = await s.call_tool("evsse__echo", {"message": "after-restart"})
                    return not r.is_error and "after-restart" in r.content[0].text
                await H.apoll_until(back, 45, "calls to evsse to work again after restart", interval=0.5)
            finally:
                sse2.stop()
    finally:
        if broker:
            broker.stop()
        sse.stop()


def _stdio_servers() -> dict:
    servers = {"evstdio": H.everything_stdio_spec()}
    if H.LEDGER_BIN.exists():
        servers["ledger"] = H.example_stdio_spec(H.LEDGER_BIN)
    return servers


def _cmdlines(pids):
    out = {}
    for p in pids:
        try:
            out[p] = open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
    return out


async def test_no_leaked_children_after_sessions_and_sigterm(tmp_path):
    """8. 20 sessions open+close, then SIGTERM: exit 0 within seconds and no descendant survives."""
    broker = H.start_broker(tmp_path, _stdio_servers(), name="broker-leak")
    try:
        await anyio.to_thread.run_sync(lambda: H.wait_for_tools(broker.url, ["evstdio__echo"], 30))
        async with H.http_session(broker.url) as s:
            await s.call_tool("evstdio__echo", {"message": "warm"})
        baseline = H.descendants(broker.proc.pid)
        assert baseline, "broker has no child processes although it has stdio upstreams"

        for i in range(20):
            async with H.http_session(broker.url) as s:
                await s.list_tools()
                r = await s.call_tool("evstdio__echo", {"message": f"s{i}"})
                assert not r.is_error

        # sessions are gone: no per-session processes may remain
        await H.apoll_until(lambda: len(H.descendants(broker.proc.pid)) <= len(baseline), 10,
                            f"children back to baseline {len(baseline)}")
        kids = H.descendants(broker.proc.pid)
        cmd = _cmdlines(kids)

        broker.proc.signal(signal.SIGTERM)  # the broker only, not its process group
        try:
            rc = broker.proc.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("broker did not exit within 10 s of SIGTERM")
        assert rc == 0, f"broker exit code {rc}\n{broker.proc.stderr_tail()}"
        await H.apoll_until(lambda: not any(H.pid_alive(p) for p in kids), 5, "broker children to exit")
        alive = {p: c for p, c in cmd.items() if H.pid_alive(p)}
        assert not alive, f"children left behind: {alive}"
    finally:
        broker.stop()


async def test_sigterm_with_open_session(tmp_path, ev_http):
    """SIGTERM while a client holds a session (and its GET stream) open still exits promptly."""
    servers = _stdio_servers()
    servers["evhttp"] = {"transport": "http", "url": ev_http.url}
    broker = H.start_broker(tmp_path, servers, name="broker-open-session")
    try:
        await anyio.to_thread.run_sync(lambda: H.wait_for_tools(broker.url, ["evstdio__echo"], 30))
        async with H.http_session(broker.url) as s:
            await s.call_tool("evstdio__echo", {"message": "x"})
            kids = H.descendants(broker.proc.pid)
            t0 = time.monotonic()
            broker.proc.signal(signal.SIGTERM)
            rc = await anyio.to_thread.run_sync(lambda: _wait(broker.proc.popen, 10))
            elapsed = time.monotonic() - t0
            assert rc is not None, "broker did not exit within 10 s of SIGTERM with a session open"
        assert rc == 0, f"exit code {rc}"
        assert elapsed < 6, f"shutdown took {elapsed:.1f}s"
        await H.apoll_until(lambda: not any(H.pid_alive(p) for p in kids), 5, "broker children to exit")
    finally:
        broker.stop()


def _wait(popen, timeout):
    try:
        return popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


async def test_stdio_upstream_env_is_cleared(tmp_path):
    """inherit_env: a stdio child sees only the inherited variables (plus what it sets itself)."""
    broker = H.start_broker(tmp_path, {"evstdio": H.everything_stdio_spec()}, name="broker-env",
                            env={"E2E_SECRET_SHOULD_NOT_LEAK": "leak-canary-123"})
    try:
        await anyio.to_thread.run_sync(lambda: H.wait_for_tools(broker.url, ["evstdio__get-env"], 30))
        async with H.http_session(broker.url) as s:
            r = await s.call_tool("evstdio__get-env", {})
        text = "\n".join(c.text for c in r.content if hasattr(c, "text"))
        assert "PATH" in text
        assert "leak-canary-123" not in text
    finally:
        broker.stop()
