"""Faithful relay: definitions pass through the broker exactly as the upstream sent them.

Every field (also ones the broker's MCP library does not model, such as `execution` on the official
Node servers' tools) and every object's key order must arrive unchanged; only the namespaced `name`
(tools, prompts), `uri` (resources) and `uriTemplate` (templates) differ. Both sides are read as raw
wire JSON (plain HTTP or stdio lines), never through a typed SDK model that could itself drop fields.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

import helpers as H
from conftest import EVERYTHING_SERVERS

SEQ_THINKING_BIN = H.NODE_BIN_DIR / "mcp-server-sequential-thinking"
FILESYSTEM_BIN = H.NODE_BIN_DIR / "mcp-server-filesystem"

# list method -> (result field, the key the broker rewrites)
LISTS = {
    "tools/list": ("tools", "name"),
    "prompts/list": ("prompts", "name"),
    "resources/list": ("resources", "uri"),
    "resources/templates/list": ("resourceTemplates", "uriTemplate"),
}


def ordered(v: Any) -> Any:
    """JSON as nested (key, value) pair lists: equality then also compares key order."""
    if isinstance(v, dict):
        return [(k, ordered(x)) for k, x in v.items()]
    if isinstance(v, list):
        return [ordered(x) for x in v]
    return v


# server-everything stamps dynamic resources with the wall-clock time ("created at 10:31:29 AM"):
# the direct and brokered calls may straddle a second, so the stamp is masked before comparing.
CLOCK = re.compile(r"\b\d{1,2}:\d{2}:\d{2}\s?[AP]M\b")


def unclocked(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: unclocked(x) for k, x in v.items()}
    if isinstance(v, list):
        return [unclocked(x) for x in v]
    return CLOCK.sub("<time>", v) if isinstance(v, str) else v


def exposed(key: str, server: str, original: str) -> str:
    return f"{server}+{original}" if key in ("uri", "uriTemplate") else f"{server}__{original}"


def http_lists(url: str, methods: list[str]) -> dict[str, list[dict]]:
    """Every page of each list, over a plain HTTP session (json.loads keeps key order)."""
    out: dict[str, list[dict]] = {}
    with H.RawSession(url, None) as s:
        s.initialize()
        for m in methods:
            field, _ = LISTS[m]
            items: list[dict] = []
            params: dict | None = None
            for _ in range(100):
                msg = s.request(m, params)
                assert "result" in msg, f"{m} at {url}: {msg}"
                items += msg["result"].get(field, [])
                cursor = msg["result"].get("nextCursor")
                if not cursor:
                    break
                params = {"cursor": cursor}
            out[m] = items
    return out


class StdioSession:
    """A raw MCP session with a stdio server (newline-delimited JSON-RPC; json.loads keeps key order)."""

    def __init__(self, cmd: list[str], cwd: Path | None = None):
        self.cmd = cmd
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, start_new_session=True, cwd=cwd)
        self.next_id = 0
        try:
            self.request("initialize", H.init_body()["params"])
            self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        except BaseException:
            self.close()
            raise

    def send(self, body: dict) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(json.dumps(body) + "\n")
        self.p.stdin.flush()

    def request(self, method: str, params: dict | None = None) -> dict:
        assert self.p.stdout is not None
        self.next_id += 1
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
        if params is not None:
            body["params"] = params
        self.send(body)
        while True:
            line = self.p.stdout.readline()
            assert line, f"{self.cmd[0]} closed stdout while {method} was pending"
            msg = json.loads(line)
            if msg.get("id") == self.next_id and ("result" in msg or "error" in msg):
                return msg

    def lists(self, methods: list[str]) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for m in methods:
            field, _ = LISTS[m]
            items: list[dict] = []
            params = None
            for _ in range(100):
                msg = self.request(m, params)
                assert "result" in msg, f"{m} via {self.cmd[0]}: {msg}"
                items += msg["result"].get(field, [])
                cursor = msg["result"].get("nextCursor")
                if not cursor:
                    break
                params = {"cursor": cursor}
            out[m] = items
        return out

    def wait_tools(self, names: set[str]) -> None:
        """Poll tools/list until `names` are listed (a broker still connecting its upstreams)."""
        def listed() -> bool:
            return names <= {t["name"] for t in self.request("tools/list").get("result", {}).get("tools", [])}
        H.poll_until(listed, 60, f"{sorted(names)} listed over stdio", interval=0.2)

    def close(self) -> None:
        if self.p.stdin:
            self.p.stdin.close()
        try:
            self.p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()

    def __enter__(self) -> "StdioSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def stdio_lists(cmd: list[str], methods: list[str], wait_tools: set[str] | None = None) -> dict[str, list[dict]]:
    with StdioSession(cmd) as s:
        if wait_tools:
            s.wait_tools(wait_tools)
        return s.lists(methods)


def assert_relayed(direct: dict[str, list[dict]], via: dict[str, list[dict]], server: str,
                   require: dict[str, int] | None = None) -> int:
    """Each directly listed item appears through the broker identical (values and key order) but for
    its namespaced key. Returns how many items were compared."""
    compared = 0
    for method, items in direct.items():
        _, key = LISTS[method]
        by_key = {b[key]: b for b in via.get(method, [])}
        missing = []
        for d in items:
            want = exposed(key, server, d[key])
            b = by_key.get(want)
            if b is None:
                missing.append(want)
                continue
            assert list(b.keys()) == list(d.keys()), f"{method} {want}: keys or key order differ"
            assert b[key] == want
            b_rest = {k: v for k, v in b.items() if k != key}
            d_rest = {k: v for k, v in d.items() if k != key}
            assert ordered(b_rest) == ordered(d_rest), (
                f"{method} {want} differs from the upstream's own definition\n"
                f"broker:   {json.dumps(b)}\nupstream: {json.dumps(d)}"
            )
            compared += 1
        assert not missing, f"{method}: not listed through the broker: {missing}"
        if require and method in require:
            assert len(items) >= require[method], f"{method}: only {len(items)} items listed directly"
    return compared


def test_everything_definitions_relayed_exactly(broker, ev_http):
    """server-everything's tools, prompts, resources and templates through the HTTP front equal the
    upstream's own list field by field, key order included, name/URI aside (all three transports)."""
    methods = list(LISTS)
    direct = http_lists(ev_http.url, methods)
    via = http_lists(broker.url, methods)
    # Fields rmcp does not model travel too (server-everything marks its tools with `execution`).
    unknown = {k for t in direct["tools/list"] for k in t} - {
        "name", "title", "description", "inputSchema", "outputSchema", "annotations", "icons", "_meta"}
    print(f"tool fields unknown to typed models: {sorted(unknown)}")
    for srv in EVERYTHING_SERVERS:
        n = assert_relayed(direct, via, srv, require={"tools/list": 5})
        assert n >= len(direct["tools/list"])


