"""Upstream OAuth (issue 16): the broker gets tokens from each upstream's own authorization server.

Real parts only: two oidc-provider instances (`tests/fixtures/as.mjs`), one as the enterprise IdP (which also issues
the callers' tokens) and one, over HTTPS with a private CA the broker trusts through `[oauth] ca_file`, as the
upstreams' authorization server (with the ID-JAG JWT bearer grant); a second such server with 4-second access tokens
for the refresh test; JWT-protected MCP servers (`tests/fixtures/protected_server.py`) that accept only their own
authorization server's tokens for themselves (their `whoami` reports the sub, client and a hash of the token they
got); the Python SDK as the MCP client; and a cookie-keeping HTTP client as the user's browser (one per user).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import subprocess
import time
from urllib.parse import urlencode
from pathlib import Path

import pytest

import helpers as H
import oauthlib as OL
from mcp import types as T

pytestmark = pytest.mark.anyio

CLI_REDIRECT = "http://127.0.0.1:8765/callback"
LINK_RE = re.compile(r"https?://\S+/oauth/start\?t=[A-Za-z0-9_\-]+")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Env:
    pass


# What the broker's config reads from the environment (the `tokens` CLI reads the same config).
SECRETS = {"BROKER_SECRET": "broker-secret", "UP_SECRET": "up-secret", "TOKEN_STORE_KEY": "k" * 40}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("upstream-oauth")
    e = Env()
    e.dir = d
    e.ca = OL.make_ca(d / "ca")
    bport, up_port, short_port = free_port(), free_port(), free_port()
    e.callback = f"http://127.0.0.1:{bport}/oauth/callback"
    up_issuer, short_issuer = f"https://127.0.0.1:{up_port}", f"https://127.0.0.1:{short_port}"
    procs = []
    e.procs = procs
    try:
        # The enterprise IdP: issues the callers' tokens (client `cli`), signs users in for the broker (client
        # `broker`) and issues ID-JAGs for the upstreams' authorization server (whose client there is broker-up).
        e.idp = H.start_auth_server(d, name="idp", env={
            "AS_CLIENTS_JSON": json.dumps([OL.broker_client("broker", "broker-secret", [e.callback])]),
            "AS_IDJAG_CLIENT_IDS": json.dumps({up_issuer: "broker-up"}),
            # Non-standard, for `subject = "access_token"`: this IdP also takes its own access tokens as the subject.
            "AS_IDJAG_FROM_ACCESS_TOKEN": "1",
        })
        procs.append(e.idp)
        trust = json.dumps({"issuer": e.idp.issuer, "jwks_uri": e.idp.issuer + "/jwks"})
        e.upas = OL.start_tls_as(d, "upas", e.ca, env={
            "AS_PORT": str(up_port), "AS_TRUST_IDJAG": trust,
            "AS_CLIENTS_JSON": json.dumps([OL.broker_client("broker-up", "up-secret", [e.callback])]),
        })
        procs.append(e.upas)
        e.short = OL.start_tls_as(d, "short-as", e.ca, env={
            "AS_PORT": str(short_port), "AS_ACCESS_TTL": "4",
            "AS_CLIENTS_JSON": json.dumps([OL.broker_client("broker-up", "up-secret", [e.callback])]),
        })
        procs.append(e.short)
        # Registration without an [oauth.clients] entry: a Client ID Metadata Document the broker's operator hosts
        # (at an AS that supports them), else dynamic registration (RFC 7591).
        e.docs = OL.JsonHttpsServer(e.ca, name="docs")
        procs.append(e.docs)
        e.cimd_url = e.docs.url("/mcp-broker/client.json")
        e.docs.docs["/mcp-broker/client.json"] = {
            "client_id": e.cimd_url, "client_name": "mcp-broker", "redirect_uris": [e.callback],
            "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
            "token_endpoint_auth_method": "none"}
        e.cimd_as = OL.start_tls_as(d, "cimd-as", e.ca, env={"AS_CIMD": "1"})
        e.dcr_as = OL.start_tls_as(d, "dcr-as", e.ca)
        procs += [e.cimd_as, e.dcr_as]
        e.seen_tokens = d / "tokens-seen.txt"
        e.wiki = OL.start_protected(d, e.upas.issuer, e.ca, name="wiki", record_tokens=e.seen_tokens)
        e.crm = OL.start_protected(d, e.upas.issuer, e.ca, name="crm", record_tokens=e.seen_tokens)
        e.reports = OL.start_protected(d, e.upas.issuer, e.ca, name="reports")
        e.crm2 = OL.start_protected(d, e.short.issuer, e.ca, name="crm2", record_tokens=e.seen_tokens)
        e.docsrv = OL.start_protected(d, e.cimd_as.issuer, e.ca, name="docsrv")
        e.tickets = OL.start_protected(d, e.dcr_as.issuer, e.ca, name="tickets")
        procs += [e.wiki, e.crm, e.reports, e.crm2, e.docsrv, e.tickets]
        e.store = d / "tokens.json"
        extra = f'''[audit]
file = "{d / 'audit.jsonl'}"

[token_store]
path = "{e.store}"
key = "${{TOKEN_STORE_KEY}}"

''' + OL.broker_oauth_toml(e.idp.issuer, e.ca.ca_pem, [up_issuer, short_issuer],
                           f'link_ttl = "2m"\nclient_metadata_url = "{e.cimd_url}"')
        mismatched = e.reports.url.replace("127.0.0.1", "localhost")
        e.broker = H.start_broker(d, {
            "wiki": {"transport": "http", "url": e.wiki.url, "upstream_auth": {"kind": "id_jag", "scopes": ["mcp:tools"]}},
            "crm": {"transport": "http", "url": e.crm.url, "upstream_auth": {"kind": "oauth", "scopes": ["mcp:tools"]}},
            "crm2": {"transport": "http", "url": e.crm2.url, "upstream_auth": {"kind": "oauth", "scopes": ["mcp:tools"]}},
            "reports": {"transport": "http", "url": e.reports.url,
                        "upstream_auth": {"kind": "client_credentials", "scopes": ["mcp:tools"]}},
            "docsrv": {"transport": "http", "url": e.docsrv.url, "upstream_auth": {"kind": "oauth", "scopes": ["mcp:tools"]}},
            "tickets": {"transport": "http", "url": e.tickets.url, "upstream_auth": {"kind": "oauth", "scopes": ["mcp:tools"]}},
            "mismatch": {"transport": "http", "url": mismatched,
                         "upstream_auth": {"kind": "oauth", "scopes": ["mcp:tools"]}},
        }, broker={"listen": f"127.0.0.1:{bport}"},
            auth={"issuer": e.idp.issuer, "admin_scopes": ["audit:read"]},
            policies=[{"effect": "allow"}], extra_toml=extra,
            env=SECRETS)
        procs.append(e.broker.proc)
        yield e
    finally:
        for p in reversed(procs):
            p.stop()


def user_token(e: Env, user: str) -> str:
    """`user`'s access token for the broker, from the IdP (authorization code + PKCE, public client `cli`)."""
    with OL.Browser() as b:
        b.login(e.idp, user)
        res = OL.authorize(b, e.idp, "cli", CLI_REDIRECT, "openid mcp:tools", resource=e.broker.url)
        r = OL.redeem_code(e.idp, res, CLI_REDIRECT, "cli", resource=e.broker.url)
        assert r.status_code == 200, r.text
        return r.json()["access_token"]


