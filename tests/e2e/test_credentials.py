"""Outbound credentials: what an upstream receives when the broker calls it for a caller.

Checklist: SPEC-CHECKLIST §1 RS-19 (no passthrough), §7 TX-2/3/5/6/7/8/10 (RFC 8693 token exchange as seen by a
real AS and a real resource server), §8 VK-1/4/6/10/11 (Vault KV v2 reads, AppRole login, re-login after a
revoked token), plus the issue's per-caller upstream sessions, static secrets, fallback chains and idle reaping.

Real parts:
- the authorization server `tests/fixtures/as.mjs` (oidc-provider) issues the callers' tokens (client_credentials for
  alice-agent / bob-agent, aud = the broker) and performs the broker's RFC 8693 exchanges (client `exchanger`; the
  issued JWT has sub = the caller, act.sub = "exchanger", aud = the requested resource, scope never broader);
- `tests/fixtures/protected_server.py`: a Python-SDK MCP server that validates JWTs against that AS (aud = its own
  URL, scope mcp:tools), or an API key from a file; its `whoami` reports the claims it saw and a SHA-256 prefix of
  the credential, and `/__seen` lists the prefix of every credential that ever arrived;
- `tests/fixtures/token_echo_stdio.py`: a stdio MCP server whose `whoami` decodes MCP_UPSTREAM_TOKEN from its own
  environment (one child per caller) and whose `getenv` reports a SHA-256 prefix of any env var;
- Vault: `tests/fixtures/vault_standin.py`, a stand-in that follows Vault's documented HTTP API (real Vault is not
  installable on the build machine). With VAULT_ADDR and VAULT_TOKEN set (a privileged token, e.g. a dev server's
  root token) the same tests seed and use that real Vault through its real API (HCL policy, AppRole) instead; the
  counters of `/__standin/stats` then give way to token accessors.

Brokers (one per concern, so a configuration the broker rejects fails only its own tests):
- `xb` exchange: prot/protpii/protfast (HTTP, protected server), echo/echofast/echocap (stdio, token in env);
- `vb` Vault: keyed (HTTP, X-Api-Key from secret/data/<p>/{sub}/keyed), vaultenv (stdio, env API_KEY),
  chain (first = [vault, exchange]);
- `sb` static: staticenv (stdio env), statichdr (HTTP header);
- `hb` hostile claims: [auth] trusts a test key, so tokens with path-traversal `sub` / claims can be minted.
No test reads a credential back from an upstream: fixtures only ever return SHA-256 prefixes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp.shared.exceptions import MCPError

import helpers as H
from conftest import AUTH_BROKER_LOG, AUTH_CALLERS, SUMMARY_LINES

pytestmark = pytest.mark.anyio

CALLERS = ("alice", "bob")
SUBJECT = {"alice": "alice-agent", "bob": "bob-agent"}
# Everything secret this module handles, for the log test at the end: caller tokens, exchanged tokens (recorded by
# the protected server, read from the echo children's environment), Vault secrets and Vault credentials.
SECRETS: set[str] = set()
RUN = uuid.uuid4().hex[:8]
VAULT_PREFIX = f"mcp-e2e-{RUN}"  # every KV path and the AppRole role of this run live under this name
APPROLE = f"mcp-broker-e2e-{RUN}"


def remember(*values: str) -> None:
    SECRETS.update(v for v in values if v)


# --------------------------------------------------------------------------- shared pieces


class Env:
    """One broker plus how to get caller tokens for it (aud = that broker) and talk to it."""

    def __init__(self, name: str, broker: H.Broker | None, auth_server: H.AuthServer | None, note: str = ""):
        self.name = name
        self.broker = broker
        self.auth_server = auth_server
        self.note = note
        self._tokens: dict[tuple, str] = {}

    def token(self, who: str, scope: str | None = None, fresh: bool = False) -> str:
        client_id, secret, default_scope = AUTH_CALLERS[who]
        key = (who, scope or default_scope)
        if fresh or key not in self._tokens:
            tok = self.auth_server.token(client_id, secret, scope=key[1], resource=self.broker.url)
            remember(tok)
            self._tokens[key] = tok
        return self._tokens[key]

    def session(self, who: str = "alice", token: str | None = None):
        return H.http_session(self.broker.url, headers=H.bearer(token or self.token(who)), timeout=30)

    def ready(self) -> "Env":
        if self.broker is None or self.note:
            pytest.fail(f"{self.name}: {self.note}")
        return self


def broker_env(name: str, work: Path, auth_server: H.AuthServer, servers: dict, credentials: dict,
               required_tools: list[str], env: dict[str, str] | None = None, auth: dict | None = None) -> Env:
    if not H.BROKER_BIN.exists():
        return Env(name, None, auth_server, f"{H.BROKER_BIN} is missing (cargo build)")
    extra = []
    for store, spec in credentials.items():
        extra.append(f"[credentials.{store}]")
        extra += [f"{H.toml_key(k)} = {H.toml_value(v)}" for k, v in spec.items()]
        extra.append("")
    try:
        broker = H.start_broker(work, servers, name=name,
                                auth=auth or {"issuer": auth_server.issuer, "required_scopes": ["mcp:tools"]},
                                policies=[{"effect": "allow"}], extra_toml="\n".join(extra),
                                env={"RUST_LOG": AUTH_BROKER_LOG, **(env or {})})
    except Exception as e:  # noqa: BLE001 - reported by every test that uses this broker
        return Env(name, None, auth_server, f"broker failed to start: {e}")
    e = Env(name, broker, auth_server)
    if auth is None:
        try:  # per-caller servers are listed once some caller has connected: alice's tools/list connects them
            H.wait_for_tools(broker.url, required_tools, timeout=30, headers=H.bearer(e.token("alice")))
        except Exception as ex:  # noqa: BLE001
            e.note = f"not ready: {ex}\n{broker.proc.stderr_tail(30)}"
    return e


def idp_store(auth_server: H.AuthServer) -> dict:
    return {"kind": "token_exchange", "token_endpoint": auth_server.token_endpoint, "client_id": "exchanger",
            "client_secret": "exchanger-secret"}


async def call(s, tool: str, args: dict | None = None):
    return await s.call_tool(tool, args or {})


async def call_json(s, tool: str, args: dict | None = None) -> dict:
    r = await call(s, tool, args)
    assert not r.is_error, f"{tool}: isError: {H.tool_text(r)[:800]}"
    return H.tool_json(r)


async def call_refused(s, tool: str, args: dict | None = None) -> str:
    """The call must fail cleanly: an isError result (or a JSON-RPC error); returns its text."""
    try:
        r = await call(s, tool, args)
    except MCPError as e:
        return f"JSON-RPC error: {e}"
    assert r.is_error, f"{tool}: expected an error, got {H.tool_text(r)[:500]}"
    return H.tool_text(r)


def assert_no_secret_in(text: str, what: str) -> None:
    leaked = [v[:10] + "…" for v in SECRETS if len(v) >= 8 and v in text]
    assert not leaked, f"{what} contains secrets: {leaked}"
    m = re.search(r"eyJ[A-Za-z0-9_-]{8,}", text)
    assert not m, f"{what} contains JWT-looking text: {m.group(0)[:24]}…"


def echo_children(broker: H.Broker, label: str) -> set[int]:
    """Live token_echo_stdio.py children with this label anywhere under the broker's process tree."""
    out = set()
    for pid in H.descendants(broker.proc.pid):
        argv = H.cmdline(pid)
        if any(a.endswith("token_echo_stdio.py") for a in argv) and label in argv and H.pid_alive(pid):
            out.add(pid)
    return out


