"""Raw HTTP behaviour of the /mcp endpoint (test 9) and the 2026-07-28 stateless era (test 12)."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlparse

import httpx2
import pytest
from mcp.shared.exceptions import MCPError

import helpers as H

ACCEPT = "application/json, text/event-stream"
HDRS = {"Content-Type": "application/json", "Accept": ACCEPT}
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "e2e-raw", "version": "0"}}}


def client() -> httpx2.Client:
    return httpx2.Client(timeout=20)


def assert_still_serving(broker):
    with client() as c:
        assert c.get(broker.base + "/healthz").status_code == 200
        r = c.post(broker.url, headers=HDRS, json=INIT)
        assert r.status_code == 200, r.text
        assert H.final_response(r, 1)["result"]["serverInfo"]


def test_healthz(broker):
    with client() as c:
        r = c.get(broker.base + "/healthz")
    assert r.status_code == 200


def test_initialize_raw_and_session_id(broker):
    with client() as c:
        r = c.post(broker.url, headers=HDRS, json=INIT)
    assert r.status_code == 200, r.text
    res = H.final_response(r, 1)["result"]
    assert res["protocolVersion"] == "2025-11-25"
    assert "tools" in res["capabilities"]
    sid = r.headers.get("mcp-session-id")
    assert sid and all(0x21 <= ord(ch) <= 0x7E for ch in sid), f"bad session id {sid!r}"


@pytest.mark.parametrize("body", [b'{"jsonrpc": "2.0", "id": 1, "method": ', b"not json at all", b"\xff\xfe\x00garbage"])
def test_malformed_json_is_a_jsonrpc_error(broker, body):
    """9a. Malformed body -> JSON-RPC parse error (-32700) or a 4xx carrying a JSON-RPC error; no crash."""
    with client() as c:
        r = c.post(broker.url, headers=HDRS, content=body)
    assert r.status_code == 200 or 400 <= r.status_code < 500, f"HTTP {r.status_code}: {r.text[:300]}"
    try:
        msg = H.sse_or_json_messages(r)[0]
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"HTTP {r.status_code} body is not a JSON-RPC message: {r.text[:300]!r}") from e
    assert msg.get("jsonrpc") == "2.0" and "error" in msg, msg
    if r.status_code == 200:
        assert msg["error"]["code"] == -32700, msg
    assert broker.proc.alive()
    assert_still_serving(broker)


async def _unknown_tool(broker):
    async with H.http_session(broker.url) as s:
        try:
            r = await s.call_tool("nope__nope", {})
        except MCPError as e:
            return ("error", e.code, e.error.message)
        return ("result", r.is_error, json.dumps(H.dump(r)))


@pytest.mark.anyio
async def test_unknown_tool(broker):
    """9b. Unknown tool -> JSON-RPC -32602 (or isError) naming the tool."""
    kind, code, text = await _unknown_tool(broker)
    if kind == "error":
        assert code == -32602, (code, text)
    else:
        assert code is True, text
    assert "nope__nope" in text


def test_oversized_body_is_413(broker):
    """9c. A body over 4 MiB -> 413 (and the broker keeps serving)."""
    pad = "x" * (4 * 1024 * 1024 + 1024)
    body = json.dumps({**INIT, "params": {**INIT["params"], "clientInfo": {"name": pad, "version": "0"}}}).encode()
    status = _raw_post_status(broker.url, body)
    assert status == 413, f"expected 413, got {status}"
    assert_still_serving(broker)


def _raw_post_status(url: str, body: bytes) -> int | None:
    """POST with a raw socket so an early 413 (before the body is read) is still observed."""
    u = urlparse(url)
    head = (f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
            f"Accept: {ACCEPT}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((u.hostname, u.port), timeout=20) as sock:
        sock.sendall(head)
        try:
            view = memoryview(body)
            for i in range(0, len(body), 65536):
                sock.sendall(view[i:i + 65536])
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            pass
    if not data.startswith(b"HTTP/1."):
        return None
    return int(data.split(b" ", 2)[1])


def test_evil_origin_is_403(broker):
    """9d. A present but foreign Origin -> 403 (DNS rebinding protection)."""
    with client() as c:
        r = c.post(broker.url, headers={**HDRS, "Origin": "https://evil.example"}, json=INIT)
    assert r.status_code == 403, f"HTTP {r.status_code}: {r.text[:200]}"
    with client() as c:  # a fresh connection: this is about Origin, not keep-alive after a 403
        ok = c.post(broker.url, headers={**HDRS, "Origin": broker.base}, json=INIT)
    assert ok.status_code == 200, f"own origin rejected: HTTP {ok.status_code}"


def test_accept_star_on_initialize(broker):
    """9e. Accept: */* on initialize -> 200, not 406 (Claude.ai sends it)."""
    with client() as c:
        r = c.post(broker.url, headers={"Content-Type": "application/json", "Accept": "*/*"}, json=INIT)
    assert r.status_code == 200, f"HTTP {r.status_code}: {r.text[:200]}"
    assert H.final_response(r, 1)["result"]["protocolVersion"]


