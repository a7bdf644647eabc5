"""Operating the broker (issue 5): Prometheus metrics (parsed with prometheus_client), rate limits and the
concurrency cap, idle timeouts extended by progress, live reload (file watch and SIGHUP, rejected files,
per-caller list_changed), draining on SIGTERM, and /healthz, /readyz.

Upstream: the `ledger` example over stdio (a second copy as `ledger2` where a reload adds a server). Callers with
[auth] carry RS256 tokens minted by the test (opslib.Minter). Nothing waits by sleeping: every wait polls a
condition against a deadline; timing assertions are generous (the machine may be busy).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import anyio
import pytest

import helpers as H
import opslib as O

MSG_NO_PII = "No PII through this broker (ops e2e)."
LEDGER_TOOLS = {"list_accounts", "get_account", "list_transactions", "update_account_status", "get_customer_pii",
                "get_audit_log", "reconcile_ledger"}


def require_bins() -> None:
    for b in (H.BROKER_BIN, H.LEDGER_BIN):
        if not b.exists():
            pytest.fail(f"{b} is missing (cargo build --all-targets)")


def ledger(**extra) -> dict:
    return H.example_stdio_spec(H.LEDGER_BIN, **extra)


def text_of(result: dict) -> str:
    return "\n".join(c.get("text", "") for c in result.get("content", []) if isinstance(c, dict))


def call(s: H.RawSession, name: str, args: dict | None = None) -> dict:
    """tools/call over a raw session; returns the JSON-RPC message (result or error)."""
    return s.request("tools/call", {"name": name, "arguments": args or {}})


def wait_exit(proc: H.Proc, timeout: float) -> int | None:
    try:
        return proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def ledger_children(broker: H.Broker) -> set[int]:
    return {p for p in H.descendants(broker.proc.pid) if any("ledger" in a for a in H.cmdline(p)[:1])}


# --------------------------------------------------------------------------- metrics


def test_metrics_on_a_separate_listener(tmp_path):
    """metrics_listen: /metrics parses as Prometheus text; requests_total moves for an ok, a denied and a
    rate-limited call (and policy_denies_total, rate_limited_total, the histograms with them); the live gauges
    show the upstream up, its child process, the open session; the main listener then has no /metrics."""
    require_bins()
    b = H.start_broker(tmp_path, {"ledger": ledger(tool_limits={"get_audit_log": {"rate_limit": {"rate": "1/m", "burst": 1}}})},
                       name="broker-metrics", broker={"metrics_listen": "127.0.0.1:0"},
                       policies=[{"servers": ["ledger"], "tools": ["get_customer_pii"], "effect": "deny", "message": MSG_NO_PII}])
    try:
        H.wait_for_tools(b.url, ["ledger__list_accounts"], 30)
        base = O.metrics_base(b)
        assert base != b.base
        m0 = O.scrape(base)
        assert m0.types["mcp_broker_requests_total"] == "counter"
        assert m0.types["mcp_broker_upstream_up"] == "gauge"
        with H.RawSession(b.url, None) as s:
            s.initialize()
            assert not call(s, "ledger__list_accounts")["result"].get("isError")
            denied = call(s, "ledger__get_customer_pii", {"customer_id": "CUST-001"})["result"]
            assert denied.get("isError") and MSG_NO_PII in text_of(denied), denied
            assert not call(s, "ledger__get_audit_log", {"limit": 1})["result"].get("isError")
            limited = call(s, "ledger__get_audit_log", {"limit": 1})["result"]
            assert limited.get("isError") and "rate limit exceeded" in text_of(limited), limited
            m1 = O.scrape(base)
            # live gauges while the session is open
            assert m1.get("mcp_broker_upstream_up", server="ledger") == 1
            assert m1.get("mcp_broker_upstream_connections", server="ledger") == 1
            assert m1.get("mcp_broker_child_processes") >= 1
            assert m1.get("mcp_broker_sessions") >= 1
            assert m1.get("mcp_broker_inflight_calls") == 0
            assert m1.get("mcp_broker_ready") == 1
            assert m1.get("mcp_broker_upstream_restarts_total", server="ledger") == 0

        def delta(metric, **labels):
            return m1.get(metric, **labels) - m0.get(metric, **labels)

        req = "mcp_broker_requests_total"
        assert delta(req, kind="tool", server="ledger", name="ledger__list_accounts", outcome="ok") == 1
        assert delta(req, kind="tool", server="ledger", name="ledger__get_customer_pii", outcome="denied") == 1
        assert delta(req, kind="tool", server="ledger", name="ledger__get_audit_log", outcome="ok") == 1
        assert delta(req, kind="tool", server="ledger", name="ledger__get_audit_log", outcome="rate_limited") == 1
        assert delta("mcp_broker_policy_denies_total", kind="tool", server="ledger") == 1
        assert delta("mcp_broker_rate_limited_total", scope="tool", server="ledger") == 1
        assert delta("mcp_broker_request_duration_seconds_count", kind="tool", server="ledger") == 4
        # only the two calls that reached the upstream have an upstream time
        assert delta("mcp_broker_upstream_duration_seconds_count", server="ledger") == 2
        assert delta("mcp_broker_audit_records_total") >= 4
        assert m1.get("mcp_broker_audit_dropped_total") == 0
        # histogram buckets are cumulative and end with +Inf = count
        hist = m1.families["mcp_broker_request_duration_seconds"]
        assert hist.type == "histogram"
        buckets = sorted(((float(s.labels["le"]), s.value) for s in hist.samples
                          if s.name.endswith("_bucket") and s.labels.get("kind") == "tool"), key=lambda x: x[0])
        assert [v for _, v in buckets] == sorted(v for _, v in buckets) and buckets[-1][0] == float("inf")
        assert buckets[-1][1] == m1.get("mcp_broker_request_duration_seconds_count", kind="tool", server="ledger")
        # no subject, token or secret in any label: only the documented label names
        for (name, labels), _ in m1.samples.items():
            assert {k for k, _ in labels} <= {"kind", "server", "name", "outcome", "scope", "store", "result", "le"}, (name, labels)
        # the session closed (DELETE): the gauge goes back down
        H.poll_until(lambda: O.scrape(base).get("mcp_broker_sessions") == m0.get("mcp_broker_sessions"), 15,
                     "mcp_broker_sessions back to its value before the session")
        # the separate listener serves the health endpoints too; the MCP listener has no /metrics
        assert O.http_get(base + "/healthz").status_code == 200
        assert O.http_get(b.base + "/metrics").status_code == 404
        assert O.http_get(b.base + "/healthz").status_code == 200
    finally:
        b.stop()


def test_metrics_on_the_main_listener(tmp_path):
    """Without metrics_listen, /metrics is served on the MCP listener and counts calls there."""
    require_bins()
    b = H.start_broker(tmp_path, {"ledger": ledger()}, name="broker-metrics-main")
    try:
        H.wait_for_tools(b.url, ["ledger__list_accounts"], 30)
        m0 = O.scrape(b.base)
        with H.RawSession(b.url, None) as s:
            s.initialize()
            for _ in range(3):
                assert not call(s, "ledger__list_accounts")["result"].get("isError")
        m1 = O.scrape(b.base)
        labels = dict(kind="tool", server="ledger", name="ledger__list_accounts", outcome="ok")
        assert m1.get("mcp_broker_requests_total", **labels) - m0.get("mcp_broker_requests_total", **labels) == 3
        assert m1.get("mcp_broker_upstream_up", server="ledger") == 1
        assert m1.get("mcp_broker_child_processes") == 1
        lists = m1.get("mcp_broker_requests_total", kind="list", server="", name="tools", outcome="ok")
        assert lists >= 1, "tools/list requests are not counted"
    finally:
        b.stop()


# --------------------------------------------------------------------------- rate limits


RETRY_RE = re.compile(r"retry after (\d+(?:\.\d+)?) (ms|s)")


def retry_hint_ms(text: str) -> float:
    m = RETRY_RE.search(text)
    assert m, f"no retry hint in {text!r}"
    return float(m.group(1)) * (1 if m.group(2) == "ms" else 1000)


def test_tool_rate_limit_trips_with_retry_hint(tmp_path):
    """tool_limits.reconcile_ledger rate "1/m" burst 2: two calls pass, the third is refused with an isError result
    naming the tool and the wait ("retry after N s") and `_meta.io.mcp-broker/retryAfterMs`; other tools of the
    server are not limited; the audit record says rate_limited/deny/limit; rate_limited_total{scope="tool"}."""
    require_bins()
    b = H.start_broker(tmp_path, {"ledger": ledger(tool_limits={"reconcile_ledger": {"rate_limit": {"rate": "1/m", "burst": 2}}})},
                       name="broker-rl-tool", extra_toml='[audit]\nfile = "audit.jsonl"\n')
    try:
        H.wait_for_tools(b.url, ["ledger__reconcile_ledger"], 30)
        args = {"steps": 1, "step_ms": 0}
        with H.RawSession(b.url, None) as s:
            s.initialize()
            for i in range(2):
                r = call(s, "ledger__reconcile_ledger", args)["result"]
                assert not r.get("isError"), f"call {i + 1} of the burst refused: {r}"
            r = call(s, "ledger__reconcile_ledger", args)["result"]
            assert r.get("isError"), f"the third call within a minute passed: {r}"
            text = text_of(r)
            assert "rate limit exceeded for tool `reconcile_ledger` on server `ledger`" in text, text
            retry_ms = r.get("_meta", {}).get("io.mcp-broker/retryAfterMs")
            assert isinstance(retry_ms, int) and 50_000 < retry_ms <= 60_000, r
            assert abs(retry_hint_ms(text) - retry_ms) <= 100, (text, retry_ms)
            assert not call(s, "ledger__list_accounts")["result"].get("isError"), "another tool was limited too"
        recs = O.wait_records(tmp_path / "audit.jsonl", lambda r: r["name"] == "ledger__reconcile_ledger", "3 reconcile calls", n=3)
        assert [r["outcome"] for r in recs] == ["ok", "ok", "rate_limited"], recs
        lim = recs[2]
        O.check_shape(lim)
        assert (lim["decision"], lim["rule"], lim["credential"], lim["upstream_ms"]) == ("deny", "limit", None, None), lim
        assert lim["reason"] == text, lim
        m = O.scrape(b.base)
        assert m.get("mcp_broker_rate_limited_total", scope="tool", server="ledger") == 1
    finally:
        b.stop()


def test_server_rate_limit_recovers(tmp_path):
    """Server rate "2/s" burst 1: calls in quick succession are refused with a sub-second retry hint, and after
    the refill (polled, not slept) a call passes again. prompts/get on the same server gets JSON-RPC -32029 with
    data {scope, retryAfterMs}."""
    require_bins()
    b = H.start_broker(tmp_path, {"ledger": ledger(rate_limit={"rate": "2/s", "burst": 1})}, name="broker-rl-server")
    try:
        H.wait_for_tools(b.url, ["ledger__list_accounts"], 30)
        with H.RawSession(b.url, None) as s:
            s.initialize()

            def refused_call():
                r = call(s, "ledger__list_accounts")["result"]
                return r if r.get("isError") else None
            r = H.poll_until(refused_call, 20, "a call refused by the server's rate limit", interval=0)
            text = text_of(r)
            assert "rate limit exceeded for server `ledger` (2.000/s, burst 1)" in text, text
            retry_ms = r["_meta"]["io.mcp-broker/retryAfterMs"]
            assert 0 < retry_ms <= 500 and 0 < retry_ms_from(text) <= 500, (text, retry_ms)

            def passes():
                return not call(s, "ledger__list_accounts")["result"].get("isError")
            H.poll_until(passes, 15, "a call to pass again after the bucket refilled", interval=0.1)

            def refused_prompt():
                m = s.request("prompts/get", {"name": "ledger__summarize_account", "arguments": {"account_id": "ACC-1001"}})
                return m if "error" in m else None
            m = H.poll_until(refused_prompt, 20, "a prompts/get refused by the rate limit", interval=0)
            err = m["error"]
            assert err["code"] == -32029, err
            assert "rate limit exceeded for server `ledger`" in err["message"], err
            assert err["data"]["scope"] == "server" and isinstance(err["data"]["retryAfterMs"], int), err
            assert 0 < err["data"]["retryAfterMs"] <= 500, err
        m = O.scrape(b.base)
        assert m.get("mcp_broker_rate_limited_total", scope="server", server="ledger") >= 2
    finally:
        b.stop()


def retry_ms_from(text: str) -> float:
    return retry_hint_ms(text)


def test_per_caller_rate_limit(tmp_path):
    """[limits] per_caller "1/m" burst 2 with [auth]: alice's third call is refused naming her (`caller `alice``);
    bob, another subject, is not affected; the limit spans servers."""
    require_bins()
    minter = O.Minter()
    b = None
    try:
        b = H.start_broker(tmp_path, {"ledger": ledger(), "ledger2": ledger()}, name="broker-rl-caller",
                           auth=minter.auth_config(), policies=[{"effect": "allow"}],
                           extra_toml='[limits]\nper_caller = { rate = "1/m", burst = 2 }\n')
        alice, bob = minter.token(b, "alice"), minter.token(b, "bob")
        H.wait_for_tools(b.url, ["ledger__list_accounts", "ledger2__list_accounts"], 30, headers=H.bearer(alice))
        with H.RawSession(b.url, alice) as s:
            s.initialize()
            assert not call(s, "ledger__list_accounts")["result"].get("isError")
            assert not call(s, "ledger2__list_accounts")["result"].get("isError")
            r = call(s, "ledger__list_accounts")["result"]
            assert r.get("isError") and "rate limit exceeded for caller `alice`" in text_of(r), r
            r2 = call(s, "ledger2__list_accounts")["result"]
            assert r2.get("isError") and "caller `alice`" in text_of(r2), "the per-caller limit does not span servers"
            assert 50_000 < r["_meta"]["io.mcp-broker/retryAfterMs"] <= 60_000, r
        with H.RawSession(b.url, bob) as s:
            s.initialize()
            for name in ("ledger__list_accounts", "ledger2__list_accounts"):
                r = call(s, name)["result"]
                assert not r.get("isError"), f"bob was limited by alice's calls: {r}"
        m = O.scrape(b.base)
        assert m.get("mcp_broker_rate_limited_total", scope="caller", server="ledger") == 1
        assert m.get("mcp_broker_rate_limited_total", scope="caller", server="ledger2") == 1
    finally:
        if b:
            b.stop()
        minter.stop()


@pytest.mark.anyio
async def test_max_concurrent_waits_then_refuses(tmp_path):
    """max_concurrent = 1, timeout "3s": while one slow call holds the slot (concurrency_in_use = 1), another waits
    for it up to the timeout and is then refused (scope concurrency); once the slot is free, calls pass."""
    require_bins()
    b = H.start_broker(tmp_path, {"ledger": ledger(max_concurrent=1, timeout="3s")}, name="broker-concurrency",
                       extra_toml='[audit]\nfile = "audit.jsonl"\n')
    try:
        await anyio.to_thread.run_sync(lambda: H.wait_for_tools(b.url, ["ledger__list_accounts"], 30))
        progress = []

        async def on_progress(p, total, message):
            progress.append(p)

        async with H.http_session(b.url) as slow, H.http_session(b.url) as other:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: slow.call_tool("ledger__reconcile_ledger", {"steps": 30, "step_ms": 500},
                                                     progress_callback=on_progress))
                await H.apoll_until(lambda: progress, 15, "the slow call's first progress")
                m = await anyio.to_thread.run_sync(lambda: O.scrape(b.base))
                assert m.get("mcp_broker_concurrency_in_use", server="ledger") == 1
                t0 = time.monotonic()
                with anyio.fail_after(20):
                    r = await other.call_tool("ledger__list_accounts", {})
                waited = time.monotonic() - t0
                assert r.is_error, f"a second call ran although max_concurrent = 1: {H.dump(r)}"
                assert "max_concurrent" in r.content[0].text, r.content[0].text
                assert (r.meta or {}).get("io.mcp-broker/retryAfterMs") == 1000, H.dump(r)
                assert waited >= 2.5, f"refused after {waited:.1f}s, without waiting for a slot"
                tg.cancel_scope.cancel()
            await H.apoll_until(lambda: O.scrape(b.base).get("mcp_broker_concurrency_in_use", server="ledger") == 0,
                                15, "the slot to be released after the slow call was cancelled")
            with anyio.fail_after(20):
                r = await other.call_tool("ledger__list_accounts", {})
            assert not r.is_error, H.dump(r)
        m = await anyio.to_thread.run_sync(lambda: O.scrape(b.base))
        assert m.get("mcp_broker_rate_limited_total", scope="concurrency", server="ledger") == 1
        rec = (await anyio.to_thread.run_sync(lambda: O.wait_records(
            Path(tmp_path) / "audit.jsonl", lambda r: r["outcome"] == "rate_limited", "the concurrency refusal")))[0]
        assert (rec["name"], rec["rule"], rec["decision"]) == ("ledger__list_accounts", "limit", "deny"), rec
    finally:
        b.stop()


# --------------------------------------------------------------------------- timeouts and progress


def test_timeout_is_an_idle_timeout_extended_by_progress(tmp_path):
    """timeout = "1s" on the server: a reconcile silent for 2 s (steps=1, step_ms=2000) times out (isError
    "did not answer within", audit outcome timeout); one that runs 2.4 s but reports progress every 600 ms
    (steps=4) completes, because each progress restarts the timeout."""
    require_bins()
    b = H.start_broker(tmp_path, {"ledger": ledger(timeout="1s")}, name="broker-timeout",
                       extra_toml='[audit]\nfile = "audit.jsonl"\n')
    try:
        H.wait_for_tools(b.url, ["ledger__reconcile_ledger"], 30)
        with H.RawSession(b.url, None) as s:
            s.initialize()
            r = call(s, "ledger__reconcile_ledger", {"steps": 1, "step_ms": 2000})["result"]
            assert r.get("isError") and "server `ledger` did not answer within 1s" in text_of(r), r
            t0 = time.monotonic()
            r = call(s, "ledger__reconcile_ledger", {"steps": 4, "step_ms": 600})["result"]
            took = time.monotonic() - t0
            assert not r.get("isError"), f"a call that kept reporting progress timed out: {r}"
            summary = r.get("structuredContent") or json.loads(text_of(r))
            assert summary["steps_completed"] == 4 and summary["progress_reported"] is True, summary
            assert took >= 2.3, f"the progressing call took {took:.2f}s: it did not run past the 1 s timeout"
        recs = O.wait_records(tmp_path / "audit.jsonl", lambda r: r["name"] == "ledger__reconcile_ledger", "two calls", n=2)
        assert [r["outcome"] for r in recs] == ["timeout", "ok"], recs
        assert "did not answer within 1s" in recs[0]["error"]
        assert recs[1]["upstream_ms"] >= 2300, recs[1]
    finally:
        b.stop()


# --------------------------------------------------------------------------- reload


def reload_count(b: H.Broker, result: str) -> float:
    return O.scrape(b.base).get("mcp_broker_config_reloads_total", result=result)


def log_text(b: H.Broker) -> str:
    return b.proc.stderr_path.read_text(errors="replace")


@pytest.mark.anyio
async def test_reload_adds_a_server_live_and_rejects_a_broken_file(tmp_path):
    """A session stays open while servers.toml is rewritten: adding `ledger2` sends that session
    notifications/tools/list_changed and the new tools are listed and callable in the SAME session, while the
    unchanged `ledger` keeps its child process. Then a broken file (unknown key) is rejected: logged, counted in
    config_reloads_total{result="error"}, and the broker keeps serving the previous configuration."""
    require_bins()
    b = H.start_broker(tmp_path, {"ledger": ledger()}, name="broker-reload")
    try:
        await anyio.to_thread.run_sync(lambda: H.wait_for_tools(b.url, ["ledger__list_accounts"], 30))
        notes = O.Notes()
        async with H.http_session(b.url, message_handler=notes) as s:
            names = {t.name for t in await H.list_all_tools(s)}
            assert names == {f"ledger__{t}" for t in LEDGER_TOOLS}, names
            kids_before = ledger_children(b)
            assert len(kids_before) == 1, kids_before
            ok0, err0 = reload_count(b, "ok"), reload_count(b, "error")

            O.write_atomic(b.config_path, H.render_config({"ledger": ledger(), "ledger2": ledger()}))
            await H.apoll_until(lambda: notes.tools >= 1, 20, "notifications/tools/list_changed after the reload")

            async def listed():
                return "ledger2__list_accounts" in {t.name for t in await H.list_all_tools(s)}
            await H.apoll_until(listed, 20, "ledger2's tools in the same session")
            r = await s.call_tool("ledger2__get_account", {"account_id": "ACC-1001"})
            assert not r.is_error, H.dump(r)
            assert reload_count(b, "ok") == ok0 + 1
            assert re.search(r"configuration reloaded.*added=\[\"ledger2\"\]", log_text(b)), log_text(b)[-2000:]
            kids_after = ledger_children(b)
            assert kids_before <= kids_after and all(H.pid_alive(p) for p in kids_before), \
                f"the unchanged server's child was replaced: {kids_before} -> {kids_after}"
            assert len(kids_after) == 2, kids_after

            good = b.config_path.read_text()
            O.write_atomic(b.config_path, good.replace("[servers.ledger2]", "[servers.ledger2]\nbogus_key = 1", 1))
            await H.apoll_until(lambda: "configuration reload rejected" in log_text(b), 20,
                                "the broken file to be rejected in the log")
            line = [ln for ln in log_text(b).splitlines() if "configuration reload rejected" in ln][0]
            assert "ERROR" in line and "bogus_key" in line, f"the rejection is not an ERROR naming the bad key: {line}"
            assert reload_count(b, "error") == err0 + 1
            assert reload_count(b, "ok") == ok0 + 1
            r = await s.call_tool("ledger2__list_accounts", {})
            assert not r.is_error, "the broker stopped serving the previous configuration"
            assert "ledger2__list_accounts" in {t.name for t in await H.list_all_tools(s)}

            # fixing the file is picked up again; the rejection was counted once, not on every poll
            O.write_atomic(b.config_path, H.render_config({"ledger": ledger()}))
            await H.apoll_until(lambda: reload_count(b, "ok") == ok0 + 2, 20, "the fixed file to be reloaded")
            assert reload_count(b, "error") == err0 + 1

            async def gone():
                return "ledger2__list_accounts" not in {t.name for t in await H.list_all_tools(s)}
            await H.apoll_until(gone, 20, "ledger2 removed")
            await H.apoll_until(lambda: notes.tools >= 2, 20, "list_changed for the removal")
            await H.apoll_until(lambda: ledger_children(b) == kids_before, 20, "ledger2's child to be stopped")
    finally:
        b.stop()


@pytest.mark.anyio
async def test_sighup_reloads_with_watch_config_off(tmp_path):
    """watch_config = false: SIGHUP alone triggers the reload (a new server appears, the session is notified);
    a changed [broker] setting is reported as needing a restart."""
    require_bins()
    broker = {"watch_config": False, "drain_timeout": "5s"}
    b = H.start_broker(tmp_path, {"ledger": ledger()}, name="broker-sighup", broker=broker)
    try:
        await anyio.to_thread.run_sync(lambda: H.wait_for_tools(b.url, ["ledger__list_accounts"], 30))
        notes = O.Notes()
        async with H.http_session(b.url, message_handler=notes) as s:
            O.write_atomic(b.config_path, H.render_config({"ledger": ledger(), "ledger2": ledger()},
                                                          broker={**broker, "drain_timeout": "7s"}))
            b.proc.signal(signal.SIGHUP)
            await H.apoll_until(lambda: notes.tools >= 1, 20, "list_changed after SIGHUP")

            async def listed():
                return "ledger2__list_accounts" in {t.name for t in await H.list_all_tools(s)}
            await H.apoll_until(listed, 20, "ledger2's tools after SIGHUP")
        log = log_text(b)
        assert re.search(r"configuration reloaded.*reason=\"?SIGHUP", log), log[-2000:]
        assert "[broker] changed: it takes effect only after a restart" in log, log[-2000:]
        assert b.proc.alive()
    finally:
        b.stop()


@pytest.mark.anyio
async def test_policy_reload_notifies_only_the_affected_caller(tmp_path):
    """[auth] with alice and bob, each with a session open. A reload that hides get_customer_pii from alice only
    sends tools/list_changed to alice's session (and her list loses the tool, bob's keeps it). A later reload that
    changes both views (a new server) notifies both: in the end alice got exactly 2 and bob exactly 1."""
    require_bins()
    minter = O.Minter()
    b = None
    auth = minter.auth_config()
    allow = [{"effect": "allow"}]
    hide = [{"servers": ["ledger"], "tools": ["get_customer_pii"], "effect": "deny", "claims": {"sub": "alice"},
             "message": "not for alice"}, {"effect": "allow"}]
    try:
        b = H.start_broker(tmp_path, {"ledger": ledger()}, name="broker-reload-policy", auth=auth, policies=allow)
        alice, bob = minter.token(b, "alice"), minter.token(b, "bob")
        await anyio.to_thread.run_sync(lambda: H.wait_for_tools(b.url, ["ledger__get_customer_pii"], 30, headers=H.bearer(alice)))
        na, nb = O.Notes(), O.Notes()
        async with H.http_session(b.url, headers=H.bearer(alice), message_handler=na) as sa, \
                H.http_session(b.url, headers=H.bearer(bob), message_handler=nb) as sb:
            for s in (sa, sb):
                assert "ledger__get_customer_pii" in {t.name for t in await H.list_all_tools(s)}

            O.write_atomic(b.config_path, H.render_config({"ledger": ledger()}, auth=auth, policies=hide))
            await H.apoll_until(lambda: na.tools >= 1, 20, "alice's list_changed after the policy change")
            assert "ledger__get_customer_pii" not in {t.name for t in await H.list_all_tools(sa)}
            assert "ledger__get_customer_pii" in {t.name for t in await H.list_all_tools(sb)}
            r = await sa.call_tool("ledger__get_customer_pii", {"customer_id": "CUST-001"})
            assert r.is_error and "not for alice" in r.content[0].text, H.dump(r)

            O.write_atomic(b.config_path, H.render_config({"ledger": ledger(), "ledger2": ledger()}, auth=auth, policies=hide))
            await H.apoll_until(lambda: nb.tools >= 1 and na.tools >= 2, 30, "both sessions notified of ledger2")
            assert "ledger2__list_accounts" in {t.name for t in await H.list_all_tools(sb)}
            assert (na.tools, nb.tools) == (2, 1), f"alice got {na.tools}, bob {nb.tools} tools/list_changed"
    finally:
        if b:
            b.stop()
        minter.stop()


# --------------------------------------------------------------------------- drain on SIGTERM


def background_call(url: str, name: str, args: dict, out: dict, token: str | None = None) -> threading.Thread:
    """tools/call in a thread over a raw session; `out` gets the JSON-RPC message, or the exception."""
    def run():
        try:
            with H.RawSession(url, token, timeout=60) as s:
                s.initialize()
                r, rid = s.post("tools/call", {"name": name, "arguments": args})
                out["status"] = r.status_code
                out["message"] = H.final_response(r, rid)
        except Exception as e:  # noqa: BLE001 - reported by the test
            out["exception"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_sigterm_lets_the_slow_call_finish(tmp_path):
    """SIGTERM with drain_timeout = "30s" during a 3 s reconcile: /readyz says 503 "draining", the call completes
    (audit outcome ok), the broker exits 0, no child remains, and the call's client gets its result."""
    require_bins()
    b = H.start_broker(tmp_path, {"ledger": ledger()}, name="broker-drain-ok",
                       broker={"drain_timeout": "30s", "metrics_listen": "127.0.0.1:0"},
                       extra_toml='[audit]\nfile = "audit.jsonl"\n')
    try:
        H.wait_for_tools(b.url, ["ledger__reconcile_ledger"], 30)
        ops = O.metrics_base(b)
        out: dict = {}
        t = background_call(b.url, "ledger__reconcile_ledger", {"steps": 6, "step_ms": 500}, out)
        H.poll_until(lambda: O.scrape(ops).get("mcp_broker_inflight_calls") == 1, 15, "the slow call in flight")
        kids = H.descendants(b.proc.pid)
        assert kids, "no ledger child"
        b.proc.signal(signal.SIGTERM)
        r = H.poll_until(lambda: (lambda x: x if x.status_code == 503 else None)(O.http_get(ops + "/readyz")), 10,
                         "/readyz to report draining")
        assert r.text.strip() == "draining", r.text
        rc = wait_exit(b.proc, 30)
        assert rc == 0, f"exit {rc}\n{b.proc.stderr_tail()}"
        rec = O.wait_records(tmp_path / "audit.jsonl", lambda r: r["name"] == "ledger__reconcile_ledger", "the drained call")[0]
        assert rec["outcome"] == "ok" and rec["latency_ms"] >= 2500, rec
        H.poll_until(lambda: not any(H.pid_alive(p) for p in kids), 10, "the ledger child to exit")
        t.join(timeout=30)
        assert "exception" not in out, f"the call completed upstream but its client did not get the result: {out.get('exception')!r}"
        res = out["message"].get("result", {})
        assert not res.get("isError"), out["message"]
        summary = res.get("structuredContent") or json.loads(text_of(res))
        assert summary["steps_completed"] == 6, summary
    finally:
        b.stop()


