"""Core v2, part 2: sessions and upstream lifecycles.

Sessions freed (registry empty, no RSS growth over 1,000 open/close cycles), a killed stdio server staying listed and
answering "unavailable", the first tools/list waiting for upstreams that are still starting (HTTP and stdio),
per-session isolation of a stateful stdio server (server-sequential-thinking), session caps per subject, and
list_changed only for the sessions whose own view changed.

Upstreams: server-everything, server-memory and server-sequential-thinking (stdio, npm) and the `ledger` example.
Every broker is started for its test and stopped at its end; waits poll with deadlines.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import uuid
from pathlib import Path

import httpx2
import pytest

import corelib as C
import helpers as H
import opslib as O

THINK_TOOL = "think__sequentialthinking"


# --------------------------------------------------------------------------- 7. sessions are freed


def open_close_sessions(url: str, n: int, capabilities: dict) -> None:
    """n sessions, one after another: initialize (with `capabilities`), notifications/initialized, DELETE."""
    body = H.init_body(name="core-v2-churn")
    body["params"]["capabilities"] = capabilities
    raw = json.dumps(body)
    base = {"Content-Type": "application/json", "Accept": H.MCP_ACCEPT}
    with httpx2.Client(timeout=30) as c:
        for i in range(n):
            r = c.post(url, headers=base, content=raw)
            assert r.status_code == 200, f"initialize {i}: HTTP {r.status_code} {r.text[:300]}"
            sid = r.headers.get("mcp-session-id")
            assert sid, f"initialize {i}: no Mcp-Session-Id"
            version = H.final_response(r, 1)["result"]["protocolVersion"]
            h = {**base, "Mcp-Session-Id": sid, "MCP-Protocol-Version": version}
            n2 = c.post(url, headers=h, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
            assert n2.status_code in (200, 202), f"initialized {i}: HTTP {n2.status_code}"
            d = c.delete(url, headers=h)
            assert d.status_code in (200, 202, 204), f"DELETE {i}: HTTP {d.status_code} {d.text[:200]}"


@pytest.mark.timeout(150)
def test_closed_sessions_are_freed(tmp_path):
    """1,000 sessions opened and closed (DELETE) one after another, each initialize carrying a ~200 KB
    `capabilities` object: afterwards the registry is empty (gauge mcp_broker_session_entries = 0 within 5 s), and a
    second round of 1,000 adds no resident memory over the first (VmRSS within 3 MB)."""
    C.require(H.LEDGER_BIN)
    b = H.start_broker(tmp_path, {"ledger": C.ledger()}, name="broker-churn")
    try:
        H.wait_for_tools(b.url, ["ledger__list_accounts"], 30)
        caps = {"experimental": {"core-v2-padding": {"blob": "p" * 200_000}}}
        t0 = time.monotonic()
        open_close_sessions(b.url, 1000, caps)
        first = time.monotonic() - t0

        assert C.metric_sum(O.scrape(b.base), "mcp_broker_session_entries") is not None, \
            "the gauge mcp_broker_session_entries is not in /metrics"

        def registry_empty(round_no: int) -> None:
            left = None

            def empty():
                nonlocal left
                left = C.metric_sum(O.scrape(b.base), "mcp_broker_session_entries")
                return left == 0
            try:
                H.poll_until(empty, 5, "mcp_broker_session_entries to reach 0")
            except TimeoutError:
                raise AssertionError(f"5 s after round {round_no} of 1,000 closed sessions the registry still holds "
                                     f"{left} entries") from None
        registry_empty(1)
        rss1 = C.vm_rss_kb(b.proc.pid)
        open_close_sessions(b.url, 1000, caps)
        registry_empty(2)
        rss2 = C.vm_rss_kb(b.proc.pid)
        assert rss2 - rss1 <= 3 * 1024, \
            f"VmRSS grew by {(rss2 - rss1) / 1024:.1f} MB over a second round of 1,000 closed sessions " \
            f"({rss1 / 1024:.1f} -> {rss2 / 1024:.1f} MB; round 1 took {first:.1f}s)"
    finally:
        b.stop()


# --------------------------------------------------------------------------- 8. availability


def test_a_killed_stdio_server_stays_listed_and_answers_unavailable(tmp_path):
    """server-memory (stdio, behind a shell wrapper that refuses to start while a stop file exists, so the outage
    lasts): after its child is killed, memory's tools stay in tools/list, and a call returns an isError result
    saying "unavailable" (never JSON-RPC -32602); once it may start again, calls work again within 30 s."""
    stop_file = tmp_path / "memory.stopped"
    wrapper = tmp_path / "memory-wrapper.sh"
    wrapper.write_text(f'#!/bin/sh\n[ -e "{stop_file}" ] && exit 1\nexec "{C.MEMORY_BIN}"\n')
    wrapper.chmod(0o755)
    spec = C.node_spec(wrapper, env={"MEMORY_FILE_PATH": str(tmp_path / "memory.jsonl")})
    b = H.start_broker(tmp_path, {"memory": spec}, name="broker-availability")
    try:
        H.wait_for_tools(b.url, ["memory__read_graph", "memory__create_entities"], 30)
        with H.RawSession(b.url, None) as s:
            s.initialize()
            r = C.call(s, "memory__read_graph")
            assert not r["result"].get("isError"), r
            kids = C.children_matching(b.proc.pid, "mcp-server-memory")
            assert len(kids) == 1, f"memory's child among the broker's children: {kids}"
            stop_file.write_text("")
            for k in kids:
                C.kill_pid(k)
            H.poll_until(lambda: O.scrape(b.base).get("mcp_broker_upstream_up", server="memory") == 0, 10,
                         "the broker to notice memory is down")
            for _ in range(3):
                names = {t["name"] for t in s.request("tools/list", {})["result"]["tools"]}
                assert {"memory__read_graph", "memory__create_entities"} <= names, \
                    f"memory's tools left tools/list while it is down: {sorted(names)}"
                m = C.call(s, "memory__read_graph")
                assert "error" not in m, f"a call to a down server got a JSON-RPC error: {m['error']}"
                assert m["result"].get("isError") and "unavailable" in C.text_of(m["result"]), m
            stop_file.unlink()

            def works():
                m = C.call(s, "memory__read_graph")
                assert "error" not in m or m["error"]["code"] != -32602, f"JSON-RPC -32602 while coming back: {m}"
                return "result" in m and not m["result"].get("isError")
            H.poll_until(works, 30, "memory__read_graph to work again", interval=0.2)
    finally:
        b.stop()


# --------------------------------------------------------------------------- 9. start-up waits


def three_servers(tmp_path: Path) -> dict:
    return {"everything": C.everything(), "memory": C.memory(tmp_path / "memory.jsonl"), "think": C.think()}


EXPECT_FIRST = {"everything__echo", "memory__read_graph", THINK_TOOL}


def test_first_tools_list_waits_for_starting_servers_http(tmp_path):
    """A fresh broker with three stdio servers (server-everything, server-memory, server-sequential-thinking): the
    very first tools/list, sent as soon as the port answers, lists tools of all three."""
    C.require(C.MEMORY_BIN, C.THINK_BIN)
    b = H.start_broker(tmp_path, three_servers(tmp_path), name="broker-startup-http")
    try:
        with H.RawSession(b.url, None) as s:
            s.initialize()
            names = {t["name"] for t in s.request("tools/list", {})["result"]["tools"]}
        missing = EXPECT_FIRST - names
        assert not missing, f"the first tools/list after start lacks {sorted(missing)}; it had {sorted(names)}"
    finally:
        b.stop()


def test_first_tools_list_waits_for_starting_servers_stdio(tmp_path):
    """The same over `mcp-broker stdio`: initialize, then tools/list at once, lists tools of all three servers."""
    C.require(C.MEMORY_BIN, C.THINK_BIN)
    cfg = tmp_path / "stdio.toml"
    cfg.write_text(H.render_config(three_servers(tmp_path)))
    c = O.StdioClient(cfg, tmp_path, name="broker-startup-stdio")
    try:
        c.initialize()
        m = c.response(c.request("tools/list", {}), 30)
        names = {t["name"] for t in m["result"]["tools"]}
        missing = EXPECT_FIRST - names
        assert not missing, f"the first tools/list over stdio lacks {sorted(missing)}; it had {sorted(names)}"
    finally:
        c.stop()


# --------------------------------------------------------------------------- 10. isolation


def thought(s: H.RawSession, n: int, total: int) -> dict:
    r = C.call(s, THINK_TOOL, {"thought": f"thought {n}", "thoughtNumber": n, "totalThoughts": total,
                               "nextThoughtNeeded": n < total})["result"]
    assert not r.get("isError"), r
    return r.get("structuredContent") or json.loads(C.text_of(r))


def record_thoughts(url: str) -> tuple[int, int]:
    with H.RawSession(url, None) as a, H.RawSession(url, None) as b_:
        a.initialize()
        b_.initialize()
        for n in (1, 2, 3):
            la = thought(a, n, 3)["thoughtHistoryLength"]
        lb = thought(b_, 1, 1)["thoughtHistoryLength"]
    return la, lb


def test_session_isolation_gives_each_session_its_own_server(tmp_path):
    """[servers.think] isolation = "session" (server-sequential-thinking keeps its history in the process): session
    A records 3 thoughts, session B 1; B's result reports thoughtHistoryLength 1, A's 3."""
    C.require(C.THINK_BIN)
    b = H.start_broker(tmp_path, {"think": C.think(isolation="session")}, name="broker-isolation-session")
    try:
        H.wait_for_tools(b.url, [THINK_TOOL], 30)
        la, lb = record_thoughts(b.url)
        assert (la, lb) == (3, 1), f"with isolation = \"session\" A's history is {la} and B's {lb} (want 3 and 1)"
    finally:
        b.stop()


def test_shared_isolation_shares_the_server_state(tmp_path):
    """The default (`shared`): both sessions talk to one server-sequential-thinking process, so B's one thought
    lands on A's three (history 4). This documents the trade-off `isolation = "session"` removes."""
    C.require(C.THINK_BIN)
    b = H.start_broker(tmp_path, {"think": C.think()}, name="broker-isolation-shared")
    try:
        H.wait_for_tools(b.url, [THINK_TOOL], 30)
        la, lb = record_thoughts(b.url)
        assert (la, lb) == (3, 4), (la, lb)
    finally:
        b.stop()


