"""Core v2, part 1: notifications and the request pipeline.

Caller-scoped logs (policy and per-caller connections), per-session log levels, resources/subscribe through policy
and audit, completion/complete through the rate limits and the drain, denied and unknown calls counted against the
caller's limit with throttled limit audit records, and a session that stops reading never delaying another.

Upstreams: server-everything (stdio) and the `ledger` example. Every broker is started for its test and stopped at
its end. Waits poll with deadlines; "nothing arrives" checks watch a bounded window after the positive event.
"""

from __future__ import annotations

import math
import signal
import time

import anyio
import pytest
from mcp import types as T

import corelib as C
import helpers as H
import opslib as O

EV_ECHO = "everything__echo"
LOG_TOGGLE = "everything__toggle-simulated-logging"


def exposed_resource(s: H.RawSession) -> tuple[str, str]:
    """(exposed URI, upstream URI) of a static server-everything resource, as the broker lists it."""
    res = s.request("resources/list", {})["result"]["resources"]
    for r in res:
        if r["uri"].startswith("everything+") and "static" in r["uri"]:
            return r["uri"], r["uri"][len("everything+"):]
    raise AssertionError(f"no server-everything resource in resources/list: {[r['uri'] for r in res][:20]}")


def dynamic_template_prefix(s: H.RawSession) -> str:
    """The exposed form of server-everything's dynamic text resource URIs (without the id)."""
    tpls = s.request("resources/templates/list", {})["result"]["resourceTemplates"]
    for t in tpls:
        u = t["uriTemplate"]
        if u.startswith("everything+") and "dynamic/text/" in u:
            return u.split("{", 1)[0]
    raise AssertionError(f"no dynamic text template: {[t['uriTemplate'] for t in tpls]}")


# --------------------------------------------------------------------------- 1. caller-scoped logs


def test_logs_reach_only_callers_who_may_see_the_server(tmp_path):
    """alice (sees everything) and bob (policy: ledger only) both setLevel debug; server-everything logs (simulated
    logging toggled on plus the info log it writes for each subscribe): alice receives them, bob receives none in
    the same window."""
    C.require(H.LEDGER_BIN)
    minter = O.Minter()
    b = None
    try:
        b = H.start_broker(tmp_path, {"everything": C.everything(), "ledger": C.ledger()}, name="broker-logs-policy",
                           auth=minter.auth_config(), policies=C.BOB_ONLY_LEDGER)
        alice, bob = minter.token(b, "alice"), minter.token(b, "bob")
        H.wait_for_tools(b.url, [EV_ECHO, "ledger__list_accounts"], 30, headers=H.bearer(alice))
        sa, sb = C.open_session(b.url, alice), C.open_session(b.url, bob)
        la, lb = C.SseListener(sa, "alice"), C.SseListener(sb, "bob")
        try:
            for s in (sa, sb):
                m = s.request("logging/setLevel", {"level": "debug"})
                assert "result" in m, f"setLevel debug refused: {m}"
            uri, _ = exposed_resource(sa)
            r = C.tool(sa, la, LOG_TOGGLE)["result"]
            assert not r.get("isError"), r
            for _ in range(3):
                assert "result" in C.req(sa, la, "resources/subscribe", {"uri": uri})
                assert "result" in C.req(sa, la, "resources/unsubscribe", {"uri": uri})
            H.poll_until(lambda: len(la.logs()) >= 3, 15, "alice to receive server-everything's log messages")
            C.hold_for(1.5, lambda: bool(lb.logs()))
            assert not lb.logs(), f"bob, who may not see server-everything, received its logs: {lb.logs()[:3]}"
            assert all("ledger" not in str(p.get("logger", "")) for p in la.logs())
        finally:
            C.call(sa, LOG_TOGGLE)
            for x in (la, lb):
                x.stop()
            sa.close()
            sb.close()
    finally:
        if b:
            b.stop()
        minter.stop()


