"""Both MCP protocol eras, end to end: real clients x real upstreams, directly and through the broker.

Clients (each with an elicitation handler, a sampling handler and a progress handler that answer deterministically):
  py-2025  the Python SDK (`mcp` 2.x) `Client(url, mode="legacy")`: the 2025-11-25 `initialize` handshake;
  py-2026  the Python SDK `Client(url, mode="auto")`: probes `server/discover` and must end up on 2026-07-28;
  ts-2026  the TypeScript SDK v2 (`@modelcontextprotocol/client`, tests/e2e/clients/ts_client.mjs on Node 22) with
           `versionNegotiation: {mode: {pin: "2026-07-28"}}`: `server/discover` must offer 2026-07-28.
Upstreams:
  eras     tests/e2e/servers/eras_server.py (Python SDK): one endpoint of both eras; its tool `ask` elicits a form,
           samples, reports progress and returns both answers plus the era it was called in: real server->client
           requests for a 2025 caller, an `input_required` result (SEP-2322) for a 2026 caller;
  ev       @modelcontextprotocol/server-everything over Streamable HTTP (TypeScript SDK v1: 2025 only):
           trigger-elicitation-request, trigger-sampling-request (real server->client requests) and
           trigger-long-running-operation (progress).

Through the broker every pairing must work (the final behaviour these tests pin down):
  * `eras` is configured with `protocol = "2026-07-28"`: the broker reaches it as a 2026-07-28 client only, so it
    must report `era=2026-07-28 | via=input_responses` whichever client called (the translation paths);
  * `erasauto` is the same server under `protocol = "auto"`: it speaks both revisions, so the broker keeps a
    2025-11-25 connection beside the 2026-07-28 one and each client reaches it in its own era, exactly as directly
    (`test_through_broker_era_matched`);
  * a 2026 upstream's `input_required` reaches a 2026 client as `input_required` (the broker wraps `requestState`),
    and a 2025 client as real `elicitation/create` / `sampling/createMessage` requests on its session, after which the
    broker retries upstream with `inputResponses`;
  * a 2025 upstream's server->client request during a 2026 client's call becomes an `input_required` result that
    the broker resumes when the client retries;
  * progress notifications reach the caller in every pairing.
Directly, the pairings the SDKs can do validate the harness; a 2026-only client cannot talk to server-everything
(2025 only), so those two direct pairings are skipped with the reason.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp import types as T

import helpers as H

CLIENTS = ["py-2025", "py-2026", "ts-2026"]
UPSTREAMS = ["eras", "ev"]
CLIENT_ERA = {"py-2025": "2025-11-25", "py-2026": "2026-07-28", "ts-2026": "2026-07-28"}
PY_MODE = {"py-2025": "legacy", "py-2026": "auto"}
TS_MODE = {"ts-2026": "2026-07-28"}

# What the clients answer.
NAME = "Ada Lovelace"
COLOUR = "ultramarine"
INTEGER = 7
ELICIT_ANSWER = {"name": NAME, "colour": COLOUR, "check": True, "integer": INTEGER}  # filtered by the asked schema
SAMPLE_TEXT = "sampled-eras-answer-42"
SAMPLE_MODEL = "e2e-eras-model"
# What the tools are asked.
TOPIC = "lighthouses"
PROMPT = "e2e-eras-prompt-xyz"
STEPS = 3

CALL_TIMEOUT = 10.0  # one tool call, all its rounds included (each takes about a second when it works)
CLIENT_DEADLINE = 25.0  # one client run: connect, tools/list and every call (a test stays under 30 s even if all hang)
TS_SYNTHETIC_PROGRESS = "Fulfilling input required"  # the TS client's own progress while it fulfils input_required

DIRECT_SKIP = (
    "not a pairing the SDKs can do directly: server-everything 2026.8.31 is built on the TypeScript SDK v1 "
    "(@modelcontextprotocol/sdk 1.32.x) and speaks only the 2025 initialize handshake (no server/discover, no "
    "input_required). The TypeScript client pinned to 2026-07-28 fails to connect (ERA_NEGOTIATION_FAILED: the "
    "server did not offer 2026-07-28 via server/discover); the Python client in mode='auto' silently falls back to "
    "2025-11-25 (so it would not be a 2026 client), and pinned to mode='2026-07-28' its first request gets "
    "'Bad Request: Server not initialized'. Only the broker can pair them (see test_through_broker)."
)


@dataclass
class Call:
    name: str  # the upstream's own tool name (the broker adds `<server>__`)
    arguments: dict[str, Any]
    progress: bool = False


@dataclass
class CallOutcome:
    text: str = ""
    is_error: bool = False
    error: str | None = None  # an exception instead of a result


@dataclass
class Outcome:
    client: str
    protocol: str | None = None
    tools: list[str] = field(default_factory=list)
    results: dict[str, CallOutcome] = field(default_factory=dict)
    elicitations: list[dict] = field(default_factory=list)
    samplings: list[dict] = field(default_factory=list)
    progress: dict[str, list[tuple]] = field(default_factory=dict)
    error: str | None = None  # the client got no further than connecting / listing tools


def calls_for(upstream: str) -> list[Call]:
    if upstream == "eras":
        return [Call("ask", {"topic": TOPIC}, progress=True)]
    return [
        Call("trigger-elicitation-request", {}),
        Call("trigger-sampling-request", {"prompt": PROMPT, "maxTokens": 20}),
        Call("trigger-long-running-operation", {"duration": 0.6, "steps": STEPS}, progress=True),
    ]


def describe(e: BaseException) -> str:
    """An exception (group) as one line per leaf, with MCP error codes."""
    if isinstance(e, BaseExceptionGroup):
        return " | ".join(describe(x) for x in e.exceptions)
    code = getattr(getattr(e, "error", None), "code", None)
    return f"{type(e).__name__}{f' (code {code})' if code is not None else ''}: {e}"


def elicit_content(schema: dict | None) -> dict:
    props = (schema or {}).get("properties") or {}
    return {k: v for k, v in ELICIT_ANSWER.items() if k in props}


# --------------------------------------------------------------------------- the two clients


async def run_py(url: str, client: str, prefix: str, calls: list[Call]) -> Outcome:
    out = Outcome(client)

    async def on_elicit(ctx, params):  # noqa: ARG001 - the SDK's callback signature
        wire = H.dump(params)
        out.elicitations.append(wire)
        return T.ElicitResult(action="accept", content=elicit_content(wire.get("requestedSchema")))

    async def on_sample(ctx, params):  # noqa: ARG001
        out.samplings.append(H.dump(params))
        return T.CreateMessageResult(role="assistant", content=T.TextContent(type="text", text=SAMPLE_TEXT),
                                     model=SAMPLE_MODEL, stop_reason="endTurn")

    stage = "connect"
    try:
        with anyio.fail_after(CLIENT_DEADLINE):
            async with Client(url, mode=PY_MODE[client], elicitation_callback=on_elicit, sampling_callback=on_sample,
                              read_timeout_seconds=CALL_TIMEOUT) as c:
                out.protocol = c.protocol_version
                stage = "tools/list"
                with anyio.fail_after(15):
                    out.tools = [t.name for t in (await c.list_tools()).tools]
                stage = "calls"
                for call in calls:
                    log = out.progress.setdefault(call.name, [])

                    async def on_progress(progress, total, message, log=log):
                        log.append((progress, total, message))

                    try:
                        with anyio.fail_after(CALL_TIMEOUT):
                            r = await c.call_tool(prefix + call.name, call.arguments,
                                                  progress_callback=on_progress if call.progress else None)
                        out.results[call.name] = CallOutcome(text=H.tool_text(r), is_error=bool(r.is_error))
                    except Exception as e:  # noqa: BLE001 - reported by the assertions
                        out.results[call.name] = CallOutcome(error=describe(e))
                stage = "close"
    except Exception as e:  # noqa: BLE001 - reported by the assertions (a failed close is not a failure)
        if stage != "close":
            out.error = f"{stage}: {describe(e)}"
    return out


def run_ts(url: str, client: str, prefix: str, calls: list[Call]) -> Outcome:
    spec = {
        "url": url, "mode": TS_MODE[client], "timeoutMs": int(CALL_TIMEOUT * 1000),
        "calls": [{"name": prefix + c.name, "arguments": c.arguments, "progress": c.progress} for c in calls],
        "elicit": ELICIT_ANSWER, "sample": SAMPLE_TEXT, "model": SAMPLE_MODEL,
    }
    try:
        rep = H.run_ts_client(spec, timeout=CLIENT_DEADLINE)
    except subprocess.TimeoutExpired as e:
        return Outcome(client, error=f"the TS client did not finish within {CLIENT_DEADLINE}s: {e}")
    out = Outcome(client, protocol=rep.get("protocolVersion"), tools=rep.get("tools") or [],
                  elicitations=rep["elicitations"], samplings=rep["samplings"])
    if not rep["ok"]:
        out.error = f"{rep.get('stage')}: {rep.get('error')}"
        return out
    for r in rep["results"]:
        short = r["name"][len(prefix):]
        if "error" in r:
            out.results[short] = CallOutcome(error=r["error"])
        else:
            res = r["result"]
            text = "\n".join(c.get("text", "") for c in res.get("content") or [] if c.get("type") == "text")
            out.results[short] = CallOutcome(text=text, is_error=bool(res.get("isError")))
    for name, log in rep["progress"].items():
        out.progress[name[len(prefix):]] = [(p["progress"], p.get("total"), p.get("message")) for p in log]
    return out


def run_client(client: str, url: str, prefix: str, upstream: str) -> Outcome:
    calls = calls_for(upstream)
    if client.startswith("py-"):
        return anyio.run(run_py, url, client, prefix, calls)
    return run_ts(url, client, prefix, calls)


# --------------------------------------------------------------------------- what every pairing must show


def server_progress(entries: list[tuple]) -> list[tuple]:
    """Progress notifications that came from the upstream (the TS client adds its own while fulfilling input)."""
    return [e for e in entries if not (isinstance(e[2], str) and e[2].startswith(TS_SYNTHETIC_PROGRESS))]


def problems_of(out: Outcome, upstream: str, route: str) -> list[str]:
    """Everything wrong with one pairing's outcome (empty when the round trips all worked)."""
    if out.error:
        return [f"{out.client} got no further than {out.error}"]
    p: list[str] = []
    if out.protocol != CLIENT_ERA[out.client]:
        p.append(f"{out.client} negotiated {out.protocol!r}, expected {CLIENT_ERA[out.client]}")
    prefix = {"broker": f"{upstream}__", "broker-auto": "erasauto__"}.get(route, "")
    want_tools = {prefix + c.name for c in calls_for(upstream)}
    if not want_tools <= set(out.tools):
        p.append(f"tools/list lacks {sorted(want_tools - set(out.tools))} (has {sorted(out.tools)})")
    for c in calls_for(upstream):
        r = out.results.get(c.name)
        if r is None:
            p.append(f"{c.name}: not called")
        elif r.error is not None:
            p.append(f"{c.name}: raised {r.error}")
        elif r.is_error:
            p.append(f"{c.name}: isError result: {r.text[:600]}")
    if upstream == "eras":
        p += eras_problems(out, route)
    else:
        p += everything_problems(out)
    return p