def harvest_child_tokens(broker: H.Broker) -> None:
    """Exchanged tokens of live stdio children (their env), for the log test. Read from /proc, never printed."""
    for pid in H.descendants(broker.proc.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith(b"MCP_UPSTREAM_TOKEN="):
                remember(kv.split(b"=", 1)[1].decode(errors="replace"))


# --------------------------------------------------------------------------- module fixtures


@pytest.fixture(scope="module")
def cred_dirs(tmp_path_factory):
    logs = tmp_path_factory.mktemp("cred-logs")
    private = tmp_path_factory.mktemp("cred-private")  # recorded tokens, key files: never scanned as logs
    return logs, private


class Secrets:
    """The per-run secret values seeded into Vault and given as static credentials."""

    def __init__(self):
        mk = lambda tag: f"{tag}-{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}"  # noqa: E731
        self.keyed = {"alice": mk("alice-keyed"), "bob": mk("bob-keyed")}
        self.keyed_rotated = mk("alice-keyed-v2")
        self.chain_alice = mk("alice-chain")
        self.static_env = mk("static-env")
        self.static_hdr = mk("static-hdr")
        remember(*self.keyed.values(), self.keyed_rotated, self.chain_alice, self.static_env, self.static_hdr)

    def all_keys(self) -> list[str]:
        return [*self.keyed.values(), self.keyed_rotated, self.chain_alice, self.static_hdr]


@pytest.fixture(scope="module")
def secrets():
    return Secrets()


@pytest.fixture(scope="module")
def protected(auth_server, cred_dirs, secrets):
    """The protected MCP server: JWTs for its own URL from the AS, or an X-Api-Key listed in a file."""
    logs, private = cred_dirs
    keys = private / "api-keys.txt"
    keys.write_text("\n".join(secrets.all_keys()) + "\n")
    record = private / "protected-tokens.txt"
    up = H.start_protected_server(logs, auth_server.issuer, name="protected", api_key_header="X-Api-Key",
                                  api_keys_file=keys, record_tokens=record)
    up.record = record
    yield up
    up.stop()


def seen(protected) -> dict:
    with httpx2.Client(timeout=10) as c:
        return c.get(protected.url[: -len("/mcp")] + "/__seen").json()


class VaultEnv:
    def __init__(self, admin: H.VaultAdmin, proc: H.Proc | None, role_id: str, secret_id: str):
        self.admin, self.proc, self.role_id, self.secret_id = admin, proc, role_id, secret_id

    @property
    def standin(self) -> bool:
        return self.admin.standin

    def path(self, sub: str, leaf: str) -> str:
        return f"secret/data/{VAULT_PREFIX}/{sub}/{leaf}"

    def store(self, cache_ttl: str = "1s") -> dict:
        return {"kind": "vault", "address": self.admin.address, "cache_ttl": cache_ttl,
                "login": {"method": "approle", "role_id": self.role_id, "secret_id": self.secret_id}}

    def reads_of(self, sub: str, leaf: str) -> int:
        return self.admin.stats()["by_path"].get(f"GET /v1/{self.path(sub, leaf)}", 0)

    def approle_logins(self) -> int:
        return self.admin.stats()["logins"].get("approle", {}).get("ok", 0)


@pytest.fixture(scope="module")
def vault(cred_dirs, secrets):
    """Real Vault when VAULT_ADDR and VAULT_TOKEN are set, else the stand-in; seeded through Vault's HTTP API."""
    logs, _ = cred_dirs
    proc = None
    if os.environ.get("VAULT_ADDR") and os.environ.get("VAULT_TOKEN"):
        admin = H.VaultAdmin(os.environ["VAULT_ADDR"], os.environ["VAULT_TOKEN"], standin=False)
    else:
        if not H.VAULT_STANDIN_PY.exists():
            pytest.fail(f"{H.VAULT_STANDIN_PY} is missing and VAULT_ADDR/VAULT_TOKEN are not set")
        root = "root-" + uuid.uuid4().hex
        remember(root)
        proc, addr = H.start_vault_standin(logs, root)
        admin = H.VaultAdmin(addr, root, standin=True)
    try:
        admin.enable_approle()
        policy = f'path "secret/data/{VAULT_PREFIX}/*" {{\n  capabilities = ["read"]\n}}\n'
        admin.put_policy(APPROLE, policy)
        role_id, secret_id = admin.create_approle(APPROLE, [APPROLE])
        remember(secret_id)
        v = VaultEnv(admin, proc, role_id, secret_id)
        for who in CALLERS:
            admin.kv2_put(v.path(SUBJECT[who], "keyed"), {"token": secrets.keyed[who]})
        admin.kv2_put(v.path("alice-agent", "chain"), {"token": secrets.chain_alice})
        # bob has no chain secret: his calls fall back to the token exchange
    except BaseException:
        if proc:
            proc.stop()
        raise
    yield v
    if not admin.standin:  # leave a real Vault as we found it
        for who in CALLERS:
            admin.kv2_delete_all("secret", f"{VAULT_PREFIX}/{SUBJECT[who]}/keyed")
        admin.kv2_delete_all("secret", f"{VAULT_PREFIX}/alice-agent/chain")
        admin.revoke_accessors(admin.approle_token_accessors(APPROLE))
        admin.request("DELETE", f"auth/approle/role/{APPROLE}", ok=(200, 204, 404))
        admin.request("DELETE", f"sys/policies/acl/{APPROLE}", ok=(200, 204, 404))
    admin.close()
    if proc:
        proc.stop()


@pytest.fixture(scope="module")
def xb_state(tmp_path_factory, auth_server, protected):
    purl = protected.url
    exch = lambda **kw: {"use": "idp", "audience": purl, "scopes": ["mcp:tools"], **kw}  # noqa: E731
    servers = {
        "prot": {"transport": "http", "url": purl, "upstream_auth": exch(ttl="30s"),
                 "max_subjects": 64, "subject_idle_timeout": "2s"},
        "protpii": {"transport": "http", "url": purl, "upstream_auth": exch(tool_scopes={"whoami": ["pii:read"]})},
        "protfast": {"transport": "http", "url": purl, "upstream_auth": exch(ttl="1s")},
        "echo": H.token_echo_stdio_spec("echo", upstream_auth={"use": "idp", "audience": "urn:echo",
                                                               "scopes": ["mcp:tools"]},
                                        subject_idle_timeout="1s"),
        "echofast": H.token_echo_stdio_spec("echofast", upstream_auth={"use": "idp", "audience": "urn:echofast",
                                                                       "scopes": ["mcp:tools"], "ttl": "1s"}),
        "echocap": H.token_echo_stdio_spec("echocap", upstream_auth={"use": "idp", "audience": "urn:echo",
                                                                     "scopes": ["mcp:tools"]}, max_subjects=1),
    }
    env = broker_env("broker-xchg", tmp_path_factory.mktemp("broker-xchg"), auth_server, servers,
                     {"idp": idp_store(auth_server)},
                     ["prot__whoami", "protpii__whoami", "protfast__whoami", "echo__whoami", "echofast__whoami",
                      "echocap__whoami"])
    yield env
    if env.broker:
        harvest_child_tokens(env.broker)
        env.broker.stop()


@pytest.fixture
def xb(xb_state) -> Env:
    return xb_state.ready()


@pytest.fixture(scope="module")
def vb_state(tmp_path_factory, auth_server, protected, vault):
    purl = protected.url
    servers = {
        "keyed": {"transport": "http", "url": purl,
                  "upstream_auth": {"use": "vault", "path": f"secret/data/{VAULT_PREFIX}/{{sub}}/keyed",
                                    "field": "token", "header": "X-Api-Key", "format": "{value}"}},
        "vaultenv": H.token_echo_stdio_spec("vaultenv", upstream_auth={
            "use": "vault", "path": f"secret/data/{VAULT_PREFIX}/{{sub}}/keyed", "field": "token", "env": "API_KEY"}),
        "chain": {"transport": "http", "url": purl, "upstream_auth": {"first": [
            {"use": "vault", "path": f"secret/data/{VAULT_PREFIX}/{{sub}}/chain", "field": "token",
             "header": "X-Api-Key", "format": "{value}"},
            {"use": "idp", "audience": purl, "scopes": ["mcp:tools"]}]}},
    }
    env = broker_env("broker-vault", tmp_path_factory.mktemp("broker-vault"), auth_server, servers,
                     {"idp": idp_store(auth_server), "vault": vault.store()},
                     ["keyed__whoami", "vaultenv__getenv", "chain__whoami"])
    yield env
    if env.broker:
        env.broker.stop()


@pytest.fixture
def vb(vb_state) -> Env:
    return vb_state.ready()


@pytest.fixture(scope="module")
def sb_state(tmp_path_factory, auth_server, protected, secrets):
    servers = {
        "staticenv": H.token_echo_stdio_spec("staticenv", upstream_auth={
            "kind": "static", "env": {"API_KEY": "${CRED_E2E_STATIC_ENV}"}}),
        "statichdr": {"transport": "http", "url": protected.url,
                      "upstream_auth": {"kind": "static", "header": "X-Api-Key", "value": "${CRED_E2E_STATIC_HDR}"}},
    }
    env = broker_env("broker-static", tmp_path_factory.mktemp("broker-static"), auth_server, servers, {},
                     ["staticenv__getenv", "statichdr__whoami"],
                     env={"CRED_E2E_STATIC_ENV": secrets.static_env, "CRED_E2E_STATIC_HDR": secrets.static_hdr})
    yield env
    if env.broker:
        env.broker.stop()


@pytest.fixture
def sb(sb_state) -> Env:
    return sb_state.ready()


class Minter:
    """Tokens with any claims, signed by a test key that the hostile-claims broker trusts."""

    def __init__(self, broker_url: str, key, kid: str, issuer: str):
        self.broker_url, self.key, self.kid, self.issuer = broker_url, key, kid, issuer

    def mint(self, **claims) -> str:
        now = int(time.time())
        c = {"iss": self.issuer, "aud": self.broker_url, "sub": "alice-agent", "client_id": "alice-agent",
             "scope": "mcp:tools", "team": "alice-agent", "iat": now - 5, "exp": now + 600, "jti": uuid.uuid4().hex}
        c.update(claims)
        tok = H.mint_rs256(self.key, {k: v for k, v in c.items() if v is not None}, self.kid)
        remember(tok)
        return tok


@pytest.fixture(scope="module")
def hb_state(tmp_path_factory, auth_server, protected, vault):
    """A broker whose [auth] trusts a test key (jwks_uri), so the tests can mint callers with hostile claims."""
    key, kid, issuer = H.rsa_private_key(), "cred-test-key", "https://minted-issuer.example"
    jwks = H.JwksServer([H.public_jwk(key, kid)])
    purl = protected.url
    vault_hdr = lambda path: {"use": "vault", "path": path, "field": "token", "header": "X-Api-Key",  # noqa: E731
                              "format": "{value}"}
    servers = {
        "hsub": {"transport": "http", "url": purl,
                 "upstream_auth": vault_hdr(f"secret/data/{VAULT_PREFIX}/{{sub}}/keyed")},
        "hclaim": {"transport": "http", "url": purl,
                   "upstream_auth": vault_hdr(f"secret/data/{VAULT_PREFIX}/{{claims.team}}/keyed")},
    }
    env = broker_env("broker-hostile", tmp_path_factory.mktemp("broker-hostile"), auth_server, servers,
                     {"vault": vault.store()}, [],
                     auth={"issuer": issuer, "jwks_uri": jwks.url, "required_scopes": ["mcp:tools"]})
    minter = Minter(env.broker.url, key, kid, issuer) if env.broker else None
    if env.broker:
        try:
            H.wait_for_tools(env.broker.url, ["hsub__whoami", "hclaim__whoami"], timeout=30,
                             headers=H.bearer(minter.mint()))
        except Exception as ex:  # noqa: BLE001
            env.note = f"not ready: {ex}\n{env.broker.proc.stderr_tail(30)}"
    yield env, minter
    if env.broker:
        env.broker.stop()
    jwks.stop()


@pytest.fixture
def hb(hb_state):
    env, minter = hb_state
    env.ready()
    return env, minter


# --------------------------------------------------------------------------- the fixtures themselves


def exchange_directly(auth_server: H.AuthServer, subject_token: str, target: str, scope: str | None = None,
                      param: str = "resource") -> httpx2.Response:
    data = {"grant_type": H.TOKEN_EXCHANGE_GRANT, "subject_token": subject_token,
            "subject_token_type": H.ACCESS_TOKEN_TYPE, param: target}
    if scope:
        data["scope"] = scope
    with httpx2.Client(timeout=20) as c:
        return c.post(auth_server.token_endpoint, data=data, auth=("exchanger", "exchanger-secret"))


async def test_fixture_protected_server_accepts_only_tokens_for_itself(auth_server, protected):
    """The fixture contract the broker tests rely on: a token exchanged for the server's URL is accepted and
    described; a caller's own token (aud elsewhere) and garbage are refused with a logged reason."""
    alice = auth_server.token("alice-agent", "alice-secret", scope="mcp:tools pii:read",
                              resource="http://127.0.0.1:9/mcp")
    r = exchange_directly(auth_server, alice, protected.url, scope="mcp:tools")
    assert r.status_code == 200, r.text
    exchanged = r.json()["access_token"]
    remember(alice, exchanged)
    async with H.http_session(protected.url, headers=H.bearer(exchanged), timeout=10) as s:
        w = await call_json(s, "whoami")
    assert w == {"auth": "bearer", "sub": "alice-agent", "client_id": "exchanger", "scopes": ["mcp:tools"],
                 "aud": protected.url, "act": {"sub": "exchanger"}, "exp": H.jwt_claims(exchanged)["exp"],
                 "token_sha256_prefix": H.sha256_prefix(exchanged)}, w
    before = seen(protected)["rejected"]
    for bad in (alice, "garbage"):
        with pytest.raises(BaseException):
            async with H.http_session(protected.url, headers=H.bearer(bad), timeout=10) as s:
                await s.list_tools()
    assert seen(protected)["rejected"] >= before + 2
    log = protected.proc.stderr_path.read_text()
    assert "InvalidAudienceError" in log and "rejected:" in log, log[-2000:]
    # bob cannot get a scope he does not hold through the exchange either (what test 3 relies on)
    bob = auth_server.token("bob-agent", "bob-secret", scope="mcp:tools", resource="http://127.0.0.1:9/mcp")
    remember(bob)
    r = exchange_directly(auth_server, bob, protected.url, scope="mcp:tools pii:read")
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope", r.text
    # a logical (non-URI) audience is accepted by the AS as RFC 8693 `audience`
    r = exchange_directly(auth_server, alice, "urn:echo", scope="mcp:tools", param="audience")
    assert r.status_code == 200 and H.jwt_claims(r.json()["access_token"])["aud"] == "urn:echo", r.text
    remember(r.json()["access_token"])


async def test_fixture_token_echo_stdio():
    """token_echo_stdio.py over the SDK's stdio client: no env -> sub null; a JWT in MCP_UPSTREAM_TOKEN -> its
    claims; getenv reports presence and a SHA-256 prefix only."""
    py, script = str(H.VENV_PYTHON), str(H.TOKEN_ECHO_PY)
    async with H.stdio_session(py, [script, "t1"], env={"PATH": os.environ.get("PATH", "")}) as s:
        w = await call_json(s, "whoami")
        assert w["sub"] is None and w["label"] == "t1", w
        assert (await call_json(s, "getenv", {"name": "API_KEY"}))["present"] is False
    fake = H._segments({"alg": "none"}, {"sub": "carol", "aud": "urn:echo", "scope": "mcp:tools",
                                         "act": {"sub": "exchanger"}}) + ".sig"
    async with H.stdio_session(py, [script], env={"MCP_UPSTREAM_TOKEN": fake, "API_KEY": "k-123"}) as s:
        w = await call_json(s, "whoami")
        assert (w["sub"], w["aud"], w["scope"], w["act"]) == ("carol", "urn:echo", "mcp:tools", {"sub": "exchanger"})
        assert w["token_sha256_prefix"] == H.sha256_prefix(fake)
        g = await call_json(s, "getenv", {"name": "API_KEY"})
        assert g["present"] and g["sha256_prefix"] == H.sha256_prefix("k-123") and "k-123" not in json.dumps(g)


# --------------------------------------------------------------------------- 1. exchange: who the upstream sees


async def test_exchanged_token_per_caller(xb, protected):
    """RS-19, TX-3/5/8/10: each caller's upstream token is its own exchanged token: sub = the caller, aud = the
    upstream, act.sub = the exchanging client, scope narrowed to the server's `scopes`; never the caller's token.
    Within `ttl` the exchanged token is reused (cache)."""
    results = {}
    for who in CALLERS:
        own = xb.token(who)
        async with xb.session(who) as s:
            p1 = await call_json(s, "prot__whoami")
            p2 = await call_json(s, "prot__whoami")
            e = await call_json(s, "echo__whoami")
        harvest_child_tokens(xb.broker)
        results[who] = (p1, e)
        assert p1["auth"] == "bearer" and p1["sub"] == SUBJECT[who], p1
        assert p1["aud"] == protected.url, p1
        assert (p1["act"] or {}).get("sub") == "exchanger" and p1["client_id"] == "exchanger", p1
        assert p1["scopes"] == ["mcp:tools"], f"{who}: scope not narrowed to the server's scopes: {p1}"
        assert p1["token_sha256_prefix"] != H.sha256_prefix(own), f"{who}'s own token reached the upstream"
        assert p2["token_sha256_prefix"] == p1["token_sha256_prefix"], "exchanged token not reused within ttl"
        assert e["sub"] == SUBJECT[who] and e["aud"] == "urn:echo" and e["scope"] == "mcp:tools", e
        assert (e["act"] or {}).get("sub") == "exchanger", e
        assert e["token_sha256_prefix"] != H.sha256_prefix(own), f"{who}'s own token reached the stdio child"
    assert results["alice"][0]["token_sha256_prefix"] != results["bob"][0]["token_sha256_prefix"]
    assert results["alice"][1]["pid"] != results["bob"][1]["pid"], "alice and bob share one stdio child"
    # the callers' own tokens never arrived at the protected server at all (not even refused)
    arrived = set(seen(protected)["bearer"])
    assert not {H.sha256_prefix(xb.token(w)) for w in CALLERS} & arrived


# --------------------------------------------------------------------------- 2. concurrency proof


async def test_parallel_callers_never_mix(xb):
    """alice and bob in parallel, two sessions each, 320 calls over HTTP (prot) and stdio (echo): every single
    result names its own caller, and no upstream token or stdio child ever serves both."""
    per_session = 40
    results: list[tuple[str, str, dict]] = []
    errors: list[str] = []

    async def one_session(who: str):
        async with xb.session(who) as s:
            async def one(tool: str):
                try:
                    r = await call(s, tool)
                    if r.is_error:
                        errors.append(f"{who} {tool}: {H.tool_text(r)[:300]}")
                    else:
                        results.append((who, tool, H.tool_json(r)))
                except Exception as e:  # noqa: BLE001 - collected, asserted below
                    errors.append(f"{who} {tool}: {e!r}")

            async with anyio.create_task_group() as tg:
                for i in range(per_session):
                    tg.start_soon(one, "prot__whoami")
                    tg.start_soon(one, "echo__whoami")

    with anyio.fail_after(100):
        async with anyio.create_task_group() as tg:
            for who in CALLERS:
                for _ in range(2):
                    tg.start_soon(one_session, who)
    harvest_child_tokens(xb.broker)
    assert not errors, f"{len(errors)} calls failed, e.g. {errors[:3]}"
    assert len(results) == 2 * 2 * 2 * per_session
    wrong = [(who, tool, r.get("sub")) for who, tool, r in results if r.get("sub") != SUBJECT[who]]
    assert not wrong, f"{len(wrong)} of {len(results)} results name another caller, e.g. {wrong[:5]}"
    for tool, key in (("prot__whoami", "token_sha256_prefix"), ("echo__whoami", "pid"),
                      ("echo__whoami", "token_sha256_prefix")):
        by = {who: {r[key] for w, t, r in results if w == who and t == tool} for who in CALLERS}
        assert not by["alice"] & by["bob"], f"{tool}: the same {key} served alice and bob: {by}"


# --------------------------------------------------------------------------- 3. per-tool scopes


async def test_tool_scopes_narrow_per_tool(xb):
    """TX-5/7: protpii has tool_scopes = {whoami = [pii:read]}: alice's whoami token carries mcp:tools + pii:read;
    bob (no pii:read) gets an isError naming the server and `invalid_scope`, with no token in it."""
    async with xb.session("alice") as s:
        w = await call_json(s, "protpii__whoami")
        plain = await call_json(s, "prot__whoami")
    assert w["sub"] == "alice-agent" and sorted(w["scopes"]) == ["mcp:tools", "pii:read"], w
    assert w["token_sha256_prefix"] != plain["token_sha256_prefix"], "different scope must mean a different token"
    async with xb.session("bob") as s:
        text = await call_refused(s, "protpii__whoami")
        ok = await call_json(s, "prot__whoami")  # the refusal is per tool: bob's other calls still work
    assert "protpii" in text and "invalid_scope" in text, f"error does not name server and OAuth error: {text!r}"
    assert_no_secret_in(text, "the credential error")
    assert ok["sub"] == "bob-agent"


# --------------------------------------------------------------------------- 4. Vault


async def test_vault_secret_per_subject(vb, vault, secrets):
    """VK-1/6: the upstream receives alice's KV v2 secret for alice and bob's for bob (HTTP header and stdio env),
    the broker logged in with AppRole."""
    for who in CALLERS:
        async with vb.session(who) as s:
            w = await call_json(s, "keyed__whoami")
            g = await call_json(s, "vaultenv__getenv", {"name": "API_KEY"})
            t = await call_json(s, "vaultenv__whoami")
        assert w["auth"] == "api_key" and w["api_key_sha256_prefix"] == H.sha256_prefix(secrets.keyed[who]), \
            f"{who} got the wrong X-Api-Key: {w}"
        assert g["present"] and g["sha256_prefix"] == H.sha256_prefix(secrets.keyed[who]), f"{who}: {g}"
        assert t["sub"] is None, f"a vault-credentialed stdio child also got a token: {t}"
    if vault.standin:
        assert vault.approle_logins() >= 1, vault.admin.stats()


async def test_vault_secret_rotation_after_cache_ttl(vb, vault, secrets, protected):
    """VK-10: KV values are re-read after `cache_ttl` (1 s): a new version of alice's secret reaches the upstream."""
    path = vault.path("alice-agent", "keyed")
    try:
        vault.admin.kv2_put(path, {"token": secrets.keyed_rotated})
        d = H.Deadline(15)
        while True:
            async with vb.session("alice") as s:
                w = await call_json(s, "keyed__whoami")
            if w.get("api_key_sha256_prefix") == H.sha256_prefix(secrets.keyed_rotated):
                break
            assert w.get("api_key_sha256_prefix") == H.sha256_prefix(secrets.keyed["alice"]), w
            assert not d.expired(), "the rotated secret never reached the upstream (cache_ttl = 1s)"
            await anyio.sleep(0.5)
    finally:
        vault.admin.kv2_put(path, {"token": secrets.keyed["alice"]})


async def test_vault_relogin_once_after_token_revoked(vb, vault, secrets):
    """VK-11: the broker's Vault token is revoked behind its back; the next reads get 403, the broker logs in
    again exactly once, and both callers get their secrets."""
    async with vb.session("alice") as s:  # make sure the broker holds a Vault token
        await call_json(s, "keyed__whoami")
    held = vault.admin.approle_token_accessors(APPROLE)
    assert held, "the broker holds no AppRole token"
    logins = vault.approle_logins() if vault.standin else None
    vault.admin.revoke_accessors(held)
    await anyio.sleep(1.5)  # past cache_ttl (1 s): the next calls must read Vault again
    for who in CALLERS:
        async with vb.session(who) as s:
            w = await call_json(s, "keyed__whoami")
        assert w["api_key_sha256_prefix"] == H.sha256_prefix(secrets.keyed[who]), (who, w)
    now_held = vault.admin.approle_token_accessors(APPROLE)
    assert len(now_held) == 1 and not set(now_held) & set(held), f"AppRole tokens after re-login: {now_held}"
    if vault.standin:
        stats = vault.admin.stats()
        assert vault.approle_logins() - logins == 1, f"expected exactly one re-login: {stats['logins']}"


async def test_vault_transient_errors_are_retried(vb, vault, secrets):
    """VK-11: Vault answers 503 (sealed/standby) twice; the broker retries the read (bounded: 3 attempts) and
    the call succeeds with the right secret, without a re-login."""
    if not vault.standin:
        pytest.skip("failure injection needs the stand-in")
    await anyio.sleep(1.2)  # past cache_ttl (1 s): the next call reads Vault again
    logins_before = vault.approle_logins()
    r = vault.admin.client.post(f"{vault.admin.address}/__standin/fail",
                                json={"status": 503, "count": 2, "path_prefix": f"/v1/secret/data/{VAULT_PREFIX}/"})
    assert r.status_code in (200, 204), r.text
    async with vb.session("alice") as s:
        w = await call_json(s, "keyed__whoami")
    assert w["api_key_sha256_prefix"] == H.sha256_prefix(secrets.keyed["alice"]), w
    stats = vault.admin.stats()
    assert stats["injected_failures"] >= 2, stats
    assert vault.approle_logins() == logins_before, "a 503 is not a reason to log in again"


async def test_vault_fallback_chain(vb, vault, secrets, protected):
    """first = [vault, exchange]: alice has a chain secret -> X-Api-Key; bob has none (404) -> the exchange."""
    async with vb.session("alice") as s:
        a = await call_json(s, "chain__whoami")
    assert a["auth"] == "api_key" and a["api_key_sha256_prefix"] == H.sha256_prefix(secrets.chain_alice), a
    async with vb.session("bob") as s:
        b = await call_json(s, "chain__whoami")
    assert b["auth"] == "bearer" and b["sub"] == "bob-agent" and b["aud"] == protected.url, b
    assert (b["act"] or {}).get("sub") == "exchanger", b
    if vault.standin:
        assert vault.reads_of("bob-agent", "chain") >= 1, "bob's chain path was never looked up in Vault"


async def test_upstream_refusal_retried_once_then_clear_error(vb, vault, secrets, protected):
    """An upstream that refuses the credential (401 on connect) makes the broker fetch a fresh one once (Vault
    re-read) and retry; refused again, the caller gets an isError naming the server, with no secret in it."""
    bogus = f"not-accepted-{uuid.uuid4().hex}"
    remember(bogus)
    path = vault.path("alice-agent", "keyed")
    try:
        vault.admin.kv2_put(path, {"token": bogus})
        await anyio.sleep(1.5)  # past cache_ttl
        async with vb.session("alice") as s:
            text = await call_refused(s, "keyed__whoami")
        assert "keyed" in text, f"the error does not name the server: {text!r}"
        assert_no_secret_in(text, "the refusal")
        tries = seen(protected)["api_key"].get(H.sha256_prefix(bogus), 0)
        assert tries == 2, f"the upstream saw the refused key {tries} times (expected: one try + one retry)"
    finally:
        vault.admin.kv2_put(path, {"token": secrets.keyed["alice"]})
    await anyio.sleep(1.5)
    async with vb.session("alice") as s:  # and recovers once the secret is good again
        w = await call_json(s, "keyed__whoami")
    assert w["api_key_sha256_prefix"] == H.sha256_prefix(secrets.keyed["alice"]), w


HOSTILE_VALUES = ["../bob-agent", "alice-agent/../bob-agent", "alice-agent/../../bob-agent", "bob-agent/keyed",
                  "..", "", "./bob-agent", "bob-agent\u0000"]


async def test_vault_path_template_refuses_hostile_claims(hb, vault, secrets):
    """A `{sub}` or `{claims.NAME}` that would climb out of or add segments to the path is refused (isError
    naming the server), Vault never gets a request for another subject's path, and nobody gets bob's secret."""
    env, minter = hb
    bob_prefix = H.sha256_prefix(secrets.keyed["bob"])
    async with env.session(token=minter.mint()) as s:  # control: a benign caller gets alice's secret
        w = await call_json(s, "hsub__whoami")
        assert w["api_key_sha256_prefix"] == H.sha256_prefix(secrets.keyed["alice"]), w
        w = await call_json(s, "hclaim__whoami")
        assert w["api_key_sha256_prefix"] == H.sha256_prefix(secrets.keyed["alice"]), w
    bob_reads = vault.reads_of("bob-agent", "keyed") if vault.standin else None
    cases = [("hsub", {"sub": v}) for v in HOSTILE_VALUES if v] + \
            [("hclaim", {"team": v}) for v in HOSTILE_VALUES] + \
            [("hclaim", {"team": ["bob-agent"]}), ("hclaim", {"team": {"x": "../bob-agent"}}),
             ("hclaim", {"team": None})]
    problems = []
    for server, claims in cases:
        async with env.session(token=minter.mint(**claims)) as s:
            try:
                r = await call(s, f"{server}__whoami")
            except MCPError:
                continue  # refused as a JSON-RPC error: acceptable
            text = H.tool_text(r)
            assert bob_prefix not in text, f"{server} {claims}: got bob's secret"
            if not r.is_error:
                problems.append(f"{server} {claims!r}: accepted -> {text[:200]}")
            elif server not in text:
                problems.append(f"{server} {claims!r}: error does not name the server: {text[:200]}")
            assert_no_secret_in(text, f"{server} {claims}")
    assert not problems, "\n".join(problems)
    if vault.standin:
        stats = vault.admin.stats()
        assert vault.reads_of("bob-agent", "keyed") == bob_reads, "a hostile claim made the broker read bob's path"
        odd = [p for p in stats["by_path"] if VAULT_PREFIX in p and (".." in p or "%2e" in p.lower() or "//" in p)]
        assert not odd, f"Vault saw traversal-looking paths: {odd}"


# --------------------------------------------------------------------------- 5. static secrets


async def test_static_env_reaches_the_stdio_child(sb, secrets):
    """`{ kind = "static", env = { API_KEY = "${...}" } }`: the child has API_KEY (and no caller token); a
    static credential needs no per-caller child, so both callers reach the same process."""
    pids = {}
    for who in CALLERS:
        async with sb.session(who) as s:
            g = await call_json(s, "staticenv__getenv", {"name": "API_KEY"})
            t = await call_json(s, "staticenv__whoami")
        assert g["present"] and g["sha256_prefix"] == H.sha256_prefix(secrets.static_env), g
        assert t["sub"] is None, f"the caller's token reached a static-credential child: {t}"
        pids[who] = g["pid"]
    assert pids["alice"] == pids["bob"], f"static credential but one child per caller: {pids}"


async def test_static_header_reaches_the_http_upstream(sb, secrets):
    """`{ kind = "static", header = "X-Api-Key", value = "${...}" }` on HTTP: the upstream authenticates the key."""
    for who in CALLERS:
        async with sb.session(who) as s:
            w = await call_json(s, "statichdr__whoami")
        assert w["auth"] == "api_key" and w["api_key_sha256_prefix"] == H.sha256_prefix(secrets.static_hdr), w


# --------------------------------------------------------------------------- 6. expiry and refresh


async def test_exchanged_token_refreshed_after_ttl(xb):
    """TX-6: with ttl = "1s" the broker exchanges again: two calls 2 s apart carry different tokens, over HTTP and
    over stdio (where the child is replaced, since a process's env cannot change)."""
    async with xb.session("alice") as s:
        h1 = await call_json(s, "protfast__whoami")
        e1 = await call_json(s, "echofast__whoami")
        harvest_child_tokens(xb.broker)
        await anyio.sleep(2.0)
        h2 = await call_json(s, "protfast__whoami")
        e2 = await call_json(s, "echofast__whoami")
        harvest_child_tokens(xb.broker)
    assert h1["sub"] == h2["sub"] == "alice-agent" and e1["sub"] == e2["sub"] == "alice-agent"
    assert h1["token_sha256_prefix"] != h2["token_sha256_prefix"], "HTTP upstream got the same token after ttl"
    assert e1["token_sha256_prefix"] != e2["token_sha256_prefix"], "stdio child kept its token after ttl"
    assert e1["pid"] != e2["pid"], "the stdio child was not replaced when its credential was refreshed"


async def test_refreshed_stdio_child_replaces_the_old_one(xb):
    """Issue #4: a per-caller stdio child is *replaced* when its credential is refreshed: once the new child serves
    the caller, the old one (holding the superseded token) exits, well before echofast's subject_idle_timeout
    (the default, 5m) would reap it."""
    async with xb.session("alice") as s:
        e1 = await call_json(s, "echofast__whoami")
        await anyio.sleep(2.0)
        e2 = await call_json(s, "echofast__whoami")
        harvest_child_tokens(xb.broker)
        assert e1["pid"] != e2["pid"] and e1["token_sha256_prefix"] != e2["token_sha256_prefix"], (e1, e2)
        H.poll_until(lambda: not H.pid_alive(e1["pid"]), 10,
                     f"the superseded child {e1['pid']} to exit (it still holds the old token)")
        assert H.pid_alive(e2["pid"]), "the current child died too"


async def test_ttl_applies_per_server_when_audience_is_shared(xb):
    """prot (ttl 30s) and protfast (ttl 1s) exchange for the same audience and scope. A token cached for prot must
    not outlive protfast's 1 s: two protfast calls 2 s apart carry different tokens even right after a prot call."""
    async with xb.session("alice") as s:
        await call_json(s, "prot__whoami")
        h1 = await call_json(s, "protfast__whoami")
        await anyio.sleep(2.0)
        h2 = await call_json(s, "protfast__whoami")
    assert h1["token_sha256_prefix"] != h2["token_sha256_prefix"], \
        "protfast reused a token for longer than its ttl (1s): the exchange cache ignores the server's ttl " \
        "when another server with a longer ttl cached a token for the same (subject, audience, scope)"


# --------------------------------------------------------------------------- 7. idle reaping


async def test_idle_per_caller_children_are_reaped(xb):
    """subject_idle_timeout = "1s" on echo: after serving alice and bob, their children leave the broker's
    process tree, while alice's MCP session stays open; her next call gets a fresh child."""
    pids = {}
    async with xb.session("alice") as alice:
        for who in CALLERS:
            async with (contextlib.nullcontext(alice) if who == "alice" else xb.session(who)) as s:
                pids[who] = (await call_json(s, "echo__whoami"))["pid"]
                live = echo_children(xb.broker, "echo")  # right away: the child may be reaped 1 s from now
                harvest_child_tokens(xb.broker)
            assert pids[who] in live, f"{who}'s child {pids[who]} is not under the broker ({live})"
        assert pids["alice"] != pids["bob"]
        d = H.Deadline(20)
        while echo_children(xb.broker, "echo"):
            assert not d.expired(), f"idle children still running after 20 s: {echo_children(xb.broker, 'echo')}"
            await anyio.sleep(0.2)
        # Out of the tree first, then gone: an exiting child can still show as alive for a moment.
        await H.apoll_until(lambda: not any(H.pid_alive(p) for p in pids.values()), 10,
                            "the reaped children to exit")
        again = await call_json(alice, "echo__whoami")  # the open session still works
    assert again["sub"] == "alice-agent" and again["pid"] != pids["alice"], again


async def test_max_subjects_evicts_least_recently_used(xb):
    """echocap has max_subjects = 1: bob's connection evicts alice's (her child exits); alice's next call opens a
    fresh child for her again. At no point does one caller's call reach the other's child."""
    async with xb.session("alice") as a, xb.session("bob") as b:
        a1 = await call_json(a, "echocap__whoami")
        b1 = await call_json(b, "echocap__whoami")
        harvest_child_tokens(xb.broker)
        assert (a1["sub"], b1["sub"]) == ("alice-agent", "bob-agent") and a1["pid"] != b1["pid"]
        H.poll_until(lambda: not H.pid_alive(a1["pid"]), 10, f"alice's evicted child {a1['pid']} to exit")
        assert len(echo_children(xb.broker, "echocap")) <= 1, echo_children(xb.broker, "echocap")
        a2 = await call_json(a, "echocap__whoami")
        harvest_child_tokens(xb.broker)
        assert a2["sub"] == "alice-agent" and a2["pid"] not in (a1["pid"], b1["pid"]), a2
        H.poll_until(lambda: len(echo_children(xb.broker, "echocap")) <= 1, 10, "at most one echocap child")


async def test_per_caller_tools_are_listed_for_every_caller(xb):
    """The per-caller servers' tools appear in every caller's tools/list (listed through some caller's
    connection), bob's included, even for protpii whose whoami he cannot call."""
    want = {f"{srv}__whoami" for srv in ("prot", "protpii", "protfast", "echo", "echofast", "echocap")}
    for who in CALLERS:
        names = await H.tool_names(xb.broker.url, H.bearer(xb.token(who)))
        assert want <= names, f"{who} misses {sorted(want - names)}"


# --------------------------------------------------------------------------- 8. no secrets in logs (keep last)


def test_vault_jwt_login_uses_an_exchanged_token(tmp_path, auth_server, vault, secrets):
    """VK-7/VK-8: per-user Vault login. The broker exchanges the caller's token for Vault's audience
    ("vault") and logs in to auth/jwt with that; each user reads only their own path through a templated
    policy. The caller's own broker-audience token is refused by the same Vault role."""
    admin = vault.admin
    mounts = admin.request("GET", "sys/auth")
    mounts = mounts.get("data", mounts)
    if "jwt/" not in mounts:
        admin.request("POST", "sys/auth/jwt", {"type": "jwt"}, ok=(200, 204, 400))
        mounts = admin.request("GET", "sys/auth")
        mounts = mounts.get("data", mounts)
    accessor = mounts["jwt/"]["accessor"]
    admin.request("POST", "auth/jwt/config", {"jwks_url": auth_server.jwks_uri, "bound_issuer": auth_server.issuer})
    role = f"mcp-broker-jwt-{RUN}"
    admin.put_policy(role, f'path "secret/data/{VAULT_PREFIX}/users/{{{{identity.entity.aliases.{accessor}.name}}}}/*" {{\n'
                           '  capabilities = ["read"]\n}\n')
    admin.request("POST", f"auth/jwt/role/{role}", {"role_type": "jwt", "bound_audiences": ["vault"],
                                                     "user_claim": "sub", "token_policies": [role], "token_ttl": "60s"})
    keys = {who: f"jwt-key-{who}-{uuid.uuid4().hex}" for who in CALLERS}
    remember(*keys.values())
    for who in CALLERS:
        admin.kv2_put(f"secret/data/{VAULT_PREFIX}/users/{SUBJECT[who]}/api", {"token": keys[who]})

    store = {"kind": "vault", "address": admin.address, "cache_ttl": "1s",
             "login": {"method": "jwt", "mount": "jwt", "role": role,
                       "exchange": {"use": "idp", "audience": "vault"}}}
    servers = {"vj": H.token_echo_stdio_spec("vj", upstream_auth={
        "use": "vjwt", "path": f"secret/data/{VAULT_PREFIX}/users/{{sub}}/api", "field": "token", "env": "API_KEY"})}
    env = broker_env("broker-vjwt", tmp_path, auth_server, servers,
                     {"idp": idp_store(auth_server), "vjwt": store}, ["vj__getenv"]).ready()
    try:
        async def read_keys():
            for who in CALLERS:
                async with env.session(who) as s:
                    g = await call_json(s, "vj__getenv", {"name": "API_KEY"})
                assert g["present"] and g["sha256_prefix"] == H.sha256_prefix(keys[who]), f"{who}: {g}"

        anyio.run(read_keys)
        # The same Vault role refuses the caller's broker-audience token: only the exchanged one works.
        r = httpx2.post(f"{admin.address}/v1/auth/jwt/login", json={"role": role, "jwt": env.token("alice")}, timeout=10)
        assert r.status_code == 400, r.text
        assert "aud" in r.text
    finally:
        env.broker.stop()


def test_vault_kv1_and_soft_deleted_secrets(tmp_path, auth_server, vault):
    """VK-2/VK-3 with Vault-token login: a KV v1 read (`kv_version = 1` reads `data`, not `data.data`)
    reaches a shared stdio upstream's environment; a KV v2 secret whose latest version was soft-deleted
    is "not found" (Vault answers 404 with data:null) and is not silently replaced by an older version,
    so that server stays unavailable with the reason in the log."""
    admin = vault.admin
    if not admin.standin:
        admin.request("POST", "sys/mounts/kv", {"type": "kv", "options": {"version": "1"}}, ok=(200, 204, 400))
    v1_key = f"v1-key-{uuid.uuid4().hex}"
    old_key = f"old-key-{uuid.uuid4().hex}"
    remember(v1_key, old_key)
    admin.request("POST", f"kv/{VAULT_PREFIX}/static", {"token": v1_key})
    admin.kv2_put(f"secret/data/{VAULT_PREFIX}/gone", {"token": old_key})
    admin.kv2_put(f"secret/data/{VAULT_PREFIX}/gone", {"token": old_key + "-v2"})
    admin.request("DELETE", f"secret/data/{VAULT_PREFIX}/gone")
    login = {"method": "token", "token": admin.token}
    stores = {"kv1": {"kind": "vault", "address": admin.address, "kv_version": 1, "login": login},
              "kv2": {"kind": "vault", "address": admin.address, "login": login}}
    servers = {
        "v1": H.token_echo_stdio_spec("v1", upstream_auth={
            "use": "kv1", "path": f"kv/{VAULT_PREFIX}/static", "field": "token", "env": "API_KEY"}),
        "gone": H.token_echo_stdio_spec("gone", upstream_auth={
            "use": "kv2", "path": f"secret/data/{VAULT_PREFIX}/gone", "field": "token", "env": "API_KEY"}),
    }
    env = broker_env("broker-kv", tmp_path, auth_server, servers, stores, ["v1__getenv"]).ready()
    try:
        async def check():
            async with env.session("alice") as s:
                g = await call_json(s, "v1__getenv", {"name": "API_KEY"})
                assert g["present"] and g["sha256_prefix"] == H.sha256_prefix(v1_key), g
                names = {t.name for t in await H.list_all_tools(s)}
                assert not any(n.startswith("gone__") for n in names), names

        anyio.run(check)
        H.poll_until(lambda: "no secret at" in env.broker.proc.stderr_tail(400), 15,
                     "the broker to log that the deleted secret was not found")
    finally:
        env.broker.stop()


def test_no_tokens_or_secrets_in_logs(cred_dirs, xb_state, vb_state, sb_state, hb_state, protected, vault):
    """RS-20, VK-5: every token issued in this module (callers', exchanged, minted), every Vault secret and Vault
    credential is absent from the brokers' logs and the upstreams' and Vault's logs."""
    logs_dir, _ = cred_dirs
    for env in (xb_state, vb_state, sb_state):
        if env.broker:
            harvest_child_tokens(env.broker)
    if protected.record.exists():
        remember(*protected.record.read_text().split())
    def is_exchanged(t: str) -> bool:
        try:
            return bool(H.jwt_claims(t).get("act"))
        except Exception:  # noqa: BLE001 - not a JWT
            return False

    exchanged = [t for t in SECRETS if t.count(".") == 2 and is_exchanged(t)]
    assert len(exchanged) >= 3, f"too few exchanged tokens were captured ({len(exchanged)}) for this to mean much"
    files = [p for p in logs_dir.rglob("*.log")]
    for env in (xb_state, vb_state, sb_state, hb_state[0]):
        if env.broker:
            files += [env.broker.proc.stderr_path, env.broker.proc.stdout_path]
    assert files
    for f in files:
        text = f.read_text(errors="replace")
        assert_no_secret_in(text, str(f))
        for t in SECRETS:
            if t.count(".") == 2 and len(t.split(".")[2]) > 16:
                assert t.split(".")[2] not in text, f"{f} contains a token signature"
    SUMMARY_LINES.append(f"credentials log check: {len(SECRETS)} secrets ({len(exchanged)} exchanged tokens) "
                         f"absent from {len(files)} log files ({'stand-in' if vault.standin else 'real'} Vault)")
    broker_logs = [env.broker.proc.stderr_path for env in (xb_state, vb_state, sb_state) if env.broker]
    assert any(p.read_text().strip() for p in broker_logs), "the brokers wrote no log at all"
