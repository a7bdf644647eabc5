"""Helpers for the "Core v2" end-to-end tests (test_core_v2.py, test_core_v2_sessions.py).

Real upstreams only: server-everything, server-memory and server-sequential-thinking (npm, stdio) and the `ledger`
example. Callers with [auth] carry RS256 tokens minted by the test (opslib.Minter). Standalone notifications are read
from each session's GET SSE stream by a thread over plain HTTP, so a test sees exactly what the broker pushed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest

import helpers as H
import opslib as O

MEMORY_BIN = H.NODE_BIN_DIR / "mcp-server-memory"
THINK_BIN = H.NODE_BIN_DIR / "mcp-server-sequential-thinking"
FILESYSTEM_BIN = H.NODE_BIN_DIR / "mcp-server-filesystem"

MSG_HIDDEN = "server-everything is not for bob (core v2 e2e)."
# bob may see the ledger only; everyone else sees everything.
BOB_ONLY_LEDGER = [
    {"servers": ["everything"], "effect": "deny", "claims": {"sub": "bob"}, "message": MSG_HIDDEN},
    {"effect": "allow"},
]
AUDIT_TOML = '[audit]\nfile = "audit.jsonl"\n'
LEVELS = ["debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"]


def require(*bins: Path) -> None:
    for b in (H.BROKER_BIN, *bins):
        if not b.exists():
            pytest.fail(f"{b} is missing (cargo build --all-targets / scripts/test.sh --harness-only)")


def everything(**extra: Any) -> dict:
    return H.everything_stdio_spec(**extra)


def ledger(**extra: Any) -> dict:
    return H.example_stdio_spec(H.LEDGER_BIN, **extra)


def node_spec(binary: Path, args: list[str] | None = None, **extra: Any) -> dict:
    spec = {"transport": "stdio", "command": str(binary), "args": args or [], "inherit_env": ["PATH", "HOME"]}
    spec.update(extra)
    return spec


def memory(memory_file: Path, **extra: Any) -> dict:
    return node_spec(MEMORY_BIN, env={"MEMORY_FILE_PATH": str(memory_file)}, **extra)


def think(**extra: Any) -> dict:
    return node_spec(THINK_BIN, env={"DISABLE_THOUGHT_LOGGING": "true"}, **extra)


def text_of(result: dict) -> str:
    return "\n".join(c.get("text", "") for c in result.get("content", []) if isinstance(c, dict))


def call(s: H.RawSession, name: str, args: dict | None = None) -> dict:
    return s.request("tools/call", {"name": name, "arguments": args or {}})


def open_session(url: str, token: str | None = None, timeout: float = 30) -> H.RawSession:
    s = H.RawSession(url, token, timeout=timeout)
    s.initialize()
    return s


def children_matching(pid: int, needle: str) -> set[int]:
    """Live descendants of pid whose command line mentions needle."""
    return {p for p in H.descendants(pid) if any(needle in a for a in H.cmdline(p))}


def vm_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def metric_sum(scrape: O.Scrape, name: str) -> float | None:
    """The sum of every series of a metric (None when the metric is absent)."""
    series = scrape.series(name)
    return sum(series.values()) if series else None


class SseListener:
    """The standalone GET SSE stream of one session, read by a thread; every JSON-RPC message it carries is kept
    with its arrival time. Stops when the session is deleted, the broker closes the stream, or stop() is called."""

    def __init__(self, session: H.RawSession, name: str = "listener"):
        self.name = name
        self.messages: list[tuple[float, dict]] = []
        self.status: int | None = None
        self.error: BaseException | None = None
        self.connected = threading.Event()
        self._client = httpx2.Client(timeout=httpx2.Timeout(10, read=None))
        self._headers = {k: v for k, v in session.headers().items() if k.lower() != "content-type"}
        self._headers["Accept"] = "text/event-stream"
        self._url = session.url
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self.connected.wait(15):
            raise AssertionError(f"{name}: the GET SSE stream did not open within 15 s ({self.error!r})")
        assert self.status == 200, f"{name}: GET /mcp answered HTTP {self.status} ({self.error!r})"

    def _run(self) -> None:
        try:
            with self._client.stream("GET", self._url, headers=self._headers) as r:
                self.status = r.status_code
                self.connected.set()
                if r.status_code != 200:
                    return
                data: list[str] = []
                for line in r.iter_lines():
                    if self._stop:
                        return
                    if line.startswith("data:"):
                        data.append(line[5:].lstrip())
                    elif line == "" and data:
                        payload = "\n".join(data)
                        data = []
                        if payload.strip():
                            try:
                                self.messages.append((time.monotonic(), json.loads(payload)))
                            except json.JSONDecodeError:
                                pass
        except BaseException as e:  # noqa: BLE001 - closed by stop() or by the broker
            self.error = e
        finally:
            self.connected.set()

    def methods(self, method: str) -> list[dict]:
        return [m for _, m in list(self.messages) if m.get("method") == method]

    def logs(self) -> list[dict]:
        return [m.get("params", {}) for m in self.methods("notifications/message")]

    def times(self, method: str) -> list[float]:
        return [t for t, m in list(self.messages) if m.get("method") == method]

    def stop(self) -> None:
        self._stop = True
        try:
            self._client.close()
        except Exception:  # noqa: BLE001
            pass


def hold_for(seconds: float, pred=lambda: False, interval: float = 0.05) -> bool:
    """Watch a window of `seconds` (a negative check: nothing may arrive); returns True as soon as pred() holds."""
    d = H.Deadline(seconds)
    while not d.expired():
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


class StuckSseReader:
    """A session's GET SSE stream on a raw socket with a tiny receive buffer that reads the response headers and then
    never reads again: a client that stopped consuming (the kernel buffers fill, the broker must not wait for it)."""

    def __init__(self, base: str, session: H.RawSession):
        host, port = base.split("://", 1)[1].split(":")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(15)
        self.sock.connect((host, int(port)))
        hdrs = {k: v for k, v in session.headers().items() if k.lower() != "content-type"}
        hdrs["Accept"] = "text/event-stream"
        req = f"GET /mcp HTTP/1.1\r\nHost: {host}:{port}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
        self.sock.sendall(req.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)  # byte by byte: consume the headers only, nothing of the body
            if not chunk:
                raise AssertionError(f"the broker closed the GET stream before its headers: {head!r}")
            head += chunk
        self.status_line = head.split(b"\r\n", 1)[0].decode()
        assert " 200" in self.status_line, f"GET /mcp for the stuck session: {head.decode(errors='replace')}"

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def req(s: H.RawSession, listener: SseListener | None, method: str, params: dict | None = None) -> dict:
    """A request over a raw session; notifications the broker put on this request's own SSE response (rather than on
    the GET stream) are added to `listener`, so a test counts them wherever the broker chose to send them."""
    r, rid = s.post(method, params)
    assert r.status_code == 200, f"{method}: HTTP {r.status_code} {r.text[:300]}"
    msgs = H.sse_or_json_messages(r)
    if listener is not None:
        now = time.monotonic()
        listener.messages.extend((now, m) for m in msgs if "method" in m and "id" not in m)
    for m in msgs:
        if m.get("id") == rid and ("result" in m or "error" in m):
            return m
    raise AssertionError(f"no response to {method} in: {r.text[:1000]}")


def tool(s: H.RawSession, listener: SseListener | None, name: str, args: dict | None = None) -> dict:
    return req(s, listener, "tools/call", {"name": name, "arguments": args or {}})