def eras_problems(out: Outcome, route: str) -> list[str]:
    p: list[str] = []
    r = out.results.get("ask")
    text = r.text if r and r.error is None else ""
    if text:
        if f"elicited name={NAME} colour={COLOUR}" not in text:
            p.append(f"ask: the elicitation answer did not make the round trip: {text!r}")
        if f"sampled={SAMPLE_TEXT}" not in text or f"model={SAMPLE_MODEL}" not in text:
            p.append(f"ask: the sampling answer did not make the round trip: {text!r}")
        # The era the upstream was called in: the client's own directly; through the broker, 2026-07-28 (the broker
        # connects as a 2026 client to an upstream that supports it, whatever era its own caller speaks).
        if route in ("direct", "broker-auto"):
            want = CLIENT_ERA[out.client]
            via = "input_responses" if want == "2026-07-28" else "server_requests"
        else:
            want, via = "2026-07-28", "input_responses"
        if f"era={want} | via={via}" not in text:
            p.append(f"ask: the upstream was called in the wrong era (want `era={want} | via={via}`): {text!r}")
    if len(out.elicitations) != 1:
        p.append(f"elicitation handler called {len(out.elicitations)} times, expected once: {out.elicitations}")
    elif TOPIC not in str(out.elicitations[0].get("message")):
        p.append(f"elicitation request without the upstream's message: {out.elicitations[0]}")
    if len(out.samplings) != 1:
        p.append(f"sampling handler called {len(out.samplings)} times, expected once: {out.samplings}")
    elif f"Write one line about {TOPIC}" not in str(out.samplings[0].get("messages")):
        p.append(f"sampling request without the upstream's prompt: {out.samplings[0]}")
    got = server_progress(out.progress.get("ask", []))
    want_progress = [(1, 3, "elicited"), (2, 3, "sampled"), (3, 3, "done")]
    if got != want_progress:
        p.append(f"ask: progress {got}, expected {want_progress}")
    return p


