"""HTTP-level fuzz of mcp-broker's /mcp endpoint (run with the harness venv's python).

    target/harness/venv/bin/python scripts/fuzz_http.py                     # starts its own broker (debug build)
    target/harness/venv/bin/python scripts/fuzz_http.py --auth              # ... with [auth] (a local JWKS)
    target/harness/venv/bin/python scripts/fuzz_http.py --url http://127.0.0.1:8080/mcp [--token T]
    ... --iterations 20000 --seconds 300 --seed 7 --check-every 50

Each iteration sends one mutated request: HTTP method and path, headers (content type, accept, protocol
version, session id -- a live one or not, SEP-2243 Mcp-Method/Mcp-Name, origin, host, authorization, huge and
odd values) and body (JSON-RPC with random methods, params shapes, ids, huge or odd names and URIs; byte-level
mutations of valid bodies; batches; invalid UTF-8; deep nesting; oversized), or a raw malformed HTTP/1.1 request
over a socket. Properties: no answer is 5xx (a 503 counts only with --allow-503, for a draining broker); the
broker process stays alive (when this script started it); and every --check-every mutations a normal
initialize + tools/list on a fresh session answers within 1 s. Prints progress and one summary line; exit 1 on a
failure. Loopback only, bounded by --iterations and --seconds. tests/e2e/test_fuzz.py runs `run()` bounded.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import helpers as H  # noqa: E402
import httpx2  # noqa: E402

PROTO = "2025-11-25"
METHODS = ["initialize", "ping", "tools/list", "tools/call", "prompts/list", "prompts/get", "resources/list",
           "resources/read", "resources/templates/list", "resources/subscribe", "resources/unsubscribe",
           "completion/complete", "logging/setLevel", "notifications/initialized", "notifications/cancelled",
           "notifications/progress", "notifications/roots/list_changed", "io.mcp-broker/raw/tools/list",
           "io.mcp-broker/raw/tools/call", "io.mcp-broker/raw/resources/read", "sampling/createMessage",
           "roots/list", "tasks/get", "server/discover"]
NAMES = ["ledger__get_account", "ledger__list_accounts", "ledger__reconcile_ledger", "get_account", "ledger__", "__",
         "", "LEDGER__get_account", "ledger__summarize_account", "ledger__get_account\u0000", "../../etc/passwd"]
URIS = ["ledger+ledger://accounts/ACC-1001", "ledger://accounts/ACC-1001", "ledger+", "+", "LEDGER+ledger://x",
        "ledger+ledger://accounts/%2e%2e/%2E%2e/x", "ledger+ledger://ACCOUNTS/../accounts/ACC-1001", "file:///etc/passwd",
        "ledger+ledger://accounts/{id}", ""]
PATHS = ["/mcp"] * 40 + ["/mcp/", "/mcp?x=1", "/mcp?access_token=abc", "/", "/metrics", "/healthz", "/readyz",
                          "/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource",
                          "/.well-known/oauth-authorization-server", "/mcp/../mcp", "/%6dcp", "//mcp", "/mcp%00",
                          "/" + "a" * 5000]
HTTP_METHODS = ["POST"] * 10 + ["GET", "GET", "DELETE", "DELETE", "PUT", "PATCH", "OPTIONS", "HEAD"]


class Rng(random.Random):
    def text(self, n: int = 40) -> str:
        k = self.randint(0, n)
        pools = ["abc_-+:/%.", "\u00e9\u4e2d\U0001F600\u202e\u0000\ufffd", "{}[]\"\\,", "0123456789"]
        pool = "".join(self.sample(pools, self.randint(1, len(pools))))
        return "".join(self.choice(pool) for _ in range(k))

    def huge(self) -> str:
        return self.choice("a_+/\u00e9%") * self.choice([100, 5000, 70_000, 300_000])

    def name(self) -> str:
        r = self.random()
        if r < 0.5:
            return self.choice(NAMES)
        if r < 0.8:
            return self.text()
        if r < 0.9:
            return self.choice(NAMES) + self.text()
        return self.huge()

    def uri(self) -> str:
        r = self.random()
        if r < 0.5:
            return self.choice(URIS)
        if r < 0.8:
            return self.choice(URIS) + self.text()
        if r < 0.9:
            return self.text()
        return "ledger+" + self.huge()

    def leaf(self) -> Any:
        return self.choice([None, True, False, 0, -1, 2 ** 63, -(2 ** 63) - 1, 10 ** 30, 1.5, 1e308,
                            self.text(), self.name(), ""])

    def value(self, depth: int = 3) -> Any:
        if depth <= 0 or self.random() < 0.4:
            return self.leaf()
        if self.random() < 0.5:
            return [self.value(depth - 1) for _ in range(self.randint(0, 5))]
        return {self.text(10): self.value(depth - 1) for _ in range(self.randint(0, 5))}

    def params(self) -> Any:
        shapes = [
            lambda: {"name": self.name(), "arguments": self.value()},
            lambda: {"name": self.name(), "arguments": {"account_id": self.text()}},
            lambda: {"uri": self.uri()},
            lambda: {"ref": {"type": self.choice(["ref/prompt", "ref/resource", "ref/x"]), "name": self.name(),
                             "uri": self.uri()}, "argument": {"name": self.text(), "value": self.text()}},
            lambda: {"level": self.choice(["debug", "info", "emergency", "nope", ""])},
            lambda: {"cursor": self.text()},
            lambda: {"requestId": self.leaf(), "reason": self.text()},
            lambda: {"progressToken": self.leaf(), "progress": self.leaf()},
            lambda: {"protocolVersion": self.choice([PROTO, "2026-07-28", "1999-01-01", self.text()]),
                     "capabilities": self.value(), "clientInfo": {"name": self.text(), "version": self.text()}},
            lambda: self.value(),
            lambda: None,
        ]
        p = self.choice(shapes)()
        if isinstance(p, dict) and self.random() < 0.3:
            p["_meta"] = self.choice([{"progressToken": self.leaf()},
                                      {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}, self.value()])
        return p

    def message(self) -> Any:
        m: dict[str, Any] = {"jsonrpc": "2.0"}
        r = self.random()
        if r < 0.75:
            m["id"] = self.choice([self.randint(1, 10 ** 6), str(uuid.uuid4()), self.leaf(), self.text(), self.huge()]
                                  if self.random() < 0.3 else [self.randint(1, 10 ** 6)])
        m["method"] = self.choice(METHODS) if self.random() < 0.85 else self.text()
        p = self.params()
        if p is not None:
            m["params"] = p
        if self.random() < 0.1:
            self.choice([lambda: m.pop("jsonrpc"), lambda: m.update(jsonrpc="1.0"), lambda: m.update(result={}),
                         lambda: m.update(error={"code": 1}), lambda: m.pop("method")])()
        return m

    def body(self) -> bytes:
        r = self.random()
        if r < 0.55:
            return json.dumps(self.message()).encode()
        if r < 0.65:
            return json.dumps([self.message() for _ in range(self.randint(0, 5))]).encode()
        if r < 0.8:  # byte-level mutations of a valid body
            b = bytearray(json.dumps(self.message()).encode())
            for _ in range(self.randint(1, 8)):
                op = self.randint(0, 3)
                i = self.randint(0, max(0, len(b) - 1))
                if op == 0 and b:
                    b[i] ^= 1 << self.randint(0, 7)
                elif op == 1:
                    del b[i:i + self.randint(1, 10)]
                elif op == 2:
                    b[i:i] = bytes(self.randint(0, 255) for _ in range(self.randint(1, 10)))
                else:
                    b = b[:i]
            return bytes(b)
        return self.choice([
            lambda: b"",
            lambda: b"null",
            lambda: b"[]",
            lambda: b"{}",
            lambda: b"\xff\xfe\x00{",
            lambda: b"\xef\xbb\xbf" + json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode(),
            lambda: b"[" * 100_000 + b"]" * 100_000,
            lambda: b'{"a":' * 5000 + b"1" + b"}" * 5000,
            lambda: json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                "params": {"name": "x", "arguments": {"a": "b" * 5_000_000}}}).encode(),
            lambda: json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {}, **{f"k{i}": i for i in range(20000)}}).encode(),
            lambda: self.text(200).encode("utf-8", "surrogatepass"),
            lambda: bytes(self.randint(0, 255) for _ in range(self.randint(1, 300))),
        ])()

    def header_value(self) -> str:
        return self.choice([self.text(30), "x" * self.choice([10, 8000, 20000]), "", " ", "\u00e9\u00e8", "a, b",
                            str(uuid.uuid4())])


class Fuzzer:
    def __init__(self, url: str, token: str | None, seed: int, allow_503: bool, proc: H.Proc | None,
                 check_every: int, verbose: bool):
        self.url, self.token, self.proc = url, token, proc
        self.rng = Rng(seed)
        self.seed = seed
        self.allow_503 = allow_503
        self.check_every = check_every
        self.verbose = verbose
        u = urlsplit(url)
        self.base = f"{u.scheme}://{u.netloc}"
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.client = httpx2.Client(timeout=10)
        self.sessions: list[str] = []
        self.statuses: collections.Counter[int | str] = collections.Counter()
        self.client_errors: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.checks = 0
        self.iterations = 0
        self.slowest_check = 0.0

    def good_headers(self, sid: str | None = None) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": H.MCP_ACCEPT, "MCP-Protocol-Version": PROTO}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        if sid:
            h["Mcp-Session-Id"] = sid
        return h

    def new_session(self, client: httpx2.Client | None = None) -> str:
        c = client or self.client
        r = c.post(self.url, headers=self.good_headers(), json=H.init_body(1, "fuzz"))
        if r.status_code != 200:
            raise AssertionError(f"initialize: HTTP {r.status_code} {r.text[:200]}")
        sid = r.headers["mcp-session-id"]
        c.post(self.url, headers=self.good_headers(sid), json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        return sid

    def check(self) -> None:
        """Alive, and a fresh session lists tools within 1 s."""
        self.checks += 1
        if self.proc is not None and not self.proc.alive():
            self.failures.append(f"the broker died after {self.iterations} iterations:\n{self.proc.stderr_tail()}")
            return
        t0 = time.monotonic()
        try:
            with httpx2.Client(timeout=1.0) as c:
                sid = self.new_session(c)
                r = c.post(self.url, headers=self.good_headers(sid), json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
                m = H.final_response(r, 2)
                assert "result" in m and m["result"].get("tools"), f"tools/list: {str(m)[:300]}"
                c.delete(self.url, headers=self.good_headers(sid))
        except Exception as e:  # noqa: BLE001
            self.failures.append(f"not responsive after {self.iterations} iterations: {type(e).__name__}: {e}")
            return
        dt = time.monotonic() - t0
        self.slowest_check = max(self.slowest_check, dt)
        if dt > 1.0:
            self.failures.append(f"initialize + tools/list took {dt:.2f} s after {self.iterations} iterations")

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Mutated headers as raw pairs (UTF-8 values go out as bytes; NUL, CR and LF are dropped)."""
        rng = self.rng
        if rng.random() < 0.5:  # a well-formed request on a live session (or none), one header changed
            h = self.good_headers(rng.choice(self.sessions + [None]))
            if rng.random() < 0.5:
                k = rng.choice(["Content-Type", "Accept", "MCP-Protocol-Version", "Mcp-Session-Id", "Mcp-Method",
                                "Mcp-Name", "Authorization", "Origin"])
                h[k] = rng.header_value()
            return self.raw_pairs(h)
        h: dict[str, str] = {}
        if rng.random() < 0.85:
            h["Content-Type"] = rng.choice(["application/json"] * 6 + ["text/plain", "application/json; charset=utf-16",
                                                                       "multipart/form-data", rng.text(20)])
        if rng.random() < 0.85:
            h["Accept"] = rng.choice([H.MCP_ACCEPT] * 5 + ["*/*", "text/event-stream", "application/json", "text/html",
                                                          rng.text(20)])
        if rng.random() < 0.7:
            h["MCP-Protocol-Version"] = rng.choice([PROTO] * 4 + ["2026-07-28", "2025-03-26", "2024-11-05", rng.text(12)])
        r = rng.random()
        if r < 0.5 and self.sessions:
            h["Mcp-Session-Id"] = rng.choice(self.sessions)
        elif r < 0.65:
            h["Mcp-Session-Id"] = rng.header_value()
        if rng.random() < 0.15:
            h["Mcp-Method"] = rng.choice(METHODS + [rng.text(10)])
        if rng.random() < 0.1:
            h["Mcp-Name"] = rng.header_value()
        if rng.random() < 0.1:
            h["Origin"] = rng.choice(["http://127.0.0.1", "http://evil.example", "null", rng.header_value()])
        if rng.random() < 0.05:
            h["Host"] = rng.choice(["evil.example", "127.0.0.1:1", rng.text(10)])
        if rng.random() < 0.05:
            h["Last-Event-ID"] = rng.header_value()
        if self.token and rng.random() < 0.8:
            h["Authorization"] = f"Bearer {self.token}"
        elif rng.random() < 0.3:
            h["Authorization"] = rng.choice(["Bearer " + rng.header_value(), "Basic Zm9vOmJhcg==", "Bearer", rng.header_value()])
        if rng.random() < 0.05:  # repeated headers and raw (latin-1) bytes
            pairs = self.raw_pairs(h)
            pairs.append((b"MCP-Protocol-Version", rng.choice([b"2025-11-25", b"\xe9\xff"])))
            pairs.append((b"Mcp-Session-Id", rng.choice([b"a", b"\xe9"])))
            return pairs
        return self.raw_pairs(h)

    @staticmethod
    def raw_pairs(h: dict[str, str]) -> list[tuple[bytes, bytes]]:
        clean = lambda v: v.replace("\x00", "").replace("\r", "").replace("\n", "")  # noqa: E731
        return [(k.encode(), clean(v).encode("utf-8", "replace")) for k, v in h.items()]

    def one(self) -> None:
        rng = self.rng
        if rng.random() < 0.04:
            return self.raw()
        if rng.random() < 0.4:  # a well-formed POST on a live session carrying a fuzzed JSON-RPC message
            method, path = "POST", "/mcp"
            body = json.dumps(rng.message()).encode()
            headers = self.raw_pairs(self.good_headers(rng.choice(self.sessions)))
        else:
            method = rng.choice(HTTP_METHODS)
            path = rng.choice(PATHS)
            body = rng.body() if method in ("POST", "PUT", "PATCH") or rng.random() < 0.1 else b""
            headers = self.headers()
        try:
            with self.client.stream(method, self.base + path, headers=headers, content=body,
                                    timeout=httpx2.Timeout(10, read=2.0)) as r:
                status = r.status_code
                # An SSE stream (GET on a live session) may stay open: read what is there, then let it go.
                if "text/event-stream" not in r.headers.get("content-type", "") or method == "POST":
                    r.read()
        except httpx2.ReadTimeout:
            self.client_errors["read timeout (open stream)"] += 1
            return
        except (httpx2.LocalProtocolError, UnicodeEncodeError, ValueError) as e:
            self.client_errors[f"not sent: {type(e).__name__}"] += 1
            return
        except httpx2.HTTPError as e:
            self.client_errors[f"{type(e).__name__}"] += 1
            return
        self.statuses[status] += 1
        if status >= 500 and not (status == 503 and self.allow_503):
            self.failures.append(f"HTTP {status} for {method} {path[:80]} headers={str(headers)[:300]} body={body[:300]!r}")

    def raw(self) -> None:
        """A malformed HTTP/1.1 request over a plain socket."""
        rng = self.rng
        host = f"{self.host}:{self.port}"
        reqs = [
            b"GET /mcp HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Length: -1\r\n\r\n",
            b"POST /mcp HTTP/1.1\r\nHost: " + host.encode() + b"\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
            b"POST /mcp HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Length: 10\r\nContent-Length: 20\r\n\r\n{}",
            b"POST /mcp HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Length: 99999999999999999999\r\n\r\n{}",
            b"POST /mcp HTTP/9.9\r\n\r\n",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # a TLS ClientHello
            b"GET /mcp HTTP/1.1\r\nHost: " + host.encode() + b"\r\n" + b"X-A: b\r\n" * 500 + b"\r\n",
            b"GET /mcp HTTP/1.1\r\nHost: " + host.encode() + b"\r\nX-Long: " + b"a" * 100_000 + b"\r\n\r\n",
            b"POST /mcp HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Length: 5\r\n\r\n",  # body never sent
            bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 200))) + b"\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ]
        req = rng.choice(reqs)
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as s:
                s.sendall(req)
                s.settimeout(1.0)
                data = b""
                try:
                    while len(data) < 64:
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                except (socket.timeout, ConnectionResetError):
                    pass
        except OSError as e:
            self.client_errors[f"raw: {type(e).__name__}"] += 1
            return
        if data.startswith(b"HTTP/"):
            try:
                status = int(data.split(b" ", 2)[1])
            except (IndexError, ValueError):
                status = -1
            self.statuses[f"raw {status}"] += 1
            if status >= 500 and not (status == 503 and self.allow_503):
                self.failures.append(f"raw request {req[:120]!r} answered {data[:200]!r}")
        else:
            self.statuses["raw: no answer"] += 1

    def run(self, iterations: int, seconds: float) -> dict:
        t0 = time.monotonic()
        self.sessions = [self.new_session() for _ in range(3)]
        self.check()
        while self.iterations < iterations and time.monotonic() - t0 < seconds and not self.failures:
            self.one()
            self.iterations += 1
            if self.iterations % self.check_every == 0:
                self.check()
                # Session churn: retire one live session, open another.
                old = self.sessions.pop(0)
                try:
                    self.client.delete(self.url, headers=self.good_headers(old))
                    self.sessions.append(self.new_session())
                except Exception as e:  # noqa: BLE001
                    self.failures.append(f"session churn failed: {e}")
            if self.verbose and self.iterations % 500 == 0:
                print(f"fuzz_http: {self.iterations} iterations, {time.monotonic() - t0:.0f} s, "
                      f"{sum(1 for s in self.statuses if isinstance(s, int) and s >= 500)} 5xx kinds", flush=True)
        if not self.failures:
            self.check()
        dt = time.monotonic() - t0
        self.client.close()
        return {
            "seed": self.seed, "iterations": self.iterations, "seconds": round(dt, 1), "checks": self.checks,
            "slowest_check_s": round(self.slowest_check, 3),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=lambda kv: str(kv[0]))},
            "client_errors": dict(self.client_errors), "failures": self.failures[:20],
        }