def test_logs_of_a_per_caller_connection_reach_only_its_owner(tmp_path):
    """server-everything with `isolation = "caller"` (one upstream connection and child per caller): alice and carol
    both may see it and both setLevel debug; the logs of alice's connection (simulated logging she toggled, the
    info log of her subscribes) reach alice only, never carol.

    (No per-caller fixture with a token-exchange credential can emit a log: tests/fixtures/token_echo_stdio.py has no
    logging; isolation = "caller" gives server-everything the same per-caller connections.)"""
    minter = O.Minter()
    b = None
    try:
        b = H.start_broker(tmp_path, {"everything": C.everything(isolation="caller")}, name="broker-logs-caller",
                           auth=minter.auth_config(), policies=[{"effect": "allow"}])
        alice, carol = minter.token(b, "alice"), minter.token(b, "carol")
        H.wait_for_tools(b.url, [EV_ECHO], 30, headers=H.bearer(alice))
        H.wait_for_tools(b.url, [EV_ECHO], 30, headers=H.bearer(carol))
        sa, sc = C.open_session(b.url, alice), C.open_session(b.url, carol)
        la, lc = C.SseListener(sa, "alice"), C.SseListener(sc, "carol")
        try:
            for s in (sa, sc):
                assert "result" in s.request("logging/setLevel", {"level": "debug"})
            # carol's own connection exists (she used it), but stays quiet
            assert not C.tool(sc, lc, EV_ECHO, {"message": "carol"})["result"].get("isError")
            # what carol's own connection says at start ("Roots updated ...") is hers: count from here
            C.hold_for(1.0, lambda: False)
            own = len(lc.logs())
            uri, _ = exposed_resource(sa)
            assert not C.tool(sa, la, LOG_TOGGLE)["result"].get("isError")
            for _ in range(3):
                assert "result" in C.req(sa, la, "resources/subscribe", {"uri": uri})
                assert "result" in C.req(sa, la, "resources/unsubscribe", {"uri": uri})
            H.poll_until(lambda: len(la.logs()) >= 3, 15, "alice to receive her connection's log messages")
            # carol's own connection announces its roots once at start ("Roots updated ..."); under load that line
            # can arrive after the baseline above, and it is hers, not alice's: only other lines count.
            def foreign():
                return [m for m in lc.logs()[own:] if not str(m.get("data", "")).startswith("Roots updated")]

            C.hold_for(1.5, lambda: bool(foreign()))
            assert not foreign(), f"carol received the logs of alice's per-caller connection: {foreign()[:3]}"
        finally:
            for x in (la, lc):
                x.stop()
            sa.close()
            sc.close()
    finally:
        if b:
            b.stop()
        minter.stop()


# --------------------------------------------------------------------------- 2. per-session log level


def test_log_level_is_per_session(tmp_path):
    """Session A setLevel error, then session B setLevel debug, on the same server-everything: B receives messages
    below error (the info log of each subscribe), A none. Each setLevel leaves an audit record of kind set_level."""
    b = H.start_broker(tmp_path, {"everything": C.everything()}, name="broker-loglevel", extra_toml=C.AUDIT_TOML)
    try:
        H.wait_for_tools(b.url, [EV_ECHO], 30)
        sa, sb = C.open_session(b.url), C.open_session(b.url)
        la, lb = C.SseListener(sa, "A"), C.SseListener(sb, "B")
        try:
            assert "result" in sa.request("logging/setLevel", {"level": "error"})
            assert "result" in sb.request("logging/setLevel", {"level": "debug"})
            uri, _ = exposed_resource(sb)
            assert not C.tool(sb, lb, LOG_TOGGLE)["result"].get("isError")
            for _ in range(3):
                assert "result" in C.req(sb, lb, "resources/subscribe", {"uri": uri})
                assert "result" in C.req(sb, lb, "resources/unsubscribe", {"uri": uri})

            def below(listener):
                return [p for p in listener.logs() if p.get("level") in C.LEVELS[:4]]
            H.poll_until(lambda: below(lb), 15, "session B (debug) to receive a message below error")
            C.hold_for(1.5, lambda: bool(below(la)))
            assert not below(la), f"session A asked for `error` and received lower levels: {below(la)[:3]}"
            assert all(C.LEVELS.index(p.get("level")) >= C.LEVELS.index("error") for p in la.logs()), la.logs()
        finally:
            C.call(sb, LOG_TOGGLE)
            for x in (la, lb):
                x.stop()
            sa.close()
            sb.close()
        recs = O.wait_records(tmp_path / "audit.jsonl", lambda r: r.get("kind") == "set_level",
                              "two set_level records", n=2, timeout=10)
        assert len({r["session"] for r in recs}) == 2, recs
        assert all(r["decision"] == "allow" for r in recs), recs
    finally:
        b.stop()


