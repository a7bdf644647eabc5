"""Inbound OAuth: the broker as an OAuth 2.1 resource server, per-caller policy and session binding.

Checklist: RS-1..RS-6, RS-9..RS-18, RS-20, RS-25 and SB-1, SB-2 (/work/shared/SPEC-CHECKLIST.md §1, §5).

Tokens come from the real authorization server (tests/fixtures/as.mjs, oidc-provider) except for the bad-token
matrix, which needs tokens no real AS will issue (see `standin` below). Upstreams: ledger and identity_directory
over stdio. Callers (conftest.AUTH_CALLERS): alice-agent (mcp:tools pii:read audit:read), bob-agent (mcp:tools),
svc (mcp:tools ledger:write); policy: conftest.AUTH_POLICIES.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid

import httpx2
import pytest

import helpers as H
from conftest import (ALL_AUTH_TOOLS, AUTH_BROKER_LOG, AUTH_SCOPES_SUPPORTED, EXPECTED_TOOLS, MSG_BOB_IDENTITY,
                      MSG_PROMPT, MSG_RETENTION, MSG_WRITE, REFUSALS, auth_section)

PRM_PATHS = ["/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource"]
POLICY_MESSAGES = sorted(set(REFUSALS.values()) | {MSG_PROMPT, MSG_RETENTION})
RETENTION = "ledger+ledger://policies/retention"


def client() -> httpx2.Client:
    return httpx2.Client(timeout=20)


def result_text(result: dict) -> str:
    return "\n".join(c.get("text", "") for c in result.get("content", []) if isinstance(c, dict))


def post_init(url: str, headers: dict[str, str] | None = None, params: str = "") -> httpx2.Response:
    h = {"Content-Type": "application/json", "Accept": H.MCP_ACCEPT, **(headers or {})}
    with client() as c:
        return c.post(url + params, headers=h, json=H.init_body())


# --------------------------------------------------------------------------- the AS fixture itself


def test_auth_server_fixture_issues_the_expected_tokens(auth_server):
    """The fixture's contract the other tests rely on: client_credentials + resource -> a JWT for that resource with
    the client as sub/client_id and the granted scope; bob-agent cannot get more than mcp:tools."""
    resource = "http://127.0.0.1:9/mcp"
    with httpx2.Client(timeout=10) as c:
        meta = c.get(auth_server.issuer + "/.well-known/oauth-authorization-server").json()
    assert meta["issuer"] == auth_server.issuer and meta["registration_endpoint"], meta
    assert "S256" in meta["code_challenge_methods_supported"]
    tok = auth_server.token("alice-agent", "alice-secret", scope="mcp:tools pii:read audit:read", resource=resource)
    c = H.jwt_claims(tok)
    assert (c["sub"], c["client_id"], c["aud"], c["iss"]) == ("alice-agent", "alice-agent", resource, auth_server.issuer), c
    assert c["scope"].split() == ["mcp:tools", "pii:read", "audit:read"], c
    assert H.jwt_claims(auth_server.token("bob-agent", "bob-secret", scope="mcp:tools", resource=resource))["sub"] == "bob-agent"
    r = auth_server.token_response("bob-agent", "bob-secret", scope="mcp:tools pii:read", resource=resource)
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope", r.text


# --------------------------------------------------------------------------- RS-1..6: protected resource metadata


@pytest.mark.parametrize("path", PRM_PATHS)
def test_prm_document(auth_env, path):
    """RS-1..RS-6: both well-known URLs serve the PRM without a token; `resource` is exactly the printed URL."""
    b = auth_env.broker
    with client() as c:
        r = c.get(b.base + path)
    assert r.status_code == 200, f"GET {path}: HTTP {r.status_code} {r.text[:300]}"
    assert r.headers.get("content-type", "").split(";")[0].strip() == "application/json", r.headers.get("content-type")
    doc = r.json()
    assert doc == {
        "resource": b.url,
        "authorization_servers": [auth_env.auth_server.issuer],
        "scopes_supported": AUTH_SCOPES_SUPPORTED,
        "bearer_methods_supported": ["header"],
        "resource_name": "mcp-broker",
    }, json.dumps(doc, indent=1)
    assert "offline_access" not in doc["scopes_supported"]  # RS-8


def test_prm_points_at_a_working_authorization_server(auth_env):
    """The PRM's issuer really serves RFC 8414 metadata whose `issuer` is the same string (what clients check)."""
    with client() as c:
        doc = c.get(auth_env.prm_url).json()
        issuer = doc["authorization_servers"][0]
        meta = c.get(issuer + "/.well-known/oauth-authorization-server").json()
    assert meta["issuer"] == issuer
    assert "client_credentials" in meta["grant_types_supported"]


