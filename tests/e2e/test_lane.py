"""The HTTP front's direct lane (issue 13): calls and lists of an established session answered without rmcp's
server machinery, as `application/json`, with exactly what rmcp's path answers.

Upstream: the `ledger` example over stdio. Each test starts its own broker and stops it.
"""

from __future__ import annotations

import json
import threading
import time

import httpx2
import pytest

import corelib as C
import helpers as H

BASE = {"Content-Type": "application/json", "Accept": H.MCP_ACCEPT}


class Session:
    """A 2025-11-25 session over plain HTTP declaring `capabilities`."""

    def __init__(self, url: str, capabilities: dict, extra: dict | None = None):
        self.url = url
        self.c = httpx2.Client(timeout=30)
        body = H.init_body(name="lane")
        body["params"]["capabilities"] = capabilities
        r = self.c.post(url, headers=BASE, content=json.dumps(body))
        assert r.status_code == 200, r.text[:300]
        self.sid = r.headers["mcp-session-id"]
        self.h = {**BASE, "Mcp-Session-Id": self.sid, "MCP-Protocol-Version": "2025-11-25", **(extra or {})}
        n = self.c.post(url, headers=self.h, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert n.status_code in (200, 202)
        self.next = 10

    def post(self, method: str, params: dict, headers: dict | None = None) -> httpx2.Response:
        self.next += 1
        return self.c.post(self.url, headers={**self.h, **(headers or {})},
                           json={"jsonrpc": "2.0", "id": self.next, "method": method, "params": params})

    def result(self, method: str, params: dict) -> tuple[str, dict]:
        r = self.post(method, params)
        assert r.status_code == 200, r.text[:300]
        return r.headers.get("content-type", ""), H.final_response(r, self.next)


def ordered(v) -> str:
    """JSON text in the order received (key order is part of what must be relayed unchanged)."""
    return json.dumps(v, sort_keys=False)


@pytest.fixture
def broker(tmp_path):
    C.require(H.LEDGER_BIN)
    b = H.start_broker(tmp_path, {"ledger": C.ledger()}, broker={"session_idle_timeout": "2s"}, name="broker-lane")
    H.wait_for_tools(b.url, ["ledger__get_account"], 30)
    yield b
    b.stop()


def test_lane_answers_as_rmcps_path_does(broker):
    """A session declaring no client features is answered `application/json`; a session declaring roots goes through
    rmcp (an event stream). Results of tools/call, prompts/get, resources/read and every list are identical, key order
    included, and an unknown tool is the same error on both."""
    lane, streamed = Session(broker.url, {}), Session(broker.url, {"roots": {}})
    calls = [
        ("tools/call", {"name": "ledger__get_account", "arguments": {"account_id": "ACC-1001"}}),
        ("tools/call", {"name": "ledger__nope", "arguments": {}}),
        ("tools/list", {}),
        ("prompts/list", {}),
        ("resources/list", {}),
        ("resources/templates/list", {}),
    ]
    prompts = H.final_response(lane.post("prompts/list", {}), lane.next)["result"]["prompts"]
    if prompts:
        args = {a["name"]: "ACC-1001" for a in prompts[0].get("arguments", []) if a.get("required")}
        calls.append(("prompts/get", {"name": prompts[0]["name"], "arguments": args}))
    resources = H.final_response(lane.post("resources/list", {}), lane.next)["result"]["resources"]
    if resources:
        calls.append(("resources/read", {"uri": resources[0]["uri"]}))
    for method, params in calls:
        ct_lane, a = lane.result(method, params)
        ct_rmcp, b = streamed.result(method, params)
        assert ct_lane.startswith("application/json"), (method, ct_lane)
        assert ct_rmcp.startswith("text/event-stream"), (method, ct_rmcp)
        a.pop("id"), b.pop("id")
        assert ordered(a) == ordered(b), f"{method}: lane {ordered(a)[:300]} vs rmcp {ordered(b)[:300]}"


def test_progress_and_browsers_keep_rmcps_path(broker):
    """A call asking for progress, and a request with an Origin header (a browser: rmcp checks it), are not served on
    the lane; a disallowed Origin is still refused."""
    s = Session(broker.url, {})
    r = s.post("tools/call", {"name": "ledger__reconcile_ledger", "arguments": {"steps": 2, "step_ms": 10},
                              "_meta": {"progressToken": "p1"}})
    assert r.headers["content-type"].startswith("text/event-stream")
    msgs = H.sse_or_json_messages(r)
    assert any(m.get("method") == "notifications/progress" for m in msgs), msgs
    port = broker.url.split(":")[2].split("/")[0]
    r = s.post("tools/list", {}, headers={"Origin": f"http://localhost:{port}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    r = s.post("tools/list", {}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403


def test_busy_lane_sessions_stay_and_idle_ones_close(broker):
    """With session_idle_timeout = 2 s: a session that only makes lane calls stays open for 4 s of calls (rmcp's own
    idle timer never sees them), and a session left idle is closed (404)."""
    busy, idle = Session(broker.url, {}), Session(broker.url, {})
    end = time.monotonic() + 4
    while time.monotonic() < end:
        ct, r = busy.result("tools/call", {"name": "ledger__get_account", "arguments": {"account_id": "ACC-1001"}})
        assert ct.startswith("application/json") and "result" in r, r
        time.sleep(0.3)
    r = idle.post("tools/list", {})
    assert r.status_code == 404, f"an idle session still answered: HTTP {r.status_code}"
    ct, _ = busy.result("tools/list", {})
    assert ct.startswith("application/json")


def test_cancel_reaches_a_lane_call(broker):
    """notifications/cancelled for a call on the lane ends it: the 5 s reconcile returns well before it would have
    finished."""
    s = Session(broker.url, {})
    out = {}

    def call():
        t0 = time.monotonic()
        r = s.post("tools/call", {"name": "ledger__reconcile_ledger", "arguments": {"steps": 50, "step_ms": 100}})
        out["elapsed"], out["r"] = time.monotonic() - t0, r

    call_id = s.next + 1
    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.5)
    c = httpx2.Client(timeout=10)
    n = c.post(broker.url, headers=s.h, json={"jsonrpc": "2.0", "method": "notifications/cancelled",
                                                  "params": {"requestId": call_id, "reason": "test"}})
    assert n.status_code in (200, 202)
    t.join(10)
    assert out["elapsed"] < 3, f"the call ran {out['elapsed']:.1f}s after being cancelled"
    assert out["r"].headers["content-type"].startswith("application/json")