def test_a_closed_session_unsubscribes_upstream(tmp_path):
    """Session B subscribes to a server-everything resource and goes away (DELETE) without unsubscribing: it was the
    only subscriber, so the broker sends resources/unsubscribe upstream. server-everything logs each unsubscribe it
    receives; session A (logging at debug) hears that log line."""
    b = H.start_broker(tmp_path, {"everything": C.everything()}, name="broker-close-unsub")
    try:
        H.wait_for_tools(b.url, [EV_ECHO], 30)
        sa, sb = C.open_session(b.url), C.open_session(b.url)
        la = C.SseListener(sa, "A")
        try:
            assert "result" in sa.request("logging/setLevel", {"level": "debug"})
            uri, upstream_uri = exposed_resource(sb)
            assert "result" in sb.request("resources/subscribe", {"uri": uri})
            sb.close()

            def unsubscribed():
                return [p for p in la.logs() if "Received Unsubscribe Resource request" in str(p.get("data"))
                        and upstream_uri in str(p.get("data"))]
            H.poll_until(unsubscribed, 15, "server-everything to log the unsubscribe the broker sent for session B")
        finally:
            la.stop()
            sa.close()
    finally:
        b.stop()


# --------------------------------------------------------------------------- 3. subscribe through policy and audit


def test_subscribe_goes_through_policy_and_audit(tmp_path):
    """bob may not read server-everything's resources: his resources/subscribe to one gets the same JSON-RPC error
    as his refused resources/read, is audited (kind subscribe, decision deny), and no
    notifications/resources/updated for it reaches him while alice's subscription to the same URI receives updates
    (server-everything sends them for subscribed URIs every 5 s once toggle-subscriber-updates is on)."""
    C.require(H.LEDGER_BIN)
    minter = O.Minter()
    b = None
    try:
        b = H.start_broker(tmp_path, {"everything": C.everything(), "ledger": C.ledger()}, name="broker-subscribe",
                           auth=minter.auth_config(), policies=C.BOB_ONLY_LEDGER, extra_toml=C.AUDIT_TOML)
        alice, bob = minter.token(b, "alice"), minter.token(b, "bob")
        H.wait_for_tools(b.url, [EV_ECHO], 30, headers=H.bearer(alice))
        sa, sb = C.open_session(b.url, alice), C.open_session(b.url, bob)
        la, lb = C.SseListener(sa, "alice"), C.SseListener(sb, "bob")
        try:
            uri, _ = exposed_resource(sa)
            read = C.req(sb, lb, "resources/read", {"uri": uri})
            assert "error" in read, f"bob's read of a server-everything resource was not refused: {read}"
            sub = C.req(sb, lb, "resources/subscribe", {"uri": uri})
            assert "error" in sub, f"bob's resources/subscribe to a resource he may not read was accepted: {sub}"
            assert (sub["error"]["code"], sub["error"]["message"]) == (read["error"]["code"], read["error"]["message"]), \
                f"subscribe refused differently from the read: {sub['error']} vs {read['error']}"
            audit = tmp_path / "audit.jsonl"
            rec = O.wait_records(audit, lambda r: r.get("kind") == "subscribe" and r["sub"] == "bob",
                                 "bob's subscribe record", timeout=10)[0]
            read_rec = O.wait_records(audit, lambda r: r.get("kind") == "resource" and r["sub"] == "bob",
                                      "bob's read record", timeout=10)[0]
            assert rec["decision"] == "deny" and rec["server"] == "everything" and rec["name"] == uri, rec
            same = ("decision", "outcome", "reason", "rule", "upstream_name")
            assert {k: rec[k] for k in same} == {k: read_rec[k] for k in same}, \
                f"the subscribe record differs from the refused read's: {rec} vs {read_rec}"

            assert "result" in C.req(sa, la, "resources/subscribe", {"uri": uri})
            assert not C.tool(sa, la, "everything__toggle-subscriber-updates")["result"].get("isError")

            def updates(listener):
                return [m for m in listener.methods("notifications/resources/updated")
                        if m.get("params", {}).get("uri") in (uri, uri[len("everything+"):])]
            H.poll_until(lambda: len(updates(la)) >= 2, 20, "two resources/updated for alice's subscription")
            assert not updates(lb), f"bob received updates for a resource he may not read: {updates(lb)}"
            assert not lb.methods("notifications/resources/updated"), lb.methods("notifications/resources/updated")
            C.call(sa, "everything__toggle-subscriber-updates")
        finally:
            for x in (la, lb):
                x.stop()
            sa.close()
            sb.close()
    finally:
        if b:
            b.stop()
        minter.stop()