def everything_problems(out: Outcome) -> list[str]:
    p: list[str] = []
    r = out.results.get("trigger-elicitation-request")
    if r and r.error is None and not r.is_error:
        if f"Name: {NAME}" not in r.text or f"Favorite Integer: {INTEGER}" not in r.text:
            p.append(f"trigger-elicitation-request: the elicitation answer did not make the round trip: {r.text!r}")
    r = out.results.get("trigger-sampling-request")
    if r and r.error is None and not r.is_error and SAMPLE_TEXT not in r.text:
        p.append(f"trigger-sampling-request: the sampling answer did not make the round trip: {r.text!r}")
    if len(out.elicitations) != 1:
        p.append(f"elicitation handler called {len(out.elicitations)} times, expected once: {out.elicitations}")
    if len(out.samplings) != 1:
        p.append(f"sampling handler called {len(out.samplings)} times, expected once: {out.samplings}")
    elif PROMPT not in str(out.samplings[0].get("messages")):
        p.append(f"sampling request without the tool's prompt: {out.samplings[0]}")
    got = [(e[0], e[1]) for e in server_progress(out.progress.get("trigger-long-running-operation", []))]
    want_progress = [(i, STEPS) for i in range(1, STEPS + 1)]
    if got != want_progress:
        p.append(f"trigger-long-running-operation: progress {got}, expected {want_progress}")
    return p


