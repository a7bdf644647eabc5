"""SEP-2549 caching hints on the lists the broker merges, for 2026-07-28 clients.

Each list is filtered per caller, so it is `cacheScope: "private"`; it may be cached for as long as the
shortest-lived of the upstreams whose entries it shows allows (what is left of that upstream's own `ttlMs`),
and not at all (0) when one of them gave no hint (a 2025-era server). The conformance reference server lists
with `ttlMs: 300000`; server-everything (2025-11-25) gives none.
"""

from __future__ import annotations

import os
import re

import pytest

import helpers as H

REF_DIR = H.HARNESS_DIR / "conformance-ref"
REF_LISTEN_RE = re.compile(r"^conformance-ref listening on (http://127\.0\.0\.1:\d+/mcp)\s*$")
REF_TTL = 300_000
LISTS = ["tools/list", "prompts/list", "resources/list", "resources/templates/list"]


def hints(url: str) -> dict[str, tuple]:
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "e2e-caching", "version": "0"}}
    out = {}
    with H.httpx2.Client(timeout=30) as c:
        for i, m in enumerate(LISTS):
            r = c.post(url, headers={"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                                     "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": m},
                       json={"jsonrpc": "2.0", "id": i + 1, "method": m, "params": {"_meta": meta}})
            res = H.final_response(r, i + 1)["result"]
            out[m] = (res.get("ttlMs"), res.get("cacheScope"))
    return out


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    if not (REF_DIR / "node_modules" / ".bin" / "tsx").exists():
        pytest.fail("conformance reference server missing; run scripts/test.sh --harness-only")
    tmp = tmp_path_factory.mktemp("caching-ref")
    env = {"PORT": "0", "NODE_OPTIONS": f"--require {REF_DIR / 'loopback.cjs'}",
           "PATH": f"{H.NODE22.parent}:{os.environ.get('PATH', '')}"}
    proc = H.Proc("conformance-ref-caching", [str(REF_DIR / "node_modules" / ".bin" / "tsx"),
                                              str(REF_DIR / "everything-server.ts")], tmp, env=env)
    try:
        yield proc.wait_line(REF_LISTEN_RE, 60).group(1)
    finally:
        proc.stop()


def test_one_upstream_keeps_its_hint_privately(tmp_path, ref):
    b = H.start_broker(tmp_path, {"ref": {"transport": "http", "url": ref}}, name="broker-cache-one")
    try:
        H.wait_for_tools(b.url, ["ref__test_simple_text"], timeout=30)
        for m, (ttl, scope) in hints(b.url).items():
            assert scope == "private", (m, scope)
            # What is left of the upstream's 5 minutes (fetched when the broker connected).
            assert REF_TTL - 60_000 < ttl <= REF_TTL, (m, ttl)
    finally:
        b.stop()


def test_a_merged_list_takes_the_shortest_hint_of_what_it_shows(tmp_path, ref, ev_http):
    servers = {"ref": {"transport": "http", "url": ref}, "ev": {"transport": "http", "url": ev_http.url}}
    b = H.start_broker(tmp_path / "both", servers, name="broker-cache-both")
    try:
        H.wait_for_tools(b.url, ["ref__test_simple_text", "ev__echo"], timeout=30)
        got = hints(b.url)
        # server-everything (2025-11-25) gave no hint: a list showing its entries is not to be cached.
        assert got["tools/list"] == (0, "private"), got
    finally:
        b.stop()
    # The same two servers, but a policy hides server-everything: the lists show only ref's entries.
    hidden = H.start_broker(tmp_path / "hidden", servers, name="broker-cache-hidden",
                            policies=[{"servers": ["ev"], "effect": "deny"}, {"effect": "allow"}])
    try:
        H.wait_for_tools(hidden.url, ["ref__test_simple_text"], timeout=30)
        ttl, scope = hints(hidden.url)["tools/list"]
        assert scope == "private" and REF_TTL - 60_000 < ttl <= REF_TTL, (ttl, scope)
    finally:
        hidden.stop()