# --------------------------------------------------------------------------- 4. completion through the pipeline


COMPLETE = {"ref": {"type": "ref/prompt", "name": "everything__completable-prompt"},
            "argument": {"name": "department", "value": "E"}}


def test_completion_is_rate_limited_per_caller(tmp_path):
    """[limits] per_caller = { rate = "1/s", burst = 2 }: of a burst of completion/complete from alice, the first two
    are answered and the 3rd and later get JSON-RPC error -32029."""
    minter = O.Minter()
    b = None
    try:
        b = H.start_broker(tmp_path, {"everything": C.everything()}, name="broker-complete-limit",
                           auth=minter.auth_config(), policies=[{"effect": "allow"}],
                           extra_toml='[limits]\nper_caller = { rate = "1/s", burst = 2 }\n')
        ready = minter.token(b, "readiness")
        H.wait_for_tools(b.url, [EV_ECHO], 30, headers=H.bearer(ready))
        with H.RawSession(b.url, minter.token(b, "alice")) as s:
            s.initialize()
            t0 = time.monotonic()
            answers = [s.request("completion/complete", COMPLETE) for _ in range(6)]
            took = time.monotonic() - t0
        assert took < 0.9, f"the burst took {took:.2f}s: a token may have refilled, the test cannot judge"
        for i, m in enumerate(answers[:2]):
            assert "result" in m and "Engineering" in m["result"]["completion"]["values"], f"completion {i + 1}: {m}"
        for i, m in enumerate(answers[2:], 3):
            assert "error" in m and m["error"]["code"] == -32029, \
                f"completion {i} of a burst (per_caller burst 2) was not rate limited: {m}"
    finally:
        if b:
            b.stop()
        minter.stop()


def test_completion_refused_during_drain(tmp_path):
    """`mcp-broker stdio`, SIGTERM while a slow call is in flight: once new calls are refused, a completion/complete
    is refused too, with an error whose message says the broker is shutting down."""
    cfg = tmp_path / "stdio.toml"
    cfg.write_text(H.render_config({"everything": C.everything()}, broker={"drain_timeout": "30s"}))
    c = O.StdioClient(cfg, tmp_path, name="broker-stdio-drain-complete")
    try:
        c.initialize()

        def has_tools():
            tools = c.response(c.request("tools/list", {}))["result"]["tools"]
            return EV_ECHO in {t["name"] for t in tools}
        H.poll_until(has_tools, 30, "server-everything's tools over stdio", interval=0.2)
        ok = c.response(c.request("completion/complete", COMPLETE))
        assert "result" in ok, f"completion before the drain failed: {ok}"
        slow = c.request("tools/call", {"name": "everything__trigger-long-running-operation",
                                        "arguments": {"duration": 6, "steps": 6}, "_meta": {"progressToken": "dr"}})
        H.poll_until(lambda: c.progress_count() >= 1, 15, "the slow call's first progress")
        c.proc.signal(signal.SIGTERM)

        def refused():
            m = c.response(c.request("tools/call", {"name": EV_ECHO, "arguments": {"message": "x"}}))
            return m if m.get("result", {}).get("isError") else None
        H.poll_until(refused, 10, "a new call refused during the drain", interval=0.05)
        m = c.response(c.request("completion/complete", COMPLETE))
        assert "error" in m, f"a completion was served during the drain: {m}"
        assert "shutting down" in m["error"]["message"], m
        c.response(slow, 30)
    finally:
        c.stop()


