"""Progress, cancellation, sampling and elicitation routed through the broker (tests 4-6)."""

from __future__ import annotations

import time

import anyio
import pytest
from mcp import types as T
from mcp.shared.exceptions import MCPError

import helpers as H

pytestmark = pytest.mark.anyio


class ProgressLog:
    def __init__(self):
        self.values: list[tuple[float, float | None, str | None]] = []

    async def __call__(self, progress, total, message):
        self.values.append((progress, total, message))


def assert_strictly_increasing(values):
    ps = [v[0] for v in values]
    assert all(b > a for a, b in zip(ps, ps[1:])), f"progress not strictly increasing: {ps}"


@pytest.mark.parametrize("server", ["evhttp", "evstdio", "evsse"])
async def test_progress_everything(broker, server):
    """4a. server-everything's long-running tool reports progress through the broker."""
    steps = 4
    log = ProgressLog()
    async with H.http_session(broker.url) as s:
        with anyio.fail_after(30):
            r = await s.call_tool(f"{server}__trigger-long-running-operation",
                                  {"duration": 1.2, "steps": steps}, progress_callback=log)
        assert not r.is_error, H.dump(r)
        assert "completed" in r.content[0].text
        # every progress notification precedes the response (as it does directly)
        at_return = list(log.values)
    assert len(at_return) == steps, f"{len(at_return)} of {steps} progress notifications before the result: {at_return}"
    assert_strictly_increasing(log.values)
    assert [v[0] for v in log.values] == [1, 2, 3, 4]
    assert all(v[1] == steps for v in log.values)


async def test_progress_ledger_reconcile(broker, ledger_bin):
    """4b. ledger__reconcile_ledger sends progress through the broker and completes."""
    log = ProgressLog()
    async with H.http_session(broker.url) as s:
        with anyio.fail_after(30):
            r = await s.call_tool("ledger__reconcile_ledger", {"steps": 5, "step_ms": 100}, progress_callback=log)
        assert not r.is_error, H.dump(r)
        at_return = list(log.values)
    assert [v[0] for v in at_return] == [1, 2, 3, 4, 5], f"progress before the result: {at_return}"
    assert_strictly_increasing(at_return)
    assert r.structured_content and r.structured_content.get("steps_completed") == 5, H.dump(r)


async def test_progress_tokens_isolated_between_sessions(broker):
    """Two sessions run the same long tool at once; each sees only its own progress (LC-6)."""
    logs = [ProgressLog(), ProgressLog()]
    results = [None, None]

    async def run(i, steps):
        async with H.http_session(broker.url) as s:
            results[i] = await s.call_tool("evhttp__trigger-long-running-operation",
                                           {"duration": 1.0, "steps": steps}, progress_callback=logs[i])

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, 0, 3)
            tg.start_soon(run, 1, 5)
    assert all(r is not None and not r.is_error for r in results)
    assert [v[1] for v in logs[0].values] == [3] * len(logs[0].values) and len(logs[0].values) == 3, logs[0].values
    assert [v[1] for v in logs[1].values] == [5] * len(logs[1].values) and len(logs[1].values) == 5, logs[1].values


@pytest.mark.parametrize("tool,args", [
    ("evhttp__trigger-long-running-operation", {"duration": 30, "steps": 30}),
    ("evstdio__trigger-long-running-operation", {"duration": 30, "steps": 30}),
    ("ledger__reconcile_ledger", {"steps": 300, "step_ms": 100}),
])
async def test_cancellation_keeps_session_usable(broker, tool, args):
    """5. Cancelling a slow call returns promptly; the same session keeps working."""
    if tool.startswith("ledger__") and not H.LEDGER_BIN.exists():
        pytest.fail(f"example {H.LEDGER_BIN} missing")
    log = ProgressLog()
    async with H.http_session(broker.url) as s:
        t0 = time.monotonic()
        early = None
        with anyio.move_on_after(1.5) as scope:
            early = await s.call_tool(tool, args, progress_callback=log)
        assert scope.cancelled_caught, f"slow call finished before it could be cancelled: {H.dump(early)}"
        assert time.monotonic() - t0 < 5
        # the session is still usable, without waiting for the cancelled call to run out
        with anyio.fail_after(10):
            r = await s.call_tool("evhttp__echo", {"message": "after-cancel"})
        assert not r.is_error and "after-cancel" in r.content[0].text
        with anyio.fail_after(20):
            r2 = await s.call_tool("evhttp__trigger-long-running-operation", {"duration": 0.4, "steps": 2})
        assert not r2.is_error, H.dump(r2)