def test_healthz_stays_open(auth_env):
    with client() as c:
        r = c.get(auth_env.broker.base + "/healthz")
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- RS-9..12: the 401 challenge


@pytest.mark.parametrize("method", ["POST", "GET", "DELETE"])
def test_401_challenge_without_token(auth_env, method):
    """RS-9/10/11/12: no token -> 401, one Bearer challenge naming the PRM URL and scope, no `error` attribute."""
    b = auth_env.broker
    with client() as c:
        if method == "POST":
            r = c.post(b.url, headers={"Content-Type": "application/json", "Accept": H.MCP_ACCEPT}, json=H.init_body())
        else:
            r = c.request(method, b.url, headers={"Accept": "text/event-stream", "Mcp-Session-Id": "no-such-session"})
    assert r.status_code == 401, f"{method} /mcp without a token: HTTP {r.status_code} {r.text[:300]}"
    ch = H.bearer_challenge(r)
    assert ch.get("resource_metadata") == auth_env.prm_url, ch
    assert ch.get("scope") == "mcp:tools", ch
    assert "error" not in ch and "error_description" not in ch, f"RS-10: challenge to a token-less request has {ch}"


def test_401_challenge_leads_to_the_prm(auth_env):
    """What a client does with the challenge: fetch resource_metadata, get a document whose resource is /mcp."""
    r = post_init(auth_env.broker.url)
    assert r.status_code == 401
    with client() as c:
        doc = c.get(H.bearer_challenge(r)["resource_metadata"]).json()
    assert doc["resource"] == auth_env.broker.url


def test_valid_token_from_the_real_as(auth_env):
    """The happy path at the HTTP level: alice's client_credentials JWT initializes a session."""
    tok = auth_env.token("alice")
    claims = H.jwt_claims(tok)
    assert claims["aud"] == auth_env.broker.url and claims["sub"] == "alice-agent", claims
    r = post_init(auth_env.broker.url, H.bearer(tok))
    assert r.status_code == 200, f"HTTP {r.status_code} {r.headers.get('www-authenticate')} {r.text[:300]}"
    assert H.final_response(r, 1)["result"]["serverInfo"]


# --------------------------------------------------------------------------- RS-13..15/18: bad tokens


def assert_invalid_token(r: httpx2.Response, prm_url: str, what: str) -> None:
    assert r.status_code == 401, f"{what}: expected 401, got HTTP {r.status_code} {r.text[:300]}"
    ch = H.bearer_challenge(r)
    assert ch.get("error") == "invalid_token", f"{what}: {ch}"
    assert ch.get("error_description"), f"{what}: no error_description in {ch}"
    assert ch.get("resource_metadata") == prm_url, f"{what}: {ch}"


def test_token_for_another_resource_is_rejected(authed_env):
    """RS-14 with the real AS: a JWT whose aud is some other MCP server -> 401 invalid_token."""
    tok = authed_env.token("alice", resource="http://127.0.0.1:9/mcp")
    assert H.jwt_claims(tok)["aud"] == "http://127.0.0.1:9/mcp"
    assert_invalid_token(post_init(authed_env.broker.url, H.bearer(tok)), authed_env.prm_url, "aud = another server")


def test_opaque_token_is_rejected(auth_env):
    """A token requested without `resource` is opaque (not a JWT): the broker cannot validate it -> 401."""
    tok = auth_env.auth_server.token("alice-agent", "alice-secret", scope="mcp:tools")
    auth_env.issued.append(tok)
    assert tok.count(".") != 2
    assert_invalid_token(post_init(auth_env.broker.url, H.bearer(tok)), auth_env.prm_url, "opaque token")


def test_insufficient_required_scope_real_as(authed_env):
    """RS-17/18: a valid JWT from the real AS without mcp:tools -> 403 insufficient_scope naming mcp:tools."""
    tok = authed_env.token("svc", scope="ledger:write")
    r = post_init(authed_env.broker.url, H.bearer(tok))
    assert r.status_code == 403, f"HTTP {r.status_code} {r.text[:300]}"
    ch = H.bearer_challenge(r)
    assert ch.get("error") == "insufficient_scope" and ch.get("scope") == "mcp:tools", ch
    assert ch.get("resource_metadata") == authed_env.prm_url, ch


