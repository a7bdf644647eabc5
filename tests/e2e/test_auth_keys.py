"""JWKS caching behaviour of the broker's resource server (SPEC-CHECKLIST §1, issue 3):
keys are fetched once and cached, cached keys keep working while the issuer is down, and an unknown
`kid` triggers at most one refetch per interval (so a flood of forged tokens cannot hammer the IdP).

The JWKS here is served by a tiny in-test HTTP server with a test-generated key, because a real
authorization server cannot be made to go down on cue or to count its JWKS fetches; the token checks
themselves are the broker's real ones."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

import helpers as H

ISSUER = "https://test-issuer.example"
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


class Jwks:
    """Serves one JWK set; counts fetches; can be switched to answer 503 (the issuer is down)."""

    def __init__(self, keys: list[dict]):
        self.body = json.dumps({"keys": keys}).encode()
        self.fetches = 0
        self.down = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.fetches += 1
                if outer.down:
                    self.send_response(503)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def keyed_broker(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="RS256", use="sig")
    jwks = Jwks([jwk])
    broker = H.start_broker(
        tmp_path, {"ledger": H.example_stdio_spec(H.EXAMPLES_DIR / "ledger")},
        auth={"issuer": ISSUER, "jwks_uri": jwks.url, "required_scopes": ["mcp:tools"]},
        policies=[{"effect": "allow"}], name="broker-keys")

    def mint(kid: str = "k1", signer=key, **claims) -> str:
        now = int(time.time())
        c = {"iss": ISSUER, "sub": "alice", "aud": broker.url, "exp": now + 600, "iat": now, "scope": "mcp:tools"}
        c.update(claims)
        return jwt.encode(c, signer, algorithm="RS256", headers={"kid": kid})

    yield broker, jwks, mint
    broker.stop()
    jwks.close()


def post_init(url: str, token: str) -> httpx2.Response:
    return httpx2.post(url, json=INIT, headers={**HEADERS, "Authorization": f"Bearer {token}"}, timeout=15)


def test_cached_keys_survive_issuer_outage_and_unknown_kids_are_rate_limited(keyed_broker):
    broker, jwks, mint = keyed_broker
    assert jwks.fetches == 0, "keys are fetched on first use, not before"

    r = post_init(broker.url, mint())
    assert r.status_code == 200, r.text
    assert jwks.fetches == 1

    # Another valid token with the same kid: served from the cache.
    assert post_init(broker.url, mint(sub="bob")).status_code == 200
    assert jwks.fetches == 1

    # The issuer goes down: tokens signed with the cached key keep working.
    jwks.down = True
    assert post_init(broker.url, mint(sub="carol")).status_code == 200

    # A flood of tokens naming unknown keys: each is refused, and the JWKS is fetched at most once
    # more within the refresh interval (30 s), not once per token.
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    before = jwks.fetches
    for i in range(8):
        r = post_init(broker.url, mint(kid=f"forged-{i}", signer=other))
        assert r.status_code == 401, r.text
        challenge = r.headers["www-authenticate"]
        assert 'error="invalid_token"' in challenge, challenge
    assert jwks.fetches - before <= 1, f"{jwks.fetches - before} JWKS fetches for 8 unknown kids"

    # And the good key still works after the failed refresh.
    assert post_init(broker.url, mint(sub="dave")).status_code == 200


def test_tokens_never_reach_the_log(keyed_broker):
    broker, _jwks, mint = keyed_broker
    good, expired = mint(), mint(exp=int(time.time()) - 3600)
    assert post_init(broker.url, good).status_code == 200
    assert post_init(broker.url, expired).status_code == 401
    broker.stop()
    log = broker.proc.stderr_tail(10_000)
    for t in (good, expired):
        assert t not in log and t.split(".")[1] not in log
