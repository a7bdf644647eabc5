"""Self-tests of the upstream-OAuth fixtures (no broker): two HTTPS instances of tests/fixtures/as.mjs with a private
CA -- an enterprise IdP ("idp") and an upstream MCP authorization server ("upstream AS") trusting the IdP's ID-JAGs
-- and tests/fixtures/protected_server.py whose issuer is the upstream AS.

Covered: authorization code + PKCE with RFC 9207 `iss`, refresh tokens for AS_CLIENTS_JSON clients, the browser
identity cookie, ID-JAG issuance from a refresh token and from an ID token, jwt-bearer redemption (replay, wrong
audience, wrong client), AS_ACCESS_TTL with a resource-bound refresh, Client ID Metadata Documents, /__test/counts,
and the protected server's RFC 9728 metadata and challenge over a private CA."""

from __future__ import annotations

import json
import time

import httpx2
import pytest

import helpers as H
import oauthlib as O

pytestmark = pytest.mark.anyio

SCOPE = "openid mcp:tools"
OTHER_AUDIENCE = "https://other-as.example"


class Env:
    pass


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if not H.AS_FIXTURE.exists() or not (H.HARNESS_DIR / "node_modules" / "oidc-provider").exists():
        pytest.fail("oidc-provider harness missing (run scripts/test.sh --harness-only)")
    work = tmp_path_factory.mktemp("oauth-fixtures")
    e = Env()
    e.ca = O.make_ca(work / "ca")
    e.redirect = f"http://127.0.0.1:{H.free_port()}/oauth/callback"  # nothing listens: the browser stops there
    started = []
    try:
        idp_port = H.free_port()
        idp_issuer = f"https://127.0.0.1:{idp_port}"
        e.upstream = O.start_tls_as(work, "upstream-as", e.ca, env={
            "AS_TRUST_IDJAG": json.dumps({"issuer": idp_issuer, "jwks_uri": idp_issuer + "/jwks"}),
            "AS_CLIENTS_JSON": json.dumps([O.broker_client("broker", "broker-secret", [e.redirect]),
                                           O.broker_client("other", "other-secret", [e.redirect])]),
        })
        started.append(e.upstream)
        e.idp = O.start_tls_as(work, "idp", e.ca, env={
            "AS_PORT": str(idp_port), "AS_CIMD": "1",
            "AS_CLIENTS_JSON": json.dumps([O.broker_client("broker", "broker-secret", [e.redirect]),
                                           O.broker_client("other", "other-secret", [e.redirect])]),
            "AS_IDJAG_CLIENT_IDS": json.dumps({OTHER_AUDIENCE: "someone-else"}),
        })
        started.append(e.idp)
        assert e.idp.issuer == idp_issuer
        e.short = O.start_tls_as(work, "short-as", e.ca, env={
            "AS_ACCESS_TTL": "3",
            "AS_CLIENTS_JSON": json.dumps([O.broker_client("broker", "broker-secret", [e.redirect])]),
        })
        started.append(e.short)
        e.protected = O.start_protected(work, e.upstream.issuer, e.ca)
        started.append(e.protected)
        e.docs = O.JsonHttpsServer(e.ca, "cimd-docs")
        started.append(e.docs)
        yield e
    finally:
        for s in reversed(started):
            s.stop()


def code_flow(env, as_server, browser, scope=SCOPE, resource=None, client=("broker", "broker-secret"), **kw):
    res = O.authorize(browser, as_server, client[0], env.redirect, scope, resource=resource, **kw)
    assert "code" in res.params, {k: v for k, v in res.params.items() if k != "code"}
    r = O.redeem_code(as_server, res, env.redirect, client[0], client[1], resource=resource)
    assert r.status_code == 200, O.brief(r)
    return res, r.json()


def test_discovery_and_protected_resource_metadata(env):
    c = httpx2.Client(verify=env.ca.ssl_context(), timeout=10)
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
        d = c.get(env.idp.issuer + path).json()
        assert d["issuer"] == env.idp.issuer
        assert d["authorization_response_iss_parameter_supported"] is True
        assert d["client_id_metadata_document_supported"] is True
        assert O.TOKEN_EXCHANGE in d["grant_types_supported"]
        u = c.get(env.upstream.issuer + path).json()
        assert O.JWT_BEARER in u["grant_types_supported"]
        assert "client_id_metadata_document_supported" not in u
    # RFC 9728 metadata and the 401 challenge of the protected server (issuer: the https upstream AS)
    prm = httpx2.get(env.protected.prm_url, timeout=10).json()
    assert prm["resource"] == env.protected.url
    assert prm["authorization_servers"] == [env.upstream.issuer], prm
    r = httpx2.post(env.protected.url, json=H.init_body(), timeout=10,
                    headers={"accept": "application/json, text/event-stream"})
    assert r.status_code == 401
    assert f'resource_metadata="{env.protected.prm_url}"' in r.headers["www-authenticate"], r.headers


