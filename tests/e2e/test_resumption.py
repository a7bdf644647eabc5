"""Streamable HTTP resumption through the broker (2025-era sessions): a call's SSE stream outlives its
HTTP response, so a client that drops it -- or whose stream the broker ends because the upstream ended
its own (SEP-1699 polling) -- gets the rest, the tool result included, with GET + Last-Event-ID. And a
Last-Event-ID from another session, or garbage, replays nothing of anyone else's.

Upstreams: server-everything over Streamable HTTP (a tool whose result comes after a delay) and the
conformance suite's reference server (its `test_reconnection` tool ends the call's stream mid-call and
answers only to a client that comes back promptly). Raw httpx, so every event id, retry field and
stream end is seen as sent.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from typing import Iterator

import httpx2
import pytest

import helpers as H

REF_DIR = H.HARNESS_DIR / "conformance-ref"
REF_LISTEN_RE = re.compile(r"^conformance-ref listening on (http://127\.0\.0\.1:\d+/mcp)\s*$")
SLOW = "evhttp__trigger-long-running-operation"
RECONNECT_TEXT = "Reconnection test completed successfully"


@pytest.fixture(scope="module")
def ref_server(tmp_path_factory):
    """The conformance reference server, started as scripts/conformance.sh and test_conformance_2026.py do."""
    tsx = REF_DIR / "node_modules" / ".bin" / "tsx"
    if not tsx.exists():
        pytest.fail(f"conformance reference server missing ({tsx}); run scripts/test.sh --harness-only")
    env = {"PORT": "0", "NODE_OPTIONS": f"--require {REF_DIR / 'loopback.cjs'}",
           "PATH": f"{H.NODE22.parent}:{os.environ.get('PATH', '')}"}
    proc = H.Proc("conformance-ref-resume", [str(tsx), str(REF_DIR / "everything-server.ts")],
                  tmp_path_factory.mktemp("ref"), env=env)
    try:
        url = proc.wait_line(REF_LISTEN_RE, 60).group(1)
    except BaseException:
        proc.stop()
        raise
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def rbroker(tmp_path_factory, ev_http, ref_server):
    work = tmp_path_factory.mktemp("broker-resume")
    b = H.start_broker(work, {"evhttp": {"transport": "http", "url": ev_http.url, "timeout": "30s"},
                              "ref": {"transport": "http", "url": ref_server, "timeout": "30s"}},
                       # Every call on an event stream: the direct lane answers plain calls as JSON, which has
                       # nothing to resume (test_lane.py covers the lane; the progress calls here bypass it anyway).
                       broker={"direct_lane": False},
                       # audit_count reads the records from the log
                       extra_toml="[audit]\nstderr = true\n",
                       name="broker-resume")
    try:
        H.wait_for_tools(b.url, [SLOW, "ref__test_reconnection", "evhttp__echo"], timeout=30)
    except BaseException:
        b.stop()
        raise
    yield b
    b.stop()


# --------------------------------------------------------------------------- raw SSE


def sse_events(resp: httpx2.Response) -> Iterator[dict]:
    """The events of an SSE response as they arrive: {"id"?, "retry"?, "event"?, "data"}."""
    ev: dict = {}
    data: list[str] = []
    for line in resp.iter_lines():
        if line == "":
            if data or ev:
                ev["data"] = "\n".join(data)
                yield ev
            ev, data = {}, []
            continue
        if line.startswith(":"):
            continue  # keep-alive comment
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field in ("id", "event"):
            ev[field] = value
        elif field == "retry":
            ev["retry"] = int(value)
    if data or ev:
        ev["data"] = "\n".join(data)
        yield ev


def message(ev: dict) -> dict | None:
    try:
        m = json.loads(ev["data"]) if ev.get("data", "").strip() else None
    except ValueError:
        return None
    return m if isinstance(m, dict) else None


def is_response(ev: dict, req_id: int) -> bool:
    m = message(ev)
    return m is not None and m.get("id") == req_id and ("result" in m or "error" in m)


class Client:
    """One raw 2025-11-25 session; reads timeout after `read` seconds without a byte (keep-alives are 15 s apart)."""

    def __init__(self, url: str, read: float = 10):
        self.session = H.RawSession(url, None)
        self.session.client = httpx2.Client(timeout=httpx2.Timeout(10, read=read))
        self.session.initialize()
        self.url = url
        self.next_id = 1000

    def headers(self, **extra: str) -> dict[str, str]:
        return {**self.session.headers(), **extra}

    def call(self, name: str, arguments: dict, meta: dict | None = None) -> tuple[int, dict]:
        self.next_id += 1
        params: dict = {"name": name, "arguments": arguments}
        if meta:
            params["_meta"] = meta
        return self.next_id, {"jsonrpc": "2.0", "id": self.next_id, "method": "tools/call", "params": params}

    def resume(self, last_event_id: str, **extra: str):
        h = {k: v for k, v in self.headers(**extra).items() if k != "Content-Type"}
        h["Accept"] = "text/event-stream"
        h["Last-Event-ID"] = last_event_id
        return self.session.client.stream("GET", self.url, headers=h)

    def close(self) -> None:
        self.session.close()


def audit_count(b: H.Broker, tool: str) -> int:
    """Calls of `tool` the broker has audited as finished ok (its stderr log)."""
    text = b.proc.stderr_path.read_text(errors="replace")
    return sum(1 for line in text.splitlines()
               if "mcp_broker::audit" in line and f"name={tool} " in line and 'outcome="ok"' in line)


def read_until(resp: httpx2.Response, stop, what: str) -> list[dict]:
    """Events of resp up to and including the first for which stop(ev) holds; fails if the stream ends first."""
    seen: list[dict] = []
    try:
        for ev in sse_events(resp):
            seen.append(ev)
            if stop(ev):
                return seen
    except httpx2.ReadTimeout:
        raise AssertionError(f"no {what} (read timed out); events so far: {seen}") from None
    raise AssertionError(f"the stream ended without {what}; events: {seen}")


def read_to_end(resp: httpx2.Response, what: str) -> list[dict]:
    try:
        return list(sse_events(resp))
    except httpx2.ReadTimeout:
        raise AssertionError(f"{what}: the stream did not end (read timed out)") from None


# --------------------------------------------------------------------------- client-side disconnects


def test_result_produced_while_away_is_replayed(rbroker):
    """The client drops the call's stream after its first event id; the result is produced while it is away;
    GET + Last-Event-ID brings it (with the progress it missed), and the stream then ends."""
    c = Client(rbroker.url)
    try:
        done_before = audit_count(rbroker, SLOW)
        rid, body = c.call(SLOW, {"duration": 1.5, "steps": 3}, meta={"progressToken": "resume-1"})
        with c.session.client.stream("POST", c.url, headers=c.headers(), json=body) as r:
            assert r.status_code == 200 and "text/event-stream" in r.headers.get("content-type", ""), r.read()[:300]
            first = read_until(r, lambda ev: "id" in ev, "event with an id")
        # Dropped. Wait (on the broker's audit log) until the upstream has answered the call.
        H.poll_until(lambda: audit_count(rbroker, SLOW) > done_before, 30,
                     "the call to finish upstream")
        time.sleep(0.3)  # margin for the result to pass from the audit record to the session's stream
        last = first[-1]["id"]
        with c.resume(last) as r:
            assert r.status_code == 200, r.read()[:300]
            events = read_to_end(r, "resumed stream of a finished call")
        assert any(is_response(ev, rid) for ev in events), f"no result after Last-Event-ID {last}: {events}"
        result = next(message(ev) for ev in events if is_response(ev, rid))
        assert "result" in result and "completed" in json.dumps(result["result"]), result
        progress = [message(ev)["params"]["progress"] for ev in events
                    if (message(ev) or {}).get("method") == "notifications/progress"]
        assert progress == [1, 2, 3], f"missed progress not replayed in order: {progress}"
        ids = [ev["id"] for ev in events if "id" in ev]
        assert last not in ids, f"replay repeats the event the client already had ({last}): {ids}"
        # Resuming again from the progress before the result replays just the result.
        with c.resume(ids[-2]) as r:
            again = read_to_end(r, "second replay")
        assert [is_response(ev, rid) for ev in again if message(ev)] == [True], again
    finally:
        c.close()


def test_reconnect_before_result_gets_it_live(rbroker):
    """The client drops the stream and comes back while the call still runs: the rest arrives live."""
    c = Client(rbroker.url)
    try:
        rid, body = c.call(SLOW, {"duration": 2, "steps": 4}, meta={"progressToken": "resume-2"})
        with c.session.client.stream("POST", c.url, headers=c.headers(), json=body) as r:
            first = read_until(r, lambda ev: "id" in ev, "event with an id")
        with c.resume(first[-1]["id"]) as r:
            assert r.status_code == 200
            events = read_until(r, lambda ev: is_response(ev, rid), "the tool result")
        assert "completed" in json.dumps(message(events[-1])), events[-1]
    finally:
        c.close()


# --------------------------------------------------------------------------- upstream-side disconnects (SEP-1699)


def test_upstream_poll_passed_on_and_resumed(rbroker):
    """The reference server ends the call's stream mid-call (SEP-1699) and answers only a client that comes
    back. Through the broker, a 2025-11-25 client sees its own stream end after an event id and a retry field,
    and GET + Last-Event-ID brings the tool result."""
    c = Client(rbroker.url)
    try:
        rid, body = c.call("ref__test_reconnection", {})
        with c.session.client.stream("POST", c.url, headers=c.headers(), json=body) as r:
            assert r.status_code == 200 and "text/event-stream" in r.headers.get("content-type", "")
            events = read_to_end(r, "POST stream of a call the upstream polls")
        assert not any(is_response(ev, rid) for ev in events), f"result on the POST stream: {events}"
        ids = [ev["id"] for ev in events if "id" in ev]
        assert ids, f"no event id to resume from: {events}"
        assert any("retry" in ev for ev in events), f"no retry field: {events}"
        with c.resume(ids[-1]) as r:
            assert r.status_code == 200
            got = read_until(r, lambda ev: is_response(ev, rid), "the tool result after Last-Event-ID")
        assert RECONNECT_TEXT in json.dumps(message(got[-1])), got[-1]
    finally:
        c.close()


# --------------------------------------------------------------------------- hostile Last-Event-IDs


def test_foreign_or_garbage_event_ids_replay_nothing(rbroker):
    """Another session's event id, or garbage, gets an empty stream (or a 4xx), never another session's events;
    the owner can still resume its own stream afterwards."""
    secret = f"private-to-A-{uuid.uuid4().hex}"
    a = Client(rbroker.url)
    b = Client(rbroker.url, read=5)
    try:
        rid, body = a.call("evhttp__echo", {"message": secret})
        with a.session.client.stream("POST", a.url, headers=a.headers(), json=body) as r:
            a_events = read_to_end(r, "A's echo")
        assert any(is_response(ev, rid) and secret in ev["data"] for ev in a_events), a_events
        a_ids = [ev["id"] for ev in a_events if "id" in ev]
        assert a_ids, a_events

        def probe(client: Client, event_id: str, **headers: str) -> tuple[int, str]:
            with client.resume(event_id, **headers) as r:
                text = "".join(r.iter_text()) if r.status_code == 200 else r.read().decode(errors="replace")
                return r.status_code, text

        garbage = ["garbage", "0/", "/0", "-1/0", "0/-1", "99999999999999999999999/0", "0/99999999999999999999999",
                   "0/0/0", "../../etc/passwd", "1" * 4000, "0/18446744073709551615"]
        # B has no streams yet: A's ids name nothing of B's.
        for eid in a_ids + garbage:
            status, text = probe(b, eid)
            assert status == 200 or 400 <= status < 500, f"{eid!r}: HTTP {status} {text[:200]}"
            assert secret not in text, f"session B got session A's events with Last-Event-ID {eid!r}: {text[:500]}"
            assert "data: {" not in text, f"{eid!r} replayed events to a session without streams: {text[:500]}"
        # Once B has its own stream with the same numbering, A's ids resume B's own events at most.
        rid_b, body_b = b.call("evhttp__echo", {"message": "from-B"})
        with b.session.client.stream("POST", b.url, headers=b.headers(), json=body_b) as r:
            read_to_end(r, "B's echo")
        for eid in a_ids + garbage:
            status, text = probe(b, eid)
            assert secret not in text, f"session B got session A's events with Last-Event-ID {eid!r}: {text[:500]}"
        # Without a session, with an unknown session, or as a 2026-07-28 (sessionless) request: nothing either.
        with httpx2.Client(timeout=10) as raw:
            base = {"Accept": "text/event-stream", "Last-Event-ID": a_ids[0], "MCP-Protocol-Version": "2025-11-25"}
            for headers in ({}, {"Mcp-Session-Id": str(uuid.uuid4())},
                            {"Mcp-Session-Id": a.session.session_id, "MCP-Protocol-Version": "2026-07-28"}):
                r = raw.get(rbroker.url, headers={**base, **headers})
                assert 400 <= r.status_code < 500, f"{headers}: HTTP {r.status_code} {r.text[:200]}"
                assert secret not in r.text
        # A still resumes its own finished stream.
        status, text = probe(a, a_ids[0])
        assert status == 200 and secret in text, f"A could not resume its own stream: HTTP {status} {text[:500]}"
    finally:
        a.close()
        b.close()