def link_in(text: str) -> str:
    m = LINK_RE.search(text)
    assert m, f"no consent link in: {text[:400]}"
    return m.group(0)


def consent(e: Env, user: str, link: str) -> "OL.httpx2.Response":
    """`user` opens `link` in their own browser and goes through every redirect."""
    with OL.Browser(e.ca) as b:
        b.login(e.idp, user)
        b.login(e.upas, user)
        for a in (e.short, e.cimd_as, e.dcr_as):
            b.login(a, user)
        final, hops = b.follow(link)
        return final


def consent_records(e: Env, sub: str, want=lambda r: True) -> list[dict]:
    """The `consent` audit records of `sub` that satisfy `want`, waiting (up to 5 s) for the audit writer."""
    path = e.dir / "audit.jsonl"
    deadline = time.monotonic() + 5
    while True:
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        got = [r for r in recs if r.get("kind") == "consent" and r.get("sub") == sub and want(r)]
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def whoami(r) -> dict:
    assert not r.is_error, r.content[0].text if r.content else r
    return json.loads(r.content[0].text)


async def names(s) -> set[str]:
    return {t.name for t in (await s.list_tools()).tools}


async def test_id_jag_for_two_users_each_with_their_own_token(env):
    e = env
    alice, bob = user_token(e, "alice"), user_token(e, "bob")
    async with H.http_session(e.broker.url, headers=H.bearer(alice)) as s:
        assert "wiki__authorize" in await names(s)
        r = await s.call_tool("wiki__authorize", {})
        assert r.is_error
        page = consent(e, "alice", link_in(r.content[0].text))
        assert page.status_code == 200 and "Signed in as alice" in page.text, page.text
        before = OL.as_counts(e.idp)["token_exchange"]
        a1 = whoami(await s.call_tool("wiki__whoami", {}))
        a2 = whoami(await s.call_tool("wiki__whoami", {}))
        assert a1["sub"] == "alice" and a1["client_id"] == "broker-up"
        assert a1["aud"] == e.wiki.url
        # The ID-JAG's access token is cached per (caller, upstream): the second call made no exchange.
        assert a1["token_sha256_prefix"] == a2["token_sha256_prefix"]
        after = OL.as_counts(e.idp)["token_exchange"]
        assert sum(after.values()) - sum(before.values()) == 1, (before, after)
        assert "wiki__whoami" in await names(s) and "wiki__authorize" not in await names(s)
    async with H.http_session(e.broker.url, headers=H.bearer(bob)) as s:
        # share_catalog (the id_jag default): bob sees the tools alice's connection listed ...
        assert "wiki__whoami" in await names(s)
        r = await s.call_tool("wiki__whoami", {})
        # ... but calling them needs his own sign-in.
        assert r.is_error and "/oauth/start" in r.content[0].text
        assert consent(e, "bob", link_in(r.content[0].text)).status_code == 200
        b1 = whoami(await s.call_tool("wiki__whoami", {}))
        assert b1["sub"] == "bob"
        assert b1["token_sha256_prefix"] != a1["token_sha256_prefix"]
    counts = OL.as_counts(e.upas)["token"]
    assert counts.get(OL.JWT_BEARER, 0) >= 2, counts
    # The callers' own tokens never reached the upstream.
    seen = e.wiki.seen()["bearer"]
    assert H.sha256_prefix(alice) not in seen and H.sha256_prefix(bob) not in seen


