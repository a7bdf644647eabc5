"""Just-in-time approvals (issue 17, item 1): `[[policy]] effect = "approve"` with `approval = "caller"` (the calling
user answers a form elicitation: accepted, declined, timed out; a client without elicitation is told why) and
`approval = "approver"` (the call waits while an approver decides with `mcp-broker approvals`; self-approval refused;
a short grant expires). Real parts: the Python SDK client, the ledger example upstream, test-minted tokens."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import anyio
import httpx2
import mcp.types as T
import pytest

import corelib as C
import helpers as H
import opslib as O

TOOL = "ledger__update_account_status"
FREEZE = {"account_id": "ACC-1001", "status": "frozen", "reason": "approval test"}
pytestmark = pytest.mark.anyio
AUDIT = '[audit]\nfile = "audit.jsonl"\narguments = "hash"\n'


def text_of(r) -> str:
    return "\n".join(c.text for c in r.content if hasattr(c, "text"))


def records(work: Path, pred) -> list[dict]:
    return [r for r in O.read_audit(work / "audit.jsonl") if pred(r)]


class Answers:
    """An elicitation callback answering with `grant` (or an action), after `delay` seconds."""

    def __init__(self, grant: str | None = "15m", action: str = "accept", delay: float = 0):
        self.grant, self.action, self.delay = grant, action, delay
        self.asked: list[T.ElicitRequestParams] = []

    async def __call__(self, ctx, params):
        self.asked.append(params)
        if self.delay:
            await anyio.sleep(self.delay)
        if self.action != "accept":
            return T.ElicitResult(action=self.action)
        return T.ElicitResult(action="accept", content={"grant": self.grant})


async def caller_broker(tmp_path: Path, name: str, **rule) -> H.Broker:
    C.require(H.LEDGER_BIN)
    policy = {"servers": ["ledger"], "tools": ["update_account_status"], "effect": "approve", "approval": "caller",
              **rule}
    b = H.start_broker(tmp_path, {"ledger": H.example_stdio_spec(H.LEDGER_BIN)}, name=name,
                       policies=[policy], extra_toml=AUDIT)
    await anyio.to_thread.run_sync(H.wait_for_tools, b.url, [TOOL], 30)
    return b


async def test_caller_approval_accepted_then_granted(tmp_path):
    b = await caller_broker(tmp_path, "appr-accept")
    try:
        cb = Answers("15m")
        async with H.http_session(b.url, elicitation_callback=cb) as s:
            # The tool is listed: callable, after approval.
            assert TOOL in [t.name for t in (await s.list_tools()).tools]
            with anyio.fail_after(30):
                r = await s.call_tool(TOOL, FREEZE)
            assert not r.is_error, H.dump(r)
            assert len(cb.asked) == 1
            asked = cb.asked[0]
            assert asked.message.startswith(f"Allow {TOOL} with {{"), asked.message
            assert "account_id: ACC-1001" in asked.message and "status: frozen" in asked.message, asked.message
            schema = asked.requested_schema
            assert schema["required"] == ["grant"], schema
            assert schema["properties"]["grant"]["enum"] == ["once", "15m", "1h", "deny"], schema
            # Within the 15m grant: nothing asked (other arguments too: bind_arguments is off).
            with anyio.fail_after(30):
                r = await s.call_tool(TOOL, {**FREEZE, "status": "active"})
            assert not r.is_error, H.dump(r)
            assert len(cb.asked) == 1
            # Other tools are not gated.
            r = await s.call_tool("ledger__list_accounts", {})
            assert not r.is_error and len(cb.asked) == 1
        recs = O.wait_records(tmp_path / "audit.jsonl", lambda r: r["kind"] == "tool" and r["name"] == TOOL,
                              "the two calls", n=2)
        first, second = recs
        assert first["approval"]["state"] == "approved" and first["approval"]["grant"] == "15m", first
        assert first["approval"]["by"] == first["sub"] and first["outcome"] == "ok", first
        assert second["approval"]["state"] == "grant_used" and second["outcome"] == "ok", second
        text = httpx2.get(f"{b.base}/metrics", timeout=10).text
        for state in ["approved", "grant_used"]:
            assert f'mcp_broker_approvals_total{{server="ledger",state="{state}"}} 1\n' in text, text
    finally:
        b.stop()


async def test_caller_approval_once_bound_to_arguments(tmp_path):
    b = await caller_broker(tmp_path, "appr-once", bind_arguments=True)
    try:
        cb = Answers("once")
        async with H.http_session(b.url, elicitation_callback=cb) as s:
            for _ in range(2):
                with anyio.fail_after(30):
                    r = await s.call_tool(TOOL, FREEZE)
                assert not r.is_error, H.dump(r)
            # `once` covers only the call that asked.
            assert len(cb.asked) == 2
            cb.grant = "1h"
            await s.call_tool(TOOL, FREEZE)
            await s.call_tool(TOOL, FREEZE)
            assert len(cb.asked) == 3
            # bind_arguments: other arguments ask again.
            await s.call_tool(TOOL, {**FREEZE, "status": "active"})
            assert len(cb.asked) == 4
    finally:
        b.stop()


@pytest.mark.parametrize("answer", ["deny", "decline", "cancel"])
async def test_caller_approval_declined(tmp_path, answer):
    b = await caller_broker(tmp_path, f"appr-{answer}")
    try:
        cb = Answers("deny") if answer == "deny" else Answers(None, action=answer)
        async with H.http_session(b.url, elicitation_callback=cb) as s:
            with anyio.fail_after(30):
                r = await s.call_tool(TOOL, FREEZE)
            assert r.is_error and "you declined it" in text_of(r), H.dump(r)
            # Nothing was granted: the next call asks again.
            await s.call_tool(TOOL, FREEZE)
            assert len(cb.asked) == 2
            # The ledger was not touched.
            r = await s.call_tool("ledger__get_account", {"account_id": "ACC-1001"})
            assert "frozen" not in text_of(r), text_of(r)
        rec = O.wait_records(tmp_path / "audit.jsonl", lambda r: r["kind"] == "tool" and r["name"] == TOOL,
                             "the refused call")[0]
        assert rec["approval"]["state"] == "denied" and rec["outcome"] == "denied", rec
        assert rec["approval"]["by"] == rec["sub"], rec
    finally:
        b.stop()


async def test_caller_approval_timed_out(tmp_path):
    b = await caller_broker(tmp_path, "appr-timeout", approval_timeout="5s")
    try:
        cb = Answers("15m", delay=8)
        async with H.http_session(b.url, elicitation_callback=cb) as s:
            t0 = time.monotonic()
            with anyio.fail_after(30):
                r = await s.call_tool(TOOL, FREEZE)
            assert r.is_error and "none came within 5s" in text_of(r), H.dump(r)
            assert 4.5 < time.monotonic() - t0 < 8, time.monotonic() - t0
        rec = O.wait_records(tmp_path / "audit.jsonl", lambda r: r["kind"] == "tool" and r["name"] == TOOL,
                             "the timed-out call")[0]
        assert rec["approval"]["state"] == "timeout" and rec["outcome"] == "denied", rec
    finally:
        b.stop()


async def test_client_without_elicitation_is_told_why(tmp_path):
    b = await caller_broker(tmp_path, "appr-noelicit")
    try:
        async with H.http_session(b.url) as s:
            with anyio.fail_after(30):
                r = await s.call_tool(TOOL, FREEZE)
            assert r.is_error, H.dump(r)
            t = text_of(r)
            assert "needs your approval" in t and "cannot ask you" in t, t
    finally:
        b.stop()


# --------------------------------------------------------------------------- approver approvals


def mint(minter: O.Minter, b: H.Broker, sub: str, groups: list[str]) -> str:
    now = int(time.time())
    claims = {"iss": minter.ISSUER, "aud": b.url, "sub": sub, "client_id": f"{sub}-agent", "scope": "mcp:tools",
              "groups": groups, "iat": now - 5, "exp": now + 900, "jti": uuid.uuid4().hex}
    return H.mint_rs256(minter.key, claims, minter.kid)


def approvals(b: H.Broker, token: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(H.BROKER_BIN), "approvals", *args, "--url", b.base + "/admin/approvals"],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "MCP_BROKER_TOKEN": token})


def pending(b: H.Broker, token: str) -> list[dict]:
    p = approvals(b, token, "list", "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["approvals"]


async def wait_pending(b: H.Broker, token: str, n: int = 1) -> list[dict]:
    def seen():
        got = pending(b, token)
        return got if len(got) >= n else None
    return await anyio.to_thread.run_sync(H.poll_until, seen, 15, "a call waiting for approval")


@pytest.fixture
def approver_env(tmp_path):
    C.require(H.LEDGER_BIN)
    minter = O.Minter()
    b = None
    try:
        rule = {"servers": ["ledger"], "tools": ["update_account_status"], "effect": "approve",
                "approval": "approver", "approvers": {"groups": ["sec-ops"]}, "approval_timeout": "30s",
                "grant_durations": ["once", "2s", "15m"]}
        quick = {"servers": ["ledger"], "tools": ["get_account"], "effect": "approve", "approval": "approver",
                 "approvers": {"subjects": ["bob"]}, "approval_timeout": "12s"}
        b = H.start_broker(tmp_path, {"ledger": H.example_stdio_spec(H.LEDGER_BIN)}, name="appr-approver",
                           auth=minter.auth_config(), policies=[rule, quick, {"effect": "allow"}], extra_toml=AUDIT)
        tokens = {"alice": mint(minter, b, "alice", ["sec-ops", "staff"]), "bob": mint(minter, b, "bob", ["sec-ops"]),
                  "carol": mint(minter, b, "carol", ["staff"])}
        yield b, tokens, tmp_path
    finally:
        if b:
            b.stop()
        minter.stop()


async def test_approver_approves_a_waiting_call(approver_env):
    b, tok, work = approver_env
    async with H.http_session(b.url, headers=H.bearer(tok["alice"])) as s:
        async with anyio.create_task_group() as tg:
            result = {}

            async def call():
                with anyio.fail_after(40):
                    result["r"] = await s.call_tool(TOOL, FREEZE)

            tg.start_soon(call)
            waiting = await wait_pending(b, tok["bob"])
            assert len(waiting) == 1, waiting
            w = waiting[0]
            assert w["caller"] == "alice" and w["tool"] == TOOL and "account_id: ACC-1001" in w["arguments"], w
            assert w["grants"] == ["once", "2s", "15m"], w
            # Not an approver: refused, sees nothing.
            p = approvals(b, tok["carol"], "list")
            assert p.returncode != 0 and "403" in p.stderr, p.stderr
            p = approvals(b, tok["carol"], "approve", w["id"])
            assert p.returncode != 0 and "403" in p.stderr, p.stderr
            # Alice is an approver too, but not of her own call.
            async with httpx2.AsyncClient(timeout=10) as hc:
                r = await hc.post(f"{b.base}/admin/approvals/{w['id']}/approve", headers=H.bearer(tok["alice"]),
                                  json={"duration": "15m"})
                assert r.status_code == 403 and "own call" in r.text, r.text
                r = await hc.get(f"{b.base}/admin/approvals")
                assert r.status_code == 401, r.text
            # A grant the rule does not offer.
            p = approvals(b, tok["bob"], "approve", w["id"], "--duration", "1d")
            assert p.returncode != 0 and "400" in p.stderr, p.stderr
            assert "r" not in result
            p = approvals(b, tok["bob"], "approve", w["id"], "--duration", "2s")
            assert p.returncode == 0 and "approved" in p.stdout, p.stderr
        r = result["r"]
        assert not r.is_error, H.dump(r)
        assert pending(b, tok["bob"]) == []
        # Within the 2 s grant: no wait.
        with anyio.fail_after(10):
            r = await s.call_tool(TOOL, FREEZE)
        assert not r.is_error, H.dump(r)
        # After it: waiting again; bob denies.
        await anyio.sleep(2.5)
        async with anyio.create_task_group() as tg:
            async def call2():
                with anyio.fail_after(40):
                    result["r2"] = await s.call_tool(TOOL, FREEZE)

            tg.start_soon(call2)
            w = (await wait_pending(b, tok["bob"]))[0]
            p = approvals(b, tok["bob"], "deny", w["id"])
            assert p.returncode == 0 and "denied" in p.stdout, p.stderr
        r = result["r2"]
        assert r.is_error and "`bob` denied it" in text_of(r), H.dump(r)
    recs = O.wait_records(work / "audit.jsonl", lambda r: r["name"] == TOOL and r["kind"] == "tool", "alice's calls",
                          n=3)
    assert [r["approval"]["state"] for r in recs] == ["approved", "grant_used", "denied"], recs
    assert recs[0]["approval"]["by"] == "bob" and recs[0]["approval"]["grant"] == "2s", recs[0]
    assert recs[2]["approval"]["by"] == "bob" and recs[2]["outcome"] == "denied", recs[2]
    approvals_recs = records(work, lambda r: r["kind"] == "approval")
    states = [(r["sub"], r["approval"]["state"]) for r in approvals_recs]
    assert ("alice", "requested") in states and ("bob", "approved") in states and ("bob", "denied") in states, states
    assert ("alice", "expired") in states, states
    assert ("alice", "refused") in states, states  # her own approval
    assert ("carol", "refused") in states, states


async def test_own_call_cannot_be_approved_and_a_cancelled_call_is_forgotten(approver_env):
    b, tok, work = approver_env
    try:
        async with H.http_session(b.url, headers=H.bearer(tok["bob"])) as s:
            async with anyio.create_task_group() as tg:
                async def call():
                    with anyio.fail_after(40):
                        await s.call_tool(TOOL, FREEZE)

                tg.start_soon(call)
                w = (await wait_pending(b, tok["alice"]))[0]
                assert w["caller"] == "bob"
                # bob sees his own waiting call listed but cannot decide it
                p = approvals(b, tok["bob"], "approve", w["id"])
                assert p.returncode != 0 and "own call" in p.stderr, p.stderr
                tg.cancel_scope.cancel()
    except* anyio.BrokenResourceError:
        pass  # the SDK's own teardown of a session whose request was cancelled mid-flight
    # The client went away: the pending approval is gone.
    await anyio.to_thread.run_sync(H.poll_until, lambda: pending(b, tok["alice"]) == [], 15, "the cancelled call removed")


async def test_no_approver_decides_in_time(approver_env):
    """The call waits (progress notifications every ~10 s keep the client alive) and is refused at the rule's timeout;
    only the approvers of that rule see it (bob by subject; alice's sec-ops group is not among them)."""
    b, tok, work = approver_env
    progress: list[tuple[float, str | None]] = []

    async def on_progress(p: float, total: float | None, message: str | None) -> None:
        progress.append((p, message))

    async with H.http_session(b.url, headers=H.bearer(tok["carol"])) as s:
        async with anyio.create_task_group() as tg:
            result = {}

            async def call():
                with anyio.fail_after(40):
                    result["r"] = await s.call_tool("ledger__get_account", {"account_id": "ACC-1001"},
                                                    progress_callback=on_progress)

            tg.start_soon(call)
            await wait_pending(b, tok["bob"])
            assert pending(b, tok["alice"]) == []
        r = result["r"]
        assert r.is_error and "no approver decided within 12s" in text_of(r), H.dump(r)
        assert progress and "waiting for an approver" in (progress[0][1] or ""), progress
    rec = O.wait_records(work / "audit.jsonl", lambda r: r["kind"] == "tool" and r["name"] == "ledger__get_account",
                         "the timed-out call")[0]
    assert rec["approval"]["state"] == "timeout" and rec["outcome"] == "denied", rec


async def test_drain_refuses_waiting_calls(approver_env):
    b, tok, _ = approver_env
    async with H.http_session(b.url, headers=H.bearer(tok["alice"])) as s:
        async with anyio.create_task_group() as tg:
            result = {}

            async def call():
                with anyio.fail_after(40):
                    result["r"] = await s.call_tool(TOOL, FREEZE)

            tg.start_soon(call)
            await wait_pending(b, tok["bob"])
            t0 = time.monotonic()
            b.proc.popen.send_signal(signal.SIGTERM)
        r = result["r"]
        assert r.is_error and "shutting down" in text_of(r), H.dump(r)
        assert time.monotonic() - t0 < 5


class Hook:
    """An HTTP endpoint that records the JSON posted to it."""

    def __init__(self):
        import http.server
        import threading
        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                n = int(self.headers.get("content-length") or 0)
                seen.append(json.loads(self.rfile.read(n)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


async def test_webhook_links_decide(tmp_path):
    """`[guard] approval_webhook` gets each new pending approval with signed links; opening one shows a confirmation
    page (GET decides nothing), confirming (POST) decides; a tampered link is refused."""
    C.require(H.LEDGER_BIN)
    minter, hook = O.Minter(), Hook()
    b = None
    try:
        rule = {"servers": ["ledger"], "tools": ["update_account_status"], "effect": "approve",
                "approval": "approver", "approvers": {"groups": ["sec-ops"]}, "approval_timeout": "30s"}
        b = H.start_broker(tmp_path, {"ledger": H.example_stdio_spec(H.LEDGER_BIN)}, name="appr-hook",
                           auth=minter.auth_config(), policies=[rule, {"effect": "allow"}],
                           extra_toml=AUDIT + f'\n[guard]\napproval_webhook = "{hook.url}"\n')
        alice = mint(minter, b, "alice", ["staff"])
        async with H.http_session(b.url, headers=H.bearer(alice)) as s:
            for action in ("deny", "approve"):
                result = {}
                hook.seen.clear()
                async with anyio.create_task_group() as tg:
                    async def call():
                        with anyio.fail_after(40):
                            result["r"] = await s.call_tool(TOOL, FREEZE)

                    tg.start_soon(call)
                    posted = await anyio.to_thread.run_sync(H.poll_until, lambda: hook.seen[:1], 15, "the webhook")
                    p = posted[0]
                    assert p["caller"] == "alice" and p["tool"] == TOOL and "ACC-1001" in p["arguments"], p
                    assert p["approve_url"].startswith(b.base + "/approvals/" + p["id"] + "/approve?sig="), p
                    url = p[f"{action}_url"]
                    async with httpx2.AsyncClient(timeout=10) as hc:
                        page = await hc.get(url)
                        assert page.status_code == 200 and "<form" in page.text and "alice" in page.text, page.text
                        assert "r" not in result
                        # Another approval's action, or an altered signature: refused.
                        other = "deny" if action == "approve" else "approve"
                        forged = url.replace(f"/{action}?", f"/{other}?")
                        assert (await hc.post(forged)).status_code == 403
                        done = await hc.post(url)
                        assert done.status_code == 200, done.text
                r = result["r"]
                if action == "deny":
                    assert r.is_error and "`webhook-link` denied it" in text_of(r), H.dump(r)
                else:
                    assert not r.is_error, H.dump(r)
        recs = O.wait_records(tmp_path / "audit.jsonl", lambda r: r["kind"] == "tool" and r["name"] == TOOL, "calls", n=2)
        assert [(r["approval"]["state"], r["approval"]["by"]) for r in recs] == \
            [("denied", "webhook-link"), ("approved", "webhook-link")], recs
        assert recs[1]["approval"]["grant"] == "once", recs[1]
    finally:
        if b:
            b.stop()
        minter.stop()
        hook.stop()


def modern_call(b: H.Broker, rid: int, caps: dict, arguments: dict, **extra) -> dict:
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": caps,
            "io.modelcontextprotocol/clientInfo": {"name": "e2e-approvals", "version": "0"}}
    h = {"Content-Type": "application/json", "Accept": H.MCP_ACCEPT, "MCP-Protocol-Version": "2026-07-28",
         "Mcp-Method": "tools/call", "Mcp-Name": TOOL}
    r = httpx2.post(b.url, headers=h, timeout=60, json={
        "jsonrpc": "2.0", "id": rid, "method": "tools/call",
        "params": {"name": TOOL, "arguments": arguments, "_meta": meta, **extra}})
    assert r.status_code == 200, f"HTTP {r.status_code} {r.text[:300]}"
    return H.final_response(r, rid)


async def test_2026_clients_are_asked_with_input_required(tmp_path):
    b = await caller_broker(tmp_path, "appr-next")
    try:
        form = {"elicitation": {"form": {}}}
        r = modern_call(b, 1, form, FREEZE)["result"]
        assert r["resultType"] == "input_required", r
        ask = r["inputRequests"]["approval"]
        assert ask["method"] == "elicitation/create" and ask["params"]["mode"] == "form", ask
        assert ask["params"]["message"].startswith(f"Allow {TOOL} with "), ask
        assert ask["params"]["requestedSchema"]["properties"]["grant"]["enum"] == ["once", "15m", "1h", "deny"]
        state = r["requestState"]
        # Declined: refused; the state is bound to this request (other arguments: refused as such).
        r = modern_call(b, 2, form, FREEZE, inputResponses={"approval": {"action": "decline"}},
                        requestState=state)["result"]
        assert r["isError"] and "you declined it" in r["content"][0]["text"], r
        r = modern_call(b, 3, form, {**FREEZE, "status": "closed"},
                        inputResponses={"approval": {"action": "accept", "content": {"grant": "15m"}}},
                        requestState=state)
        assert "error" in r, r
        r = modern_call(b, 4, form, FREEZE,
                        inputResponses={"approval": {"action": "accept", "content": {"grant": "15m"}}},
                        requestState=state)["result"]
        assert not r.get("isError") and r.get("resultType", "complete") == "complete", r
        # The grant covers the next call: no question.
        r = modern_call(b, 5, {}, FREEZE)["result"]
        assert not r.get("isError") and r.get("resultType", "complete") == "complete", r
    finally:
        b.stop()
    b = await caller_broker(tmp_path, "appr-next-noelicit")
    try:
        r = modern_call(b, 1, {}, FREEZE)["result"]
        assert r["isError"] and "cannot ask you" in r["content"][0]["text"], r
    finally:
        b.stop()


async def test_drain_refuses_a_call_waiting_for_its_caller(tmp_path):
    b = await caller_broker(tmp_path, "appr-caller-drain")
    try:
        cb = Answers("15m", delay=20)
        async with H.http_session(b.url, elicitation_callback=cb) as s:
            result = {}
            async with anyio.create_task_group() as tg:
                async def call():
                    with anyio.fail_after(30):
                        result["r"] = await s.call_tool(TOOL, FREEZE)

                tg.start_soon(call)
                await anyio.to_thread.run_sync(H.poll_until, lambda: cb.asked, 15, "the question")
                b.proc.popen.send_signal(signal.SIGTERM)
            r = result["r"]
            assert r.is_error and "shutting down" in text_of(r), H.dump(r)
    finally:
        b.stop()


async def test_caller_grant_covers_every_instance_under_cluster(tmp_path):
    """Under [cluster] a grant is kept in Redis (sealed, under a keyed name): approved on one instance, the caller's
    next call on another instance asks nothing."""
    import clusterlib as CL

    for tool in (CL.REDIS_SERVER, CL.REDIS_CLI):
        if not Path(tool).exists():
            pytest.fail(f"{tool} is missing (scripts/test.sh installs Debian's redis-server)")
    C.require(H.LEDGER_BIN)
    redis = CL.Redis(tmp_path)
    redis.start()
    policy = {"servers": ["ledger"], "tools": ["update_account_status"], "effect": "approve", "approval": "caller"}
    cluster = f'[cluster]\nredis_url = "{redis.url}"\nsecret_key = "${{MCPB_KEY}}"\n'
    env = {"MCPB_KEY": "k" * 40}
    brokers = []
    try:
        for name in ("appr-a", "appr-b"):
            d = tmp_path / name
            b = H.start_broker(d, {"ledger": H.example_stdio_spec(H.LEDGER_BIN)}, name=name, policies=[policy],
                               extra_toml=AUDIT + cluster, env=env)
            brokers.append((d, b))
            await anyio.to_thread.run_sync(H.wait_for_tools, b.url, [TOOL], 30)
        (da, a), (db, b) = brokers
        on_a, on_b = Answers("15m"), Answers("15m")
        async with H.http_session(a.url, elicitation_callback=on_a) as s:
            with anyio.fail_after(30):
                r = await s.call_tool(TOOL, FREEZE)
            assert not r.is_error and len(on_a.asked) == 1, H.dump(r)
        async with H.http_session(b.url, elicitation_callback=on_b) as s:
            with anyio.fail_after(30):
                r = await s.call_tool(TOOL, FREEZE)
            assert not r.is_error, H.dump(r)
        assert on_b.asked == [], "the grant given on instance a must cover the call on instance b"
        rec = O.wait_records(db / "audit.jsonl", lambda r: r["kind"] == "tool" and r["name"] == TOOL, "b's call")[0]
        assert rec["approval"]["state"] == "grant_used" and rec["approval"]["grant"] == "15m", rec
        keys = redis.cli("--scan", "--pattern", "mcpb:grant:*").split()
        assert len(keys) == 1 and "ledger" not in keys[0] and "anonymous" not in keys[0], keys
        value = redis.cli("GET", keys[0]).strip()
        # Sealed: base64url text of random-looking bytes (a short word can occur in that text by chance, so
        # the words are looked for in the decoded bytes).
        assert re.fullmatch(r"[A-Za-z0-9_-]+", value), value
        opened = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        assert b"15m" not in opened and b"anonymous" not in opened and b"ledger" not in opened, value
    finally:
        for _, b in brokers:
            b.stop()
        redis.stop()
