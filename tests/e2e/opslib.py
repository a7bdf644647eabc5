"""Shared helpers for test_audit.py and test_operations.py: the audit file, /metrics, minted tokens, config rewrites
and a raw stdio client. Like helpers.py, nothing here sleeps for synchronisation: every wait polls a deadline."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import httpx2
from mcp import types as T
from prometheus_client.parser import text_string_to_metric_families

import helpers as H

# The documented keys of an audit record (README / issue 5), no more, no less.
AUDIT_KEYS = {"ts", "request_id", "session", "sub", "client_id", "act", "authenticated", "kind", "server", "name",
              "upstream_name", "decision", "reason", "rule", "credential", "outcome", "error", "latency_ms",
              "upstream_ms", "arguments", "shown", "hidden"}
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
OUTCOMES = {"ok", "tool_error", "error", "timeout", "cancelled", "denied", "rate_limited"}
METRICS_ADDR_RE = re.compile(r"serving /metrics, /healthz and /readyz addr=(\S+)")


# --------------------------------------------------------------------------- audit file


def audit_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def read_audit(path: Path) -> list[dict]:
    """Every record of a JSONL audit file; fails on a line that is not a complete JSON object."""
    text = path.read_text() if path.exists() else ""
    assert not text or text.endswith("\n"), f"{path} ends with a partial line: {text[-200:]!r}"
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        try:
            v = json.loads(line)
        except json.JSONDecodeError as e:
            raise AssertionError(f"{path}:{i} is not complete JSON ({e}): {line[:300]!r}") from None
        assert isinstance(v, dict), f"{path}:{i} is not an object: {line[:200]!r}"
        out.append(v)
    return out


def wait_records(path: Path, pred: Callable[[dict], bool], what: str, n: int = 1, timeout: float = 15) -> list[dict]:
    """Poll the audit file until at least n records satisfy pred; return those records."""
    def found():
        recs = [r for r in read_audit(path) if pred(r)]
        return recs if len(recs) >= n else None
    try:
        return H.poll_until(found, timeout, f"{n} audit record(s): {what}")
    except TimeoutError as e:
        recent = "\n".join(audit_lines(path)[-8:])
        raise AssertionError(f"{e}\nlast records of {path}:\n{recent}") from None


def check_shape(r: dict) -> None:
    """The schema every record has, whatever the request."""
    assert set(r) == AUDIT_KEYS, f"record keys differ: missing {sorted(AUDIT_KEYS - set(r))}, extra {sorted(set(r) - AUDIT_KEYS)}: {r}"
    assert TS_RE.match(r["ts"]), f"ts is not RFC 3339 UTC with milliseconds: {r['ts']!r}"
    assert abs(ts_epoch(r["ts"]) - time.time()) < 600, f"ts {r['ts']} is not now"
    assert r["kind"] in {"tool", "prompt", "resource", "completion", "list"}, r
    assert r["decision"] in {"allow", "deny"}, r
    assert r["outcome"] in OUTCOMES, r
    assert isinstance(r["latency_ms"], float) and r["latency_ms"] >= 0, r
    assert r["upstream_ms"] is None or (isinstance(r["upstream_ms"], float) and 0 <= r["upstream_ms"] <= r["latency_ms"]), r
    assert isinstance(r["act"], list) and isinstance(r["authenticated"], bool), r
    assert r["credential"] in {None, "none", "static", "vault", "token_exchange"}, r
    assert r["session"] is None or isinstance(r["session"], int), r
    if r["outcome"] == "ok":
        assert r["error"] is None, r
    elif r["outcome"] in ("error", "timeout", "tool_error"):
        assert isinstance(r["error"], str) and r["error"], f"{r['outcome']} record without an error message: {r}"
    elif r["outcome"] in ("denied", "rate_limited"):
        assert r["decision"] == "deny" and r["reason"], f"{r['outcome']} record without deny/reason: {r}"


def ts_epoch(ts: str) -> float:
    import datetime as dt

    return dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()


def canonical_sha256(args: dict) -> str:
    """The documented argument hash: SHA-256 of the JSON with sorted keys and no whitespace."""
    return "sha256:" + hashlib.sha256(json.dumps(args, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------- metrics


class Scrape:
    """One parsed /metrics answer: samples by (sample name, labels)."""

    def __init__(self, text: str):
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[tuple[str, frozenset], float] = {}
        self.types: dict[str, str] = {}
        for f in self.families.values():
            for s in f.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value
                self.types[s.name] = f.type

    def get(self, metric: str, default: float | None = 0.0, **labels: str) -> float | None:
        return self.samples.get((metric, frozenset(labels.items())), default)

    def series(self, name: str) -> dict[frozenset, float]:
        return {lbl: v for (n, lbl), v in self.samples.items() if n == name}


def scrape(base: str, headers: dict[str, str] | None = None) -> Scrape:
    with httpx2.Client(timeout=10) as c:
        r = c.get(base + "/metrics", headers=headers or {})
    assert r.status_code == 200, f"GET {base}/metrics: HTTP {r.status_code} {r.text[:300]}"
    ctype = r.headers.get("content-type", "")
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype, f"content-type {ctype!r}"
    return Scrape(r.text)


def metrics_base(broker: H.Broker, timeout: float = 10) -> str:
    """The http://host:port of the separate metrics listener, from the broker's log line."""
    def find():
        m = METRICS_ADDR_RE.search(broker.proc.stderr_path.read_text(errors="replace"))
        return m.group(1) if m else None
    return "http://" + H.poll_until(find, timeout, "the metrics listener's log line")