async def test_oauth_consent_through_the_python_sdk_url_elicitation(env):
    e = env
    carol = user_token(e, "carol")
    asked = []

    async def on_elicit(ctx, params):
        asked.append(params)
        assert params.mode == "url"
        page = await asyncio.to_thread(consent, e, "carol", params.url)
        assert page.status_code == 200 and "Connected `crm` for carol" in page.text, page.text
        return T.ElicitResult(action="accept")

    async with H.http_session(e.broker.url, headers=H.bearer(carol), elicitation_callback=on_elicit) as s:
        tools = await names(s)
        assert "crm__authorize" in tools and "crm__whoami" not in tools
        # The first call asks for consent and, once given, goes on: its result is the upstream's.
        got = whoami(await s.call_tool("crm__whoami", {}))
        assert got["sub"] == "carol" and got["aud"] == e.crm.url and got["client_id"] == "broker-up"
        assert len(asked) == 1 and "/oauth/start" in asked[0].url
        again = whoami(await s.call_tool("crm__whoami", {}))
        assert len(asked) == 1 and again["sub"] == "carol"
        done = consent_records(e, "carol", lambda r: r["decision"] == "allow" and r["server"] == "crm")
        assert done and "connected" in done[0]["reason"], done
        tools = await names(s)
        assert "crm__whoami" in tools and "crm__authorize" not in tools


