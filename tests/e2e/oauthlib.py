"""Helpers for end-to-end tests of upstream OAuth with real parts: a private CA, HTTPS instances of the AS fixture
(tests/fixtures/as.mjs), the protected MCP server fixture trusting that CA, a cookie-keeping "browser" that follows
redirects hop by hop, PKCE, and a tiny HTTPS server for JSON documents (Client ID Metadata Documents).

    ca = make_ca(tmp_path)                       # ca.ca_pem, ca.leaf("name") -> (cert_path, key_path), ca.ssl_context()
    idp = start_tls_as(logs, "idp", ca, env={"AS_CLIENTS_JSON": json.dumps([...])})   # H.AuthServer, https issuer
    prot = start_protected(logs, upstream_as.issuer, ca)                             # .url (…/mcp), .seen()
    b = Browser(ca); b.login(idp, "alice")
    res = authorize(b, idp, client_id="broker", redirect_uri=..., scope="openid mcp:tools")   # code, state, iss
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import httpx2
from cryptography.hazmat.primitives import serialization

import helpers as H
from test_tls import make_ca as _make_ca_pair, write_leaf as _write_leaf

IDJAG_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id-jag"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
REFRESH_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:refresh_token"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"

# ----------------------------------------------------------------------------------------------- private CA


class CA:
    """A throw-away CA (EC P-256, one day) in `dir`: `ca_pem` is its certificate; `leaf(name)` writes a server
    certificate (chain: leaf + CA) for IP 127.0.0.1 and DNS localhost, and its key."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._pair = _make_ca_pair()
        self.ca_pem = self.dir / "ca.pem"
        self.ca_pem.write_bytes(self._pair[1].public_bytes(serialization.Encoding.PEM))

    def leaf(self, name: str) -> tuple[Path, Path]:
        cert, key = self.dir / f"{name}-cert.pem", self.dir / f"{name}-key.pem"
        _write_leaf(self._pair, name, cert, key)
        return cert, key

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_pem))


def make_ca(directory: Path) -> CA:
    return CA(directory)


# ----------------------------------------------------------------------------------------------- processes


def start_tls_as(log_dir: Path, name: str, ca: CA, env: dict[str, str] | None = None) -> H.AuthServer:
    """tests/fixtures/as.mjs over HTTPS (issuer https://127.0.0.1:PORT) with a leaf of `ca`; Node trusts `ca` for its
    own fetches (NODE_EXTRA_CA_CERTS). The returned AuthServer's token helpers trust `ca` too."""
    cert, key = ca.leaf(name)
    a = H.start_auth_server(log_dir, name=name, env={"AS_TLS_CERT": str(cert), "AS_TLS_KEY": str(key),
                                                    "NODE_EXTRA_CA_CERTS": str(ca.ca_pem), **(env or {})})
    a.verify = ca.ssl_context()
    return a


def as_counts(a: H.AuthServer) -> dict:
    """GET /__test/counts of an AS fixture: {"token": {grant_type: n}, "token_exchange": {requested_token_type: n},
    "revocations": {token_type_hint: n}, "cimd_fetches": n, "introspections": n}."""
    with httpx2.Client(timeout=10, verify=a.verify) as c:
        return c.get(a.issuer + "/__test/counts").json()


class Protected:
    """tests/fixtures/protected_server.py (aud = `url`, tokens from `issuer`)."""

    def __init__(self, up: H.Upstream):
        self.up = up
        self.proc = up.proc
        self.url = up.url
        self.base = up.url.rsplit("/mcp", 1)[0]
        self.prm_url = self.base + "/.well-known/oauth-protected-resource/mcp"

    def seen(self) -> dict:
        """{"bearer": {sha256-prefix: count}, "api_key": {...}, "rejected": N} (no credential values)."""
        return httpx2.get(self.base + "/__seen", timeout=10).json()

    def stop(self) -> None:
        self.up.proc.stop()