@pytest.mark.parametrize("with_header", [True, False], ids=["query+header", "query-only"])
def test_query_string_token_is_refused(auth_env, with_header):
    """RS-15: `?access_token=` -> 400 invalid_request, even when a valid header token is also present."""
    tok = auth_env.token("alice")
    r = post_init(auth_env.broker.url, H.bearer(tok) if with_header else None, params=f"?access_token={tok}")
    assert r.status_code == 400, f"HTTP {r.status_code} {r.text[:300]}"
    ch = H.bearer_challenge(r)
    assert ch.get("error") == "invalid_request", ch


class Standin:
    def __init__(self, broker: H.Broker, jwks: H.JwksServer, key, other_key, kid: str, issuer: str):
        self.broker, self.jwks, self.key, self.other_key, self.kid, self.issuer = broker, jwks, key, other_key, kid, issuer
        self.minted: list[str] = []

    @property
    def prm_url(self) -> str:
        return self.broker.base + "/.well-known/oauth-protected-resource/mcp"

    def claims(self, **over) -> dict:
        now = int(time.time())
        c = {"iss": self.issuer, "aud": self.broker.url, "sub": "carol", "client_id": "carol-agent",
             "scope": "mcp:tools", "iat": now - 5, "exp": now + 600, "jti": uuid.uuid4().hex}
        c.update(over)
        return {k: v for k, v in c.items() if v is not None}

    def mint(self, **over) -> str:
        t = H.mint_rs256(self.key, self.claims(**over), self.kid)
        self.minted.append(t)
        return t


@pytest.fixture(scope="module")
def standin(tmp_path_factory, auth_env_state):
    """A second broker whose [auth] trusts a test-generated RSA key published by a local JWKS server.

    Exists because a real AS cannot be made to issue expired, not-yet-valid, wrongly issued or addressed, badly
    signed or `alg: none` tokens; here the test mints them itself with pyjwt. With `jwks_uri` set, the issuer is
    only compared, never fetched, so it can be a name that does not resolve."""
    for b in (H.BROKER_BIN, H.LEDGER_BIN):
        if not b.exists():
            pytest.fail(f"{b} is missing")
    key, other = H.rsa_private_key(), H.rsa_private_key()
    kid = "test-key-1"
    jwks = H.JwksServer([H.public_jwk(key, kid)])
    issuer = "https://test-issuer.example"
    work = tmp_path_factory.mktemp("broker-standin")
    try:
        broker = H.start_broker(work, {"ledger": H.example_stdio_spec(H.LEDGER_BIN)}, name="broker-standin",
                                auth=auth_section(issuer, jwks_uri=jwks.url), policies=[{"effect": "allow"}],
                                env={"RUST_LOG": AUTH_BROKER_LOG})
    except Exception as e:  # noqa: BLE001
        jwks.stop()
        pytest.fail(f"stand-in broker failed to start: {e}")
    s = Standin(broker, jwks, key, other, kid, issuer)
    yield s
    broker.stop()
    jwks.stop()


def bad_tokens(s: Standin) -> dict[str, str]:
    now = int(time.time())
    good = s.mint()
    head, _payload, sig = good.split(".")
    elevated = H._b64url(json.dumps(s.claims(scope="mcp:tools pii:read audit:read ledger:write"),
                                    separators=(",", ":")).encode())
    return {
        "expired": s.mint(iat=now - 7200, exp=now - 3600),
        "nbf_in_future": s.mint(nbf=now + 3600),
        "iat_and_nbf_in_future": s.mint(iat=now + 3600, nbf=now + 3600, exp=now + 7200),
        "wrong_iss": s.mint(iss="https://evil-issuer.example"),
        "wrong_aud": s.mint(aud="http://127.0.0.1:9/mcp"),
        "aud_is_the_prm_url": s.mint(aud=s.prm_url),
        "bad_signature": H.mint_rs256(s.other_key, s.claims(), s.kid),
        "payload_swapped": f"{head}.{elevated}.{sig}",
        "alg_none": H.mint_alg_none(s.claims(), s.kid),
        "hs256_with_rsa_public_key": H.mint_hs256_with_key_bytes(H.public_pem(s.key), s.claims(), s.kid),
        "unknown_kid": H.mint_rs256(s.key, s.claims(), "no-such-key"),
        "garbage": "garbage",
        "three_garbage_segments": "aaa.bbb.ccc",
    }


