"""The audit trail (issue 5): one JSON record per request, field by field, for allowed, denied, failed, timed-out and
cancelled calls; argument hashing and masking; no secret in any record or log; the file's permissions, rotation and
survival of a SIGKILL; the stdout and log sinks; the `mcp-broker audit` reader; `check --stdio` refusing
`[audit] stdout = true`.

Upstreams are real: the `ledger` example over stdio, and tests/fixtures/token_echo_stdio.py holding a static secret.
Callers carry RS256 tokens minted by the test and published through a local JWKS server (opslib.Minter).
Each test uses its own subjects, so it finds its own records by `sub`.
"""

from __future__ import annotations

import json
import os
import re
import time
import signal
import stat
import subprocess
import threading
import uuid
from pathlib import Path

import anyio
import httpx2
import pytest

import helpers as H
import opslib as O

MSG_PII = "Customer PII needs pii:read (audit e2e)."
MSG_PROMPT = "Account summaries need pii:read (audit e2e)."
AUDIT_POLICIES = [
    {"servers": ["ledger"], "tools": ["get_customer_pii"], "require_scopes": ["pii:read"], "message": MSG_PII},
    {"servers": ["ledger"], "prompts": ["summarize_account"], "require_scopes": ["pii:read"], "message": MSG_PROMPT},
    {"effect": "allow"},
]
RETENTION = "ledger+ledger://policies/retention"


def require_bins() -> None:
    for b in (H.BROKER_BIN, H.LEDGER_BIN):
        if not b.exists():
            pytest.fail(f"{b} is missing (cargo build --all-targets)")


class AuditEnv:
    def __init__(self, broker: H.Broker, minter: O.Minter, audit: Path, static_secret: str, work: Path):
        self.broker, self.minter, self.audit, self.static_secret, self.work = broker, minter, audit, static_secret, work

    def token(self, sub: str, scope: str = "mcp:tools", **kw) -> str:
        return self.minter.token(self.broker, sub, scope, **kw)

    def records(self, sub: str, what: str, pred=lambda r: True, n: int = 1) -> list[dict]:
        return O.wait_records(self.audit, lambda r: r["sub"] == sub and pred(r), f"{what} (sub {sub})", n=n)

    def one(self, sub: str, what: str, pred=lambda r: True) -> dict:
        recs = self.records(sub, what, pred)
        assert len(recs) == 1, f"expected one record for {what}, got {len(recs)}: {recs}"
        O.check_shape(recs[0])
        return recs[0]


@pytest.fixture(scope="module")
def aenv(tmp_path_factory):
    """A broker with [auth] (test-minted tokens), [audit] file = "audit.jsonl" (hash), a ledger whose
    reconcile_ledger has a 1 s tool timeout, and a token-echo upstream started with a static secret."""
    require_bins()
    work = tmp_path_factory.mktemp("broker-audit")
    minter = O.Minter()
    static_secret = "static-audit-secret-" + uuid.uuid4().hex
    servers = {
        "ledger": H.example_stdio_spec(H.LEDGER_BIN, tool_limits={"reconcile_ledger": {"timeout": "1s"}}),
        "auditstatic": H.token_echo_stdio_spec("auditstatic", upstream_auth={
            "kind": "static", "env": {"API_KEY": "${E2E_AUDIT_STATIC}"}}),
    }
    try:
        broker = H.start_broker(work, servers, name="broker-audit", auth=minter.auth_config(),
                                policies=AUDIT_POLICIES,
                                extra_toml='[audit]\nfile = "audit.jsonl"\narguments = "hash"\n',
                                env={"RUST_LOG": "info,mcp_broker=debug,rmcp=warn", "E2E_AUDIT_STATIC": static_secret})
    except Exception:
        minter.stop()
        raise
    env = AuditEnv(broker, minter, work / "audit.jsonl", static_secret, work)
    try:
        H.wait_for_tools(broker.url, ["ledger__get_account", "auditstatic__getenv"], 30,
                         headers=H.bearer(env.token("readiness", "mcp:tools pii:read")))
        yield env
    finally:
        broker.stop()
        minter.stop()


def tool_text(result: dict) -> str:
    return "\n".join(c.get("text", "") for c in result.get("content", []) if isinstance(c, dict))


def uniq(who: str) -> str:
    return f"{who}-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- the record of each kind of call


