"""Upstream OAuth (issue 16) under `[cluster]` (issue 14): consent and tokens across instances.

One Redis, three broker instances with the same config (`[cluster]`, the same `public_url`: HAProxy's), HAProxy
(examples/cluster/haproxy.cfg through clusterlib: round robin, `option http-server-close`) in front; the IdP
(tests/fixtures/as.mjs over http) and the upstream's authorization server (as.mjs over https, trusted through
`[oauth] ca_file`), and one JWT-protected upstream `crm` with `upstream_auth = { kind = "oauth" }`, as in
test_upstream_oauth.py. Under `[cluster]` consent links are sealed with `[cluster] secret_key`, authorizations in
progress are kept in Redis (sealed) and so are the tokens (hash `mcpb:tok`): a browser's `/oauth/start` and its two
`/oauth/callback`s may each land on a different instance, a link made on one instance opens on another, and every
instance finds every caller's token. Which instance served a browser request is read from HAProxy's log
(`option httplog`: one line per request, naming the backend server).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import subprocess
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

import clusterlib as C
import helpers as H
import oauthlib as OL

pytestmark = pytest.mark.anyio

N = 3
CLI_REDIRECT = "http://127.0.0.1:8765/callback"
LINK_RE = re.compile(r"https?://\S+/oauth/start\?t=[A-Za-z0-9_\-]+")
# HAProxy's httplog line: ... mcp brokers/b2 0/0/0/3/3 302 ... "GET /oauth/callback?code=... HTTP/1.1"
HAPROXY_LINE_RE = re.compile(r"\sbrokers/(b\d+)\s.*\"(GET|POST) (/[^ ?\"]*)")
SECRETS = {"BROKER_SECRET": "broker-secret", "UP_SECRET": "up-secret"}


class Env:
    def logs(self) -> str:
        """Every instance's and HAProxy's log tail (conftest attaches it to a failed test's report, as for
        test_cluster.py's `cluster` fixture)."""
        parts = [i.proc.stderr_tail(25) for i in self.instances if i.proc is not None]
        if self.haproxy is not None:
            parts.append("--- haproxy log (last 30 lines) ---\n" + "\n".join(self.haproxy.log_text().splitlines()[-30:]))
        return "\n".join(parts)


def start_instance(e: Env, inst: C.Instance) -> None:
    extra = f'''[cluster]
redis_url = "{e.redis.url}"
instance_id = "{inst.name}"
secret_key = "${{MCP_BROKER_CLUSTER_KEY}}"

[audit]
file = "{inst.audit}"

'''
    extra += OL.broker_oauth_toml(e.idp.issuer, e.ca.ca_pem, [e.upas.issuer], 'link_ttl = "2m"')
    b = H.start_broker(inst.dir, {
        "crm": {"transport": "http", "url": e.crm.url, "upstream_auth": {"kind": "oauth", "scopes": ["mcp:tools"]}},
    }, broker={"listen": f"127.0.0.1:{inst.port}", "public_url": e.url}, name=inst.name,
        auth={"issuer": e.idp.issuer}, policies=[{"effect": "allow"}], extra_toml=extra,
        env={**SECRETS, "MCP_BROKER_CLUSTER_KEY": e.key, "RUST_LOG": "info,mcp_broker=debug,rmcp=warn"})
    inst.proc = b.proc


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for b in (H.BROKER_BIN, H.NODE22):
        if not b.exists():
            pytest.fail(f"{b} is missing (cargo build --all-targets; scripts/test.sh --harness-only)")
    for b in (C.REDIS_SERVER, C.HAPROXY, C.REDIS_CLI):
        if not Path(b).exists():
            pytest.fail(f"{b} is missing (scripts/test.sh installs Debian's redis-server and haproxy)")
    d = tmp_path_factory.mktemp("cluster-oauth")
    e = Env()
    e.dir = d
    e.ca = OL.make_ca(d / "ca")
    e.key = secrets.token_hex(32)
    e.haproxy = None
    e.instances = [C.Instance(i, d) for i in range(1, N + 1)]
    stops = []
    try:
        e.redis = C.Redis(d)
        e.redis.start()
        stops.append(e.redis.stop)
        haproxy_port, up_port = H.free_port(), H.free_port()
        # Every instance's public_url: consent links and the callback (the redirect URI both authorization servers
        # allow) go through HAProxy.
        e.url = f"http://127.0.0.1:{haproxy_port}/mcp"
        e.callback = f"http://127.0.0.1:{haproxy_port}/oauth/callback"
        e.idp = H.start_auth_server(d, name="idp", env={
            "AS_CLIENTS_JSON": json.dumps([OL.broker_client("broker", "broker-secret", [e.callback])])})
        stops.append(e.idp.proc.stop)
        e.upas = OL.start_tls_as(d, "upas", e.ca, env={
            "AS_PORT": str(up_port),
            "AS_CLIENTS_JSON": json.dumps([OL.broker_client("broker-up", "up-secret", [e.callback])])})
        stops.append(e.upas.proc.stop)
        e.seen_tokens = d / "tokens-seen.txt"
        e.crm = OL.start_protected(d, e.upas.issuer, e.ca, name="crm", record_tokens=e.seen_tokens)
        stops.append(e.crm.stop)
        for inst in e.instances:
            start_instance(e, inst)
            stops.append(inst.proc.stop)
        for inst in e.instances:
            H.poll_until(lambda inst=inst: inst.readyz() == 200, 30, f"{inst.name} /readyz 200")
        e.haproxy = C.HAProxy(d, [i.port for i in e.instances], port=haproxy_port)
        stops.append(e.haproxy.stop)
        e.haproxy.wait_status({i.name: "UP" for i in e.instances}, timeout=20)
        yield e
    finally:
        for stop in reversed(stops):
            stop()


def user_token(e: Env, user: str) -> str:
    """`user`'s access token for the broker (audience: HAProxy's URL, the public_url), from the IdP."""
    with OL.Browser() as b:
        b.login(e.idp, user)
        res = OL.authorize(b, e.idp, "cli", CLI_REDIRECT, "openid mcp:tools", resource=e.url)
        r = OL.redeem_code(e.idp, res, CLI_REDIRECT, "cli", resource=e.url)
        assert r.status_code == 200, OL.brief(r)
        return r.json()["access_token"]


def link_in(r) -> str:
    assert r.is_error, r
    text = r.content[0].text
    m = LINK_RE.search(text)
    assert m, f"no consent link in: {text[:400]}"
    return m.group(0)


def consent(e: Env, user: str, link: str):
    """`user` opens `link` in their own browser and goes through every redirect: (final response, hops)."""
    with OL.Browser(e.ca) as b:
        b.login(e.idp, user)
        b.login(e.upas, user)
        return b.follow(link)


def haproxy_lines(e: Env) -> list[tuple[str, str, str]]:
    """(backend server, method, path) of every request HAProxy logged, in order."""
    return [(m.group(1), m.group(2), m.group(3)) for m in map(HAPROXY_LINE_RE.search, e.haproxy.log_text().splitlines())
            if m]


def whoami(r) -> dict:
    assert not r.is_error, r.content[0].text if r.content else r
    return json.loads(r.content[0].text)


def consent_records(e: Env, sub: str) -> dict[str, list[dict]]:
    return {i.name: [r for r in i.records() if r.get("kind") == "consent" and r.get("sub") == sub]
            for i in e.instances}


def redis_cli(e: Env, *args: str) -> bytes:
    p = subprocess.run([C.REDIS_CLI, "-h", "127.0.0.1", "-p", str(e.redis.port), *args], capture_output=True,
                       timeout=10, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    return p.stdout


def redis_contents(e: Env) -> tuple[list[bytes], bytes]:
    """Every key in Redis and everything stored under it (keys and values, concatenated)."""
    def cli(*args: str) -> bytes:
        return redis_cli(e, *args)

    keys = [k for k in cli("--scan").split(b"\n") if k]
    blob = []
    for k in keys:
        key = k.decode()
        kind = cli("TYPE", key).strip().decode()
        read = {"string": ["GET"], "hash": ["HGETALL"], "set": ["SMEMBERS"], "list": ["LRANGE", "0", "-1"],
                "zset": ["ZRANGE", "0", "-1", "WITHSCORES"], "stream": ["XRANGE", "-", "+"]}.get(kind)
        blob.append(k)
        if read is not None:
            blob.append(cli(read[0], key, *read[1:]))
    return keys, b"\n".join(blob)


def in_clear(word: str, data: bytes) -> bool:
    """`word` in `data` standing alone, not inside a run of base64url text (a sealed value is base64url: a short word
    can turn up inside one by chance)."""
    return re.search(rb"(?<![A-Za-z0-9_-])" + re.escape(word.encode()) + rb"(?![A-Za-z0-9_-])", data) is not None


def with_base(link: str, base: str) -> str:
    """`link` with its scheme and host:port replaced by `base`'s."""
    u, b = urlsplit(link), urlsplit(base)
    return urlunsplit((b.scheme, b.netloc, u.path, u.query, u.fragment))


async def test_consent_and_tokens_span_instances(cluster):
    e = cluster
    b1, b2, b3 = e.instances
    alice = user_token(e, "alice")

    # alice, not connected, through HAProxy: the authorize tool answers with a link to HAProxy's /oauth/start.
    async with H.http_session(e.url, headers=H.bearer(alice)) as s:
        link = link_in(await s.call_tool("crm__authorize", {}))
    assert link.startswith(e.url.rsplit("/mcp", 1)[0] + "/oauth/start?"), link

    # Her browser follows it through HAProxy: /oauth/start, the sign-in callback, the upstream's callback.
    before = len(haproxy_lines(e))
    page, hops = consent(e, "alice", link)
    assert page.status_code == 200 and "Connected `crm` for alice" in page.text, page.text
    broker_hops = [h for h in hops if h.url.startswith(e.url.rsplit("/mcp", 1)[0] + "/oauth/")]
    assert [urlsplit(h.url).path for h in broker_hops] == ["/oauth/start", "/oauth/callback", "/oauth/callback"], hops

    def browser_lines():
        got = [(srv, path) for srv, meth, path in haproxy_lines(e)[before:] if path.startswith("/oauth/")]
        return got if len(got) >= 3 else None

    served = H.poll_until(browser_lines, 10, "HAProxy to log the browser's three /oauth requests", interval=0.1)
    assert [p for _, p in served] == ["/oauth/start", "/oauth/callback", "/oauth/callback"], served
    on = {srv for srv, _ in served}
    assert len(on) >= 2, f"the browser's /oauth requests were all served by one instance: {served}"

    # The instance that served the last callback (the one that redeemed the code) wrote the consent record.
    def records():
        got = consent_records(e, "alice")
        return got if any(got.values()) else None

    recs = H.poll_until(records, 5, "alice's consent audit record")
    assert [n for n, rs in recs.items() if rs] == [served[-1][0]], (recs, served)
    rec = recs[served[-1][0]][0]
    assert rec["decision"] == "allow" and rec["server"] == "crm" and "connected" in rec["reason"], rec
    # ... and logged the connection (no other instance did).
    connected = [i.name for i in e.instances if "upstream connected (oauth) sub=alice server=crm" in i.stderr()]
    assert connected == [served[-1][0]], (connected, served)

    # Her calls through HAProxy land on every instance; each finds her token (in Redis).
    before = len(haproxy_lines(e))
    async with H.http_session(e.url, headers=H.bearer(alice)) as s:
        firsts = [whoami(await s.call_tool("crm__whoami", {})) for _ in range(2 * N)]
    assert {g["sub"] for g in firsts} == {"alice"}, firsts
    assert all(g["aud"] == e.crm.url and g["client_id"] == "broker-up" for g in firsts), firsts
    def posted_on():
        got = {srv for srv, meth, path in haproxy_lines(e)[before:] if meth == "POST" and path == "/mcp"}
        return got if got == {i.name for i in e.instances} else None

    H.poll_until(posted_on, 10, "HAProxy to log POST /mcp on every instance (round robin)", interval=0.1)
    # ... and each instance, called directly.
    for inst in e.instances:
        async with H.http_session(inst.url, headers=H.bearer(alice)) as s:
            got = whoami(await s.call_tool("crm__whoami", {}))
        assert got["sub"] == "alice", (inst.name, got)

    # bob, not connected: every instance gives him a link.
    bob = user_token(e, "bob")
    links = {}
    for inst in e.instances:
        async with H.http_session(inst.url, headers=H.bearer(bob)) as s:
            links[inst.name] = link_in(await s.call_tool("crm__whoami", {}))
    # The link b1 made, opened on b2 directly (the callbacks then come back through HAProxy).
    moved = with_base(links["b1"], b2.base)
    assert moved.startswith(b2.base + "/oauth/start?"), moved
    before = len(haproxy_lines(e))
    with OL.Browser(e.ca) as br:
        br.login(e.idp, "bob")
        br.login(e.upas, "bob")
        signin_cb, hops = br.follow(moved, stop_at_prefix=e.callback)
        assert hops[0].url == moved and hops[0].status == 302, hops
        # The authorization in progress is in Redis, under a hash of its state, sealed.
        state = OL.query_of(signin_cb)["state"]
        key = "mcpb:oauth:" + hashlib.sha256(state.encode()).hexdigest()
        keys, blob = redis_contents(e)
        assert key.encode() in keys, keys
        kept = redis_cli(e, "GET", key).strip()
        assert kept and state.encode() not in kept, kept[:200]
        assert not in_clear("bob", kept) and not in_clear("crm", kept), kept[:200]
        page, hops = br.follow(signin_cb)
    assert page.status_code == 200 and "Connected `crm` for bob" in page.text, (page.status_code, page.text[:500])
    # /oauth/start was b2's (directly); both callbacks came through HAProxy.
    # HAProxy writes a request's log line after the response: wait for both (CI once read only the first).
    def callback_lines():
        got = [(srv, path) for srv, _m, path in haproxy_lines(e)[before:] if path.startswith("/oauth/")]
        return got if len(got) >= 2 else None

    lines = H.poll_until(callback_lines, 10, "HAProxy to log the two callbacks", interval=0.1)
    assert [p for _, p in lines] == ["/oauth/callback", "/oauth/callback"], lines
    async with H.http_session(e.url, headers=H.bearer(bob)) as s:
        for _ in range(N):
            assert whoami(await s.call_tool("crm__whoami", {}))["sub"] == "bob"
    for inst in (b1, b3):
        async with H.http_session(inst.url, headers=H.bearer(bob)) as s:
            assert whoami(await s.call_tool("crm__whoami", {}))["sub"] == "bob", inst.name
    # alice's calls still carry her own token.
    async with H.http_session(b3.url, headers=H.bearer(alice)) as s:
        assert whoami(await s.call_tool("crm__whoami", {}))["sub"] == "alice"

    # Redis, once every session above is closed (a live session's record `mcpb:s:{id}` names its owner's sub, as
    # the README documents): the token store is there, and nothing in Redis is a token or a caller's name in clear.
    keys, blob = redis_contents(e)
    assert b"mcpb:tok" in keys, keys
    assert redis_cli(e, "HLEN", "mcpb:tok").strip() == b"2", "one token store entry each for alice and bob"
    seen = [t for t in e.seen_tokens.read_text().splitlines() if t]
    assert len(seen) >= 2, "the protected server recorded no tokens"
    for tok in seen:
        for piece in (tok, tok[:40], tok[-30:]):
            assert piece.encode() not in blob, "an upstream token is in Redis in clear"
    for word in ("alice", "bob", "crm"):
        assert not in_clear(word, blob), f"{word!r} is in Redis in clear"
    assert alice.encode() not in blob and bob.encode() not in blob

    # No upstream token in any broker log or audit file, and no panic.
    logs = "".join(p.read_text(errors="replace") for p in e.dir.glob("b*/*.log"))
    logs += "".join(i.audit.read_text() for i in e.instances if i.audit.exists())
    assert not [t for t in seen if t in logs or t[-30:] in logs], "an upstream token is in a broker log"
    assert not re.search(r"panicked at", logs)