def test_session_isolation_stops_the_child_when_the_session_closes(tmp_path):
    """isolation = "session": a session's first call starts a child of its own, and closing the session (DELETE)
    stops that child within 10 s."""
    C.require(C.THINK_BIN)
    b = H.start_broker(tmp_path, {"think": C.think(isolation="session")}, name="broker-isolation-close")
    try:
        H.wait_for_tools(b.url, [THINK_TOOL], 30)

        def kids():
            return C.children_matching(b.proc.pid, "sequential-thinking")
        before = kids()
        s = H.RawSession(b.url, None)
        try:
            s.initialize()
            thought(s, 1, 1)
            during = kids()
            assert len(during - before) == 1, \
                f"the session's first call did not start a child of its own: before {before}, during {during}"
        finally:
            s.close()
        mine = during - before
        try:
            H.poll_until(lambda: not (kids() & mine), 10, "the closed session's child to stop")
        except TimeoutError:
            raise AssertionError(f"the closed session's child {mine} is still running") from None
        assert not (kids() - before), f"children left after the session closed: {kids() - before}"
    finally:
        b.stop()


def test_check_refuses_shared_isolation_with_a_per_caller_credential(tmp_path):
    """`mcp-broker check` refuses `isolation = "shared"` on a server whose credential is per caller (token exchange):
    exit code non-zero, the message names `isolation`."""
    cfg = tmp_path / "shared-exchange.toml"
    creds = ('[credentials.idp]\nkind = "token_exchange"\ntoken_endpoint = "http://127.0.0.1:9/token"\n'
             'client_id = "exchanger"\nclient_secret = "exchanger-secret"\n')
    server = H.token_echo_stdio_spec("iso", upstream_auth={"use": "idp", "audience": "urn:echo"}, isolation="shared")
    cfg.write_text(H.render_config({"echo": server}, auth={"issuer": "https://issuer.example",
                                                           "jwks_uri": "http://127.0.0.1:9/jwks.json"},
                                   policies=[{"effect": "allow"}], extra_toml=creds))
    p = subprocess.run([str(H.BROKER_BIN), "check", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    out = p.stdout + p.stderr
    assert p.returncode != 0, f"check accepted isolation = \"shared\" with token exchange:\n{out}"
    assert "isolation" in out, out
    ok = cfg.read_text().replace('isolation = "shared"', 'isolation = "caller"')
    cfg.write_text(ok)
    p = subprocess.run([str(H.BROKER_BIN), "check", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr


# --------------------------------------------------------------------------- 11. session caps


def test_sessions_per_subject_are_capped(tmp_path):
    """[broker] max_sessions_per_subject = 2: alice's third initialize is refused with a message containing "session
    limit" (JSON-RPC error or HTTP 429/503), bob can still open one, and after alice closes one she can open another."""
    C.require(H.LEDGER_BIN)
    minter = O.Minter()
    b = None
    opened: list[H.RawSession] = []
    try:
        b = H.start_broker(tmp_path, {"ledger": C.ledger()}, name="broker-session-cap",
                           broker={"max_sessions_per_subject": 2}, auth=minter.auth_config(),
                           policies=[{"effect": "allow"}])
        alice, bob = minter.token(b, "alice"), minter.token(b, "bob")
        for _ in range(2):
            opened.append(C.open_session(b.url, alice))
        third = H.RawSession(b.url, alice)
        opened.append(third)
        r = third.client.post(b.url, headers=third.headers(session=False), json=H.init_body())
        if r.status_code == 200:
            msg = H.final_response(r, 1)
            assert "error" in msg, f"alice's third session was opened with max_sessions_per_subject = 2: {msg}"
            text = msg["error"]["message"]
        else:
            assert r.status_code in (429, 503), f"third initialize: HTTP {r.status_code} {r.text[:300]}"
            text = r.text
        assert "session limit" in text, f"the refusal does not say `session limit`: {text[:300]}"
        opened.append(C.open_session(b.url, bob))
        opened.pop(0).close()

        def reopen():
            s = H.RawSession(b.url, alice)
            opened.append(s)
            r = s.client.post(b.url, headers=s.headers(session=False), json=H.init_body())
            return r.status_code == 200 and "result" in H.final_response(r, 1)
        H.poll_until(reopen, 5, "alice to open a session again after closing one")
    finally:
        for s in opened:
            try:
                s.close()
            except Exception:  # noqa: BLE001 - a refused session has nothing to close
                pass
        if b:
            b.stop()
        minter.stop()


# --------------------------------------------------------------------------- 12. list_changed per session view


LIST_CHANGED = ("notifications/tools/list_changed", "notifications/prompts/list_changed",
                "notifications/resources/list_changed")


def list_changed(listener: C.SseListener) -> list[str]:
    return [m["method"] for _, m in list(listener.messages) if m.get("method") in LIST_CHANGED]


def data_uri(text: str) -> str:
    return "data:text/plain;base64," + base64.b64encode(text.encode()).decode()


def assert_coalesced(listener: C.SseListener) -> None:
    """At most one list_changed per kind per 100 ms (10 ms of slack for scheduling)."""
    for kind in LIST_CHANGED:
        ts = listener.times(kind)
        gaps = [round(y - x, 3) for x, y in zip(ts, ts[1:])]
        assert all(g >= 0.09 for g in gaps), f"{listener.name}'s {kind} are not coalesced (gaps in s: {gaps})"


def test_list_changed_only_when_the_sessions_own_view_changed(tmp_path):
    """bob sees only the ledger. (a) server-everything changes its resource list five times in quick succession
    (gzip-file-as-resource registers a resource each time): alice gets resources/list_changed, coalesced to at most
    one per 100 ms, bob nothing. (b) server-everything's child is killed and restarts:
    bob gets no list_changed. (c) a reload adds `everything2` (hidden from bob): alice gets tools/list_changed, bob
    nothing; alice's notifications of one kind are at least 100 ms apart throughout."""
    C.require(H.LEDGER_BIN)
    minter = O.Minter()
    b = None
    auth = minter.auth_config()
    policies = [{**C.BOB_ONLY_LEDGER[0], "servers": ["everything*"]}, C.BOB_ONLY_LEDGER[1]]
    servers = {"everything": C.everything(), "ledger": C.ledger()}
    try:
        b = H.start_broker(tmp_path, servers, name="broker-list-changed", auth=auth, policies=policies)
        alice, bob = minter.token(b, "alice"), minter.token(b, "bob")
        H.wait_for_tools(b.url, ["everything__echo", "ledger__list_accounts"], 30, headers=H.bearer(alice))
        sa, sb = C.open_session(b.url, alice), C.open_session(b.url, bob)
        la, lb = C.SseListener(sa, "alice"), C.SseListener(sb, "bob")
        try:
            for s in (sa, sb):
                s.request("tools/list", {})
                s.request("resources/list", {})
            # (a) the upstream's own list changes, five times in quick succession
            for i in range(5):
                r = C.call(sa, "everything__gzip-file-as-resource",
                           {"name": f"core-v2-{i}-{uuid.uuid4().hex[:6]}.txt.gz", "data": data_uri("core v2 " * 50)})
                assert not r["result"].get("isError"), r
            H.poll_until(lambda: "notifications/resources/list_changed" in list_changed(la), 10,
                         "alice's resources/list_changed after server-everything registered a resource")
            C.hold_for(1.0, lambda: bool(list_changed(lb)))
            assert not list_changed(lb), f"(a) bob, who cannot see server-everything, was told {list_changed(lb)}"
            assert_coalesced(la)

            # (b) server-everything restarts
            restarts0 = O.scrape(b.base).get("mcp_broker_upstream_restarts_total", server="everything")
            kids = C.children_matching(b.proc.pid, "mcp-server-everything")
            assert kids, "no server-everything child"
            for k in kids:
                C.kill_pid(k)
            H.poll_until(lambda: O.scrape(b.base).get("mcp_broker_upstream_restarts_total", server="everything")
                         > restarts0 and O.scrape(b.base).get("mcp_broker_upstream_up", server="everything") == 1,
                         30, "server-everything to restart")
            H.poll_until(lambda: not C.call(sa, "everything__echo", {"message": "back"})["result"].get("isError"),
                         30, "server-everything to answer again")
            C.hold_for(1.0, lambda: bool(list_changed(lb)))
            assert not list_changed(lb), f"(b) bob was told {list_changed(lb)} when server-everything restarted"

            # (c) a reload adds a server bob cannot see
            n_alice = len(la.methods("notifications/tools/list_changed"))
            O.write_atomic(b.config_path, H.render_config({**servers, "everything2": C.everything()}, auth=auth,
                                                          policies=policies))
            H.poll_until(lambda: len(la.methods("notifications/tools/list_changed")) > n_alice, 30,
                         "alice's tools/list_changed after everything2 was added")
            H.poll_until(lambda: "everything2__echo" in {t["name"] for t in sa.request("tools/list", {})["result"]["tools"]},
                         30, "everything2's tools for alice")
            C.hold_for(1.0, lambda: bool(list_changed(lb)))
            assert not list_changed(lb), f"(c) bob was told {list_changed(lb)} when a hidden server was added"
            assert_coalesced(la)
        finally:
            for x in (la, lb):
                x.stop()
            sa.close()
            sb.close()
    finally:
        if b:
            b.stop()
        minter.stop()


def test_a_restart_with_an_unchanged_list_notifies_nobody(tmp_path):
    """Items 8 and 12 together: a killed stdio server stays listed while it is down, so when server-everything's
    child is killed and comes back with the same tools, no session's view changed: neither alice (who sees it) nor
    bob (who does not) gets a list_changed, and alice's tools/list is the same before and after."""
    C.require(H.LEDGER_BIN)
    minter = O.Minter()
    b = None
    policies = [{**C.BOB_ONLY_LEDGER[0], "servers": ["everything*"]}, C.BOB_ONLY_LEDGER[1]]
    try:
        b = H.start_broker(tmp_path, {"everything": C.everything(), "ledger": C.ledger()}, name="broker-restart-quiet",
                           auth=minter.auth_config(), policies=policies)
        alice, bob = minter.token(b, "alice"), minter.token(b, "bob")
        H.wait_for_tools(b.url, ["everything__echo", "ledger__list_accounts"], 30, headers=H.bearer(alice))
        sa, sb = C.open_session(b.url, alice), C.open_session(b.url, bob)
        la, lb = C.SseListener(sa, "alice"), C.SseListener(sb, "bob")
        try:
            before = sorted(t["name"] for t in sa.request("tools/list", {})["result"]["tools"])
            sb.request("tools/list", {})
            restarts0 = O.scrape(b.base).get("mcp_broker_upstream_restarts_total", server="everything")
            kids = C.children_matching(b.proc.pid, "mcp-server-everything")
            assert kids, "no server-everything child"
            for k in kids:
                C.kill_pid(k)
            H.poll_until(lambda: O.scrape(b.base).get("mcp_broker_upstream_restarts_total", server="everything")
                         > restarts0 and O.scrape(b.base).get("mcp_broker_upstream_up", server="everything") == 1,
                         30, "server-everything to restart")
            H.poll_until(lambda: not C.call(sa, "everything__echo", {"message": "back"})["result"].get("isError"),
                         30, "server-everything to answer again")
            C.hold_for(1.0, lambda: bool(list_changed(la) or list_changed(lb)))
            after = sorted(t["name"] for t in sa.request("tools/list", {})["result"]["tools"])
            assert after == before, f"alice's tools differ after the restart: {set(before) ^ set(after)}"
            assert not list_changed(lb), f"bob was told {list_changed(lb)} when server-everything restarted"
            assert not list_changed(la), \
                f"alice was told {list_changed(la)} although her list is the same before and after the restart"
        finally:
            for x in (la, lb):
                x.stop()
            sa.close()
            sb.close()
    finally:
        if b:
            b.stop()
        minter.stop()


def test_a_server_changed_by_reload_stays_listed_while_it_restarts(tmp_path):
    """A reload that changes a server restarts it. While the new one starts (here: 3 s, through `sh -c sleep`),
    its tools stay listed and calls answer `isError` "unavailable", never -32602 "unknown tool"; then they work."""
    # startup_wait 0: a call right after start-up would otherwise wait for the restarting server instead
    b = H.start_broker(tmp_path, {"ledger": H.example_stdio_spec(H.LEDGER_BIN)}, broker={"startup_wait": "0s"},
                       name="broker-reload-restart")
    try:
        H.wait_for_tools(b.url, ["ledger__list_accounts"], 30)
        slow = {"transport": "stdio", "command": "sh", "args": ["-c", f"sleep 3; exec '{H.LEDGER_BIN}' stdio"],
                "inherit_env": ["PATH", "HOME"]}
        with H.RawSession(b.url, None) as s:
            s.initialize()
            ok0 = O.scrape(b.base).get("mcp_broker_config_reloads_total", result="ok")
            O.write_atomic(b.config_path, H.render_config({"ledger": slow}, {"startup_wait": "0s"}))
            H.poll_until(lambda: O.scrape(b.base).get("mcp_broker_config_reloads_total", result="ok") > ok0, 20,
                         "the reload to be applied")
            deadline = time.monotonic() + 30
            unavailable = 0
            while True:
                assert time.monotonic() < deadline, "the restarted server never answered"
                msg = s.request("tools/call", {"name": "ledger__list_accounts", "arguments": {}})
                assert "error" not in msg, f"a call during the restart got a JSON-RPC error: {msg}"
                r = msg["result"]
                if not r.get("isError"):
                    break
                assert "unavailable" in C.text_of(r), r
                unavailable += 1
                time.sleep(0.1)
            assert unavailable > 0, "the reload restart was not observed (no call landed while it started)"
            assert "ledger__list_accounts" in {t["name"] for t in s.request("tools/list", {})["result"]["tools"]}
    finally:
        b.stop()