@pytest.fixture
def node_servers(tmp_path):
    for b in (SEQ_THINKING_BIN, FILESYSTEM_BIN):
        if not b.exists():
            pytest.fail(f"{b} is missing: run scripts/test.sh --harness-only")
    root = tmp_path / "fsroot"
    root.mkdir()
    (root / "a.txt").write_text("hello\n")
    return {
        "seq": [str(SEQ_THINKING_BIN)],
        "fs": [str(FILESYSTEM_BIN), str(root)],
    }


def test_official_node_servers_relayed_exactly(tmp_path, node_servers):
    """sequential-thinking (whose inputSchema property order is not alphabetical) and filesystem:
    their tools through the broker, over the HTTP front and the stdio front, equal their own."""
    servers = {name: {"transport": "stdio", "command": cmd[0], "args": cmd[1:], "inherit_env": ["PATH", "HOME"]}
               for name, cmd in node_servers.items()}
    b = H.start_broker(tmp_path / "b", servers)
    try:
        H.wait_for_tools(b.url, ["seq__sequentialthinking", "fs__read_text_file"], timeout=60)
        via_http = http_lists(b.url, ["tools/list"])
        via_stdio = stdio_lists([str(H.BROKER_BIN), "stdio", "--config", str(b.config_path)], ["tools/list"],
                                wait_tools={"seq__sequentialthinking", "fs__read_text_file"})
    finally:
        b.stop()
    for name, cmd in node_servers.items():
        direct = stdio_lists(cmd, ["tools/list"])
        assert direct["tools/list"], f"{name} listed no tools"
        assert_relayed(direct, via_http, name)
        assert_relayed(direct, via_stdio, name)
    seq = next(t for t in via_http["tools/list"] if t["name"] == "seq__sequentialthinking")
    props = list(seq["inputSchema"]["properties"])
    assert props != sorted(props), f"expected the upstream's (non-alphabetical) property order, got {props}"