def report(out: Outcome, problems: list[str], *procs: H.Proc) -> str:
    lines = [f"{len(problems)} problem(s) for {out.client}:"] + [f"  - {x}" for x in problems]
    lines.append(f"  (results: { {k: (v.error or v.text[:300]) for k, v in out.results.items()} })")
    for proc in procs:
        lines.append(proc.stderr_tail(25))
    return "\n".join(lines)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def eras_up(logs_dir):
    up = H.start_eras_server(logs_dir)
    yield up
    up.stop()


@pytest.fixture(scope="module")
def eras_broker_state(tmp_path_factory, eras_up, ev_http):
    """A broker in front of both upstreams: `eras` (both eras) and `ev` (server-everything, 2025 only)."""
    if not H.BROKER_BIN.exists():
        yield None, f"broker binary {H.BROKER_BIN} is missing (cargo build)"
        return
    servers = {
        "eras": {"transport": "http", "url": eras_up.url, "timeout": "30s", "protocol": "2026-07-28"},
        "erasauto": {"transport": "http", "url": eras_up.url, "timeout": "30s"},
        "ev": {"transport": "http", "url": ev_http.url, "timeout": "30s"},
    }
    try:
        broker = H.start_broker(tmp_path_factory.mktemp("broker-eras"), servers, name="broker-eras")
    except Exception as e:  # noqa: BLE001 - every test reports it
        yield None, f"broker failed to start: {e}"
        return
    required = ["eras__ask"] + [f"ev__{c.name}" for c in calls_for("ev")]
    note = ""
    try:
        H.wait_for_tools(broker.url, required, timeout=30)
    except Exception as e:  # noqa: BLE001
        note = f"broker not ready: {e}"
    yield broker, note
    broker.stop()


@pytest.fixture
def eras_broker(eras_broker_state) -> H.Broker:
    b, note = eras_broker_state
    if b is None or note:
        pytest.fail(note)
    return b


def require_client(client: str) -> None:
    if client.startswith("ts-") and not H.TS_CLIENT_PKG.exists():
        pytest.fail(f"{H.TS_CLIENT_PKG} is missing (scripts/test.sh --harness-only installs @modelcontextprotocol/client)")


# --------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("client", CLIENTS)
def test_direct(client, upstream, eras_up, ev_http):
    """Client -> upstream with no broker: validates the harness (the clients, the eras server, the assertions)."""
    if upstream == "ev" and CLIENT_ERA[client] == "2026-07-28":
        pytest.skip(DIRECT_SKIP)
    require_client(client)
    up = eras_up if upstream == "eras" else ev_http
    out = run_client(client, up.url, "", upstream)
    problems = problems_of(out, upstream, "direct")
    assert not problems, report(out, problems, up.proc)


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("client", CLIENTS)
def test_through_broker(client, upstream, eras_broker, eras_up, ev_http):
    """Client -> broker -> upstream: every pairing of eras must round-trip elicitation, sampling and progress."""
    require_client(client)
    out = run_client(client, eras_broker.url, f"{upstream}__", upstream)
    problems = problems_of(out, upstream, "broker")
    up = eras_up if upstream == "eras" else ev_http
    assert not problems, report(out, problems, eras_broker.proc, up.proc)


@pytest.mark.parametrize("client", CLIENTS)
def test_through_broker_era_matched(client, eras_broker, eras_up):
    """A server that speaks both revisions (`protocol = "auto"`) is reached in each client's own era: a 2025 client
    gets the server's own server->client requests, a 2026 client its own input_required results."""
    require_client(client)
    out = run_client(client, eras_broker.url, "erasauto__", "eras")
    problems = problems_of(out, "eras", "broker-auto")
    assert not problems, report(out, problems, eras_broker.proc, eras_up.proc)