def start(work_dir: Path, auth: bool) -> tuple[H.Broker, str | None, Any]:
    """A broker in front of two ledgers (one unprefixed), optionally with [auth] and a local JWKS."""
    servers = {"ledger": H.example_stdio_spec(H.LEDGER_BIN), "plain": H.example_stdio_spec(H.LEDGER_BIN, prefix="")}
    if not auth:
        b = H.start_broker(work_dir, servers, name="fuzz-broker", env={"RUST_LOG": "warn"})
        return b, None, None
    key, kid, issuer = H.rsa_private_key(), "fuzz-key", "https://fuzz-issuer.example"
    jwks = H.JwksServer([H.public_jwk(key, kid)])
    try:
        b = H.start_broker(work_dir, servers, name="fuzz-broker-auth", env={"RUST_LOG": "warn"},
                           auth={"issuer": issuer, "jwks_uri": jwks.url, "required_scopes": ["mcp:tools"]},
                           policies=[{"effect": "allow"}])
    except BaseException:
        jwks.stop()
        raise
    now = int(time.time())
    token = H.mint_rs256(key, {"iss": issuer, "aud": b.url, "sub": "fuzzer", "client_id": "fuzz-agent",
                               "scope": "mcp:tools", "iat": now - 5, "exp": now + 86400, "jti": uuid.uuid4().hex}, kid)
    return b, token, jwks