async def test_a_link_opened_by_another_signed_in_user_is_refused(env):
    e = env
    dave = user_token(e, "dave")
    async with H.http_session(e.broker.url, headers=H.bearer(dave)) as s:
        # crm's tools are listed by now (carol's connection), but share_catalog is off for kind = "oauth":
        # dave, not connected, sees only the authorize tool.
        tools = await names(s)
        assert "crm__authorize" in tools and "crm__whoami" not in tools, tools
        r = await s.call_tool("crm__authorize", {})
        link = link_in(r.content[0].text)
        # erin, signed in at the IdP, opens dave's link: the anti-phishing check refuses it.
        page = consent(e, "erin", link)
        assert page.status_code == 403 and "another user" in page.text, page.text
        refused = consent_records(e, "dave", lambda r: r["decision"] == "deny")
        assert refused and "`erin` signed in" in refused[0]["reason"] and refused[0]["server"] == "crm", refused
        r = await s.call_tool("crm__whoami", {})
        assert r.is_error and "/oauth/start" in r.content[0].text, "dave must still be unconnected"
        page = consent(e, "dave", link_in(r.content[0].text))
        assert page.status_code == 200, page.text
        assert whoami(await s.call_tool("crm__whoami", {}))["sub"] == "dave"


async def test_replayed_altered_state_and_wrong_iss_are_refused(env):
    e = env
    frank = user_token(e, "frank")
    async with H.http_session(e.broker.url, headers=H.bearer(frank)) as s:
        r = await s.call_tool("crm__authorize", {})
        link = link_in(r.content[0].text)
    with OL.Browser(e.ca) as b:
        b.login(e.idp, "frank")
        b.login(e.upas, "frank")
        # The sign-in comes back ...
        signin_cb, _ = b.follow(link, stop_at_prefix=e.callback)
        q = OL.query_of(signin_cb)
        altered = signin_cb.replace(q["state"], q["state"][:-2] + ("AA" if not q["state"].endswith("AA") else "BB"))
        assert b.client.get(altered).status_code == 400
        # ... then goes on to the upstream's authorization server, which comes back again.
        connect_cb, _ = b.follow(signin_cb, stop_at_prefix=e.callback)
        assert connect_cb != signin_cb and OL.query_of(connect_cb)["iss"] == e.upas.issuer
        cq = OL.query_of(connect_cb)
        wrong_iss = connect_cb.split("?")[0] + "?" + urlencode({**cq, "iss": "https://evil.example"})
        refused = b.client.get(wrong_iss)
        assert refused.status_code == 400, refused.text
        # The state was used up by the refused attempt: the genuine callback is a replay now.
        replay = b.client.get(connect_cb)
        assert replay.status_code == 400 and "used" in replay.text
        # The sign-in callback replayed: refused as well.
        assert b.client.get(signin_cb).status_code == 400
    async with H.http_session(e.broker.url, headers=H.bearer(frank)) as s:
        r = await s.call_tool("crm__whoami", {})
        assert r.is_error and "/oauth/start" in r.content[0].text, "frank must not be connected"