def test_allowed_call_record(aenv):
    """An allowed tool call: every documented field, with the caller's identity, delegation chain, route, policy
    rule, credential kind, timings and the argument hash; the list in the same session has the same session id."""
    sub = uniq("alice")
    tok = aenv.token(sub, "mcp:tools pii:read", client_id="alice-agent",
                     act={"sub": "gateway-1", "act": {"sub": "orchestrator"}})
    args = {"account_id": "ACC-1001"}
    with H.RawSession(aenv.broker.url, tok) as s:
        s.initialize()
        listed = s.request("tools/list", {})
        r, rid = s.post("tools/call", {"name": "ledger__get_account", "arguments": args})
        res = H.final_response(r, rid)["result"]
    assert not res.get("isError"), res
    rec = aenv.one(sub, "the get_account call", lambda r: r["kind"] == "tool")
    lst = aenv.one(sub, "the tools/list", lambda r: r["kind"] == "list")
    assert rec["request_id"] == rid, rec
    assert lst["request_id"] == listed["id"], lst
    assert isinstance(rec["session"], int), rec  # (the first request's session: see the next test)
    expected = {
        "sub": sub, "client_id": "alice-agent", "act": ["gateway-1", "orchestrator"], "authenticated": True,
        "kind": "tool", "server": "ledger", "name": "ledger__get_account", "upstream_name": "get_account",
        "decision": "allow", "reason": "allowed by policy rule 3", "rule": "rule 3", "credential": "none",
        "outcome": "ok", "error": None, "arguments": O.canonical_sha256(args), "shown": None, "hidden": None,
    }
    assert {k: rec[k] for k in expected} == expected, json.dumps(rec, indent=1)
    assert rec["upstream_ms"] is not None and 0 < rec["upstream_ms"] <= rec["latency_ms"] < 30_000, rec


def test_every_request_of_a_session_names_it(aenv):
    """`session` is the broker's session number for every request of a stateful session, including the first one
    sent right after notifications/initialized (40 sessions: tools/list at once, then a call): never null, and the
    same for both requests of a session, different between sessions."""
    sub = uniq("alice")
    tok = aenv.token(sub)
    for _ in range(40):
        with H.RawSession(aenv.broker.url, tok) as s:
            s.initialize()
            s.request("tools/list", {})
            s.request("tools/call", {"name": "ledger__list_accounts", "arguments": {}})
    recs = aenv.records(sub, "40 lists and 40 calls", n=80)
    null = [(r["kind"], r["request_id"]) for r in recs if r["session"] is None]
    assert not null, f"{len(null)} of {len(recs)} records of stateful sessions have session null: {null}"
    by_session: dict[int, list[str]] = {}
    for r in recs:
        by_session.setdefault(r["session"], []).append(r["kind"])
    assert len(by_session) == 40 and all(sorted(k) == ["list", "tool"] for k in by_session.values()), by_session


def test_session_ids_differ_between_sessions(aenv):
    """Two sessions of the same caller get different `session` numbers; each record names its own."""
    sub = uniq("alice")
    tok = aenv.token(sub, "mcp:tools pii:read")
    for _ in range(2):
        with H.RawSession(aenv.broker.url, tok) as s:
            s.initialize()
            assert not s.request("tools/call", {"name": "ledger__list_accounts", "arguments": {}})["result"].get("isError")
    recs = aenv.records(sub, "two list_accounts calls", lambda r: r["kind"] == "tool", n=2)
    assert len({r["session"] for r in recs}) == 2, recs


def test_denied_call_record(aenv):
    """A tools/call refused by policy: the client gets an isError result with the rule's message; the record says
    deny/denied with the rule and reason, and no credential or upstream time (the call never went upstream)."""
    sub = uniq("bob")
    with H.RawSession(aenv.broker.url, aenv.token(sub)) as s:
        s.initialize()
        r, rid = s.post("tools/call", {"name": "ledger__get_customer_pii", "arguments": {"customer_id": "CUST-001"}})
        res = H.final_response(r, rid)["result"]
    assert res.get("isError") and MSG_PII in tool_text(res), res
    assert "Margaret" not in json.dumps(res)
    rec = aenv.one(sub, "the refused PII call", lambda r: r["kind"] == "tool")
    expected = {
        "request_id": rid, "client_id": f"{sub}-agent", "act": [], "authenticated": True, "kind": "tool",
        "server": "ledger", "name": "ledger__get_customer_pii", "upstream_name": "get_customer_pii",
        "decision": "deny", "reason": MSG_PII, "rule": "rule 1", "credential": None, "outcome": "denied",
        "upstream_ms": None, "arguments": O.canonical_sha256({"customer_id": "CUST-001"}),
    }
    assert {k: rec[k] for k in expected} == expected, json.dumps(rec, indent=1)


def test_denied_prompt_record(aenv):
    """prompts/get refused by policy: a JSON-RPC error with the message; record kind prompt, deny/denied, rule 2."""
    sub = uniq("bob")
    with H.RawSession(aenv.broker.url, aenv.token(sub)) as s:
        s.initialize()
        m = s.request("prompts/get", {"name": "ledger__summarize_account", "arguments": {"account_id": "ACC-1001"}})
    assert "error" in m and MSG_PROMPT in m["error"]["message"], m
    rec = aenv.one(sub, "the refused prompt", lambda r: r["kind"] == "prompt")
    assert (rec["server"], rec["name"], rec["upstream_name"], rec["decision"], rec["outcome"], rec["rule"],
            rec["reason"], rec["credential"]) == \
        ("ledger", "ledger__summarize_account", "summarize_account", "deny", "denied", "rule 2", MSG_PROMPT, None), rec