def run(url: str | None = None, token: str | None = None, iterations: int = 2000, seconds: float = 600,
        seed: int | None = None, auth: bool = False, work_dir: Path | None = None, allow_503: bool = False,
        check_every: int = 50, verbose: bool = False) -> dict:
    """Fuzz `url` (or a broker started here); returns the summary (its `failures` empty when all held)."""
    seed = random.randrange(2 ** 32) if seed is None else seed
    broker = jwks = None
    if url is None:
        broker, token, jwks = start(work_dir or ROOT / "target" / "fuzz-http", auth)
        url = broker.url
    try:
        H.wait_for_tools(url, ["ledger__get_account"], timeout=30, headers=H.bearer(token) if token else None)
        f = Fuzzer(url, token, seed, allow_503, broker.proc if broker else None, check_every, verbose)
        out = f.run(iterations, seconds)
        out["auth"] = bool(token)
        return out
    finally:
        if broker is not None:
            broker.stop()
        if jwks is not None:
            jwks.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="fuzz this broker instead of starting one (then a death is seen as unresponsiveness)")
    ap.add_argument("--token", help="a bearer token for --url")
    ap.add_argument("--auth", action="store_true", help="start the broker with [auth] (a local JWKS, a minted token)")
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--check-every", type=int, default=50)
    ap.add_argument("--allow-503", action="store_true", help="a draining broker's 503 is not a failure")
    ap.add_argument("--work-dir", type=Path)
    a = ap.parse_args()
    out = run(a.url, a.token, a.iterations, a.seconds, a.seed, a.auth, a.work_dir, a.allow_503, a.check_every, True)
    print(json.dumps(out, indent=1))
    print(f"fuzz_http: {out['iterations']} iterations in {out['seconds']} s (seed {out['seed']}, auth {out['auth']}), "
          f"{out['checks']} responsiveness checks (slowest {out['slowest_check_s']} s), "
          f"{sum(v for k, v in out['statuses'].items() if k[-3:].isdigit() and int(k[-3:]) >= 500)} 5xx, "
          f"{len(out['failures'])} failures: {'FAIL' if out['failures'] else 'ok'}")
    return 1 if out["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