async def test_access_token_refreshed_on_expiry(env):
    e = env
    gina = user_token(e, "gina")
    async with H.http_session(e.broker.url, headers=H.bearer(gina)) as s:
        r = await s.call_tool("crm2__authorize", {})
        assert consent(e, "gina", link_in(r.content[0].text)).status_code == 200
        first = whoami(await s.call_tool("crm2__whoami", {}))
        refreshes = OL.as_counts(e.short)["token"].get("refresh_token", 0)
        await asyncio.sleep(5)  # the 4-second access token expired
        second = whoami(await s.call_tool("crm2__whoami", {}))
        assert second["sub"] == "gina"
        assert second["token_sha256_prefix"] != first["token_sha256_prefix"]
        assert OL.as_counts(e.short)["token"].get("refresh_token", 0) > refreshes


def revoke(e: Env, admin: str, sub: str, server: str) -> subprocess.CompletedProcess:
    """`mcp-broker tokens revoke --sub SUB --server SERVER` with `admin`'s token; it must succeed."""
    rev = subprocess.run([str(H.BROKER_BIN), "tokens", "revoke", "--config", str(e.broker.config_path),
                          "--sub", sub, "--server", server, "--token", admin],
                         capture_output=True, text=True, timeout=30, env={**os.environ, **SECRETS})
    assert rev.returncode == 0, rev.stderr
    return rev


async def test_revoke_then_consent_again_and_store_holds_no_token_text(env):
    e = env
    hank = user_token(e, "hank")
    async with H.http_session(e.broker.url, headers=H.bearer(hank)) as s:
        r = await s.call_tool("crm__authorize", {})
        assert consent(e, "hank", link_in(r.content[0].text)).status_code == 200
        whoami(await s.call_tool("crm__whoami", {}))
        # And the enterprise sign-in (id_jag): a second entry, at the IdP.
        r = await s.call_tool("wiki__whoami", {})
        assert consent(e, "hank", link_in(r.content[0].text)).status_code == 200
        whoami(await s.call_tool("wiki__whoami", {}))
    # The store file: sealed entries only, no token, subject or server name in clear. A sealed value is
    # base64url of random-looking bytes, so a short word can turn up inside its text by chance (CI once
    # found "crm" there): the words are looked for in the file's structure and in the decoded bytes.
    text = e.store.read_text()
    for tok in filter(None, e.seen_tokens.read_text().splitlines()):
        assert tok not in text
        assert tok[:40] not in text
    disk = json.loads(text)
    assert set(disk) == {"version", "check", "entries"}, list(disk)
    assert disk["entries"] and all(re.fullmatch(r"[0-9a-f]{64}", name) for name in disk["entries"]), disk["entries"]
    sealed = [disk["check"], *disk["entries"].values()]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", v) for v in sealed)
    opened = b"".join(base64.urlsafe_b64decode(v + "=" * (-len(v) % 4)) for v in sealed)
    skeleton = json.dumps({**disk, "check": "", "entries": {k: "" for k in disk["entries"]}})
    for word in ["hank", "alice", "carol", "crm", "wiki", "access_token", "refresh_token"]:
        assert word not in skeleton and word.encode() not in opened, word
    admin = e.idp.token("svc", "svc-secret", scope="mcp:tools audit:read", resource=e.broker.url)
    listed = subprocess.run([str(H.BROKER_BIN), "tokens", "list", "--config", str(e.broker.config_path), "--json",
                             "--token", admin], capture_output=True, text=True, timeout=30,
                            env={**os.environ, **SECRETS})
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    rows = rows.get("tokens", rows) if isinstance(rows, dict) else rows
    assert any(t["sub"] == "hank" and t["server"] == "crm" for t in rows), rows
    for tok in filter(None, e.seen_tokens.read_text().splitlines()):
        assert tok not in listed.stdout
    revoked_at = lambda a: sum(OL.as_counts(a).get("revocations", {}).values())  # noqa: E731
    before_up, before_idp = revoked_at(e.upas), revoked_at(e.idp)
    rev = revoke(e, admin, "hank", "crm")
    # RFC 7009: the upstream's authorization server is told too (it accepted the broker's request).
    assert "hank crm: at the authorization server: revoked" in rev.stdout, rev.stdout
    assert revoked_at(e.upas) == before_up + 1
    assert consent_records(e, "hank", lambda r: "revoked by" in r["reason"]
                           and "revoked at the authorization server" in r["reason"]), consent_records(e, "hank")
    # The sign-in's refresh token goes back to the IdP the same way.
    rev = revoke(e, admin, "hank", "@sign-in")
    assert "hank @sign-in: at the authorization server: revoked" in rev.stdout, rev.stdout
    assert revoked_at(e.idp) == before_idp + 1
    assert OL.as_counts(e.idp)["revocations"].get("refresh_token", 0) >= 1
    # No token the upstreams received appears in any log or audit record of the broker.
    logs = "".join(p.read_text(errors="replace") for p in e.dir.glob("broker*.log")) + (e.dir / "audit.jsonl").read_text()
    seen = [t for t in e.seen_tokens.read_text().splitlines() if t]
    assert seen and not [t for t in seen if t in logs or t[-30:] in logs]
    async with H.http_session(e.broker.url, headers=H.bearer(hank)) as s:
        r = await s.call_tool("crm__whoami", {})
        assert r.is_error and "/oauth/start" in r.content[0].text, "a revoked caller must consent again"