BAD_CASES = ["expired", "nbf_in_future", "iat_and_nbf_in_future", "wrong_iss", "wrong_aud", "aud_is_the_prm_url",
             "bad_signature", "payload_swapped", "alg_none", "hs256_with_rsa_public_key", "unknown_kid", "garbage",
             "three_garbage_segments"]


def test_standin_control_token_is_accepted(standin):
    """The control for the matrix: a correctly minted token is accepted (else every 401 below proves nothing)."""
    r = post_init(standin.broker.url, H.bearer(standin.mint()))
    assert r.status_code == 200, f"HTTP {r.status_code} {r.headers.get('www-authenticate')} {r.text[:300]}"
    assert standin.jwks.hits >= 1, "the broker never fetched the configured jwks_uri"


def test_standin_aud_array_containing_the_resource_is_accepted(standin):
    """RS-14: `aud` may be an array; it must *contain* the broker's resource."""
    r = post_init(standin.broker.url, H.bearer(standin.mint(aud=["http://127.0.0.1:9/other", standin.broker.url])))
    assert r.status_code == 200, f"HTTP {r.status_code} {r.headers.get('www-authenticate')} {r.text[:300]}"


def test_standin_aud_compared_as_canonical_uri(standin):
    """RS-21: the audience comparison ignores the case of the scheme; an `aud` with a #fragment is not the broker."""
    upper = "HTTP" + standin.broker.url[len("http"):]
    r = post_init(standin.broker.url, H.bearer(standin.mint(aud=upper)))
    assert r.status_code == 200, f"aud {upper}: HTTP {r.status_code} {r.headers.get('www-authenticate')}"
    assert_invalid_token(post_init(standin.broker.url, H.bearer(standin.mint(aud=standin.broker.url + "#frag"))),
                         standin.prm_url, "aud with a fragment")


def test_standin_scheme_is_case_insensitive(standin):
    """RFC 7235 §2.1 / RFC 6750: the auth scheme is case-insensitive (`bearer TOKEN` works)."""
    r = post_init(standin.broker.url, {"Authorization": f"bearer {standin.mint()}"})
    assert r.status_code == 200, f"HTTP {r.status_code} {r.headers.get('www-authenticate')} {r.text[:300]}"


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_token_matrix(standin, case):
    """RS-13/14: each invalid token -> 401 with error="invalid_token", error_description and resource_metadata."""
    tok = bad_tokens(standin)[case]
    standin.minted.append(tok)
    assert_invalid_token(post_init(standin.broker.url, H.bearer(tok)), standin.prm_url, case)


def test_bad_token_inside_a_session(standin):
    """RS-16: a session opened with a good token; the next request with an expired token -> 401 invalid_token."""
    with H.RawSession(standin.broker.url, standin.mint()) as s:
        s.initialize()
        now = int(time.time())
        expired = standin.mint(iat=now - 7200, exp=now - 3600)
        r, _ = s.post("tools/list", {}, token=expired)
        assert_invalid_token(r, standin.prm_url, "expired token in a session")
        assert s.request("tools/list", {})["result"]["tools"], "the session should still work with the good token"


@pytest.mark.parametrize("scope", ["pii:read", None], ids=["other-scope", "no-scope-claim"])
def test_standin_insufficient_scope(standin, scope):
    """RS-17: a valid token without the required mcp:tools -> 403 insufficient_scope, scope="mcp:tools"."""
    r = post_init(standin.broker.url, H.bearer(standin.mint(scope=scope)))
    assert r.status_code == 403, f"HTTP {r.status_code} {r.text[:300]}"
    ch = H.bearer_challenge(r)
    assert ch.get("error") == "insufficient_scope" and ch.get("scope") == "mcp:tools", ch
    assert ch.get("resource_metadata") == standin.prm_url, ch


# --------------------------------------------------------------------------- RS-25: per-caller catalogs


