"""Hostile callers against inbound auth (issue 11, items 5 and 6), with the real authorization server
(tests/fixtures/as.mjs, oidc-provider):

- introspection amplification: repeats of one inactive opaque token must not each cost an RFC 7662 call at the
  AS (the AS fixture counts the introspection requests it receives at GET /__test/introspections);
- identity confusion: a client registered as `alice` gets opaque client_credentials tokens that introspect with
  `client_id = alice` and no `sub`. That client is not the user alice: it cannot use her session, and a Vault
  path templated on `{sub}` refuses it instead of reading hers.
"""

from __future__ import annotations

import base64
import hashlib
import secrets as pysecrets
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlencode, urljoin, urlparse

import anyio
import httpx2
import pytest

import helpers as H
import opslib as O

RUN = uuid.uuid4().hex[:8]
PREFIX = f"hostile-{RUN}"
USER_PATH = f"secret/data/{PREFIX}/users/{{sub}}/key"
CLI_REDIRECT = "http://127.0.0.1:8765/callback"  # registered for the fixture's public client `cli`; nothing listens


def introspections(auth_server: H.AuthServer) -> int:
    with httpx2.Client(timeout=10) as c:
        return c.get(auth_server.issuer + "/__test/introspections").json()["count"]


def user_token(auth_server: H.AuthServer, user: str, resource: str, scope: str = "mcp:tools") -> str:
    """authorization_code + PKCE for `user` through the fixture's headless login (login_hint picks the user):
    a JWT for `resource` whose `sub` is the user."""
    verifier = pysecrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    params = {"client_id": "cli", "response_type": "code", "redirect_uri": CLI_REDIRECT, "scope": scope,
              "code_challenge": challenge, "code_challenge_method": "S256", "login_hint": user,
              "resource": resource, "state": pysecrets.token_urlsafe(8)}
    url = auth_server.issuer + "/auth?" + urlencode(params)
    with httpx2.Client(timeout=20, follow_redirects=False) as c:
        code = None
        for _ in range(12):
            r = c.get(url)
            loc = r.headers.get("location")
            assert loc, f"the authorization flow stopped at {url}: HTTP {r.status_code} {r.text[:300]}"
            url = urljoin(url, loc)
            if url.startswith(CLI_REDIRECT):
                q = parse_qs(urlparse(url).query)
                assert "code" in q, f"no code: {q}"
                code = q["code"][0]
                break
        assert code, "the authorization flow did not reach the redirect"
        t = c.post(auth_server.token_endpoint, data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": CLI_REDIRECT, "client_id": "cli",
            "code_verifier": verifier, "resource": resource})
        assert t.status_code == 200, t.text
        return t.json()["access_token"]


@pytest.fixture(scope="module")
def vault(tmp_path_factory):
    logs = tmp_path_factory.mktemp("hostile-vault")
    root = "root-" + uuid.uuid4().hex
    proc, addr = H.start_vault_standin(logs, root)
    admin = H.VaultAdmin(addr, root, standin=True)
    admin.enable_approle()
    admin.put_policy(PREFIX, f'path "secret/data/{PREFIX}/*" {{\n  capabilities = ["read"]\n}}\n')
    role_id, secret_id = admin.create_approle(PREFIX, [PREFIX])
    alice_secret = f"alice-user-{uuid.uuid4().hex}"
    admin.kv2_put(f"secret/data/{PREFIX}/users/alice/key", {"token": alice_secret})
    yield admin, role_id, secret_id, alice_secret
    admin.close()
    proc.stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory, auth_server, vault):
    """Opaque tokens are introspected at the AS (as client `svc`); JWTs are verified with the AS's keys. One
    stdio server gets API_KEY from the caller's own Vault path `users/{sub}/key`."""
    admin, role_id, secret_id, _ = vault
    port = H.free_port()
    store = {"kind": "vault", "address": admin.address, "cache_ttl": "1s",
             "login": {"method": "approle", "role_id": role_id, "secret_id": secret_id}}
    extra = ["[credentials.vault]"] + [f"{H.toml_key(k)} = {H.toml_value(v)}" for k, v in store.items()]
    work = tmp_path_factory.mktemp("hostile-broker")
    extra += ["", "[audit]", 'file = "audit.jsonl"']
    b = H.start_broker(
        work,
        {"vaultenv": H.token_echo_stdio_spec("vaultenv", upstream_auth={
            "use": "vault", "path": USER_PATH, "field": "token", "env": "API_KEY"})},
        broker={"listen": f"127.0.0.1:{port}"},
        auth={"issuer": auth_server.issuer, "required_scopes": ["mcp:tools"],
              "introspection": {"endpoint": auth_server.issuer + "/token/introspection",
                                "client_id": "svc", "client_secret": "svc-secret"}},
        policies=[{"effect": "allow"}], extra_toml="\n".join(extra), name="broker-hostile")
    b.audit = work / "audit.jsonl"
    yield b
    b.stop()


