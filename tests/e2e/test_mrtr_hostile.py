"""Multi-round-trip requests (SEP-2322) through the broker, with a hostile second caller.

A broker with inbound OAuth (the real oidc-provider AS; alice and bob are two of its clients) in front of
  * `eras`: tests/e2e/servers/eras_server.py reached as 2026-07-28 only (`protocol = "2026-07-28"`), whose
    `ask` tool answers `input_required` with its own requestState: the broker relays it with a state it seals
    and binds to the caller, the server and the request;
  * `ev`: server-everything (2025-11-25 only), whose `trigger-elicitation-request` sends a real server->client
    request: a 2026-07-28 caller's call parks and the caller gets `input_required` naming the parked call.
A sealed state is accepted only from the caller it was issued to, for the same request, unaltered: anything
else is -32602 and never reaches the upstream (nor resumes the parked call).
"""

from __future__ import annotations

from typing import Any

import pytest

import helpers as H
from conftest import AUTH_CALLERS, auth_section

PV = "2026-07-28"
CAPS = {"elicitation": {"form": {}}, "sampling": {}}


def meta(caps: dict | None = None) -> dict:
    return {
        "io.modelcontextprotocol/protocolVersion": PV,
        "io.modelcontextprotocol/clientCapabilities": CAPS if caps is None else caps,
        "io.modelcontextprotocol/clientInfo": {"name": "e2e-mrtr-hostile", "version": "0"},
    }


class Caller:
    def __init__(self, url: str, token: str):
        self.url, self.token, self.next_id = url, token, 100

    def call(self, name: str, arguments: dict, **extra: Any) -> dict:
        """One stateless 2026-07-28 tools/call; the JSON-RPC response (result or error)."""
        self.next_id += 1
        params = {"name": name, "arguments": arguments, "_meta": meta(), **extra}
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                   "MCP-Protocol-Version": PV, "Mcp-Method": "tools/call", "Mcp-Name": name,
                   **(H.bearer(self.token) if self.token else {})}
        with H.httpx2.Client(timeout=30) as c:
            r = c.post(self.url, headers=headers,
                       json={"jsonrpc": "2.0", "id": self.next_id, "method": "tools/call", "params": params})
        return H.final_response(r, self.next_id)


@pytest.fixture(scope="module")
def env(tmp_path_factory, auth_server, ev_http):
    logs = tmp_path_factory.mktemp("mrtr-hostile")
    eras = H.start_eras_server(logs, name="eras-mrtr")
    broker = None
    try:
        broker = H.start_broker(
            logs, {"eras": {"transport": "http", "url": eras.url, "protocol": PV},
                   "ev": {"transport": "http", "url": ev_http.url}},
            name="broker-mrtr", auth=auth_section(auth_server.issuer), policies=[{"effect": "allow"}])

        def caller(who: str) -> Caller:
            client_id, secret, scope = AUTH_CALLERS[who]
            return Caller(broker.url, auth_server.token(client_id, secret, scope=scope, resource=broker.url))

        alice, bob = caller("alice"), caller("bob")
        H.wait_for_tools(broker.url, ["eras__ask", "eras__route", "eras__touch", "ev__trigger-elicitation-request",
                                      "ev__trigger-url-elicitation"], timeout=30,
                         headers=H.bearer(alice.token))
        yield alice, bob, broker
    finally:
        if broker:
            broker.stop()
        eras.stop()


def input_required(resp: dict) -> dict:
    res = resp.get("result")
    assert res and res.get("resultType") == "input_required", f"expected input_required: {resp}"
    assert res.get("requestState"), res
    return res


def refused(resp: dict, what: str) -> None:
    err = resp.get("error")
    assert err, f"{what}: expected a JSON-RPC error, got {resp}"
    assert err["code"] == -32602 and "requestState refused" in err["message"], f"{what}: {err}"


def answers_for(inputs: dict) -> dict:
    out = {}
    for key, req in inputs.items():
        if req["method"] == "elicitation/create":
            out[key] = {"action": "accept", "content": {"name": "Alice", "colour": "teal"}}
        elif req["method"] == "sampling/createMessage":
            out[key] = {"role": "assistant", "content": {"type": "text", "text": "a line"}, "model": "m-1"}
        else:
            raise AssertionError(f"unexpected input request {req}")
    return out


def test_sealed_state_is_bound_to_caller_request_and_integrity(env):
    alice, bob, broker = env
    first = input_required(alice.call("eras__ask", {"topic": "tides"}))
    state, inputs = first["requestState"], first["inputRequests"]
    answers = answers_for(inputs)
    # Not the upstream's own state: the broker's token, which the upstream never sees.
    assert state.count(".") >= 1 and len(state) > 40, state
    refused(bob.call("eras__ask", {"topic": "tides"}, inputResponses=answers, requestState=state), "bob replaying")
    altered = state[:-3] + ("AAA" if not state.endswith("AAA") else "BBB")
    refused(alice.call("eras__ask", {"topic": "tides"}, inputResponses=answers, requestState=altered), "altered")
    refused(alice.call("eras__ask", {"topic": "moons"}, inputResponses=answers, requestState=state),
            "other arguments")
    refused(alice.call("eras__echo", {"message": "x"}, inputResponses=answers, requestState=state), "other tool")
    done = alice.call("eras__ask", {"topic": "tides"}, inputResponses=answers, requestState=state)
    res = done.get("result")
    assert res and res.get("resultType") == "complete", done
    text = res["content"][0]["text"]
    assert "elicited name=Alice colour=teal" in text and "sampled=a line" in text, text
    assert "era=2026-07-28 | via=input_responses" in text, text


