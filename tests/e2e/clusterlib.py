"""Fixtures for test_cluster.py (issue 14): one Redis, three broker instances with `[cluster]`, HAProxy in front.

The brokers run examples/cluster/servers.toml and HAProxy runs examples/cluster/haproxy.cfg, the files the README
documents, with only their addresses (and the token issuer) replaced line by line: a replacement that no longer
matches exactly one line fails the fixture, so the documented files and the tested ones cannot drift apart.

Like helpers.py, nothing here sleeps for synchronisation: every wait polls a condition against a deadline; every
process runs in its own process group and is killed on teardown; logs stay in the test's tmp folder.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

import helpers as H
import opslib as O

EXAMPLE_DIR = H.ROOT / "examples" / "cluster"
EXAMPLE_SERVERS = EXAMPLE_DIR / "servers.toml"
EXAMPLE_HAPROXY = EXAMPLE_DIR / "haproxy.cfg"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

# The per-server limit the rate-limit test measures, on a server the test adds to the example (the ledger example:
# a stdio child that starts in milliseconds). Small numbers so that a limit multiplied by three instances shows.
LIMITED_RATE = 1.0  # calls per second
LIMITED_BURST = 10
EXTRA_TOML = f"""
[audit]
file = "audit.jsonl"
arguments = "full"