# --------------------------------------------------------------------------- 5. denied and unknown requests count


def test_unknown_tool_calls_count_against_the_caller_limit_and_limit_audit_is_throttled(tmp_path):
    """per_caller burst 2 (rate 1/m): 20 calls to an unknown tool name in a tight loop: the later ones get the
    rate-limit isError result, and the audit file holds far fewer than 20 records for them (at most the 2 unknown-name
    records plus about one limit record per second)."""
    C.require(H.LEDGER_BIN)
    minter = O.Minter()
    b = None
    name = "nosuchserver__no_such_tool"
    try:
        b = H.start_broker(tmp_path, {"ledger": C.ledger()}, name="broker-unknown-limit",
                           auth=minter.auth_config(), policies=[{"effect": "allow"}],
                           extra_toml=C.AUDIT_TOML + '\n[limits]\nper_caller = { rate = "1/m", burst = 2 }\n')
        H.wait_for_tools(b.url, ["ledger__list_accounts"], 30, headers=H.bearer(minter.token(b, "readiness")))
        with H.RawSession(b.url, minter.token(b, "alice")) as s:
            s.initialize()
            t0 = time.monotonic()
            answers = []
            for _ in range(20):
                r, rid = s.post("tools/call", {"name": name, "arguments": {}})
                answers.append(H.final_response(r, rid) if r.status_code == 200 else {"http": r.status_code})
            elapsed = time.monotonic() - t0
        limited = [m for m in answers[2:] if m.get("result", {}).get("isError") and "rate limit" in C.text_of(m["result"])]
        assert len(limited) == 18, \
            f"unknown-tool calls past the burst were not rate limited ({len(limited)} of 18): {answers[2:5]}"
        # a marker from another caller: once its record is written, every earlier record is too (one writer queue)
        with H.RawSession(b.url, minter.token(b, "marker")) as m:
            m.initialize()
            C.call(m, "ledger__list_accounts")
        audit = tmp_path / "audit.jsonl"
        O.wait_records(audit, lambda r: r["sub"] == "marker" and r["kind"] == "tool", "the marker call", timeout=10)
        recs = [r for r in O.read_audit(audit) if r["name"] == name]
        limit_recs = [r for r in recs if r["outcome"] == "rate_limited"]
        allowed = 2 + 2 * max(1, math.ceil(elapsed))
        assert len(recs) <= allowed, \
            f"{len(recs)} audit records for 20 refused calls in {elapsed:.2f}s (at most {allowed}); " \
            f"{len(limit_recs)} of them rate_limited"
    finally:
        if b:
            b.stop()
        minter.stop()


def test_denied_calls_count_against_the_caller_limit(tmp_path):
    """per_caller burst 2 (rate 1/m): two calls refused by policy use up bob's budget, so his next, allowed call is
    rate limited (a caller cannot probe refused tools for free)."""
    C.require(H.LEDGER_BIN)
    minter = O.Minter()
    b = None
    try:
        b = H.start_broker(tmp_path, {"ledger": C.ledger()}, name="broker-denied-limit", auth=minter.auth_config(),
                           policies=[{"servers": ["ledger"], "tools": ["get_customer_pii"], "effect": "deny",
                                      "message": "no pii (core v2 e2e)"}, {"effect": "allow"}],
                           extra_toml='[limits]\nper_caller = { rate = "1/m", burst = 2 }\n')
        H.wait_for_tools(b.url, ["ledger__list_accounts"], 30, headers=H.bearer(minter.token(b, "readiness")))
        with H.RawSession(b.url, minter.token(b, "bob")) as s:
            s.initialize()
            for _ in range(2):
                r = C.call(s, "ledger__get_customer_pii", {"customer_id": "CUST-001"})["result"]
                assert r.get("isError") and "no pii" in C.text_of(r), r
            r = C.call(s, "ledger__list_accounts")["result"]
            assert r.get("isError") and "rate limit" in C.text_of(r), \
                f"two denied calls did not count against bob's per-caller limit (burst 2): {r}"
    finally:
        if b:
            b.stop()
        minter.stop()