async def test_code_flow_refresh_token_id_jag_and_jwt_bearer(env):
    with O.Browser(env.ca) as alice:
        alice.login(env.idp, "alice")
        res, toks = code_flow(env, env.idp, alice)
    assert res.params["iss"] == env.idp.issuer  # RFC 9207
    assert {"id_token", "refresh_token", "access_token"} <= set(toks), sorted(toks)
    assert H.jwt_claims(toks["id_token"])["sub"] == "alice"
    broker = ("broker", "broker-secret")

    # refresh token -> ID-JAG, checked the way rmcp's enterprise.rs checks it
    r = O.request_id_jag(env.idp, broker, toks["refresh_token"], O.REFRESH_TOKEN_TYPE, env.upstream.issuer,
                         resource=env.protected.url, scope="mcp:tools")
    assert r.status_code == 200, O.brief(r)
    j = r.json()
    assert j["issued_token_type"] == O.IDJAG_TOKEN_TYPE and j["token_type"] == "N_A"
    assert j["expires_in"] == 300 and j["scope"] == "mcp:tools" and "refresh_token" not in j
    jag = j["access_token"]
    import base64
    hdr = json.loads(base64.urlsafe_b64decode(jag.split(".")[0] + "=="))
    assert hdr["typ"] == "oauth-id-jag+jwt" and hdr["alg"] == "RS256"
    c = H.jwt_claims(jag)
    assert (c["iss"], c["sub"], c["aud"], c["client_id"], c["resource"], c["scope"]) == \
        (env.idp.issuer, "alice", env.upstream.issuer, "broker", env.protected.url, "mcp:tools")
    assert c["exp"] - c["iat"] == 300 and c["jti"]

    # redeem at the upstream AS (only grant_type + assertion, as rmcp sends it)
    r = O.redeem_jag(env.upstream, broker, jag)
    assert r.status_code == 200, O.brief(r)
    t = r.json()
    assert t["token_type"] == "Bearer" and t["scope"] == "mcp:tools" and t["expires_in"] > 0
    assert "refresh_token" not in t
    at = H.jwt_claims(t["access_token"])
    assert (at["sub"], at["aud"], at["iss"], at["client_id"]) == \
        ("alice", env.protected.url, env.upstream.issuer, "broker")
    async with H.http_session(env.protected.url, headers=H.bearer(t["access_token"]), timeout=10) as s:
        w = H.tool_json(await s.call_tool("whoami", {}))
    assert w["sub"] == "alice" and w["aud"] == env.protected.url and w["scopes"] == ["mcp:tools"], w

    # the same JAG again: replay
    r = O.redeem_jag(env.upstream, broker, jag)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant", O.brief(r)

    # a JAG for another issuer (its client_id from AS_IDJAG_CLIENT_IDS) is refused by the upstream AS
    r = O.request_id_jag(env.idp, broker, toks["refresh_token"], O.REFRESH_TOKEN_TYPE, OTHER_AUDIENCE,
                         resource=env.protected.url)
    assert r.status_code == 200, O.brief(r)
    other = r.json()["access_token"]
    assert H.jwt_claims(other)["client_id"] == "someone-else" and "scope" not in r.json()
    r = O.redeem_jag(env.upstream, broker, other)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant", O.brief(r)

    # a JAG for "broker" presented by another client of the upstream AS
    r = O.request_id_jag(env.idp, broker, toks["refresh_token"], O.REFRESH_TOKEN_TYPE, env.upstream.issuer,
                         resource=env.protected.url, scope="mcp:tools")
    r = O.redeem_jag(env.upstream, ("other", "other-secret"), r.json()["access_token"])
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant", O.brief(r)

    # the ID token as subject; no scope asked -> the JAG has none, the response omits scope, the token has the default
    r = O.request_id_jag(env.idp, broker, toks["id_token"], O.ID_TOKEN_TYPE, env.upstream.issuer,
                         resource=env.protected.url)
    assert r.status_code == 200, O.brief(r)
    assert "scope" not in H.jwt_claims(r.json()["access_token"])
    r = O.redeem_jag(env.upstream, broker, r.json()["access_token"])
    assert r.status_code == 200, O.brief(r)
    assert "scope" not in r.json()
    async with H.http_session(env.protected.url, headers=H.bearer(r.json()["access_token"]), timeout=10) as s:
        assert H.tool_json(await s.call_tool("whoami", {}))["sub"] == "alice"

    # refusals at the IdP (among them: another client's refresh token and ID token)
    with O.Browser(env.ca) as alice:
        alice.login(env.idp, "alice")
        _, others = code_flow(env, env.idp, alice, client=("other", "other-secret"))
    bad = [
        ({"subject_token": others["refresh_token"], "subject_token_type": O.REFRESH_TOKEN_TYPE}, "invalid_grant"),
        ({"subject_token": others["id_token"], "subject_token_type": O.ID_TOKEN_TYPE}, "invalid_grant"),
        ({"subject_token": "not-a-refresh-token", "subject_token_type": O.REFRESH_TOKEN_TYPE}, "invalid_grant"),
        ({"subject_token": toks["access_token"], "subject_token_type": O.ID_TOKEN_TYPE}, "invalid_grant"),
        ({"subject_token": toks["refresh_token"], "subject_token_type": O.REFRESH_TOKEN_TYPE, "audience": None},
         "invalid_request"),
        ({"subject_token": toks["refresh_token"], "subject_token_type": O.REFRESH_TOKEN_TYPE,
          "resource": "not a url"}, "invalid_target"),
    ]
    for extra, code in bad:
        data = {"grant_type": O.TOKEN_EXCHANGE, "requested_token_type": O.IDJAG_TOKEN_TYPE,
                "audience": env.upstream.issuer, **extra}
        data = {k: v for k, v in data.items() if v is not None}
        r = O.token_post(env.idp, data, auth=broker)
        assert r.status_code == 400 and r.json()["error"] == code, (sorted(extra), O.brief(r))

    idp_counts, up_counts = O.as_counts(env.idp), O.as_counts(env.upstream)
    assert idp_counts["token_exchange"][O.IDJAG_TOKEN_TYPE] >= 10, idp_counts
    assert idp_counts["token"]["authorization_code"] >= 1, idp_counts
    assert up_counts["token"][O.JWT_BEARER] >= 5, up_counts