async def sdk_catalog(url: str, headers: dict[str, str]) -> dict[str, set[str]]:
    async with H.http_session(url, headers=headers) as s:
        tools = {t.name for t in await H.list_all_tools(s)}
        prompts = {p.name for p in (await s.list_prompts()).prompts}
        resources = {str(r.uri) for r in (await s.list_resources()).resources}
        templates = {t.uri_template for t in (await s.list_resource_templates()).resource_templates}
    return {"tools": tools, "prompts": prompts, "resources": resources, "templates": templates}


@pytest.mark.anyio
async def test_callers_see_different_catalogs(authed_env):
    """RS-25 via the Python SDK: each caller's tools/list is exactly what the policy lets it call."""
    cats = {who: await sdk_catalog(authed_env.broker.url, authed_env.headers(who)) for who in EXPECTED_TOOLS}
    assert "ledger__get_customer_pii" in cats["alice"]["tools"] and "ledger__get_audit_log" in cats["alice"]["tools"]
    assert "ledger__get_customer_pii" not in cats["bob"]["tools"]
    assert "ledger__get_audit_log" not in cats["bob"]["tools"]
    for who, want in EXPECTED_TOOLS.items():
        got = cats[who]["tools"]
        assert got == want, f"{who}: missing {sorted(want - got)}, unexpected {sorted(got - want)}"
    # prompts and resources follow the same decision
    assert "ledger__summarize_account" in cats["alice"]["prompts"]
    assert "ledger__summarize_account" not in cats["bob"]["prompts"]
    assert RETENTION in cats["alice"]["resources"]
    assert RETENTION not in cats["bob"]["resources"]
    for who in cats:  # no rule applies to the account template: everyone authenticated sees it
        assert "ledger+ledger://accounts/{id}" in cats[who]["templates"], (who, cats[who]["templates"])


@pytest.mark.anyio
async def test_sdk_calls_follow_policy(authed_env):
    """Through the SDK: alice reads PII; bob's PII call is an isError result with the rule's message."""
    async with H.http_session(authed_env.broker.url, headers=authed_env.headers("alice")) as s:
        r = await s.call_tool("ledger__get_customer_pii", {"customer_id": "CUST-001"})
        assert not r.is_error, H.dump(r)
        assert "Margaret Ellison" in json.dumps(H.dump(r))
    async with H.http_session(authed_env.broker.url, headers=authed_env.headers("bob")) as s:
        r = await s.call_tool("ledger__get_customer_pii", {"customer_id": "CUST-001"})
        assert r.is_error, H.dump(r)
        text = json.dumps(H.dump(r))
        assert "PII access requires the pii:read scope." in text, text
        assert "Margaret Ellison" not in text and "4821" not in text
        r = await s.call_tool("ledger__list_accounts", {})
        assert not r.is_error, H.dump(r)


# Arguments that make each tool succeed (so "allowed" is checked end to end). Mutating tools get arguments that
# change nothing observable for other tests: activate an already active user, set an already active account active.
GOOD_ARGS = {
    "ledger__list_accounts": {},
    "ledger__get_account": {"account_id": "ACC-1001"},
    "ledger__list_transactions": {"account_id": "ACC-1001"},
    "ledger__update_account_status": {"account_id": "ACC-1003", "status": "active", "reason": "e2e no-op"},
    "ledger__get_customer_pii": {"customer_id": "CUST-002"},
    "ledger__get_audit_log": {"limit": 1},
    "ledger__reconcile_ledger": {"steps": 1, "step_ms": 0},
    "identity__lookup_user": {"username": "jdoe"},
    "identity__list_users": {},
    "identity__disable_user": {"username": "rgarcia", "reason": "Left the company (last working day 2025-01-31)"},
    "identity__activate_user": {"username": "mchen"},
}


def call_outcome(s: H.RawSession, tool: str) -> tuple[str, object]:
    """('http', response) for a non-200, ('error', jsonrpc error), or ('result', result)."""
    r, rid = s.post("tools/call", {"name": tool, "arguments": GOOD_ARGS.get(tool, {})})
    if r.status_code != 200:
        return "http", r
    m = H.final_response(r, rid)
    return ("error", m["error"]) if "error" in m else ("result", m["result"])