def _init(url: str, token: str) -> httpx2.Response:
    return httpx2.post(url, json=H.init_body(), timeout=15, headers={
        "Content-Type": "application/json", "Accept": H.MCP_ACCEPT, "Authorization": f"Bearer {token}"})


def test_repeats_of_one_inactive_token_cost_at_most_two_introspections(broker, auth_server):
    """100 requests with one made-up opaque token (sequential, then 50 concurrent) reach the AS at most twice:
    the refusal is remembered and concurrent requests share one call. Before: one call per request."""
    token = "made-up-" + uuid.uuid4().hex
    before = introspections(auth_server)
    for _ in range(50):
        r = _init(broker.url, token)
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"], r.text
    with ThreadPoolExecutor(max_workers=25) as pool:
        statuses = list(pool.map(lambda _: _init(broker.url, token).status_code, range(50)))
    assert statuses == [401] * 50, statuses
    calls = introspections(auth_server) - before
    assert 1 <= calls <= 2, f"100 repeats of one inactive token cost {calls} introspection calls"
    assert token not in broker.proc.stderr_tail(10_000)


def test_many_distinct_inactive_tokens_each_cost_one_call_once(broker, auth_server):
    """Negative answers are per token: 20 distinct made-up tokens, each sent 3 times, cost 20 calls."""
    tokens = [f"made-up-{RUN}-{i}-{uuid.uuid4().hex}" for i in range(20)]
    before = introspections(auth_server)
    for _ in range(3):
        for t in tokens:
            assert _init(broker.url, t).status_code == 401
    assert introspections(auth_server) - before == 20


def test_client_named_alice_is_not_the_user_alice(broker, auth_server, vault):
    """A client registered as `alice` (its opaque token introspects with client_id = alice and no sub) is the
    caller `client.alice`: alice's session id answers it 404, and the `{sub}` Vault path refuses it with a
    clear error instead of reading alice's secret. The user alice (sub = alice) is served from her path."""
    admin, _, _, alice_secret = vault
    alice_path = f"GET /v1/secret/data/{PREFIX}/users/alice/key"
    user = user_token(auth_server, "alice", broker.url)
    assert H.jwt_claims(user)["sub"] == "alice"
    client = auth_server.token("alice", "alice-client-secret", scope="mcp:tools")
    assert client.count(".") != 2, "expected an opaque client_credentials token"

    # The user alice gets her own secret (control). Per-caller servers are listed once the caller connects.
    H.wait_for_tools(broker.url, ["vaultenv__getenv"], 30, headers=H.bearer(user))
    async def as_user() -> dict:
        async with H.http_session(broker.url, headers=H.bearer(user)) as s:
            r = await s.call_tool("vaultenv__getenv", {"name": "API_KEY"})
            assert not r.is_error, H.tool_text(r)
            return H.tool_json(r)

    g = anyio.run(as_user)
    assert g["present"] and g["sha256_prefix"] == H.sha256_prefix(alice_secret), g

    # Alice's session is hers only.
    with H.RawSession(broker.url, user) as s:
        s.initialize()
        assert s.request("tools/list")["result"]["tools"]
        r, _ = s.post("tools/list", token=client)
        assert r.status_code == 404, f"the client `alice` used the user alice's session: HTTP {r.status_code}"
        r, _ = s.post("tools/call", {"name": "vaultenv__getenv", "arguments": {"name": "API_KEY"}}, token=client)
        assert r.status_code == 404, r.text[:300]
        assert s.request("tools/list")["result"]["tools"], "alice's own session still works"

    # In its own session, the client cannot reach alice's Vault path.
    reads = admin.stats()["by_path"].get(alice_path, 0)
    with H.RawSession(broker.url, client) as s:
        s.initialize()
        r, rid = s.post("tools/call", {"name": "vaultenv__getenv", "arguments": {"name": "API_KEY"}})
        assert r.status_code == 200, r.text[:300]
        msg = H.final_response(r, rid)
        text = str(msg)
        assert H.sha256_prefix(alice_secret) not in text, f"the client `alice` got alice's secret: {text[:500]}"
        refused = "error" in msg or msg.get("result", {}).get("isError")
        assert refused, f"the call was not refused: {text[:500]}"
    assert admin.stats()["by_path"].get(alice_path, 0) == reads, "the broker read alice's path for the client"
    # The audit trail names the client as `client.alice`, never as the user alice.
    recs = O.wait_records(broker.audit, lambda r: r.get("client_id") == "alice" and r.get("name") == "vaultenv__getenv",
                          "the client's audited call")
    assert all(r["sub"] == "client.alice" for r in recs), recs
    log = broker.proc.stderr_tail(400)
    assert "acting for no user" in log or "acting for no user" in text, \
        f"no clear error about the missing user subject:\n{text[:500]}\n{log[-2000:]}"