def http_get(url: str, headers: dict[str, str] | None = None) -> httpx2.Response:
    with httpx2.Client(timeout=10) as c:
        return c.get(url, headers=headers or {})


# --------------------------------------------------------------------------- tokens


class Minter:
    """A test RSA key published by a local JWKS server; mints access tokens a broker with `auth_config()` accepts."""

    ISSUER = "https://ops-test-issuer.example"

    def __init__(self):
        self.key = H.rsa_private_key()
        self.kid = "ops-key-" + uuid.uuid4().hex[:8]
        self.jwks = H.JwksServer([H.public_jwk(self.key, self.kid)])
        self.minted: list[str] = []

    def auth_config(self) -> dict:
        return {"issuer": self.ISSUER, "jwks_uri": self.jwks.url, "required_scopes": ["mcp:tools"],
                "scopes_supported": ["mcp:tools", "pii:read"]}

    def token(self, broker: H.Broker, sub: str, scope: str = "mcp:tools", client_id: str | None = None,
              act: dict | None = None) -> str:
        now = int(time.time())
        claims = {"iss": self.ISSUER, "aud": broker.url, "sub": sub, "client_id": client_id or f"{sub}-agent",
                  "scope": scope, "iat": now - 5, "exp": now + 900, "jti": uuid.uuid4().hex}
        if act:
            claims["act"] = act
        t = H.mint_rs256(self.key, claims, self.kid)
        self.minted.append(t)
        return t

    def stop(self) -> None:
        self.jwks.stop()


# --------------------------------------------------------------------------- config rewrites


def write_atomic(path: Path, text: str) -> None:
    """Replace a config file in one rename, so the broker's file watcher never reads half a file."""
    tmp = path.with_name(path.name + f".tmp-{uuid.uuid4().hex[:6]}")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- notifications


class Notes:
    """A message_handler that counts list_changed notifications by kind."""

    def __init__(self):
        self.counts = {"tools": 0, "prompts": 0, "resources": 0}

    async def __call__(self, message: Any) -> None:
        m = getattr(message, "root", message)
        method = getattr(m, "method", None)
        if isinstance(m, T.ToolListChangedNotification) or method == "notifications/tools/list_changed":
            self.counts["tools"] += 1
        elif method == "notifications/prompts/list_changed":
            self.counts["prompts"] += 1
        elif method == "notifications/resources/list_changed":
            self.counts["resources"] += 1

    @property
    def tools(self) -> int:
        return self.counts["tools"]


# --------------------------------------------------------------------------- a raw stdio client


class StdioClient:
    """`mcp-broker stdio` driven with raw JSON-RPC lines (so a test controls exactly when each request is sent)."""

    def __init__(self, config: Path, log_dir: Path, name: str = "broker-stdio", env: dict[str, str] | None = None):
        self.proc = H.Proc(name, [str(H.BROKER_BIN), "stdio", "--config", str(config)], log_dir,
                           env={"RUST_LOG": "info,rmcp=warn", **(env or {})}, stdin=subprocess.PIPE)
        self._id = 0

    def send(self, msg: dict) -> None:
        assert self.proc.popen.stdin is not None
        self.proc.popen.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.popen.stdin.flush()

    def request(self, method: str, params: dict | None = None) -> int:
        self._id += 1
        body = {"jsonrpc": "2.0", "id": self._id, "method": method}
        if params is not None:
            body["params"] = params
        self.send(body)
        return self._id

    def messages(self) -> list[dict]:
        out = []
        for line in list(self.proc.stdout_lines):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"_unparsed": line})
        return out

    def response(self, rid: int, timeout: float = 20) -> dict:
        def find():
            for m in self.messages():
                if m.get("id") == rid and ("result" in m or "error" in m):
                    return m
            if not self.proc.alive():
                raise AssertionError(f"broker exited (rc={self.proc.popen.poll()}) before answering {rid}\n{self.proc.stderr_tail()}")
            return None
        return H.poll_until(find, timeout, f"the stdio response to request {rid}")

    def initialize(self) -> dict:
        rid = self.request("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                          "clientInfo": {"name": "e2e-ops-stdio", "version": "0"}})
        r = self.response(rid, 30)
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return r

    def progress_count(self) -> int:
        return sum(1 for m in self.messages() if m.get("method") == "notifications/progress")

    def stop(self) -> int | None:
        return self.proc.stop()