def test_unknown_tool_record(aenv):
    """An unknown tool: JSON-RPC -32602 to the client; record deny by `catalog`, outcome error, no server."""
    sub = uniq("alice")
    with H.RawSession(aenv.broker.url, aenv.token(sub)) as s:
        s.initialize()
        r, rid = s.post("tools/call", {"name": "ledger__no_such_tool", "arguments": {}})
        m = H.final_response(r, rid)
    assert m.get("error", {}).get("code") == -32602, m
    rec = aenv.one(sub, "the unknown-tool call", lambda r: r["kind"] == "tool")
    assert (rec["request_id"], rec["server"], rec["name"], rec["upstream_name"], rec["decision"], rec["rule"],
            rec["outcome"], rec["credential"], rec["upstream_ms"]) == \
        (rid, None, "ledger__no_such_tool", None, "deny", "catalog", "error", None, None), rec
    assert "ledger__no_such_tool" in rec["error"] and "unknown tool" in rec["error"], rec


def test_tool_error_record(aenv):
    """The upstream's own tool error (get_account with an id that does not exist): outcome tool_error, its text
    in `error`, decision allow, the call did go upstream."""
    sub = uniq("alice")
    with H.RawSession(aenv.broker.url, aenv.token(sub)) as s:
        s.initialize()
        res = s.request("tools/call", {"name": "ledger__get_account", "arguments": {"account_id": "ACC-0000"}})["result"]
    assert res.get("isError") and "ACC-0000" in tool_text(res), res
    rec = aenv.one(sub, "the failing get_account", lambda r: r["kind"] == "tool")
    assert (rec["decision"], rec["outcome"], rec["credential"]) == ("allow", "tool_error", "none"), rec
    assert "no account with id 'ACC-0000'" in rec["error"], rec
    assert rec["upstream_ms"] is not None, rec


def test_timeout_record(aenv):
    """A call whose upstream stays silent past the tool's timeout (1 s; reconcile sleeps 2 s before its only
    progress): the client gets an isError "did not answer within", the record says timeout."""
    sub = uniq("alice")
    with H.RawSession(aenv.broker.url, aenv.token(sub)) as s:
        s.initialize()
        res = s.request("tools/call", {"name": "ledger__reconcile_ledger", "arguments": {"steps": 1, "step_ms": 2000}})["result"]
    assert res.get("isError") and "did not answer within" in tool_text(res), res
    rec = aenv.one(sub, "the timed-out reconcile", lambda r: r["kind"] == "tool")
    assert (rec["name"], rec["decision"], rec["outcome"], rec["credential"]) == \
        ("ledger__reconcile_ledger", "allow", "timeout", "none"), rec
    assert "did not answer within 1s" in rec["error"], rec
    assert 900 <= rec["upstream_ms"] < 10_000, f"the 1 s timeout fired after {rec['upstream_ms']} ms: {rec}"


@pytest.mark.anyio
async def test_cancelled_record(aenv):
    """A call the client cancels (after its first progress) is recorded with outcome cancelled."""
    sub = uniq("alice")
    progress = []

    async def on_progress(p, total, message):
        progress.append(p)

    async with H.http_session(aenv.broker.url, headers=H.bearer(aenv.token(sub))) as s:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                async def call():
                    await s.call_tool("ledger__reconcile_ledger", {"steps": 50, "step_ms": 200},
                                      progress_callback=on_progress)
                tg.start_soon(call)
                await H.apoll_until(lambda: progress, 15, "the first reconcile progress")
                tg.cancel_scope.cancel()
        r = await s.call_tool("ledger__list_accounts", {})
        assert not r.is_error
    rec = await anyio.to_thread.run_sync(
        lambda: aenv.one(sub, "the cancelled reconcile", lambda r: r["name"] == "ledger__reconcile_ledger"))
    assert (rec["decision"], rec["outcome"], rec["server"], rec["credential"]) == ("allow", "cancelled", "ledger", "none"), rec
    assert rec["latency_ms"] < 10_000, rec  # cancelled promptly, not after the 10 s the reconcile would take
    assert rec["upstream_ms"] is not None, rec
    assert rec["error"] is None or "cancel" in rec["error"], rec


def test_list_records(aenv):
    """tools/list and prompts/list: kind list, name tools/prompts, no server, shown/hidden counts and the reason
    "N shown, M hidden by policy" matching what the caller was actually shown."""
    sub = uniq("bob")
    with H.RawSession(aenv.broker.url, aenv.token(sub)) as s:
        s.initialize()
        tools = s.request("tools/list", {})["result"]["tools"]
        prompts = s.request("prompts/list", {})["result"]["prompts"]
    assert "ledger__get_customer_pii" not in {t["name"] for t in tools}
    recs = {r["name"]: r for r in aenv.records(sub, "two list records", lambda r: r["kind"] == "list", n=2)}
    for name, shown, hidden in (("tools", len(tools), 1), ("prompts", len(prompts), 1)):
        rec = recs[name]
        O.check_shape(rec)
        assert (rec["server"], rec["upstream_name"], rec["decision"], rec["outcome"], rec["shown"], rec["hidden"],
                rec["reason"], rec["rule"], rec["credential"], rec["arguments"]) == \
            (None, None, "allow", "ok", shown, hidden, f"{shown} shown, {hidden} hidden by policy", None, None, None), rec