def test_sigterm_cancels_calls_past_the_drain_timeout(tmp_path):
    """SIGTERM with drain_timeout = "1s" during a 20 s reconcile: after the second the call is cancelled (audit:
    cancelled, "shutting down"), the broker exits 0 within a few seconds and leaves no child behind; the client
    gets an error saying the broker is shutting down."""
    require_bins()
    b = H.start_broker(tmp_path, {"ledger": ledger()}, name="broker-drain-cancel",
                       broker={"drain_timeout": "1s"}, extra_toml='[audit]\nfile = "audit.jsonl"\n')
    try:
        H.wait_for_tools(b.url, ["ledger__reconcile_ledger"], 30)
        out: dict = {}
        t = background_call(b.url, "ledger__reconcile_ledger", {"steps": 20, "step_ms": 1000}, out)
        H.poll_until(lambda: O.scrape(b.base).get("mcp_broker_inflight_calls") == 1, 15, "the slow call in flight")
        kids = H.descendants(b.proc.pid)
        assert kids, "no ledger child"
        t0 = time.monotonic()
        b.proc.signal(signal.SIGTERM)
        rc = wait_exit(b.proc, 15)
        took = time.monotonic() - t0
        assert rc == 0, f"exit {rc} ({took:.1f}s)\n{b.proc.stderr_tail()}"
        assert took < 8, f"shutdown took {took:.1f}s with drain_timeout = 1s"
        rec = O.wait_records(tmp_path / "audit.jsonl", lambda r: r["name"] == "ledger__reconcile_ledger", "the cancelled call")[0]
        O.check_shape(rec)
        assert rec["outcome"] == "cancelled" and "shutting down" in (rec["error"] or ""), rec
        assert 900 <= rec["latency_ms"] < 8000, rec
        assert "drain deadline passed" in b.proc.stderr_path.read_text(errors="replace")
        H.poll_until(lambda: not any(H.pid_alive(p) for p in kids), 10, "the ledger child to exit")
        t.join(timeout=15)
        assert "exception" not in out, f"the cancelled call's client got no answer: {out.get('exception')!r}"
        msg = out["message"]
        assert "error" in msg and "shutting down" in msg["error"]["message"], msg
    finally:
        b.stop()


