"""Scale-out (issue 14): three broker instances with `[cluster]` behind HAProxy round robin, one Redis.

Every test gets its own cluster (clusterlib.Cluster): Redis on a free port, three brokers running
examples/cluster/servers.toml (plus an `[audit]` file per instance and a rate-limited `limited` server), HAProxy
running examples/cluster/haproxy.cfg (`option http-server-close`: every request is a new backend connection, so
consecutive requests of one session go to different instances). Which instance served a call is read from that
instance's audit file: each call carries a unique marker in its arguments (`[audit] arguments = "full"`).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import types as T

import clusterlib as C
import helpers as H

pytestmark = pytest.mark.anyio


@pytest.fixture
def cluster(tmp_path):
    for b in (H.BROKER_BIN, H.LEDGER_BIN, H.EVERYTHING_BIN):
        if not b.exists():
            pytest.fail(f"{b} is missing (cargo build --all-targets; scripts/test.sh --harness-only)")
    for b in (C.REDIS_SERVER, C.HAPROXY, C.REDIS_CLI):
        if not Path(b).exists():
            pytest.fail(f"{b} is missing (scripts/test.sh installs Debian's redis-server and haproxy)")
    # A free port can be taken by another process between choosing it and binding it (this machine runs other
    # suites too): start again on fresh ports then, at most twice.
    for attempt in range(3):
        c = C.Cluster(tmp_path / f"start{attempt}")
        try:
            c.start()
            break
        except BaseException as e:
            print(c.logs())
            c.stop()
            if "Address already in use" not in str(e) or attempt == 2:
                raise
    yield c
    c.stop()


def text_of(r: T.CallToolResult) -> str:
    return "\n".join(getattr(c, "text", "") or "" for c in r.content)


class ProgressLog:
    def __init__(self):
        self.values: list[tuple[float, float | None, str | None]] = []

    async def __call__(self, progress, total, message):
        self.values.append((progress, total, message))


class Elicit:
    def __init__(self):
        self.requests: list[T.ElicitRequestParams] = []

    async def __call__(self, ctx, params):
        self.requests.append(params)
        return T.ElicitResult(action="accept", content={"name": f"Ada Lovelace {len(self.requests)}", "check": True,
                                                        "integer": 7})


async def echo(s, marker: str) -> T.CallToolResult:
    r = await s.call_tool("everything__echo", {"message": marker})
    assert not r.is_error, H.dump(r)
    assert marker in text_of(r), H.dump(r)
    return r


def served_all(c: C.Cluster, tag: str, total: int) -> dict[str, int]:
    """Per instance, the audit records mentioning `tag`, once they add up to `total` (records are written by a
    writer task when a request ends: poll for them)."""
    try:
        return H.poll_until(lambda: (lambda d: d if sum(d.values()) >= total else None)(c.served(tag)), 10,
                            f"{total} audit records mentioning {tag}")
    except TimeoutError as e:
        raise AssertionError(f"{e}: found {c.served(tag)}") from None


# --------------------------------------------------------------------------- one session, every instance


async def test_session_spans_instances(cluster):
    """A Python SDK session through HAProxy: lists, calls, progress during a long call and an answered elicitation,
    while its requests are served by every instance (the audit file of each instance shows the session's calls)."""
    c = cluster
    tag = "span-" + uuid.uuid4().hex[:8]
    elicit = Elicit()
    async with C.sdk_session(c.url, c.headers("alice"), elicitation_callback=elicit) as (s, ids):
        with anyio.fail_after(60):
            tools = {t.name for t in await H.list_all_tools(s)}
            assert {"everything__echo", "everything__trigger-long-running-operation",
                    "everything__trigger-elicitation-request", "limited__list_accounts"} <= tools, sorted(tools)
            for i in range(9):
                await echo(s, f"{tag}-echo-{i}")
            # a tools/list again, on whichever instance: the same catalog
            assert {t.name for t in await H.list_all_tools(s)} == tools

            # progress: every notification arrives before the result, in order
            log = ProgressLog()
            r = await s.call_tool("everything__trigger-long-running-operation", {"duration": 1.5, "steps": 3},
                                  progress_callback=log)
            assert not r.is_error, H.dump(r)
            assert "completed" in text_of(r), H.dump(r)
            assert [v[0] for v in log.values] == [1, 2, 3], log.values
            assert all(v[1] == 3 for v in log.values), log.values

            # elicitation, three times: the client's answer is a new POST, which round robin sends to the next
            # instance, not the one whose upstream asked (the broker routes it back through Redis)
            for k in range(1, 4):
                r = await s.call_tool("everything__trigger-elicitation-request", {})
                assert not r.is_error, H.dump(r)
                assert f"Ada Lovelace {k}" in text_of(r) and "Favorite Integer: 7" in text_of(r), text_of(r)
            assert len(elicit.requests) == 3

            for i in range(3):
                await echo(s, f"{tag}-after-{i}")
    assert len(ids.ids) == 1, f"the session changed ids (re-initialized?): {ids.ids}"

    served = served_all(c, tag, 12)
    assert sum(served.values()) == 12, f"12 echo calls expected in the audit files, got {served}"
    on = [n for n, k in served.items() if k]
    # round robin over three instances, one connection per request: every instance served some of the 12 calls
    assert len(on) >= 2, f"consecutive requests of one session did not land on different instances: {served}"
    assert len(on) == 3, f"round robin over three instances left one out: {served}"
    # every instance audited those calls as calls of a session
    sids = {n: {r["session"] for r in i.records() if tag in str(r)} for n, i in zip(served, c.instances)}
    assert all(None not in v for v in sids.values()), f"a call of the session was audited without a session: {sids}"
    assert not c.panics(), c.panics()


# --------------------------------------------------------------------------- an instance dies


def inflight(inst: C.Instance) -> float:
    try:
        return C.O.scrape(inst.base).get("mcp_broker_inflight_calls") or 0
    except (httpx2.HTTPError, AssertionError):
        return 0


async def test_instance_killed_mid_session(cluster):
    """SIGKILL the instance running a long call: that call ends (an error, not a hang), HAProxy marks the instance
    down, and the session goes on through the other two (at most two retries of a request sent at kill time)."""
    c = cluster
    tag = "kill-" + uuid.uuid4().hex[:8]
    async with C.sdk_session(c.url, c.headers("alice"), timeout=20) as (s, ids):
        with anyio.fail_after(90):
            for i in range(3):
                await echo(s, f"{tag}-before-{i}")
            long_outcome: list[str] = []
            victim: list[C.Instance] = []

            async def long_call():
                try:
                    r = await s.call_tool("everything__trigger-long-running-operation", {"duration": 8, "steps": 8},
                                          progress_callback=ProgressLog())
                    long_outcome.append("error result" if r.is_error else "ok: " + text_of(r)[:80])
                except Exception as e:  # noqa: BLE001 - the outcome is the point
                    long_outcome.append(f"exception: {e!r}"[:200])

            async with anyio.create_task_group() as tg:
                tg.start_soon(long_call)

                def holder():
                    found = [i for i in c.instances if inflight(i) >= 1]
                    return found[0] if found else None

                v = await anyio.to_thread.run_sync(lambda: H.poll_until(holder, 10, "the long call in flight"))
                victim.append(v)
                c.kill(v)
                # the call in flight on the dead instance ends with an error within a bounded time (the client
                # may try to resume its stream on another instance; that must fail, not wait forever)
                with anyio.move_on_after(20) as scope:
                    while not long_outcome:
                        await anyio.sleep(0.1)
                if scope.cancelled_caught:
                    tg.cancel_scope.cancel()
                    long_outcome.append("hang: no result or error 20 s after the kill (cancelled by the test)")
            v = victim[0]
            assert not H.port_open(v.port)
            assert long_outcome[0].startswith(("exception", "error result")), \
                f"the call in flight on the killed {v.name}: {long_outcome[0]}"
            await anyio.to_thread.run_sync(lambda: c.haproxy.wait_status({v.name: "DOWN"}, timeout=10))

            # the session goes on: allow the first request or two after the kill to fail, then every call succeeds
            failures = []
            ok = 0
            for i in range(12):
                try:
                    await echo(s, f"{tag}-after-{i}")
                    ok += 1
                except Exception as e:  # noqa: BLE001
                    failures.append((i, repr(e)[:300]))
                    assert i < 2 and ok == 0, f"call {i} after the kill failed after earlier ones: {failures}"
            assert ok >= 10, failures
    served_after = served_all(c, f"{tag}-after-", ok)
    survivors = [i.name for i in c.instances if i is not v]
    assert served_after[v.name] == 0
    assert all(served_after[n] >= 1 for n in survivors), \
        f"after the kill both surviving instances should serve the session: {served_after}"
    assert all(i.alive() for i in c.instances if i is not v)
    assert not c.panics(), c.panics()
    print(f"victim {v.name}; the call in flight on it: {long_outcome}; failures after the kill: {failures}")


# --------------------------------------------------------------------------- one limit for all instances


async def test_global_rate_limit(cluster):
    """`rate_limit = { rate = "1/s", burst = 10 }` on one server holds across the three instances: of 30 calls
    fired at once through HAProxy, burst + refill (±1) are admitted, not three buckets' worth."""
    c = cluster
    n = 30
    tag = "limit-" + uuid.uuid4().hex[:8]
    results: list[tuple[bool, str]] = []
    async with C.sdk_session(c.url, c.headers("alice")) as (s, _):
        async def one(i):
            r = await s.call_tool("limited__list_accounts", {"marker": f"{tag}-{i}"})
            results.append((bool(r.is_error), text_of(r)))

        with anyio.fail_after(60):
            t0 = time.monotonic()
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(one, i)
            elapsed = time.monotonic() - t0
    admitted = sum(1 for err, _ in results if not err)
    limited = [t for err, t in results if err]
    assert len(results) == n
    assert all("rate limit exceeded" in t for t in limited), limited[:3]
    most = C.LIMITED_BURST + int(C.LIMITED_RATE * elapsed) + 1
    assert C.LIMITED_BURST - 1 <= admitted <= most, (
        f"{admitted} of {n} calls admitted in {elapsed:.2f}s; a global limit admits {C.LIMITED_BURST} ±1 "
        f"(+{C.LIMITED_RATE:g}/s refill) = at most {most}; per-instance buckets would admit up to "
        f"{C.Cluster.N * C.LIMITED_BURST}")
    served = c.served(tag)
    assert sum(1 for k in served.values() if k) >= 2, f"the calls did not spread over the instances: {served}"
    assert not c.panics(), c.panics()


# --------------------------------------------------------------------------- ownership across instances


def raw_call(url: str, token: str, session_id: str, marker: str, client: httpx2.Client) -> httpx2.Response:
    return client.post(url, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                                     "Accept": H.MCP_ACCEPT, "MCP-Protocol-Version": "2025-11-25",
                                     "Mcp-Session-Id": session_id},
                       json={"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                             "params": {"name": "everything__echo", "arguments": {"message": marker}}})


def test_other_subject_gets_404_on_every_instance(cluster):
    """bob sends requests with alice's session id straight to each instance: 404 from every one, while alice's own
    requests with that id succeed on every one (so the 404 is the owner check, not an unknown session)."""
    c = cluster
    alice, bob = c.token("alice"), c.token("bob")
    with H.RawSession(c.url, alice) as a, httpx2.Client(timeout=20) as hc:
        a.initialize()
        sid = a.session_id
        assert sid
        for inst in c.instances:
            r = raw_call(inst.url, bob, sid, f"bob-on-{inst.name}", hc)
            assert r.status_code == 404, f"bob with alice's session on {inst.name}: HTTP {r.status_code} {r.text[:300]}"
            d = hc.delete(inst.url, headers={"Authorization": f"Bearer {bob}", "Mcp-Session-Id": sid,
                                             "MCP-Protocol-Version": "2025-11-25"})
            assert d.status_code == 404, f"bob's DELETE of alice's session on {inst.name}: HTTP {d.status_code}"
        for inst in c.instances:
            marker = f"alice-on-{inst.name}-" + uuid.uuid4().hex[:6]
            r = raw_call(inst.url, alice, sid, marker, hc)
            assert r.status_code == 200, f"alice's own session on {inst.name}: HTTP {r.status_code} {r.text[:300]}"
            m = H.final_response(r, 7)
            assert marker in str(m.get("result")), m
            # audit records are written when a request ends, by a writer task: poll
            H.poll_until(lambda: c.served(marker)[inst.name] == 1, 10,
                         f"the audit record of alice's call on {inst.name} ({c.served(marker)})")
        # and through the balancer
        out = a.request("tools/list")
        assert any(t["name"] == "everything__echo" for t in out["result"]["tools"])
    assert not any("bob-on-" in str(r) for i in c.instances for r in i.records()), "bob's calls reached an upstream"
    assert not c.panics(), c.panics()


# --------------------------------------------------------------------------- Redis goes away and comes back empty


def initialize_raw(url: str, token: str, client: httpx2.Client) -> httpx2.Response:
    return client.post(url, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                                     "Accept": H.MCP_ACCEPT}, json=H.init_body())


def test_redis_restart(cluster):
    """Redis stopped: /readyz of every instance is 503 (HAProxy takes them all out), a new session is refused with
    503 and a message naming the cluster store, no broker dies. Redis back, empty: /readyz 200 again, and sessions
    opened before work on every instance (each instance re-registered the sessions it holds), including one that
    only ever touched a single instance."""
    c = cluster
    alice = c.token("alice")
    b1, b2, b3 = c.instances
    with H.RawSession(c.url, alice) as spread_s, H.RawSession(b1.url, alice) as local_s, \
            httpx2.Client(timeout=20) as hc:
        spread_s.initialize()
        for i in range(3):
            spread_s.request("tools/call", {"name": "everything__echo", "arguments": {"message": f"pre-{i}"}})
        local_s.initialize()  # straight to b1: no other instance has served it
        local_s.request("tools/call", {"name": "everything__echo", "arguments": {"message": "pre-local"}})

        c.redis.stop()
        H.poll_until(lambda: all(i.readyz() == 503 for i in c.instances), 15,
                     "every instance's /readyz to answer 503 with Redis down "
                     f"(now {[i.readyz() for i in c.instances]})")
        c.haproxy.wait_status({i.name: "DOWN" for i in c.instances}, timeout=10)
        r = initialize_raw(b2.url, alice, hc)
        assert r.status_code == 503, f"a new session with Redis down: HTTP {r.status_code} {r.text[:300]}"
        assert any(w in r.text.lower() for w in ("redis", "cluster")), \
            f"the 503 should say the cluster store is unreachable: {r.text[:300]!r}"
        assert all(i.alive() for i in c.instances), "a broker died while Redis was down"

        c.redis.start()  # same port, empty
        H.poll_until(lambda: all(i.readyz() == 200 for i in c.instances), 20,
                     f"every /readyz back to 200 (now {[i.readyz() for i in c.instances]})")
        c.haproxy.wait_status({i.name: "UP" for i in c.instances}, timeout=10)

        for sess, label in ((spread_s, "spread"), (local_s, "local")):
            for inst in c.instances:
                marker = f"post-{label}-{inst.name}-" + uuid.uuid4().hex[:6]
                resp = raw_call(inst.url, alice, sess.session_id, marker, hc)
                assert resp.status_code == 200, (
                    f"the {label} session on {inst.name} after Redis came back empty: HTTP {resp.status_code} "
                    f"{resp.text[:300]}")
                assert marker in str(H.final_response(resp, 7).get("result"))
        # and through the balancer, both sessions, a few requests each
        for i in range(3):
            spread_s.request("tools/call", {"name": "everything__echo", "arguments": {"message": f"post-{i}"}})
        local_s.url = c.url
        for i in range(3):
            local_s.request("tools/call", {"name": "everything__echo", "arguments": {"message": f"post-local-{i}"}})
        # a new session works again
        r = initialize_raw(c.url, alice, hc)
        assert r.status_code == 200, f"a new session after Redis came back: HTTP {r.status_code} {r.text[:300]}"
    assert all(i.alive() for i in c.instances), "a broker died"
    assert not c.panics(), c.panics()


# --------------------------------------------------------------------------- the documented files are the tested ones


def test_readme_shows_the_tested_haproxy_config():
    """README's HAProxy config is examples/cluster/haproxy.cfg (the file the fixtures run), after its header."""
    import re

    readme = (H.ROOT / "README.md").read_text()
    blocks = re.findall(r"```haproxy\n(.*?)```", readme, re.S)
    assert len(blocks) == 1, f"{len(blocks)} ```haproxy blocks in README.md"
    example = C.EXAMPLE_HAPROXY.read_text()
    body = example[example.index("\nglobal\n") + 1:]
    assert blocks[0] == body, "README.md's HAProxy config differs from examples/cluster/haproxy.cfg"



# --------------------------------------------------------------------------- what one instance holds is forwarded


def test_resumption_is_served_by_the_instance_holding_the_stream(cluster):
    """A client loses a call's stream on b1 and comes back with `Last-Event-ID` on b2: b2 forwards the request to
    b1 (the event ids name it), and the client gets the rest of the stream, result included. Once b1 is gone, the
    same resumption gets 404 and a message saying so (a client then gives up instead of retrying forever)."""
    c = cluster
    b1, b2 = c.instances[0], c.instances[1]
    token = c.token("alice")
    auth = {"Authorization": f"Bearer {token}"}
    with httpx2.Client(timeout=30) as hc:
        r = hc.post(b1.url, headers={**auth, "Content-Type": "application/json", "Accept": H.MCP_ACCEPT},
                    json=H.init_body())
        assert r.status_code == 200, r.text
        sid = r.headers["mcp-session-id"]
        common = {**auth, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
        hc.post(b1.url, headers={**common, "Content-Type": "application/json", "Accept": H.MCP_ACCEPT},
                json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        call = {"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                "params": {"name": "everything__trigger-long-running-operation", "arguments": {"duration": 3, "steps": 3},
                           "_meta": {"progressToken": "p9"}}}
        # Read the stream up to its first progress event, then drop the connection.
        last_id = None
        with hc.stream("POST", b1.url, json=call,
                       headers={**common, "Content-Type": "application/json", "Accept": H.MCP_ACCEPT}) as s:
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
            in_progress = False
            for line in s.iter_lines():
                if line.startswith("data:"):
                    in_progress = "notifications/progress" in line
                elif line.startswith("id:"):
                    last_id = line[3:].strip()
                elif line == "" and in_progress:
                    break  # the whole first progress event, its id included, has arrived
        assert last_id and ":" in last_id, f"event ids name the instance: {last_id!r}"
        rest = hc.get(b2.url, headers={**common, "Accept": "text/event-stream", "Last-Event-ID": last_id}, timeout=20)
        assert rest.status_code == 200, f"HTTP {rest.status_code}: {rest.text[:300]}"
        done = H.final_response(rest, 9)
        assert "Long running operation completed" in str(done.get("result")), done
        progress = [m for m in H.sse_or_json_messages(rest) if m.get("method") == "notifications/progress"]
        assert progress and all(m["params"]["progress"] > 1 for m in progress), progress
        # b1 is gone: what it held is gone with it, and the client is told.
        c.kill(b1)
        gone = hc.get(b2.url, headers={**common, "Accept": "text/event-stream", "Last-Event-ID": last_id}, timeout=20)
        assert gone.status_code == 404 and "gone" in gone.text, f"HTTP {gone.status_code}: {gone.text[:300]}"
    assert not c.panics(), c.panics()


PV_NEXT = "2026-07-28"


def call_2026(url: str, token: str, req_id: int, name: str, arguments: dict, hc: httpx2.Client, **extra) -> dict:
    meta = {"io.modelcontextprotocol/protocolVersion": PV_NEXT,
            "io.modelcontextprotocol/clientCapabilities": {"elicitation": {}},
            "io.modelcontextprotocol/clientInfo": {"name": "e2e-cluster", "version": "0"}}
    r = hc.post(url, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                              "Accept": H.MCP_ACCEPT, "MCP-Protocol-Version": PV_NEXT, "Mcp-Method": "tools/call",
                              "Mcp-Name": name},
                json={"jsonrpc": "2.0", "id": req_id, "method": "tools/call",
                      "params": {"name": name, "arguments": arguments, "_meta": meta, **extra}})
    assert r.status_code == 200, f"HTTP {r.status_code}: {r.text[:300]}"
    return H.final_response(r, req_id)


def test_parked_call_retry_on_another_instance(cluster):
    """A 2026-07-28 client calls a 2025-era server that asks for input: the call parks on b1 and the client gets
    `input_required`. Its retry lands on b2, which forwards it to b1 (the state names it): the call completes with
    the client's answers. bob's retry with alice's state, forwarded the same way, is refused by b1."""
    c = cluster
    b1, b2, b3 = c.instances
    alice, bob = c.token("alice"), c.token("bob")
    name = "everything__trigger-elicitation-request"
    with httpx2.Client(timeout=30) as hc:
        first = call_2026(b1.url, alice, 1, name, {}, hc)
        res = first.get("result") or {}
        assert res.get("resultType") == "input_required", first
        state = res["requestState"]
        key = next(iter(res["inputRequests"]))
        answers = {key: {"action": "accept", "content": {"name": "Ada", "check": True, "integer": 7,
                                                         "color": "red", "email": "ada@example.com", "age": 30,
                                                         "role": "admin", "rating": 4}}}
        stolen = call_2026(b3.url, bob, 2, name, {}, hc, inputResponses=answers, requestState=state)
        assert "error" in stolen or (stolen.get("result") or {}).get("isError"), stolen
        done = call_2026(b2.url, alice, 3, name, {}, hc, inputResponses=answers, requestState=state)
        out = done.get("result") or {}
        assert out.get("resultType") == "complete", done
        assert "Ada" in str(out.get("content")), done
    assert not c.panics(), c.panics()


def test_events_reach_the_instance_holding_the_stream(cluster):
    """A session opened on b1 holds its GET stream on b2 and sets its log level on b3; it subscribes to a resource
    and turns on server-everything's simulated logs and resource updates on b1 (one instance, since each instance
    has its own server-everything child). The logs b1's child emits and the resource updates for b1's subscription
    arrive on the stream held by b2, filtered by the level set on b3."""
    import corelib as CL

    c = cluster
    b1, b2, b3 = c.instances
    s = CL.open_session(b1.url, c.token("alice"))
    s.url = b2.url
    listener = CL.SseListener(s, "stream-on-b2")
    try:
        s.url = b3.url
        assert "result" in CL.req(s, None, "logging/setLevel", {"level": "warning"})
        s.url = b1.url
        res = s.request("resources/list", {})["result"]["resources"]
        uri = next(r["uri"] for r in res if r["uri"].startswith("everything+") and "static" in r["uri"])
        assert "result" in CL.req(s, None, "resources/subscribe", {"uri": uri})
        for name in ("everything__toggle-subscriber-updates", "everything__toggle-simulated-logging"):
            out = CL.tool(s, None, name)
            assert not out["result"].get("isError"), out

        def updates():
            return [m for m in listener.methods("notifications/resources/updated") if m["params"]["uri"] == uri]

        # Every 5 s server-everything logs at a random level (5 in 8 are warning or above) and updates.
        H.poll_until(lambda: len(updates()) >= 2 and len(listener.logs()) >= 1, 35,
                     f"resource updates and logs on the stream held by b2 ({listener.messages})")
        levels = {log["level"] for log in listener.logs()}
        assert levels <= {"warning", "error", "critical", "alert", "emergency"}, f"b3's level not applied: {levels}"
        assert all(log.get("logger", "").startswith("everything") for log in listener.logs()), listener.logs()
    finally:
        listener.stop()
        s.close()
    assert not c.panics(), c.panics()