class Callbacks:
    def __init__(self):
        self.sampling: list[T.CreateMessageRequestParams] = []
        self.elicit: list[T.ElicitRequestParams] = []

    async def sample(self, ctx, params):
        self.sampling.append(params)
        return T.CreateMessageResult(role="assistant", content=T.TextContent(type="text", text="sampled-answer-42"),
                                     model="e2e-model", stop_reason="endTurn")

    async def elicitation(self, ctx, params):
        self.elicit.append(params)
        return T.ElicitResult(action="accept", content={"name": "Ada Lovelace", "check": True, "integer": 7})


@pytest.mark.parametrize("server", ["evhttp", "evstdio", "evsse"])
async def test_sampling_routed_to_client(broker, server):
    """6a. An upstream sampling request reaches the calling client; the tool result carries the answer."""
    cb = Callbacks()
    async with H.http_session(broker.url, sampling_callback=cb.sample) as s:
        with anyio.fail_after(30):
            r = await s.call_tool(f"{server}__trigger-sampling-request", {"prompt": "e2e-prompt-xyz", "maxTokens": 20})
    assert not r.is_error, H.dump(r)
    assert len(cb.sampling) == 1
    assert "e2e-prompt-xyz" in str(H.dump(cb.sampling[0].messages))
    assert "sampled-answer-42" in r.content[0].text


@pytest.mark.parametrize("server", ["evhttp", "evstdio", "evsse"])
async def test_elicitation_routed_to_client(broker, server):
    """6b. An upstream elicitation reaches the calling client; the answer is reflected."""
    cb = Callbacks()
    async with H.http_session(broker.url, elicitation_callback=cb.elicitation) as s:
        with anyio.fail_after(30):
            r = await s.call_tool(f"{server}__trigger-elicitation-request", {})
    assert not r.is_error, H.dump(r)
    assert len(cb.elicit) == 1
    assert "requested_schema" in cb.elicit[0].model_dump() or "requestedSchema" in str(H.dump(cb.elicit[0]))
    text = "\n".join(c.text for c in r.content if hasattr(c, "text"))
    assert "Ada Lovelace" in text and "Favorite Integer: 7" in text, text


async def test_elicitation_only_reaches_originating_session(broker):
    """LC-12: with two sessions open, only the caller's callback is invoked."""
    a, b = Callbacks(), Callbacks()
    async with H.http_session(broker.url, elicitation_callback=a.elicitation, sampling_callback=a.sample) as sa:
        async with H.http_session(broker.url, elicitation_callback=b.elicitation, sampling_callback=b.sample) as sb:
            with anyio.fail_after(30):
                r = await sa.call_tool("evhttp__trigger-elicitation-request", {})
            await sb.send_ping()
    assert not r.is_error
    assert len(a.elicit) == 1 and len(b.elicit) == 0


@pytest.mark.parametrize("tool,args", [
    ("evhttp__trigger-sampling-request", {"prompt": "nobody-answers"}),
    ("evhttp__trigger-elicitation-request", {}),
    ("evstdio__trigger-sampling-request", {"prompt": "nobody-answers"}),
])
async def test_server_request_without_client_capability_errors(broker, tool, args):
    """6c. A client that did not declare sampling/elicitation gets an error, not a hang."""
    got_error = False
    with anyio.fail_after(30):
        async with H.http_session(broker.url) as s:
            try:
                r = await s.call_tool(tool, args)
                got_error = r.is_error
                detail = H.dump(r)
            except MCPError as e:
                got_error = True
                detail = str(e)
            # and the session still works
            ok = await s.call_tool("evhttp__echo", {"message": "ok"})
    assert got_error, f"expected an error result, got {detail}"
    assert not ok.is_error


async def test_cancellation_reaches_upstream(tmp_path, ledger_bin):
    """LC-7: a downstream cancel is forwarded: the upstream ledger stops its reconciliation."""
    ledger = H.start_example_http(ledger_bin, tmp_path, "ledger-http-cancel")
    broker = None
    try:
        broker = H.start_broker(tmp_path, {"ledgerh": {"transport": "http", "url": ledger.url}}, name="broker-cancel")
        await anyio.to_thread.run_sync(lambda: H.wait_for_tools(broker.url, ["ledgerh__reconcile_ledger"], 30))
        log = ProgressLog()
        async with H.http_session(broker.url) as s:
            with anyio.move_on_after(30):
                async def first_progress():
                    return len(log.values) >= 1
                async with anyio.create_task_group() as tg:
                    async def call():
                        await s.call_tool("ledgerh__reconcile_ledger", {"steps": 50, "step_ms": 200}, progress_callback=log)
                    tg.start_soon(call)
                    await H.apoll_until(first_progress, 10, "first reconcile progress")
                    tg.cancel_scope.cancel()
            r = await s.call_tool("ledgerh__list_accounts", {})
            assert not r.is_error
        await H.apoll_until(lambda: "reconciliation cancelled" in ledger.proc.stderr_path.read_text(errors="replace"),
                            10, "the ledger to log 'reconciliation cancelled'")
    finally:
        if broker:
            broker.stop()
        ledger.stop()