@pytest.mark.parametrize("who", sorted(EXPECTED_TOOLS))
def test_list_equals_callable(authed_env, who):
    """RS-25 property, over raw HTTP: every listed tool is not refused by policy; every other tool is refused
    (isError with the rule's message, or the step-up 403 for get_audit_log)."""
    with H.RawSession(authed_env.broker.url, authed_env.token(who)) as s:
        s.initialize()
        listed = {t["name"] for t in s.request("tools/list", {})["result"]["tools"]}
        problems = []
        for tool in sorted(ALL_AUTH_TOOLS | listed):
            kind, out = call_outcome(s, tool)
            if tool in listed:
                if kind == "http":
                    problems.append(f"{tool}: listed but HTTP {out.status_code} {out.headers.get('www-authenticate')}")
                    continue
                text = json.dumps(out)
                hit = [m for m in POLICY_MESSAGES if m in text]
                if hit:
                    problems.append(f"{tool}: listed but refused by policy: {hit}")
                elif kind == "result" and out.get("isError"):
                    problems.append(f"{tool}: listed but the call failed: {result_text(out)[:200]}")
            else:
                msg = REFUSALS.get(tool)
                if tool == "ledger__get_audit_log":
                    if kind != "http" or out.status_code != 403:
                        problems.append(f"{tool}: not listed; expected the step-up 403, got {kind} {str(out)[:200]}")
                    else:
                        ch = H.bearer_challenge(out)
                        if ch.get("error") != "insufficient_scope" or "audit:read" not in ch.get("scope", "").split():
                            problems.append(f"{tool}: 403 challenge {ch}")
                elif kind != "result" or not out.get("isError") or msg is None or msg not in result_text(out):
                    problems.append(f"{tool}: not listed; expected isError with {msg!r}, got {kind} {str(out)[:300]}")
        assert not problems, f"{who} (listed {sorted(listed)}):\n" + "\n".join(problems)


def test_refused_calls_never_reach_the_upstream(authed_env):
    """A refused mutating call changes nothing upstream: bob cannot disable jdoe, alice cannot freeze ACC-1001."""
    with H.RawSession(authed_env.broker.url, authed_env.token("bob")) as s:
        s.initialize()
        r = s.request("tools/call", {"name": "identity__disable_user", "arguments": {"username": "jdoe", "reason": "x"}})
        assert r["result"]["isError"] and MSG_BOB_IDENTITY in result_text(r["result"]), r
    with H.RawSession(authed_env.broker.url, authed_env.token("alice")) as s:
        s.initialize()
        r = s.request("tools/call", {"name": "ledger__update_account_status",
                                     "arguments": {"account_id": "ACC-1001", "status": "frozen", "reason": "x"}})
        assert r["result"]["isError"] and MSG_WRITE in result_text(r["result"]), r
        user = s.request("tools/call", {"name": "identity__lookup_user", "arguments": {"username": "jdoe"}})["result"]
        assert not user.get("isError") and '"active"' in json.dumps(user).lower(), user
        acct = s.request("tools/call", {"name": "ledger__get_account", "arguments": {"account_id": "ACC-1001"}})["result"]
        assert not acct.get("isError") and "frozen" not in json.dumps(acct).lower(), acct


def test_prompts_and_resources_follow_policy(authed_env):
    """The same decision for prompts and resources: bob's prompts/get and resources/read of refused entries fail
    with the rule's message; alice's succeed; an entry no rule restricts works for bob."""
    with H.RawSession(authed_env.broker.url, authed_env.token("alice")) as s:
        s.initialize()
        r = s.request("prompts/get", {"name": "ledger__summarize_account", "arguments": {"account_id": "ACC-1001"}})
        assert "result" in r and r["result"]["messages"], r
        r = s.request("resources/read", {"uri": RETENTION})
        assert "result" in r and r["result"]["contents"][0]["uri"] == RETENTION, r
    with H.RawSession(authed_env.broker.url, authed_env.token("bob")) as s:
        s.initialize()
        r = s.request("prompts/get", {"name": "ledger__summarize_account", "arguments": {"account_id": "ACC-1001"}})
        assert "error" in r and MSG_PROMPT in json.dumps(r["error"]), r
        r = s.request("resources/read", {"uri": RETENTION})
        assert "error" in r and MSG_RETENTION in json.dumps(r["error"]), r
        r = s.request("resources/read", {"uri": "ledger+ledger://accounts/ACC-1001"})
        assert "result" in r, r


MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "e2e-auth-stateless", "version": "0"},
}