[servers.limited]
transport = "stdio"
command = "{H.LEDGER_BIN}"
args = ["stdio"]
rate_limit = {{ rate = "{int(LIMITED_RATE)}/s", burst = {LIMITED_BURST} }}
"""


REQUIRED_TOOLS = ["everything__echo", "everything__trigger-long-running-operation",
                  "everything__trigger-elicitation-request", "limited__list_accounts"]


def substitute(text: str, replacements: list[tuple[str, str]], what: str) -> str:
    """Replace whole lines: each pattern (a regex anchored at a line) must match exactly one line."""
    for pattern, repl in replacements:
        rx = re.compile(pattern, re.M)
        n = len(rx.findall(text))
        if n != 1:
            raise AssertionError(f"{what}: {pattern!r} matches {n} lines, expected exactly 1 (did the example change?)")
        text = rx.sub(lambda _m, r=repl: r, text)
    return text


# --------------------------------------------------------------------------- Redis


class Redis:
    """redis-server in the foreground on its own free port, no persistence: a restart is an empty Redis."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.port = H.free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc: H.Proc | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.proc = H.Proc(f"redis-{self.starts}", [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                                                    "--save", "", "--appendonly", "no", "--daemonize", "no"],
                           self.log_dir, capture_stdout=False)
        proc = self.proc

        H.poll_until(lambda: not proc.alive() or self.cli("PING").strip() == "PONG", 15,
                     f"redis-server on port {self.port}")
        if not proc.alive():
            raise RuntimeError(f"redis-server exited early\n{proc.stderr_tail()}\n"
                               f"{proc.stdout_path.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        H.poll_until(lambda: not H.port_open(self.port), 10, f"redis port {self.port} to close")

    def cli(self, *args: str) -> str:
        p = subprocess.run([REDIS_CLI, "-h", "127.0.0.1", "-p", str(self.port), *args], capture_output=True,
                           text=True, timeout=5, stdin=subprocess.DEVNULL)
        return p.stdout


# --------------------------------------------------------------------------- HAProxy


class HAProxy:
    """examples/cluster/haproxy.cfg with the frontend, stats and server addresses replaced."""

    def __init__(self, log_dir: Path, backend_ports: list[int], port: int | None = None):
        self.port = port or H.free_port()
        self.stats_port = H.free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        text = EXAMPLE_HAPROXY.read_text()
        repl = [(r"^    bind :8080$", f"    bind 127.0.0.1:{self.port}"),
                (r"^    bind 127\.0\.0\.1:8404$", f"    bind 127.0.0.1:{self.stats_port}")]
        for i, p in enumerate(backend_ports, 1):
            repl.append((rf"^    server b{i} broker-{i}:8080 check$", f"    server b{i} 127.0.0.1:{p} check"))
        self.cfg = log_dir / "haproxy.cfg"
        self.cfg.write_text(substitute(text, repl, str(EXAMPLE_HAPROXY)))
        check = subprocess.run([HAPROXY, "-c", "-f", str(self.cfg)], capture_output=True, text=True, timeout=20)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c refused {self.cfg}:\n{check.stdout}\n{check.stderr}")
        self.proc = H.Proc("haproxy", [HAPROXY, "-f", str(self.cfg), "-db"], log_dir, capture_stdout=False)
        H.poll_until(lambda: not self.proc.alive() or (H.port_open(self.port) and H.port_open(self.stats_port)), 15,
                     f"haproxy on port {self.port}")
        if not self.proc.alive():
            raise RuntimeError(f"haproxy exited early\n{self.proc.stderr_tail()}")

    def status(self) -> dict[str, str]:
        """Backend server name -> HAProxy's status (UP, DOWN, "UP 1/2", ...), from the stats CSV."""
        with httpx2.Client(timeout=5) as c:
            r = c.get(f"http://127.0.0.1:{self.stats_port}/stats;csv")
        r.raise_for_status()
        lines = r.text.splitlines()
        header = lines[0].lstrip("# ").split(",")
        out = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == "brokers" and row.get("svname") not in ("FRONTEND", "BACKEND"):
                out[row["svname"]] = row["status"]
        return out

    def wait_status(self, want: dict[str, str], timeout: float = 10) -> dict[str, str]:
        return H.poll_until(lambda: (lambda s: s if all(s.get(k) == v for k, v in want.items()) else None)(self.status()),
                            timeout, f"haproxy to see {want} (now {self.status()})", interval=0.1)

    def log_text(self) -> str:
        return self.proc.stdout_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.stop()


# --------------------------------------------------------------------------- brokers


class Instance:
    def __init__(self, index: int, work: Path):
        self.index = index
        self.name = f"b{index}"
        self.dir = work / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = H.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/mcp"
        self.audit = self.dir / "audit.jsonl"
        self.proc: H.Proc | None = None
        self.starts = 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def readyz(self) -> int | None:
        try:
            with httpx2.Client(timeout=2) as c:
                return c.get(self.base + "/readyz").status_code
        except httpx2.HTTPError:
            return None

    def records(self) -> list[dict]:
        return O.read_audit(self.audit)

    def stderr(self) -> str:
        if self.proc is None:
            return ""
        return self.proc.stderr_path.read_text(errors="replace")


class Cluster:
    """Redis + three brokers running examples/cluster/servers.toml + HAProxy running examples/cluster/haproxy.cfg."""

    N = 3

    def __init__(self, work: Path):
        self.work = work
        self.minter = O.Minter()
        self.key = secrets.token_hex(32)
        self.redis = Redis(work)
        self.instances = [Instance(i, work) for i in range(1, self.N + 1)]
        self.haproxy: HAProxy | None = None
        self.haproxy_port = 0

    # -- lifecycle

    def start(self) -> None:
        self.redis.start()
        # Brokers before HAProxy: HAProxy's health checks open connections from ephemeral ports, the range free
        # ports come from, and one could take a broker's port before it binds. The brokers' public_url (the token
        # audience) is HAProxy's address, chosen now.
        self.haproxy_port = H.free_port()
        for inst in self.instances:
            self.start_instance(inst, wait=False)
        for inst in self.instances:
            self._wait_listening(inst)
        self.haproxy = HAProxy(self.work, [i.port for i in self.instances], port=self.haproxy_port)
        self.haproxy.wait_status({i.name: "UP" for i in self.instances}, timeout=20)
        # each instance directly: its upstreams are connected (through HAProxy a session's requests would spread)
        for inst in self.instances:
            H.wait_for_tools(inst.url, REQUIRED_TOOLS, timeout=45, headers=self.headers("alice"))

    def config_text(self, inst: Instance) -> str:
        text = EXAMPLE_SERVERS.read_text()
        text = substitute(text, [
            (r'^listen = "0\.0\.0\.0:8080"(.*)$', f'listen = "127.0.0.1:{inst.port}"'),
            (r'^public_url = "https://mcp\.example\.com/mcp"(.*)$', f'public_url = "{self.url}"'),
            (r'^redis_url = "redis://redis:6379"$', f'redis_url = "{self.redis.url}"'),
            (r'^# instance_id = "broker-1"(.*)$', f'instance_id = "{inst.name}"'),
            (r'^issuer = "https://idp\.example\.com"$',
             f'issuer = "{self.minter.ISSUER}"\njwks_uri = "{self.minter.jwks.url}"'),
        ], str(EXAMPLE_SERVERS))
        return text + EXTRA_TOML

    def start_instance(self, inst: Instance, wait: bool = True) -> None:
        cfg = inst.dir / "servers.toml"
        cfg.write_text(self.config_text(inst))
        inst.starts += 1
        inst.proc = H.Proc(f"{inst.name}-{inst.starts}", [str(H.BROKER_BIN), "serve", "--config", str(cfg)], inst.dir,
                           env={"RUST_LOG": "info,mcp_broker=debug,rmcp=warn", "MCP_BROKER_CLUSTER_KEY": self.key,
                                "PATH": f"{H.NODE_BIN_DIR}:{os.environ.get('PATH', '/usr/bin:/bin')}"})
        if wait:
            self._wait_listening(inst)

    def _wait_listening(self, inst: Instance) -> None:
        assert inst.proc is not None
        inst.proc.wait_line(H.BROKER_LISTEN_RE, 30)
        H.poll_until(lambda: inst.readyz() == 200, 30, f"{inst.name} /readyz 200")

    def kill(self, inst: Instance) -> None:
        assert inst.proc is not None
        inst.proc.signal(signal.SIGKILL)
        H.poll_until(lambda: not inst.proc.alive(), 10, f"{inst.name} to die")
        inst.proc.stop()  # reaps the process and kills what was left of its group (its stdio children)

    def stop(self) -> None:
        for inst in self.instances:
            if inst.proc is not None:
                inst.proc.stop()
        if self.haproxy is not None:
            self.haproxy.stop()
        self.redis.stop()
        self.minter.stop()

    # -- callers

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.haproxy_port}/mcp"

    def token(self, who: str) -> str:
        return self.minter.token(_Aud(self.url), who)

    def headers(self, who: str) -> dict[str, str]:
        return H.bearer(self.token(who))

    # -- evidence

    def served(self, marker: str) -> dict[str, int]:
        """Per instance: how many audit records mention `marker` (a unique string sent in a tool's arguments)."""
        return {i.name: sum(1 for r in i.records() if marker in json.dumps(r)) for i in self.instances}

    def panics(self) -> dict[str, str]:
        """Every broker log (of every start of every instance) that says a thread panicked: log name -> line."""
        out = {}
        for p in sorted(self.work.glob("b*/b*-*.stderr.log")):
            m = re.search(r".*panicked at.*", p.read_text(errors="replace"))
            if m:
                out[p.name] = m.group(0)
        return out

    def logs(self) -> str:
        parts = []
        for inst in self.instances:
            if inst.proc is not None:
                parts.append(inst.proc.stderr_tail(25))
        if self.haproxy is not None:
            parts.append("--- haproxy log (last 30 lines) ---\n" + "\n".join(self.haproxy.log_text().splitlines()[-30:]))
        return "\n".join(parts)


class _Aud:
    """What opslib.Minter.token needs of a broker: its URL (the token audience)."""

    def __init__(self, url: str):
        self.url = url


# --------------------------------------------------------------------------- an SDK session that tells its id


class SessionIds:
    """An httpx response hook remembering the Mcp-Session-Id the broker assigned."""

    def __init__(self):
        self.ids: list[str] = []

    async def __call__(self, response: httpx2.Response) -> None:
        sid = response.headers.get("mcp-session-id")
        if sid and sid not in self.ids:
            self.ids.append(sid)


@asynccontextmanager
async def sdk_session(url: str, headers: dict[str, str], timeout: float = 30,
                      **session_kwargs: Any) -> AsyncIterator[tuple[ClientSession, SessionIds]]:
    """A Python SDK session over Streamable HTTP (initialize first), plus the session id it was given."""
    ids = SessionIds()
    async with httpx2.AsyncClient(headers=headers, timeout=timeout, event_hooks={"response": [ids]}) as hc:
        async with streamable_http_client(url, http_client=hc) as streams:
            async with ClientSession(streams[0], streams[1], **session_kwargs) as s:
                await s.initialize()
                yield s, ids