def test_unknown_session_is_404(broker):
    with client() as c:
        r = c.post(broker.url, headers={**HDRS, "Mcp-Session-Id": "bogus-session-e2e", "MCP-Protocol-Version": "2025-11-25"},
                   json={"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}})
    assert r.status_code == 404, f"HTTP {r.status_code}: {r.text[:200]}"


def test_delete_ends_session(broker):
    """SH-13: DELETE with the session id ends it (or 405); afterwards the id is unknown -> 404."""
    with client() as c:
        r = c.post(broker.url, headers=HDRS, json=INIT)
        sid = r.headers["mcp-session-id"]
        h = {**HDRS, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
        c.post(broker.url, headers=h, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        lst = c.post(broker.url, headers=h, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}})
        assert lst.status_code == 200 and H.final_response(lst, 2)["result"]["tools"]
        d = c.delete(broker.url, headers=h)
        assert d.status_code in (200, 202, 204, 405), f"DELETE -> HTTP {d.status_code}"
        if d.status_code != 405:
            again = c.post(broker.url, headers=h, json={"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {}})
            assert again.status_code == 404, f"ended session still answered: HTTP {again.status_code}"


def test_ping(broker):
    with client() as c:
        r = c.post(broker.url, headers=HDRS, json=INIT)
        h = {**HDRS, "Mcp-Session-Id": r.headers["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25"}
        c.post(broker.url, headers=h, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        p = c.post(broker.url, headers=h, json={"jsonrpc": "2.0", "id": "p", "method": "ping"})
    assert H.final_response(p, "p")["result"] == {}


# ----------------------------------------------------------------------------- 2026-07-28 stateless

MODERN = "2026-07-28"
META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "e2e-stateless", "version": "0.1.0"},
}


def modern_post(c: httpx2.Client, url: str, rid: int, method: str, params: dict | None = None,
                name: str | None = None, headers: dict | None = None):
    body = {"jsonrpc": "2.0", "id": rid, "method": method, "params": {**(params or {}), "_meta": META}}
    h = {**HDRS, "MCP-Protocol-Version": MODERN, "Mcp-Method": method}
    if name is not None:
        h["Mcp-Name"] = name
    h.update(headers or {})
    return c.post(url, headers=h, json=body)


def test_stateless_discover_list_call(broker):
    """12. server/discover, tools/list and tools/call without initialize or a session."""
    with client() as c:
        r = modern_post(c, broker.url, 1, "server/discover")
        assert r.status_code == 200, f"discover: HTTP {r.status_code}: {r.text[:500]}"
        assert "mcp-session-id" not in r.headers
        d = H.final_response(r, 1)
        assert "result" in d, d
        assert MODERN in d["result"]["supportedVersions"], d
        assert "tools" in d["result"]["capabilities"], d

        r = modern_post(c, broker.url, 2, "tools/list")
        assert r.status_code == 200, f"tools/list: HTTP {r.status_code}: {r.text[:500]}"
        assert "mcp-session-id" not in r.headers
        lst = H.final_response(r, 2)
        assert "result" in lst, lst
        names = {t["name"] for t in lst["result"]["tools"]}
        cursor = lst["result"].get("nextCursor")
        rid = 3
        while cursor:
            r = modern_post(c, broker.url, rid, "tools/list", {"cursor": cursor})
            page = H.final_response(r, rid)["result"]
            names |= {t["name"] for t in page["tools"]}
            cursor = page.get("nextCursor")
            rid += 1
        assert {"evhttp__echo", "evstdio__echo", "evsse__echo"} <= names, sorted(names)

        r = modern_post(c, broker.url, 100, "tools/call", {"name": "evhttp__echo", "arguments": {"message": "stateless-hi"}},
                        name="evhttp__echo")
        assert r.status_code == 200, f"tools/call: HTTP {r.status_code}: {r.text[:500]}"
        res = H.final_response(r, 100)
        assert "result" in res, res
        assert not res["result"].get("isError"), res
        assert "stateless-hi" in res["result"]["content"][0]["text"]


def test_stateless_header_mismatch_rejected(broker):
    """MH-3: an Mcp-Name header that contradicts the body -> 400 / -32020."""
    with client() as c:
        r = modern_post(c, broker.url, 7, "tools/call", {"name": "evhttp__echo", "arguments": {"message": "x"}},
                        name="evhttp__get-sum")
    assert r.status_code == 400, f"HTTP {r.status_code}: {r.text[:300]}"
    assert H.final_response(r, 7)["error"]["code"] == -32020