def test_resource_record(aenv):
    """resources/read: kind resource, the exposed URI as name, the upstream's own URI as upstream_name."""
    sub = uniq("alice")
    with H.RawSession(aenv.broker.url, aenv.token(sub)) as s:
        s.initialize()
        m = s.request("resources/read", {"uri": RETENTION})
    assert "result" in m, m
    rec = aenv.one(sub, "the resource read", lambda r: r["kind"] == "resource")
    assert (rec["server"], rec["name"], rec["upstream_name"], rec["decision"], rec["outcome"]) == \
        ("ledger", RETENTION, "ledger://policies/retention", "allow", "ok"), rec


def test_static_credential_record(aenv):
    """A server with a static secret: the record names the credential kind `static`, never the value."""
    sub = uniq("alice")
    with H.RawSession(aenv.broker.url, aenv.token(sub)) as s:
        s.initialize()
        res = s.request("tools/call", {"name": "auditstatic__getenv", "arguments": {"name": "API_KEY"}})["result"]
    assert not res.get("isError"), res
    data = res.get("structuredContent") or json.loads(tool_text(res))
    assert data.get("present") is True and data.get("name") == "API_KEY", data
    rec = aenv.one(sub, "the static-credential call", lambda r: r["kind"] == "tool")
    assert (rec["server"], rec["upstream_name"], rec["credential"], rec["outcome"]) == ("auditstatic", "getenv", "static", "ok"), rec


# The arguments below stay within what Python's json.dumps(sort_keys=True, separators=(",", ":")) and serde_json
# print identically: ASCII strings only (Python would \u-escape non-ASCII, serde_json writes UTF-8), and floats
# whose shortest representation is the same in both (2.5). Their canonical text is spelled out to make that visible.
HASH_ARGS = {"account_id": "ACC-1002", "z": [1, 2.5, True, None, {"b": "x", "a": "y"}], "m": {"k2": -7, "k1": "v w"}}
HASH_CANONICAL = '{"account_id":"ACC-1002","m":{"k1":"v w","k2":-7},"z":[1,2.5,true,null,{"a":"y","b":"x"}]}'


def test_argument_hash_is_canonical_sha256(aenv):
    """arguments = "hash": `sha256:` + SHA-256 of the JSON with sorted keys (nested too) and no whitespace; a call
    without `arguments` hashes as {}."""
    assert json.dumps(HASH_ARGS, sort_keys=True, separators=(",", ":")) == HASH_CANONICAL
    sub = uniq("alice")
    with H.RawSession(aenv.broker.url, aenv.token(sub)) as s:
        s.initialize()
        s.request("tools/call", {"name": "ledger__get_account", "arguments": HASH_ARGS})
        s.request("tools/call", {"name": "ledger__list_accounts"})
    recs = {r["name"]: r for r in aenv.records(sub, "two calls", lambda r: r["kind"] == "tool", n=2)}
    import hashlib

    assert recs["ledger__get_account"]["arguments"] == "sha256:" + hashlib.sha256(HASH_CANONICAL.encode()).hexdigest(), recs
    assert recs["ledger__list_accounts"]["arguments"] == "sha256:" + hashlib.sha256(b"{}").hexdigest(), recs


def test_audit_file_is_private_and_next_to_the_config(aenv):
    """`file = "audit.jsonl"` resolves against the config file's folder and is created with mode 0600."""
    assert aenv.audit.parent == aenv.broker.config_path.parent
    mode = stat.S_IMODE(aenv.audit.stat().st_mode)
    assert mode == 0o600, f"audit file mode {oct(mode)}"