async def test_id_jag_from_the_callers_access_token(env, tmp_path):
    """`subject = "access_token"` (non-standard): no sign-in; each caller's own token is exchanged at the IdP for an
    ID-JAG, redeemed at the upstream's AS. A second broker (same public_url, so the callers' tokens fit) with one
    such server on the upstream AS, and one on an AS that does not take ID-JAGs: that error names the step."""
    e = env
    wiki3 = OL.start_protected(tmp_path, e.upas.issuer, e.ca, name="wiki3")
    extra = OL.broker_oauth_toml(e.idp.issuer, e.ca.ca_pem, [e.upas.issuer, e.short.issuer])
    jag = {"kind": "id_jag", "subject": "access_token", "scopes": ["mcp:tools"]}
    b = H.start_broker(tmp_path, {
        "wiki3": {"transport": "http", "url": wiki3.url, "upstream_auth": jag},
        "nojag": {"transport": "http", "url": e.crm2.url, "upstream_auth": jag},
    }, name="broker-at", broker={"public_url": e.broker.url}, auth={"issuer": e.idp.issuer},
        policies=[{"effect": "allow"}], extra_toml=extra, env=SECRETS)
    try:
        url = b.url
        ivy, kim = user_token(e, "ivy"), user_token(e, "kim")
        before = OL.as_counts(e.idp)["token_exchange"].get(OL.IDJAG_TOKEN_TYPE, 0)
        got = {}
        for user, tok in [("ivy", ivy), ("kim", kim)]:
            async with H.http_session(url, headers=H.bearer(tok)) as s:
                listed = await names(s)
                assert "wiki3__whoami" in listed and "wiki3__authorize" not in listed, listed
                w1 = whoami(await s.call_tool("wiki3__whoami", {}))
                w2 = whoami(await s.call_tool("wiki3__whoami", {}))
                assert w1["sub"] == user and w1["client_id"] == "broker-up" and w1["aud"] == wiki3.url, w1
                assert w1["token_sha256_prefix"] == w2["token_sha256_prefix"], "cached per (caller, upstream)"
                got[user] = w1["token_sha256_prefix"]
                # An AS that does not take the JWT bearer grant gives no token: no tools from it (like any
                # server the broker has no credential for) and no consent link; the log names the failed step.
                assert not [n for n in listed if n.startswith("nojag__")], listed
        assert got["ivy"] != got["kim"]
        log = (tmp_path / "broker-at.stderr.log").read_text()
        assert "server=nojag sub=kim error=redeeming the ID-JAG at the upstream's authorization server" in log
        after = OL.as_counts(e.idp)["token_exchange"].get(OL.IDJAG_TOKEN_TYPE, 0)
        # One exchange per caller for wiki3 (then cached), and the failed nojag attempts asked again.
        assert after - before >= 4, (before, after)
        # The callers' own tokens went to the IdP that issued them, never upstream.
        seen = wiki3.seen()["bearer"]
        assert H.sha256_prefix(ivy) not in seen and H.sha256_prefix(kim) not in seen
    finally:
        b.stop()
        wiki3.stop()