def start_protected(log_dir: Path, issuer: str, ca: CA | None, name: str = "protected", **kw: Any) -> Protected:
    return Protected(H.start_protected_server(log_dir, issuer, name=name, ca_file=ca.ca_pem if ca else None, **kw))


# ----------------------------------------------------------------------------------------------- browser


@dataclass
class Hop:
    url: str
    status: int
    location: str | None  # absolute, or None when the response was not a redirect


@dataclass
class Browser:
    """A cookie-keeping HTTP client that trusts `ca` and never follows redirects by itself."""

    ca: CA | None = None
    timeout: float = 20
    client: httpx2.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx2.Client(verify=self.ca.ssl_context() if self.ca else True, follow_redirects=False,
                                    timeout=self.timeout)

    def login(self, as_server: H.AuthServer, user: str) -> None:
        """Set the AS fixture's fixture_user cookie: this browser's authorization requests sign in as `user`."""
        r = self.client.get(as_server.issuer + "/__test/login", params={"user": user})
        r.raise_for_status()

    def follow(self, url: str, stop_at_prefix: str | None = None,
               max_hops: int = 20) -> tuple[httpx2.Response | str, list[Hop]]:
        """GET `url` and follow redirects across hosts. Stops at the first Location starting with `stop_at_prefix`
        and returns that URL (not requested) instead of a response; otherwise returns the final response."""
        hops: list[Hop] = []
        for _ in range(max_hops):
            r = self.client.get(url)
            loc = r.headers.get("location")
            if r.is_redirect and loc:
                loc = urljoin(url, loc)
                hops.append(Hop(url, r.status_code, loc))
                if stop_at_prefix is not None and loc.startswith(stop_at_prefix):
                    return loc, hops
                url = loc
                continue
            hops.append(Hop(url, r.status_code, None))
            return r, hops
        raise AssertionError(f"more than {max_hops} redirects: {[h.url for h in hops]}")

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge)."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


@dataclass
class AuthzResult:
    redirect: str           # the redirect URI with its query, as the AS sent it (not requested)
    params: dict[str, str]  # its query: code, state, iss (or error, error_description)
    verifier: str
    hops: list[Hop]


def authorize(browser: Browser, as_server: H.AuthServer, client_id: str, redirect_uri: str, scope: str | None,
              resource: str | None = None, login_hint: str | None = None, **extra: str) -> AuthzResult:
    """An authorization request (code + PKCE S256) followed by `browser` up to the redirect back to `redirect_uri`."""
    verifier, challenge = pkce_pair()
    q = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
         "state": secrets.token_urlsafe(12), "code_challenge": challenge, "code_challenge_method": "S256", **extra}
    if scope is not None:
        q["scope"] = scope
    if resource is not None:
        q["resource"] = resource
    if login_hint is not None:
        q["login_hint"] = login_hint
    final, hops = browser.follow(as_server.issuer + "/auth?" + urlencode(q), stop_at_prefix=redirect_uri)
    if not isinstance(final, str):
        raise AssertionError(f"authorization did not come back to {redirect_uri}: HTTP {final.status_code} "
                             f"{final.text[:500]} via {[(h.url.split('?')[0], h.status) for h in hops]}")
    params = query_of(final)
    if params.get("state") != q["state"]:
        raise AssertionError(f"state mismatch in the authorization response: {sorted(params)}")
    return AuthzResult(final, params, verifier, hops)


def brief(r: httpx2.Response) -> str:
    """A token-endpoint response for an assertion message, without any token value: the status and either the OAuth
    error fields or the names of the fields of a success."""
    try:
        body = r.json()
    except ValueError:
        return f"HTTP {r.status_code} (not JSON, {len(r.content)} bytes)"
    if isinstance(body, dict) and "error" in body:
        return f"HTTP {r.status_code} {body.get('error')}: {body.get('error_description', '')}"
    return f"HTTP {r.status_code} fields {sorted(body) if isinstance(body, dict) else type(body).__name__}"