def test_stateless_request_has_no_session(aenv):
    """A 2026-07-28 (stateless) tools/call has no broker session: `session` is null; the rest is recorded as usual."""
    sub = uniq("alice")
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "e2e-audit-stateless", "version": "0"}}
    h = {"Content-Type": "application/json", "Accept": H.MCP_ACCEPT, "MCP-Protocol-Version": "2026-07-28",
         "Mcp-Method": "tools/call", "Mcp-Name": "ledger__list_accounts", **H.bearer(aenv.token(sub))}
    with httpx2.Client(timeout=30) as c:
        r = c.post(aenv.broker.url, headers=h, json={"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                   "params": {"name": "ledger__list_accounts", "arguments": {}, "_meta": meta}})
    assert r.status_code == 200, r.text[:300]
    assert not H.final_response(r, 9)["result"].get("isError")
    rec = aenv.one(sub, "the stateless call", lambda r: r["kind"] == "tool")
    assert (rec["session"], rec["request_id"], rec["outcome"], rec["server"]) == (None, 9, "ok", "ledger"), rec


def test_no_secret_in_audit_or_log(aenv):
    """No bearer token (nor its signature, nor anything JWT-looking) and not the static secret in the audit file or
    the broker's debug log, after the calls of this module plus an allowed, a refused and a static-secret call."""
    for who, scope, tool, args in (("alice", "mcp:tools pii:read", "ledger__get_customer_pii", {"customer_id": "CUST-002"}),
                                   ("bob", "mcp:tools", "ledger__get_customer_pii", {"customer_id": "CUST-002"}),
                                   ("alice", "mcp:tools", "auditstatic__getenv", {"name": "API_KEY"})):
        with H.RawSession(aenv.broker.url, aenv.token(uniq(who), scope, act={"sub": "gw"})) as s:
            s.initialize()
            s.request("tools/list", {})
            s.request("tools/call", {"name": tool, "arguments": args})
    O.wait_records(aenv.audit, lambda r: r["name"] == "auditstatic__getenv", "the static-secret call")
    texts = {"audit file": aenv.audit.read_text(), "broker log": aenv.broker.proc.stderr_path.read_text(errors="replace")}
    tokens = list(aenv.minter.minted)
    assert len(tokens) >= 5, "too few tokens used for this check to mean anything"
    for name, text in texts.items():
        assert text.strip(), f"{name} is empty"
        assert aenv.static_secret not in text, f"the static secret is in the {name}"
        for t in tokens:
            assert t not in text, f"a bearer token is in the {name}"
            assert t.split(".")[2] not in text, f"a token signature is in the {name}"
        m = re.search(r"eyJ[A-Za-z0-9_-]{8,}", text)
        assert not m, f"JWT-looking text in the {name}: {m.group(0)[:40]}…"
        assert "Bearer " not in text, f"'Bearer ' in the {name}"


# --------------------------------------------------------------------------- arguments = "full" / "none"


def start_plain(work: Path, name: str, audit_toml: str, **kw) -> H.Broker:
    require_bins()
    return H.start_broker(work, {"ledger": H.example_stdio_spec(H.LEDGER_BIN)}, name=name,
                          extra_toml=audit_toml, **kw)


FAKE_JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhdWRpdC1lMmUifQ.c2lnbmF0dXJlLWF1ZGl0LWUyZQ"


def test_full_arguments_are_masked(tmp_path):
    """arguments = "full": the arguments are recorded, but values under secret-looking keys (password, api_key,
    client_secret, session_token, …) and credential-looking values ("Bearer …", JWTs) become "[masked]"; the
    secrets appear nowhere in the file or the log."""
    secrets = {"password": "hunter2-" + uuid.uuid4().hex, "bearer": "Bearer xyz-" + uuid.uuid4().hex,
               "api_key": "k-" + uuid.uuid4().hex, "client_secret": "cs-" + uuid.uuid4().hex,
               "session_token": "st-" + uuid.uuid4().hex}
    args = {"account_id": "ACC-1001", "password": secrets["password"], "note": secrets["bearer"],
            "nested": {"api_key": secrets["api_key"], "n": 1, "client_secret": secrets["client_secret"]},
            "session_token": secrets["session_token"], "jwt_value": FAKE_JWT,
            "list": ["plain", secrets["bearer"], {"Authorization": "Basic dXNlcjpwYXNz"}]}
    b = start_plain(tmp_path, "broker-audit-full", '[audit]\nfile = "audit.jsonl"\narguments = "full"\n')
    try:
        H.wait_for_tools(b.url, ["ledger__get_account"], 30)
        with H.RawSession(b.url, None) as s:
            s.initialize()
            s.request("tools/call", {"name": "ledger__get_account", "arguments": args})
        audit = tmp_path / "audit.jsonl"
        rec = O.wait_records(audit, lambda r: r["name"] == "ledger__get_account", "the call")[0]
        O.check_shape(rec)
        assert rec["arguments"] == {
            "account_id": "ACC-1001", "password": "[masked]", "note": "[masked]",
            "nested": {"api_key": "[masked]", "n": 1, "client_secret": "[masked]"},
            "session_token": "[masked]", "jwt_value": "[masked]",
            "list": ["plain", "[masked]", {"Authorization": "[masked]"}],
        }, json.dumps(rec["arguments"], indent=1)
        for text in (audit.read_text(), b.proc.stderr_path.read_text(errors="replace")):
            for k, v in secrets.items():
                assert v.split()[-1] not in text, f"{k} leaked"
            assert FAKE_JWT not in text and "dXNlcjpwYXNz" not in text
    finally:
        b.stop()


def test_arguments_none(tmp_path):
    """arguments = "none": the record carries no arguments at all (null)."""
    b = start_plain(tmp_path, "broker-audit-none", '[audit]\nfile = "audit.jsonl"\narguments = "none"\n')
    try:
        H.wait_for_tools(b.url, ["ledger__get_account"], 30)
        with H.RawSession(b.url, None) as s:
            s.initialize()
            s.request("tools/call", {"name": "ledger__get_account", "arguments": {"account_id": "ACC-1001"}})
        rec = O.wait_records(tmp_path / "audit.jsonl", lambda r: r["kind"] == "tool", "the call")[0]
        O.check_shape(rec)
        assert rec["arguments"] is None and "ACC-1001" not in (tmp_path / "audit.jsonl").read_text(), rec
        # without auth: the anonymous caller, unauthenticated, allowed by default
        assert (rec["sub"], rec["authenticated"], rec["client_id"], rec["rule"]) == ("anonymous", False, None, "default"), rec
    finally:
        b.stop()


# --------------------------------------------------------------------------- sinks


def test_stderr_records_go_to_the_log(tmp_path):
    """`[audit] stderr = true`: records are `mcp_broker::audit` events in the stderr log (lists only at debug)."""
    b = start_plain(tmp_path, "broker-audit-log", "[audit]\nstderr = true\n")
    try:
        H.wait_for_tools(b.url, ["ledger__list_accounts"], 30)
        with H.RawSession(b.url, None) as s:
            s.initialize()
            s.request("tools/call", {"name": "ledger__list_accounts", "arguments": {}})

        def line():
            for ln in b.proc.stderr_path.read_text(errors="replace").splitlines():
                if "mcp_broker::audit" in ln and "name=ledger__list_accounts" in ln:
                    return ln
        ln = H.poll_until(line, 15, "an mcp_broker::audit log event for the call")
        for key, value in (("sub", "anonymous"), ("kind", "tool"), ("server", "ledger"), ("decision", "allow"),
                           ("outcome", "ok")):
            assert re.search(rf'\b{key}="?{value}"?(\s|$)', ln), (key, value, ln)
        assert not list(tmp_path.glob("*.jsonl"))
        log = b.proc.stderr_path.read_text(errors="replace")
        assert not [ln for ln in log.splitlines() if "mcp_broker::audit" in ln and 'kind="list"' in ln], \
            "list records are logged at debug only"
    finally:
        b.stop()


def test_without_audit_section_the_log_holds_no_records(tmp_path):
    """No [audit]: a session that lists and calls (one unknown tool among them) leaves no audit record and no
    library WARN line on stderr; the start-up log says records are not kept."""
    b = start_plain(tmp_path, "broker-audit-none", "")
    try:
        H.wait_for_tools(b.url, ["ledger__list_accounts"], 30)
        with H.RawSession(b.url, None) as s:
            s.initialize()
            s.request("tools/list", {})
            s.request("tools/call", {"name": "ledger__list_accounts", "arguments": {}})
            s.post("tools/call", {"name": "ledger__no_such_tool", "arguments": {}})
        time.sleep(0.5)
        log = b.proc.stderr_path.read_text(errors="replace")
        assert "audit records are not kept" in log, log[-2000:]
        records = [ln for ln in log.splitlines() if "mcp_broker::audit: audit sub=" in ln]
        assert not records, records[:3]
        broker_warns = [ln for ln in log.splitlines()
                        if " WARN " in ln and "rmcp" in ln and "mcp_broker::upstream::stderr" not in ln]
        assert not broker_warns, broker_warns[:3]
    finally:
        b.stop()


def test_audit_stdout_sink(tmp_path):
    """`[audit] stdout = true` under `serve`: each record is one JSON line on stdout (after the listening line)."""
    b = start_plain(tmp_path, "broker-audit-stdout", "[audit]\nstdout = true\n")
    try:
        H.wait_for_tools(b.url, ["ledger__list_accounts"], 30)
        with H.RawSession(b.url, None) as s:
            s.initialize()
            s.request("tools/call", {"name": "ledger__list_accounts", "arguments": {}})

        def rec():
            for ln in list(b.proc.stdout_lines):
                if ln.startswith("{"):
                    v = json.loads(ln)
                    if v.get("name") == "ledger__list_accounts":
                        return v
        r = H.poll_until(rec, 15, "the call's record on stdout")
        O.check_shape(r)
        assert r["outcome"] == "ok" and r["kind"] == "tool"
        others = [ln for ln in b.proc.stdout_lines if not ln.startswith("{") and not H.BROKER_LISTEN_RE.match(ln)]
        assert not others, f"stdout carries something other than records: {others[:3]}"
    finally:
        b.stop()


def test_check_stdio_refuses_stdout_audit(tmp_path):
    """`check --stdio` fails naming audit.stdout when `[audit] stdout = true` (plain `check` accepts it), and
    `mcp-broker stdio` refuses to start with it."""
    require_bins()
    cfg = tmp_path / "servers.toml"
    cfg.write_text(H.render_config({"ledger": H.example_stdio_spec(H.LEDGER_BIN)}, extra_toml="[audit]\nstdout = true\n"))
    p = subprocess.run([str(H.BROKER_BIN), "check", "--stdio", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0, p.stdout
    assert "audit.stdout" in p.stderr, p.stderr
    p = subprocess.run([str(H.BROKER_BIN), "check", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([str(H.BROKER_BIN), "stdio", "--config", str(cfg)], capture_output=True, text=True, timeout=30,
                       input="")
    assert p.returncode != 0 and "audit.stdout" in p.stderr, (p.returncode, p.stderr)
    assert p.stdout == "", f"stdio wrote to stdout before refusing: {p.stdout[:200]!r}"
    # the same file with a file sink instead is fine for stdio
    cfg.write_text(H.render_config({"ledger": H.example_stdio_spec(H.LEDGER_BIN)},
                                   extra_toml='[audit]\nfile = "a.jsonl"\n'))
    p = subprocess.run([str(H.BROKER_BIN), "check", "--stdio", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr


# --------------------------------------------------------------------------- durability and rotation


def _hammer(url: str, stop: threading.Event, errors: list, tool: str, args: dict) -> None:
    try:
        with H.RawSession(url, None, timeout=10) as s:
            s.initialize()
            while not stop.is_set():
                s.post("tools/call", {"name": tool, "arguments": args})
    except Exception as e:  # noqa: BLE001 - the broker is killed under us; expected
        errors.append(e)


def test_audit_file_survives_sigkill(tmp_path):
    """SIGKILL the broker while calls are in flight from four clients in a loop: every line of the audit file is
    complete JSON (records are written whole, one line per write) and the file ends with a newline."""
    b = start_plain(tmp_path, "broker-audit-kill", '[audit]\nfile = "audit.jsonl"\narguments = "full"\n')
    audit = tmp_path / "audit.jsonl"
    stop = threading.Event()
    errors: list = []
    threads = [threading.Thread(target=_hammer, args=(b.url, stop, errors, tool, args), daemon=True)
               for tool, args in (("ledger__list_accounts", {}), ("ledger__get_account", {"account_id": "ACC-1001", "pad": "x" * 2000}),
                                  ("ledger__list_transactions", {"account_id": "ACC-1002"}),
                                  ("ledger__reconcile_ledger", {"steps": 2, "step_ms": 5}))]
    try:
        H.wait_for_tools(b.url, ["ledger__list_accounts"], 30)
        for t in threads:
            t.start()
        H.poll_until(lambda: len(O.audit_lines(audit)) >= 150, 60, "150 audit records")
        os.kill(b.proc.pid, signal.SIGKILL)
        b.proc.popen.wait(timeout=10)
        assert b.proc.popen.returncode == -signal.SIGKILL
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
        b.stop()
    recs = O.read_audit(audit)  # asserts every line parses and the file ends with "\n"
    assert len(recs) >= 150
    for r in recs:
        O.check_shape(r)


def test_rotation_and_reading_rotated_files(tmp_path):
    """max_file_size = "4KB", keep_files = 2: the file rotates to audit.jsonl.1 and .2 (never .3), each file stays
    within the size and holds only complete records, and `mcp-broker audit --json` reads them oldest first."""
    b = start_plain(tmp_path, "broker-audit-rotate",
                    '[audit]\nfile = "logs/audit.jsonl"\nmax_file_size = "4KB"\nkeep_files = 2\narguments = "none"\n')
    audit = tmp_path / "logs" / "audit.jsonl"
    try:
        H.wait_for_tools(b.url, ["ledger__list_accounts"], 30)
        with H.RawSession(b.url, None) as s:
            s.initialize()
            for _ in range(60):  # ~600 bytes a record: 60 records are ~36 KB, several rotations
                s.request("tools/call", {"name": "ledger__list_accounts", "arguments": {}})
            last_id = s._next_id
        H.poll_until(lambda: any(r.get("request_id") == last_id for r in O.read_audit(audit)), 15, "the last record")
    finally:
        b.stop()
    files = [audit.with_name("audit.jsonl.2"), audit.with_name("audit.jsonl.1"), audit]
    for f in files:
        assert f.exists(), f"{f.name} missing: {sorted(p.name for p in audit.parent.iterdir())}"
        assert f.stat().st_size <= 4096, f"{f.name} is {f.stat().st_size} bytes"
        O.read_audit(f)
    assert not audit.with_name("audit.jsonl.3").exists()
    p = subprocess.run([str(H.BROKER_BIN), "audit", "--file", str(audit), "--json", "--tool", "ledger__list_accounts"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    ids = [json.loads(ln)["request_id"] for ln in p.stdout.splitlines()]
    assert ids == sorted(ids) and ids[-1] == last_id, ids
    expected = [r["request_id"] for f in files for r in O.read_audit(f) if r["kind"] == "tool"]
    assert ids == expected, "the reader's order is not .2, .1, current"


# --------------------------------------------------------------------------- the `mcp-broker audit` reader


def rec(ts: str, sub: str, name: str, decision: str = "allow", outcome: str = "ok", server: str | None = "ledger",
        kind: str = "tool", reason: str = "allowed by policy rule 1", error: str | None = None, upstream: str | None = None) -> dict:
    return {"ts": ts, "request_id": 1, "session": 1, "sub": sub, "client_id": f"{sub}-agent", "act": [],
            "authenticated": True, "kind": kind, "server": server, "name": name,
            "upstream_name": upstream or (name.split("__", 1)[1] if "__" in name else None), "decision": decision,
            "reason": reason, "rule": "rule 1", "credential": "none" if decision == "allow" else None,
            "outcome": outcome, "error": error, "latency_ms": 1.5, "upstream_ms": 1.0 if decision == "allow" else None,
            "arguments": None, "shown": None, "hidden": None}


def iso(delta_s: float) -> str:
    import datetime as dt

    t = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=delta_s)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


@pytest.fixture
def crafted(tmp_path):
    """A hand-written trail: audit.jsonl.1 (older) and audit.jsonl (newer), with records from 3 days, 2 hours and
    a minute ago."""
    old = [
        rec(iso(-3 * 86400), "alice", "ledger__get_account"),
        rec(iso(-3 * 86400 + 1), "bob", "ledger__get_customer_pii", "deny", "denied", reason="PII needs pii:read"),
    ]
    new = [
        rec(iso(-7200), "alice", "ledger__list_accounts"),
        rec(iso(-7100), "bob", "identity__disable_user", "deny", "rate_limited", server="identity", reason="rate limit exceeded"),
        rec(iso(-60), "alice", "ledger__reconcile_ledger", outcome="timeout", error="server `ledger` did not answer within 1s"),
        rec(iso(-30), "carol", "ledger__get_account", outcome="tool_error", error="no account with id 'X'"),
    ]
    f = tmp_path / "audit.jsonl"
    f.with_name("audit.jsonl.1").write_text("".join(json.dumps(r) + "\n" for r in old))
    f.write_text("".join(json.dumps(r) + "\n" for r in new))
    return f, old + new


def run_audit(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([str(H.BROKER_BIN), "audit", *args], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, f"mcp-broker audit {args}: exit {p.returncode}\n{p.stderr}"
    return p


def json_names(p: subprocess.CompletedProcess) -> list[tuple[str, str]]:
    return [(r["sub"], r["name"]) for r in map(json.loads, p.stdout.splitlines())]


def test_audit_cli_table(crafted):
    """The table: header TIME SUB CLIENT KIND SERVER NAME DECISION OUTCOME MS REASON, one row per record, rotated
    file first, the error in the REASON column for failures, and the count on the last line."""
    f, all_recs = crafted
    lines = run_audit("--file", str(f)).stdout.splitlines()
    assert lines[0].split() == ["TIME", "SUB", "CLIENT", "KIND", "SERVER", "NAME", "DECISION", "OUTCOME", "MS", "REASON"], lines[0]
    assert lines[-1] == f"({len(all_recs)} records)", lines[-1]
    rows = lines[1:-1]
    assert len(rows) == len(all_recs)
    assert [r.split()[2] for r in rows] == [r["sub"] for r in all_recs], rows  # date, time, sub, …
    assert rows[0].startswith(all_recs[0]["ts"][:10] + " " + all_recs[0]["ts"][11:19]), rows[0]
    assert "did not answer within 1s" in rows[4] and "timeout" in rows[4], rows[4]
    assert "PII needs pii:read" in rows[1], rows[1]


def test_audit_cli_filters(crafted):
    """--sub, --denied (deny decisions, including rate_limited), --tool (glob on exposed or upstream name),
    --server, --outcome, --last and --json (the raw lines)."""
    f, all_recs = crafted
    fa = ("--file", str(f), "--json")
    assert json_names(run_audit(*fa, "--sub", "alice")) == \
        [("alice", "ledger__get_account"), ("alice", "ledger__list_accounts"), ("alice", "ledger__reconcile_ledger")]
    assert json_names(run_audit(*fa, "--denied")) == \
        [("bob", "ledger__get_customer_pii"), ("bob", "identity__disable_user")]
    assert json_names(run_audit(*fa, "--tool", "ledger__get_*")) == \
        [("alice", "ledger__get_account"), ("bob", "ledger__get_customer_pii"), ("carol", "ledger__get_account")]
    assert json_names(run_audit(*fa, "--tool", "disable_user")) == [("bob", "identity__disable_user")]  # upstream name
    assert json_names(run_audit(*fa, "--server", "identity")) == [("bob", "identity__disable_user")]
    assert json_names(run_audit(*fa, "--outcome", "timeout")) == [("alice", "ledger__reconcile_ledger")]
    assert json_names(run_audit(*fa, "--last", "2")) == [("alice", "ledger__reconcile_ledger"), ("carol", "ledger__get_account")]
    assert json_names(run_audit(*fa, "--sub", "alice", "--tool", "*reconcile*")) == [("alice", "ledger__reconcile_ledger")]
    # --json prints the stored lines themselves
    raw = (f.with_name("audit.jsonl.1").read_text() + f.read_text()).splitlines()
    assert run_audit(*fa).stdout.splitlines() == raw
    table = run_audit("--file", str(f), "--denied").stdout.splitlines()
    assert table[-1] == "(2 records)", table


def test_audit_cli_since(crafted):
    """--since keeps records newer than the given age (records crafted 3 days, 2 hours and a minute old)."""
    f, _ = crafted
    fa = ("--file", str(f), "--json")
    assert [n for _, n in json_names(run_audit(*fa, "--since", "10m"))] == ["ledger__reconcile_ledger", "ledger__get_account"]
    assert len(json_names(run_audit(*fa, "--since", "3h"))) == 4
    assert len(json_names(run_audit(*fa, "--since", "4d"))) == 6
    assert json_names(run_audit(*fa, "--since", "1h", "--sub", "carol")) == [("carol", "ledger__get_account")]


def test_audit_cli_reads_the_configured_file(tmp_path, crafted):
    """Without --file, `--config servers.toml` finds `[audit] file` (relative to that config's folder)."""
    f, all_recs = crafted
    cfg = f.parent / "servers.toml"
    cfg.write_text(H.render_config({"ledger": H.example_stdio_spec(H.LEDGER_BIN)}, extra_toml='[audit]\nfile = "audit.jsonl"\n'))
    out = subprocess.run([str(H.BROKER_BIN), "audit", "--config", str(cfg), "--json"], capture_output=True, text=True,
                         timeout=30, cwd="/")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == len(all_recs)