def test_stdio_drain_refuses_new_calls(tmp_path):
    """`mcp-broker stdio`, SIGTERM during a slow call while the client keeps stdin open: new calls are answered
    "mcp-broker is shutting down…" (audit: deny by `drain`), the slow call still completes with its result, then
    the broker exits 0 without children."""
    require_bins()
    cfg = tmp_path / "stdio.toml"
    cfg.write_text(H.render_config({"ledger": ledger()}, broker={"drain_timeout": "30s"},
                                   extra_toml='[audit]\nfile = "audit.jsonl"\n'))
    c = O.StdioClient(cfg, tmp_path)
    try:
        c.initialize()

        def has_tools():
            tools = c.response(c.request("tools/list", {}))["result"]["tools"]
            return "ledger__reconcile_ledger" in {t["name"] for t in tools}
        H.poll_until(has_tools, 30, "the ledger's tools over stdio", interval=0.2)
        slow = c.request("tools/call", {"name": "ledger__reconcile_ledger", "arguments": {"steps": 10, "step_ms": 500},
                                        "_meta": {"progressToken": "drain-1"}})
        H.poll_until(lambda: c.progress_count() >= 1, 15, "the slow call's first progress")
        kids = H.descendants(c.proc.pid)
        assert kids
        c.proc.signal(signal.SIGTERM)

        def refused():
            m = c.response(c.request("tools/call", {"name": "ledger__list_accounts", "arguments": {}}))
            res = m.get("result", {})
            return m if res.get("isError") else None
        m = H.poll_until(refused, 10, "a new call refused during the drain", interval=0.05)
        assert "mcp-broker is shutting down" in text_of(m["result"]), m
        done = c.response(slow, 30)
        assert not done["result"].get("isError"), done
        assert (done["result"].get("structuredContent") or {}).get("steps_completed") == 10, done
        audit = tmp_path / "audit.jsonl"
        O.wait_records(audit, lambda r: r["name"] == "ledger__reconcile_ledger", "the slow call's record")
        recs = O.read_audit(audit)
        drained = [r for r in recs if r["rule"] == "drain"]
        assert drained and all((r["decision"], r["outcome"], r["sub"]) == ("deny", "error", "local") for r in drained), drained
        assert "shutting down" in drained[0]["reason"]
        assert [r["outcome"] for r in recs if r["name"] == "ledger__reconcile_ledger"] == ["ok"]
        H.poll_until(lambda: not any(H.pid_alive(p) for p in kids), 40, "the ledger child to exit")
        rc = wait_exit(c.proc, 15)
        assert rc == 0, f"`mcp-broker stdio` did not exit after SIGTERM and the drain (its client keeps stdin open): " \
                        f"exit {rc}\n{c.proc.stderr_tail(5)}"
    finally:
        c.stop()