def test_parked_call_resumes_only_for_its_caller(env):
    alice, bob, broker = env
    first = input_required(alice.call("ev__trigger-elicitation-request", {}))
    inputs = first["inputRequests"]
    assert len(inputs) == 1 and next(iter(inputs.values()))["method"] == "elicitation/create", inputs
    key = next(iter(inputs))
    answer = {key: {"action": "accept", "content": {"color": "red", "email": "a@example.com", "name": "Alice",
                                                    "age": 30, "role": "admin", "rating": 4}}}
    refused(bob.call("ev__trigger-elicitation-request", {}, inputResponses=answer, requestState=first["requestState"]),
            "bob resuming alice's parked call")
    # The parked call is still alice's to finish.
    done = alice.call("ev__trigger-elicitation-request", {}, inputResponses=answer, requestState=first["requestState"])
    res = done.get("result")
    assert res and res.get("resultType") == "complete", done
    text = " ".join(c.get("text", "") for c in res["content"])
    assert "accept" in text.lower() and "Alice" in text, text
    # Used up: the same state does not resume anything again.
    again = alice.call("ev__trigger-elicitation-request", {}, inputResponses=answer, requestState=first["requestState"])
    refused(again, "a finished parked call")


def test_a_client_without_the_capability_is_not_asked(env):
    alice, bob, broker = env
    alice_no_caps = Caller(broker.url, alice.token)
    resp = alice_no_caps.call("ev__trigger-elicitation-request", {}, _meta=meta(caps={}))
    res = resp.get("result")
    # server-everything gets the broker's refusal for its elicitation and reports it as a tool error.
    assert res and res.get("resultType") != "input_required", resp


def test_mcp_param_headers_reach_a_2026_upstream(env):
    """SEP-2243: `eras__route`'s `region` is annotated `x-mcp-header: Region`; the Python SDK server rejects a
    2026-07-28 call without a matching `Mcp-Param-Region` header, so the broker must send one upstream (from the
    upstream's own schema, for the upstream's own tool name)."""
    alice, bob, broker = env
    resp = alice.call("eras__route", {"region": "eu-west", "note": "n1"})
    res = resp.get("result")
    assert res and not res.get("isError"), resp
    assert res["content"][0]["text"] == "routed to eu-west n1", res


def test_a_2025_session_subscribes_to_a_2026_only_server(env):
    """2026-07-28 has no resources/subscribe: the broker holds a subscriptions/listen stream filtered to the URI on
    the server's 2026 connection and relays its notifications/resources/updated to the subscribed session (URI
    namespaced); after unsubscribe, nothing more arrives."""
    import corelib as C

    alice, bob, broker = env
    s = C.open_session(broker.url, alice.token)
    listener = C.SseListener(s, "alice-2025")
    uri = "eras+eras://note"
    try:
        sub = C.req(s, listener, "resources/subscribe", {"uri": uri})
        assert "result" in sub, sub
        r = C.tool(s, listener, "eras__touch")
        assert "result" in r and not r["result"].get("isError"), r
        H.poll_until(lambda: listener.methods("notifications/resources/updated"), 15,
                     "notifications/resources/updated through the broker")
        got = listener.methods("notifications/resources/updated")
        assert [m.get("params", {}).get("uri") for m in got] == [uri], got
        assert "result" in C.req(s, listener, "resources/unsubscribe", {"uri": uri})
        C.tool(s, listener, "eras__touch")
        C.hold_for(1.0, lambda: len(listener.methods("notifications/resources/updated")) > 1)
        assert len(listener.methods("notifications/resources/updated")) == 1, listener.methods(
            "notifications/resources/updated")
    finally:
        listener.stop()
        s.close()


def test_elicitation_honours_the_declared_modes(env):
    """server-everything's trigger-url-elicitation sends a URL-mode elicitation/create. A client that declared
    `elicitation: {}` (form only) is not asked; one that declared `url` gets it (as input_required: 2026-07-28)."""
    alice, bob, broker = env
    args = {"url": "https://example.com/consent", "elicitationId": "e-1"}
    form_only = alice.call("ev__trigger-url-elicitation", args, _meta=meta(caps={"elicitation": {}}))
    res = form_only.get("result")
    assert res is not None and res.get("resultType") != "input_required", form_only
    assert res.get("isError") or "error" in str(res).lower(), form_only
    url_ok = alice.call("ev__trigger-url-elicitation", args, _meta=meta(caps={"elicitation": {"url": {}}}))
    ir = input_required(url_ok)
    (req,) = ir["inputRequests"].values()
    assert req["method"] == "elicitation/create" and req["params"].get("mode") == "url", req
    assert req["params"].get("url") == args["url"], req


def test_an_unanswered_parked_call_expires_and_is_cancelled(tmp_path, ev_http):
    """`[broker] request_state_ttl`: a call parked for a 2026-07-28 client's answers waits that long, then is
    dropped by the sweeper (cancelled upstream; `mcp_broker_parked_calls` back to 0) and its state is refused."""
    import opslib as O

    b = H.start_broker(tmp_path, {"ev": {"transport": "http", "url": ev_http.url}},
                       broker={"request_state_ttl": "1s"}, name="broker-mrtr-ttl")
    try:
        H.wait_for_tools(b.url, ["ev__trigger-elicitation-request"], timeout=30)
        c = Caller(b.url, "")
        c.token = None
        first = input_required(c.call("ev__trigger-elicitation-request", {}))
        assert O.scrape(b.base).get("mcp_broker_parked_calls") == 1.0
        H.poll_until(lambda: O.scrape(b.base).get("mcp_broker_parked_calls") == 0.0, 15,
                     "the expired parked call to be swept")
        key = next(iter(first["inputRequests"]))
        late = c.call("ev__trigger-elicitation-request", {},
                      inputResponses={key: {"action": "decline"}}, requestState=first["requestState"])
        refused(late, "an expired state")
    finally:
        b.stop()