def token_post(as_server: H.AuthServer, data: dict[str, str], auth: tuple[str, str] | None = None) -> httpx2.Response:
    """POST the token endpoint (client_secret_basic with `auth`, else whatever `data` carries)."""
    with httpx2.Client(timeout=20, verify=as_server.verify) as c:
        return c.post(as_server.token_endpoint, data=data, auth=auth)


def redeem_code(as_server: H.AuthServer, res: AuthzResult, redirect_uri: str, client_id: str,
                client_secret: str | None = None, resource: str | None = None) -> httpx2.Response:
    data = {"grant_type": "authorization_code", "code": res.params["code"], "redirect_uri": redirect_uri,
            "code_verifier": res.verifier}
    if resource is not None:
        data["resource"] = resource
    if client_secret is None:
        data["client_id"] = client_id
        return token_post(as_server, data)
    return token_post(as_server, data, auth=(client_id, client_secret))


def request_id_jag(idp: H.AuthServer, client: tuple[str, str], subject_token: str, subject_token_type: str,
                   audience: str, resource: str | None = None, scope: str | None = None) -> httpx2.Response:
    data = {"grant_type": TOKEN_EXCHANGE, "requested_token_type": IDJAG_TOKEN_TYPE,
            "subject_token": subject_token, "subject_token_type": subject_token_type, "audience": audience}
    if resource is not None:
        data["resource"] = resource
    if scope is not None:
        data["scope"] = scope
    return token_post(idp, data, auth=client)


def redeem_jag(resource_as: H.AuthServer, client: tuple[str, str], assertion: str) -> httpx2.Response:
    return token_post(resource_as, {"grant_type": JWT_BEARER, "assertion": assertion}, auth=client)


def broker_client(client_id: str, client_secret: str, redirect_uris: list[str], **extra: Any) -> dict[str, Any]:
    """Client metadata for AS_CLIENTS_JSON: a confidential web client with every grant the broker may use."""
    return {"client_id": client_id, "client_secret": client_secret,
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["authorization_code", "refresh_token", TOKEN_EXCHANGE, JWT_BEARER, "client_credentials"],
            "response_types": ["code"], "redirect_uris": redirect_uris, **extra}


def broker_oauth_toml(idp_issuer: str, ca_pem: Any, upstream_issuers: list[str], oauth_extra: str = "") -> str:
    """The broker's upstream-OAuth config as the tests use it: [credentials.corp] (its client `broker` at the IdP,
    secret from ${BROKER_SECRET}) signing users in, `ca_pem` trusted, `oauth_extra` lines in [oauth], and its client
    `broker-up` (${UP_SECRET}) at each of `upstream_issuers`."""
    out = f'''[credentials.corp]
kind = "token_exchange"
token_endpoint = "{idp_issuer}/token"
client_id = "broker"
client_secret = "${{BROKER_SECRET}}"

[oauth]
sign_in = "corp"
ca_file = "{ca_pem}"
{oauth_extra}
'''
    for issuer in upstream_issuers:
        out += f'''
[oauth.clients."{issuer}"]
client_id = "broker-up"
client_secret = "${{UP_SECRET}}"
'''
    return out


# ----------------------------------------------------------------------------------------------- HTTPS documents


class JsonHttpsServer:
    """A threaded HTTPS server on 127.0.0.1 serving `docs[path]` as JSON (404 otherwise), with a leaf of `ca`.
    `base` is https://127.0.0.1:PORT; `hits` counts GETs per path."""

    def __init__(self, ca: CA, name: str = "docs"):
        self.docs: dict[str, Any] = {}
        self.hits: dict[str, int] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                path = self.path.split("?")[0]
                owner.hits[path] = owner.hits.get(path, 0) + 1
                doc = owner.docs.get(path)
                body = json.dumps(doc).encode() if doc is not None else b'{"error":"not found"}'
                self.send_response(200 if doc is not None else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_a):
                pass

        cert, key = ca.leaf(name)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.base = f"https://127.0.0.1:{self.httpd.server_address[1]}"
        self._t = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._t.start()

    def url(self, path: str) -> str:
        return self.base + path

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