async def test_client_credentials_one_token_for_everyone_cached(env):
    """`reports` connects once, with one client-credentials token that every caller's call then rides on."""
    e = env
    subs, hashes = set(), set()
    for user in ["ivan", "judy"]:
        async with H.http_session(e.broker.url, headers=H.bearer(user_token(e, user))) as s:
            for _ in range(2):
                got = whoami(await s.call_tool("reports__whoami", {}))
                subs.add(got["sub"])
                hashes.add(got["token_sha256_prefix"])
                assert got["aud"] == e.reports.url and got["scopes"] == ["mcp:tools"]
    assert subs == {"broker-up"} and len(hashes) == 1
    assert OL.as_counts(e.upas)["token"].get("client_credentials", 0) == 1
    metrics = OL.httpx2.get(e.broker.base + "/metrics", timeout=10).text
    assert re.search(r'mcp_broker_upstream_oauth_tokens_total\{server="wiki",kind="id_jag",result="cached"\} [1-9]', metrics)
    assert 'mcp_broker_requests_total{kind="consent",server="crm"' in metrics


async def test_metadata_naming_another_resource_is_refused(env):
    """The upstream is configured as http://localhost:P/mcp; its RFC 9728 metadata names http://127.0.0.1:P/mcp."""
    e = env
    async with H.http_session(e.broker.url, headers=H.bearer(user_token(e, "kim"))) as s:
        r = await s.call_tool("mismatch__authorize", {})
        page = consent(e, "kim", link_in(r.content[0].text))
        assert page.status_code == 502, page.text
        assert "protected resource metadata names resource" in page.text, page.text
        counts = OL.as_counts(e.upas)["token"]
        r = await s.call_tool("mismatch__whoami", {})
        assert r.is_error and "/oauth/start" in r.content[0].text
        assert OL.as_counts(e.upas)["token"] == counts, "nothing may be asked of an unverified server's AS"


async def test_registration_by_client_id_metadata_document_then_dynamic_registration(env):
    """No [oauth.clients] entry: at an AS that supports them the broker's client id is its metadata document's URL
    (the AS fetches it); at one that does not, the broker registers itself (RFC 7591)."""
    e = env
    lena = user_token(e, "lena")
    async with H.http_session(e.broker.url, headers=H.bearer(lena)) as s:
        r = await s.call_tool("docsrv__authorize", {})
        page = consent(e, "lena", link_in(r.content[0].text))
        assert page.status_code == 200, page.text
        got = whoami(await s.call_tool("docsrv__whoami", {}))
        assert got["sub"] == "lena" and got["client_id"] == e.cimd_url
        assert OL.as_counts(e.cimd_as)["cimd_fetches"] >= 1
        r = await s.call_tool("tickets__authorize", {})
        page = consent(e, "lena", link_in(r.content[0].text))
        assert page.status_code == 200, page.text
        got = whoami(await s.call_tool("tickets__whoami", {}))
        assert got["sub"] == "lena" and got["client_id"] not in ("broker-up", e.cimd_url) and got["client_id"]