# --------------------------------------------------------------------------- 6. a slow session never delays another


@pytest.mark.timeout(180)
def test_a_session_that_stops_reading_never_delays_another(tmp_path):
    """Session S sets log level debug, opens its GET SSE stream on a raw socket with a 4 KB receive buffer and never
    reads it. Session G subscribes to server-everything resource URIs ~7 KB long, each of which makes
    server-everything log a message quoting the URI (pushed to S): tens of megabytes for S, until the broker reports
    drops. Meanwhile session T's tools/call
    and a call that makes server-everything send T a sampling request (answered by T's client) each complete within
    1 s, G's requests never stall, and mcp_broker_notifications_dropped_total is > 0 once S's queue is full."""
    b = H.start_broker(tmp_path, {"everything": C.everything()}, name="broker-slow-session")
    stuck = None
    try:
        H.wait_for_tools(b.url, [EV_ECHO], 30)
        s = C.open_session(b.url)
        g = C.open_session(b.url)
        assert "result" in s.request("logging/setLevel", {"level": "debug"})
        stuck = C.StuckSseReader(b.base, s)
        prefix = dynamic_template_prefix(g)
        pad = "x" * 7_000  # the broker refuses resource URIs over 8 KB

        def dropped() -> float | None:
            return C.metric_sum(O.scrape(b.base), "mcp_broker_notifications_dropped_total")

        # flood S until the broker reports drops (checked every 100 messages), at most 3,000 messages (~21 MB) / 60 s
        slowest = 0.0
        sent = 0
        t_flood = time.monotonic()
        while sent < 3000 and time.monotonic() - t_flood < 60:
            t0 = time.monotonic()
            m = g.request("resources/subscribe", {"uri": f"{prefix}{sent}-{pad}"})
            slowest = max(slowest, time.monotonic() - t0)
            assert "result" in m or "error" in m, m
            sent += 1
            if slowest > 5 or (sent % 100 == 0 and (dropped() or 0) > 0):
                break
        assert slowest < 2, f"a subscribe took {slowest:.1f}s while session S was not reading its stream ({sent} sent)"

        timings: dict[str, float] = {}

        async def sample(ctx, params):
            return T.CreateMessageResult(role="assistant", content=T.TextContent(type="text", text="core-v2-sampled"),
                                         model="e2e", stop_reason="endTurn")

        async def t_session():
            async with H.http_session(b.url, sampling_callback=sample) as t:
                for name, args in ((EV_ECHO, {"message": "t-echo"}),
                                   ("everything__trigger-sampling-request", {"prompt": "p", "maxTokens": 5}),
                                   (EV_ECHO, {"message": "t-echo-2"})):
                    t0 = time.monotonic()
                    key = f"{name}#{len(timings)}"
                    r = None
                    with anyio.move_on_after(5):
                        r = await t.call_tool(name, args)
                    timings[key] = time.monotonic() - t0
                    if r is None:
                        timings[key] = float("inf")  # no answer within 5 s
                        return
                    assert not r.is_error, H.dump(r)
                    if "sampling" in name:
                        assert "core-v2-sampled" in str(H.dump(r)), H.dump(r)
                    # more notifications for S while T works
                    await anyio.to_thread.run_sync(lambda: g.request("resources/subscribe", {"uri": f"{prefix}t-{pad}"}))

        anyio.run(t_session)
        slow = {k: round(v, 3) for k, v in timings.items() if v >= 1.0}
        assert len(timings) == 3 and not slow, \
            f"session T was delayed while S did not read its stream (seconds per call, inf = no answer in 5 s): {timings}"
        n = dropped()
        assert n is not None, "mcp_broker_notifications_dropped_total is not in /metrics"
        assert n > 0, f"{sent} log messages of ~7 KB for a session that never reads, yet nothing was dropped"
        g.close()
        s.close()
    finally:
        if stuck:
            stuck.close()
        b.stop()