def modern_post(url: str, token: str | None, rid: int, method: str, params: dict | None = None,
                name: str | None = None) -> httpx2.Response:
    h = {"Content-Type": "application/json", "Accept": H.MCP_ACCEPT, "MCP-Protocol-Version": "2026-07-28",
         "Mcp-Method": method}
    if name:
        h["Mcp-Name"] = name
    if token:
        h["Authorization"] = f"Bearer {token}"
    with client() as c:
        return c.post(url, headers=h, json={"jsonrpc": "2.0", "id": rid, "method": method,
                                            "params": {**(params or {}), "_meta": MODERN_META}})


def test_stateless_era_is_authorized_per_request(authed_env):
    """The 2026-07-28 stateless era on the same endpoint: no token -> 401; each caller's tools/list is its own
    (RS-25: never marked cacheScope "public"); bob's PII call is refused, his audit-log call gets the step-up 403."""
    url = authed_env.broker.url
    r = modern_post(url, None, 1, "tools/list")
    assert r.status_code == 401 and "error" not in H.bearer_challenge(r), f"HTTP {r.status_code}"
    lists = {}
    for who in ("alice", "bob"):
        r = modern_post(url, authed_env.token(who), 2, "tools/list")
        assert r.status_code == 200, f"{who}: HTTP {r.status_code} {r.text[:300]}"
        res = H.final_response(r, 2)["result"]
        lists[who] = {t["name"] for t in res["tools"]}
        assert res.get("cacheScope", "private") == "private", f"{who}'s per-caller list is cacheable across callers: {res.get('cacheScope')}"
        assert lists[who] == EXPECTED_TOOLS[who], f"{who}: {sorted(lists[who] ^ EXPECTED_TOOLS[who])}"
    bob = authed_env.token("bob")
    r = modern_post(url, bob, 3, "tools/call", {"name": "ledger__get_customer_pii", "arguments": {"customer_id": "CUST-001"}},
                    name="ledger__get_customer_pii")
    assert r.status_code == 200, f"HTTP {r.status_code} {r.text[:300]}"
    res = H.final_response(r, 3)["result"]
    assert res.get("isError") and "PII access requires the pii:read scope." in result_text(res), res
    r = modern_post(url, bob, 4, "tools/call", {"name": "ledger__get_audit_log", "arguments": {}}, name="ledger__get_audit_log")
    assert r.status_code == 403, f"HTTP {r.status_code} {r.text[:300]}"
    ch = H.bearer_challenge(r)
    assert ch.get("error") == "insufficient_scope" and "audit:read" in ch.get("scope", "").split(), ch


# --------------------------------------------------------------------------- RS-17: step-up


def test_step_up_403(authed_env):
    """RS-17: bob calling ledger__get_audit_log in a session -> HTTP 403 with an insufficient_scope challenge
    naming audit:read and the PRM; the session stays usable."""
    with H.RawSession(authed_env.broker.url, authed_env.token("bob")) as s:
        s.initialize()
        r, _ = s.post("tools/call", {"name": "ledger__get_audit_log", "arguments": {}})
        assert r.status_code == 403, f"HTTP {r.status_code} {r.text[:300]}"
        ch = H.bearer_challenge(r)
        assert ch.get("error") == "insufficient_scope", ch
        assert "audit:read" in ch.get("scope", "").split(), ch
        assert ch.get("resource_metadata") == authed_env.prm_url, ch
        assert '"entries"' not in r.text, "the refused call's body carries upstream data"
        assert s.request("tools/call", {"name": "ledger__list_accounts", "arguments": {}})["result"].get("isError") is not True
    # the step-up scope is really obtainable by a client that may have it, and then the call works
    with H.RawSession(authed_env.broker.url, authed_env.token("alice")) as s:
        s.initialize()
        r = s.request("tools/call", {"name": "ledger__get_audit_log", "arguments": {"limit": 1}})
        assert not r["result"].get("isError"), r


def test_bob_cannot_get_the_step_up_scope(auth_env):
    """The AS side of the story: bob-agent asking for audit:read gets invalid_scope (so policy is the only gate)."""
    r = auth_env.auth_server.token_response("bob-agent", "bob-secret", scope="mcp:tools audit:read",
                                            resource=auth_env.broker.url)
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope", r.text


# --------------------------------------------------------------------------- RS-16 / SB-2: session binding