def test_cookie_picks_the_user(env):
    with O.Browser(env.ca) as bob:
        bob.login(env.idp, "bob")
        _, toks = code_flow(env, env.idp, bob, login_hint="alice")
        assert H.jwt_claims(toks["id_token"])["sub"] == "bob"
    with O.Browser(env.ca) as jar:
        _, toks = code_flow(env, env.idp, jar, login_hint="carol")  # no cookie: login_hint (today's behaviour)
        assert H.jwt_claims(toks["id_token"])["sub"] == "carol"
        jar.login(env.idp, "alice")  # a session of carol exists in this jar: the cookie's user still wins
        _, toks = code_flow(env, env.idp, jar)
        assert H.jwt_claims(toks["id_token"])["sub"] == "alice"


def test_access_ttl_and_refresh_keep_the_resource(env):
    with O.Browser(env.ca) as alice:
        alice.login(env.short, "alice")
        _, toks = code_flow(env, env.short, alice, resource=env.protected.url)
    assert toks["expires_in"] == 3
    first = H.jwt_claims(toks["access_token"])
    assert first["aud"] == env.protected.url and first["exp"] - first["iat"] == 3
    time.sleep(3.5)
    r = O.token_post(env.short, {"grant_type": "refresh_token", "refresh_token": toks["refresh_token"],
                                 "resource": env.protected.url}, auth=("broker", "broker-secret"))
    assert r.status_code == 200, O.brief(r)
    t = r.json()
    again = H.jwt_claims(t["access_token"])
    assert t["access_token"] != toks["access_token"] and t["expires_in"] == 3
    assert again["aud"] == env.protected.url and again["sub"] == "alice" and again["exp"] > first["exp"]
    # and without `resource` on the refresh, the granted resource is used again
    r = O.token_post(env.short, {"grant_type": "refresh_token", "refresh_token": t.get("refresh_token") or
                                 toks["refresh_token"]}, auth=("broker", "broker-secret"))
    assert r.status_code == 200, O.brief(r)
    assert H.jwt_claims(r.json()["access_token"])["aud"] == env.protected.url


def test_client_id_metadata_documents(env):
    good = env.docs.url("/client.json")
    bad = env.docs.url("/bad.json")
    env.docs.docs["/client.json"] = {"client_id": good, "client_name": "cimd test", "redirect_uris": [env.redirect],
                                     "token_endpoint_auth_method": "none"}
    env.docs.docs["/bad.json"] = {"client_id": env.docs.url("/elsewhere.json"), "redirect_uris": [env.redirect]}
    before = O.as_counts(env.idp)["cimd_fetches"]
    with O.Browser(env.ca) as alice:
        alice.login(env.idp, "alice")
        res = O.authorize(alice, env.idp, good, env.redirect, SCOPE)
        assert res.params["iss"] == env.idp.issuer and "code" in res.params, sorted(res.params)
        r = O.redeem_code(env.idp, res, env.redirect, good)  # public client: client_id in the body
        assert r.status_code == 200, O.brief(r)
        assert H.jwt_claims(r.json()["id_token"])["aud"] == good
        # a document whose client_id is not its URL: refused, and no redirect
        with pytest.raises(AssertionError) as ei:
            O.authorize(alice, env.idp, bad, env.redirect, SCOPE)
        assert "invalid_client" in str(ei.value)
    assert env.docs.hits["/client.json"] >= 1 and env.docs.hits["/bad.json"] == 1
    assert O.as_counts(env.idp)["cimd_fetches"] >= before + 2
