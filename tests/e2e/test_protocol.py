"""Lifecycle and utility details of the legacy (initialize) era, checked with raw JSON-RPC over HTTP and stdio
(SPEC-CHECKLIST §3.2, §3.5, §4)."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import anyio
import httpx2
import pytest

import helpers as H
from conftest import require_broker

ACCEPT = "application/json, text/event-stream"
HDRS = {"Content-Type": "application/json", "Accept": ACCEPT}


def init_body(version="2025-11-25", caps=None, rid=1):
    return {"jsonrpc": "2.0", "id": rid, "method": "initialize",
            "params": {"protocolVersion": version, "capabilities": caps or {}, "clientInfo": {"name": "e2e-raw", "version": "0"}}}


class RawSession:
    def __init__(self, url: str, caps=None, version="2025-11-25"):
        self.url = url
        self.c = httpx2.Client(timeout=30)
        r = self.c.post(url, headers=HDRS, json=init_body(version, caps))
        assert r.status_code == 200, r.text
        self.init = H.final_response(r, 1)["result"]
        self.h = {**HDRS, "Mcp-Session-Id": r.headers["mcp-session-id"], "MCP-Protocol-Version": self.init["protocolVersion"]}
        n = self.c.post(url, headers=self.h, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        self.initialized_status = n.status_code
        self.initialized_body = n.content

    def request(self, rid, method, params=None, **kw):
        return self.c.post(self.url, headers=self.h, json={"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}}, **kw)

    def close(self):
        try:
            self.c.delete(self.url, headers=self.h)
        finally:
            self.c.close()


@pytest.fixture
def raw(broker):
    s = RawSession(broker.url)
    yield s
    s.close()


def test_initialized_notification_is_202(raw):
    """SH-4: an accepted notification gets 202 with an empty body."""
    assert raw.initialized_status == 202
    assert raw.initialized_body == b""


def test_version_negotiation(broker):
    """LC-1: a supported version is echoed; an unknown one is answered with a supported version."""
    with httpx2.Client(timeout=20) as c:
        r = c.post(broker.url, headers=HDRS, json=init_body("2025-06-18"))
        assert H.final_response(r, 1)["result"]["protocolVersion"] == "2025-06-18"
        r = c.post(broker.url, headers=HDRS, json=init_body("2099-01-01"))
        v = H.final_response(r, 1)["result"]["protocolVersion"]
    assert v in ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"), v


def test_bad_protocol_version_header_is_400(raw):
    """SH-14: an unsupported MCP-Protocol-Version header -> 400."""
    r = raw.c.post(raw.url, headers={**raw.h, "MCP-Protocol-Version": "1999-01-01"},
                   json={"jsonrpc": "2.0", "id": 5, "method": "tools/list", "params": {}})
    assert r.status_code == 400, f"HTTP {r.status_code}: {r.text[:200]}"


def test_batch_is_rejected(raw):
    """SH-3: JSON-RPC batches were removed in 2025-06-18."""
    r = raw.c.post(raw.url, headers=raw.h, json=[{"jsonrpc": "2.0", "id": 8, "method": "ping"},
                                                 {"jsonrpc": "2.0", "id": 9, "method": "ping"}])
    assert 400 <= r.status_code < 500, f"HTTP {r.status_code}: {r.text[:200]}"


def test_invalid_cursor_is_32602(raw):
    """LC-9: an invalid cursor SHOULD get -32602."""
    r = raw.request(3, "tools/list", {"cursor": "garbage-cursor-e2e"})
    msg = H.final_response(r, 3)
    assert "error" in msg and msg["error"]["code"] == -32602, msg


def test_logging_set_level(raw):
    """LC-11: with `logging` declared, setLevel works and an invalid level -> -32602."""
    r = raw.request(4, "logging/setLevel", {"level": "bogus"})
    msg = H.final_response(r, 4)
    # setLevel is optional: without the logging capability, -32601 (method not found) is right
    expected = -32602 if "logging" in raw.init["capabilities"] else -32601
    if "logging" in raw.init["capabilities"]:
        ok = H.final_response(raw.request(5, "logging/setLevel", {"level": "info"}), 5)
        assert ok.get("result") == {}, f"logging is declared but setLevel(info) failed: {ok}"
    assert "error" in msg and msg["error"]["code"] == expected, (raw.init["capabilities"], msg)


def test_same_request_ids_in_two_sessions(broker):
    """LC-4: two sessions both use id 1 concurrently; each gets its own result."""
    a, b = RawSession(broker.url), RawSession(broker.url)
    out = {}

    def call(name, s, msg):
        r = s.request(1, "tools/call", {"name": "evhttp__trigger-long-running-operation", "arguments": {"duration": 0.5, "steps": 1}})
        r2 = s.request(2, "tools/call", {"name": "evhttp__echo", "arguments": {"message": msg}})
        out[name] = (H.final_response(r, 1), H.final_response(r2, 2))

    try:
        ts = [threading.Thread(target=call, args=("a", a, "from-a")), threading.Thread(target=call, args=("b", b, "from-b"))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
    finally:
        a.close()
        b.close()
    assert "from-a" in out["a"][1]["result"]["content"][0]["text"]
    assert "from-b" in out["b"][1]["result"]["content"][0]["text"]
    assert "completed" in out["a"][0]["result"]["content"][0]["text"]


def test_no_elicitation_sent_to_client_without_capability(raw):
    """LC-3: a client that did not declare elicitation never receives elicitation/create; it gets an error."""
    r = raw.request(11, "tools/call", {"name": "evhttp__trigger-elicitation-request", "arguments": {}}, timeout=30)
    msgs = H.sse_or_json_messages(r)
    assert not any(m.get("method") == "elicitation/create" for m in msgs), msgs
    final = H.final_response(r, 11)
    assert "error" in final or final["result"].get("isError") is True, final


def test_tool_name_shortening(tmp_path, ev_http):
    """Names that would exceed 64 characters are shortened (with a hash), stay unique, and still route."""
    long_name = "a_long_upstream_name_for_e2e_x32"  # 32 characters, the maximum server name
    sep = "_-_-_"  # 32 + 5 + len("trigger-long-running-operation") = 67 > 64
    assert len(long_name) == 32
    b = H.start_broker(tmp_path, {long_name: {"transport": "http", "url": ev_http.url}},
                       broker={"separator": sep}, name="broker-longnames")
    try:
        H.wait_for_tools(b.url, [f"{long_name}{sep}echo"], 30)

        async def go():
            async with H.http_session(b.url) as s:
                tools = await H.list_all_tools(s)
                names = [t.name for t in tools]
                assert all(H.TOOL_NAME_RE.match(n) for n in names), names
                assert len(names) == len(set(names))
                long = [t for t in tools if t.description == "Demonstrates a long running operation with progress updates."]
                assert len(long) == 1, names
                assert len(long[0].name) <= 64
                r = await s.call_tool(long[0].name, {"duration": 0.2, "steps": 1})
                assert not r.is_error and "completed" in r.content[0].text, H.dump(r)
        anyio.run(go)
    finally:
        b.stop()


def test_resource_uri_namespacing_rules(tmp_path, ev_http):
    """Resource URIs: <server lowercased, _ -> ->+<uri>; prefix = "" leaves them unchanged."""
    b = H.start_broker(tmp_path, {
        "Ev_Http": {"transport": "http", "url": ev_http.url},
        "plain": {"transport": "http", "url": ev_http.url, "prefix": ""},
    }, name="broker-uris")
    uri = "demo://resource/static/document/architecture.md"
    try:
        H.wait_for_tools(b.url, ["Ev_Http__echo", "echo"], 30)

        async def go():
            async with H.http_session(b.url) as s:
                uris = {str(r.uri) for r in (await s.list_resources()).resources}
                assert f"ev-http+{uri}" in uris, sorted(uris)
                assert uri in uris, sorted(uris)
                got = await s.read_resource(f"ev-http+{uri}")
                assert str(got.contents[0].uri) == f"ev-http+{uri}"
                plain = await s.read_resource(uri)
                assert str(plain.contents[0].uri) == uri
                assert got.contents[0].text == plain.contents[0].text and got.contents[0].text
        anyio.run(go)
    finally:
        b.stop()


def test_stdio_front_raw_lines_and_eof_exit(tmp_path, ev_http):
    """IO-1/IO-2: every stdout line is one JSON-RPC message; closing stdin ends the process and its children."""
    require_broker()
    cfg = tmp_path / "stdio-raw.toml"
    cfg.write_text(H.render_config({"evstdio": H.everything_stdio_spec(), "evhttp": {"transport": "http", "url": ev_http.url}}))
    p = subprocess.Popen([str(H.BROKER_BIN), "stdio", "--config", str(cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=open(tmp_path / "stdio-raw.stderr.log", "wb"), start_new_session=True)
    lines: list[str] = []

    def reader():
        for raw_line in p.stdout:
            lines.append(raw_line.decode())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        def send(obj):
            p.stdin.write((json.dumps(obj) + "\n").encode())
            p.stdin.flush()

        send(init_body())
        H.poll_until(lambda: any('"id":1' in l.replace(" ", "") for l in lines), 20, "initialize response on stdout")
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})

        def listed():
            send({"jsonrpc": "2.0", "id": 100 + len(lines), "method": "tools/list"})
            time.sleep(0)  # the poll interval paces the requests
            return any("evhttp__echo" in l and "evstdio__echo" in l for l in lines)
        H.poll_until(listed, 30, "tools/list listing both upstreams", interval=0.5)
        kids = H.descendants(p.pid)
        assert kids, "stdio broker has no child process for its stdio upstream"
        p.stdin.close()
        try:
            rc = p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("stdio broker did not exit within 10 s of stdin EOF")
        assert rc == 0, rc
        H.poll_until(lambda: not any(H.pid_alive(k) for k in kids), 5, "children of the stdio broker to exit")
        t.join(5)
        for l in lines:
            m = json.loads(l)
            assert m.get("jsonrpc") == "2.0", l
    finally:
        if p.poll() is None:
            p.kill()
        for k in H.descendants(p.pid):
            try:
                import os
                os.kill(k, 9)
            except OSError:
                pass