def test_session_bound_to_its_user(authed_env):
    """SB-2/RS-16: alice's session id with bob's token -> 404 (never alice's session); no token -> 401;
    alice's token again -> works."""
    with H.RawSession(authed_env.broker.url, authed_env.token("alice")) as s:
        s.initialize()
        assert s.session_id, "the broker gave no Mcp-Session-Id"
        r, _ = s.post("tools/list", {}, token=authed_env.token("bob"))
        assert r.status_code == 404, f"bob with alice's session: HTTP {r.status_code} {r.text[:300]}"
        assert "get_customer_pii" not in r.text
        r, _ = s.post("tools/call", {"name": "ledger__get_customer_pii", "arguments": {"customer_id": "CUST-001"}},
                      token=authed_env.token("bob"))
        assert r.status_code == 404 and "Margaret" not in r.text, f"HTTP {r.status_code} {r.text[:300]}"
        r, _ = s.post("tools/list", {}, token=None)
        assert r.status_code == 401, f"no token in alice's session: HTTP {r.status_code} {r.text[:300]}"
        assert "error" not in H.bearer_challenge(r)
        tools = {t["name"] for t in s.request("tools/list", {})["result"]["tools"]}
        assert "ledger__get_customer_pii" in tools
        # a fresh token for the same user (same sub) keeps working in the session
        tools = {t["name"] for t in s.request("tools/list", {}, token=authed_env.token("alice", fresh=True))["result"]["tools"]}
        assert "ledger__get_customer_pii" in tools
        # bob cannot end alice's session either
        d = s.client.delete(s.url, headers=s.headers(token=authed_env.token("bob")))
        assert d.status_code == 404, f"DELETE by bob: HTTP {d.status_code}"
        assert s.request("tools/list", {})["result"]["tools"]


# --------------------------------------------------------------------------- `mcp-broker tools --token`


def run_tools_cli(auth_env, token: str, json_out: bool = True) -> subprocess.CompletedProcess:
    args = [str(H.BROKER_BIN), "tools", "--config", str(auth_env.broker.config_path), "--token", token]
    if json_out:
        args.append("--json")
    return subprocess.run(args, capture_output=True, text=True, timeout=90,
                          env={**os.environ, "RUST_LOG": AUTH_BROKER_LOG})


def test_tools_cli_with_token(authed_env):
    """`mcp-broker tools --config F --token T [--json]` shows the catalog as that caller sees it."""
    out = {}
    for who in ("alice", "bob"):
        p = run_tools_cli(authed_env, authed_env.token(who))
        assert p.returncode == 0, f"{who}: exit {p.returncode}\n{p.stderr[-2000:]}"
        out[who] = {e["name"] for e in json.loads(p.stdout)}
        assert out[who] == EXPECTED_TOOLS[who], f"{who}: {sorted(out[who] ^ EXPECTED_TOOLS[who])}"
        assert authed_env.token(who) not in p.stderr and "eyJ" not in p.stderr, "token in the tools command's log"
    p = run_tools_cli(authed_env, authed_env.token("bob"), json_out=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "ledger__list_accounts" in p.stdout and "ledger__get_customer_pii" not in p.stdout, p.stdout


# --------------------------------------------------------------------------- RS-20: no tokens in logs (keep last)


def test_no_tokens_in_broker_logs(auth_env, standin):
    """RS-20: after everything above, neither broker's stderr contains any token (or any JWT-looking text)."""
    logs = {
        "auth broker": auth_env.broker.proc.stderr_path.read_text(errors="replace"),
        "stand-in broker": standin.broker.proc.stderr_path.read_text(errors="replace"),
    }
    tokens = auth_env.issued + standin.minted
    assert len(tokens) >= 3, "too few tokens were used for this check to mean anything"
    for name, text in logs.items():
        assert text.strip(), f"{name} wrote no log at all"
        leaked = [t[:24] + "…" for t in tokens if len(t) > 12 and t in text]
        assert not leaked, f"{name} log contains tokens: {leaked}"
        for piece in {t.split(".")[2] for t in tokens if t.count(".") == 2 and len(t.split(".")[2]) > 16}:
            assert piece not in text, f"{name} log contains a token signature"
        m = re.search(r"eyJ[A-Za-z0-9_-]{8,}", text)
        assert not m, f"{name} log contains JWT-looking text: {m.group(0)[:40]}…"