def modern_call(e: Env, token: str, rid: int, name: str, caps: dict, **extra) -> dict:
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": caps,
            "io.modelcontextprotocol/clientInfo": {"name": "e2e-upstream-oauth", "version": "0"}}
    h = {"Content-Type": "application/json", "Accept": H.MCP_ACCEPT, "MCP-Protocol-Version": "2026-07-28",
         "Mcp-Method": "tools/call", "Mcp-Name": name, **H.bearer(token)}
    r = OL.httpx2.post(e.broker.url, headers=h, timeout=60, json={
        "jsonrpc": "2.0", "id": rid, "method": "tools/call",
        "params": {"name": name, "arguments": {}, "_meta": meta, **extra}})
    assert r.status_code == 200, f"HTTP {r.status_code} {r.text[:300]}"
    return H.final_response(r, rid)


async def test_stateless_clients_are_asked_with_input_required_or_get_the_link(env):
    """2026-07-28 requests have no server-to-client requests: one that declared URL elicitation gets an
    input_required result asking for it (its retry, with the sealed state, goes on once the consent is given); one
    that did not gets an isError result carrying the link."""
    e = env
    mona = user_token(e, "mona")
    r = modern_call(e, mona, 1, "crm__whoami", {"elicitation": {"url": {}}})["result"]
    assert r["resultType"] == "input_required", r
    ask = r["inputRequests"]["consent"]
    assert ask["method"] == "elicitation/create" and ask["params"]["mode"] == "url", ask
    link, state = ask["params"]["url"], r["requestState"]
    assert "/oauth/start" in link and state
    r = modern_call(e, mona, 2, "crm__whoami", {})["result"]
    assert r["isError"] and "/oauth/start" in r["content"][0]["text"]
    # A forged state is refused; the genuine one, after the consent, completes the call.
    r = modern_call(e, mona, 3, "crm__whoami", {"elicitation": {"url": {}}},
                    inputResponses={"consent": {"action": "accept"}}, requestState="mcpb-consent")
    assert "error" in r, r
    assert consent(e, "mona", link).status_code == 200
    r = modern_call(e, mona, 4, "crm__whoami", {"elicitation": {"url": {}}},
                    inputResponses={"consent": {"action": "accept"}}, requestState=state)["result"]
    assert json.loads(r["content"][0]["text"])["sub"] == "mona", r


async def test_a_server_added_by_reload_takes_consent(env):
    """A reload that adds an oauth server (and changes nothing in [credentials] or [oauth]) makes it usable."""
    e = env
    extra = OL.start_protected(e.dir, e.upas.issuer, e.ca, name="crm3")
    e.procs.append(extra)
    cfg = e.broker.config_path
    cfg.write_text(cfg.read_text() + f"""
[servers.crm3]
transport = "http"
url = "{extra.url}"
upstream_auth = {{ kind = "oauth", scopes = ["mcp:tools"] }}
""")
    e.broker.proc.signal(signal.SIGHUP)
    nina = user_token(e, "nina")
    async with H.http_session(e.broker.url, headers=H.bearer(nina)) as s:
        deadline = time.monotonic() + 20
        while "crm3__authorize" not in await names(s):
            assert time.monotonic() < deadline, "crm3 did not appear after SIGHUP"
            await asyncio.sleep(0.2)
        r = await s.call_tool("crm3__authorize", {})
        assert consent(e, "nina", link_in(r.content[0].text)).status_code == 200
        assert whoami(await s.call_tool("crm3__whoami", {}))["sub"] == "nina"


async def test_tokens_survive_a_restart(env):
    """Last in this module: the token store file keeps carol's crm token across a restart of the broker."""
    e = env
    carol = user_token(e, "carol")
    e.broker.proc.stop()
    proc = H.Proc("broker-restarted", [str(H.BROKER_BIN), "serve", "--config", str(e.broker.config_path)], e.dir,
                  env={"RUST_LOG": "info,rmcp=warn", **SECRETS})
    e.procs.append(proc)
    proc.wait_line(H.BROKER_LISTEN_RE, 30)
    async with H.http_session(e.broker.url, headers=H.bearer(carol)) as s:
        assert "crm__whoami" in await names(s)
        assert whoami(await s.call_tool("crm__whoami", {}))["sub"] == "carol"