# --------------------------------------------------------------------------- health


def test_readyz_follows_required_servers(tmp_path):
    """/readyz is 200 "ready" once the required ledger is up; with a required server that cannot start (`false`) it
    is 503 naming that server only (not an optional one that is also down); /healthz is 200 "ok" either way;
    mcp_broker_ready and upstream_up agree."""
    require_bins()
    good = H.start_broker(tmp_path / "good", {"ledger": ledger(required=True)}, name="broker-ready")
    bad = H.start_broker(tmp_path / "bad", {
        "ledger": ledger(required=True),
        "broken": {"transport": "stdio", "command": "false", "required": True},
        "optional": {"transport": "stdio", "command": "false"},
    }, name="broker-notready")
    try:
        r = H.poll_until(lambda: (lambda x: x if x.status_code == 200 else None)(O.http_get(good.base + "/readyz")), 30,
                         "/readyz 200 with the required ledger up")
        assert r.text.strip() == "ready"
        assert O.scrape(good.base).get("mcp_broker_ready") == 1
        H.wait_for_tools(bad.url, ["ledger__list_accounts"], 30)
        r = O.http_get(bad.base + "/readyz")
        assert r.status_code == 503, r.text
        assert r.text.strip() == "not ready: required server(s) down: broken", r.text
        for b in (good, bad):
            h = O.http_get(b.base + "/healthz")
            assert h.status_code == 200 and h.text.strip() == "ok", h.text
        m = O.scrape(bad.base)
        assert m.get("mcp_broker_ready") == 0
        assert (m.get("mcp_broker_upstream_up", server="broken"), m.get("mcp_broker_upstream_up", server="ledger")) == (0, 1)
    finally:
        good.stop()
        bad.stop()


def test_ops_endpoints_need_no_token_with_auth(tmp_path):
    """With [auth] on, /healthz, /readyz and /metrics answer without a token (while /mcp demands one)."""
    require_bins()
    minter = O.Minter()
    b = None
    try:
        b = H.start_broker(tmp_path, {"ledger": ledger(required=True)}, name="broker-ops-auth",
                           auth=minter.auth_config(), policies=[{"effect": "allow"}])
        H.wait_for_tools(b.url, ["ledger__list_accounts"], 30, headers=H.bearer(minter.token(b, "alice")))
        assert O.http_get(b.base + "/healthz").status_code == 200
        r = O.http_get(b.base + "/readyz")
        assert r.status_code == 200 and r.text.strip() == "ready", r.text
        m = O.scrape(b.base)
        assert m.get("mcp_broker_upstream_up", server="ledger") == 1
        with H.RawSession(b.url, None) as s:
            resp = s.client.post(b.url, headers=s.headers(session=False), json=H.init_body())
        assert resp.status_code == 401, resp.status_code
    finally:
        if b:
            b.stop()
        minter.stop()