def test_stateless_lists_are_raw_with_2026_fields(broker):
    """A 2026-07-28 stateless tools/list carries the same raw definitions as a legacy session, plus
    the result type and SEP-2549 caching hints rmcp adds to its own typed results for that era."""
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "e2e-relay", "version": "0"},
    }
    legacy = http_lists(broker.url, ["tools/list"])["tools/list"]
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/list"}
    body = {"jsonrpc": "2.0", "id": 5, "method": "tools/list", "params": {"_meta": meta}}
    with H.httpx2.Client(timeout=30) as c:
        r = c.post(broker.url, headers=headers, json=body)
    assert r.status_code == 200, f"HTTP {r.status_code}: {r.text[:500]}"
    res = H.final_response(r, 5)["result"]
    assert res.get("resultType") == "complete", res.keys()
    assert res.get("ttlMs") == 0 and res.get("cacheScope") == "private", {k: res[k] for k in res if k != "tools"}
    assert ordered(res["tools"]) == ordered(legacy)


# Calls whose results must arrive exactly as server-everything sends them (resources/read: only the
# contents' URIs namespaced). Deterministic tools and prompts only.
RAW_CALLS = [
    ("tools/call", {"name": "echo", "arguments": {"message": "relay \u2713"}}),
    ("tools/call", {"name": "get-sum", "arguments": {"a": 2, "b": 3.5}}),
    ("tools/call", {"name": "get-structured-content", "arguments": {"location": "Chicago"}}),
    ("tools/call", {"name": "get-annotated-message", "arguments": {"messageType": "error", "includeImage": True}}),
    ("tools/call", {"name": "get-resource-reference", "arguments": {"resourceType": "Text", "resourceId": 2}}),
    ("tools/call", {"name": "get-resource-links", "arguments": {"count": 2}}),
    ("tools/call", {"name": "get-tiny-image", "arguments": {}}),
    ("prompts/get", {"name": "args-prompt", "arguments": {"city": "Oslo", "state": "Viken"}}),
    ("prompts/get", {"name": "resource-prompt", "arguments": {"resourceType": "Text", "resourceId": "1"}}),
    ("resources/read", {"uri": "demo://resource/static/document/architecture.md"}),
]


def compare_results(direct_session: Any, broker_session: Any, server: str) -> None:
    for method, params in RAW_CALLS:
        direct = direct_session.request(method, params)
        assert "result" in direct, f"{method} {params} directly: {direct}"
        via_params = dict(params)
        expected = json.loads(json.dumps(direct["result"]))
        if method == "resources/read":
            via_params["uri"] = f"{server}+{params['uri']}"
            for c in expected["contents"]:
                c["uri"] = f"{server}+{c['uri']}"
        else:
            via_params["name"] = f"{server}__{params['name']}"
        via = broker_session.request(method, via_params)
        assert "result" in via, f"{method} {via_params} through the broker: {via}"
        assert ordered(unclocked(via["result"])) == ordered(unclocked(expected)), (
            f"{method} {params.get('name') or params.get('uri')}: result differs\n"
            f"broker:   {json.dumps(via['result'])[:1500]}\nupstream: {json.dumps(expected)[:1500]}"
        )


def test_everything_results_relayed_exactly(broker, ev_http):
    """tools/call, prompts/get and resources/read results through the broker (HTTP front) equal the
    upstream's own result JSON field by field and in key order; a read result's content URIs are
    namespaced."""
    with H.RawSession(ev_http.url, None) as d, H.RawSession(broker.url, None) as b:
        d.initialize()
        b.initialize()
        compare_results(d, b, "evhttp")


def test_stdio_front_results_relayed_exactly(tmp_path):
    """The same through the stdio front, with server-everything as a stdio upstream."""
    cfg = tmp_path / "stdio.toml"
    cfg.write_text(H.render_config({"ev": H.everything_stdio_spec()}))
    with StdioSession([str(H.EVERYTHING_BIN), "stdio"]) as d, \
            StdioSession([str(H.BROKER_BIN), "stdio", "--config", str(cfg)]) as b:
        b.wait_tools({"ev__echo"})
        compare_results(d, b, "ev")
