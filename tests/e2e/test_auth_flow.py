"""Inbound OAuth end to end with mcp-remote (what Claude Desktop users run) as the OAuth client.

mcp-remote only knows the broker's URL: it gets a 401, follows `resource_metadata` to the RFC 9728 document, finds
the authorization server there, reads its RFC 8414 metadata, obtains a token for `resource` = the broker's URL and
then speaks MCP. The Python SDK drives mcp-remote over stdio, so every hop between a real client and the broker is
exercised: PRM -> AS metadata -> token -> MCP.

- client_credentials (headless): `--client-credentials --static-oauth-client-info {alice-agent | bob-agent}`.
- authorization_code + PKCE in a "browser": a fake `xdg-open`/`x-www-browser`/$BROWSER that follows the
  authorization URL with curl (the AS fixture logs the user in and consents without a page) back to mcp-remote's
  loopback callback; once with dynamic client registration, once with the pre-registered public client `cli`.
Each run gets its own HOME (mcp-remote caches tokens in ~/.mcp-auth).
"""

from __future__ import annotations

import json
import os
import signal
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import parse_qs, urlparse

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client

import helpers as H
from conftest import ALL_AUTH_TOOLS, EXPECTED_TOOLS

FAKE_BROWSER = """#!/bin/sh
# headless browser: follow the authorization URL (the AS auto-logs-in and auto-consents) to the client's callback
echo "$1" >> "$FAKEBROWSER_DIR/urls.log"
exec curl -s -L --max-time 20 -o /dev/null -c "$FAKEBROWSER_DIR/cookies" -b "$FAKEBROWSER_DIR/cookies" "$1"
"""
# What a caller holding only mcp:tools and no special client_id may use under conftest.AUTH_POLICIES.
MCP_TOOLS_ONLY = ALL_AUTH_TOOLS - {"ledger__get_customer_pii", "ledger__get_audit_log", "ledger__update_account_status"}


def mcp_remote_procs(home: Path) -> list[int]:
    """pids of mcp-remote processes running with this HOME (ours: each test has its own)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            if str(H.MCP_REMOTE_JS).encode() not in cmd:
                continue
            env = Path(f"/proc/{d}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"HOME={home}".encode() in env and H.pid_alive(int(d)):
            out.append(int(d))
    return out


@asynccontextmanager
async def mcp_remote_session(url: str, home: Path, args: list[str], env: dict[str, str] | None = None
                             ) -> AsyncIterator[ClientSession]:
    home.mkdir(parents=True, exist_ok=True)
    full_env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})}
    params = StdioServerParameters(command=str(H.NODE22), args=[str(H.MCP_REMOTE_JS), url, "--allow-http", *args],
                                   env=full_env)
    errlog = home / "mcp-remote.stderr.log"
    try:
        with open(errlog, "w") as err:
            with anyio.fail_after(60):
                async with stdio_client(params, errlog=err) as streams:
                    async with ClientSession(streams[0], streams[1]) as s:
                        await s.initialize()
                        yield s
    except BaseException as e:
        tail = "\n".join(errlog.read_text(errors="replace").splitlines()[-40:]) if errlog.exists() else ""
        raise AssertionError(f"mcp-remote session failed: {e!r}\n--- mcp-remote stderr ---\n{tail}") from e
    finally:
        # mcp-remote exits when its stdin closes; make sure (these are processes this test started)
        try:
            H.poll_until(lambda: not mcp_remote_procs(home), 5, "mcp-remote to exit")
        except TimeoutError:
            for pid in mcp_remote_procs(home):
                os.kill(pid, signal.SIGKILL)


def cached_tokens(home: Path) -> list[dict]:
    """Token responses mcp-remote stored under ~/.mcp-auth."""
    out = []
    for f in (home / ".mcp-auth").rglob("*tokens*.json"):
        try:
            v = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(v, dict) and "access_token" in v:
            out.append(v)
    return out


def remember(auth_env, home: Path) -> list[dict]:
    toks = cached_tokens(home)
    auth_env.issued.extend(t["access_token"] for t in toks)
    auth_env.issued.extend(t["refresh_token"] for t in toks if t.get("refresh_token"))
    return toks


@pytest.mark.anyio
@pytest.mark.parametrize("who", ["alice", "bob"])
async def test_mcp_remote_client_credentials(authed_env, tmp_path, who):
    """mcp-remote --client-credentials: discovery from the broker's 401/PRM, a token for the broker, the caller's
    own catalog; alice's PII call succeeds, bob never sees the PII tool."""
    client_id, secret, scope = {"alice": ("alice-agent", "alice-secret", "mcp:tools pii:read audit:read"),
                                "bob": ("bob-agent", "bob-secret", "mcp:tools")}[who]
    home = tmp_path / "home"
    args = ["--client-credentials",
            "--static-oauth-client-info", json.dumps({"client_id": client_id, "client_secret": secret}),
            # without this mcp-remote asks for the 401 challenge's scope (mcp:tools) only
            "--static-oauth-client-metadata", json.dumps({"scope": scope})]
    async with mcp_remote_session(authed_env.broker.url, home, args) as s:
        names = {t.name for t in await H.list_all_tools(s)}
        assert names == EXPECTED_TOOLS[who], f"{who}: {sorted(names ^ EXPECTED_TOOLS[who])}"
        if who == "alice":
            r = await s.call_tool("ledger__get_customer_pii", {"customer_id": "CUST-003"})
            assert not r.is_error and "Priya Raman" in json.dumps(H.dump(r)), H.dump(r)
        else:
            r = await s.call_tool("ledger__list_accounts", {})
            assert not r.is_error, H.dump(r)
    toks = remember(authed_env, home)
    assert toks, f"mcp-remote stored no token under {home / '.mcp-auth'}"
    claims = H.jwt_claims(toks[-1]["access_token"])
    assert claims["aud"] == authed_env.broker.url and claims["client_id"] == client_id, claims
    assert set(claims["scope"].split()) == set(scope.split()), claims


def fake_browser(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    for name in ("xdg-open", "x-www-browser"):  # `open` uses xdg-open; mcp-remote falls back to x-www-browser
        f = bindir / name
        f.write_text(FAKE_BROWSER)
        f.chmod(0o755)
    state = tmp_path / "browser"
    state.mkdir()
    env = {"PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}", "BROWSER": str(bindir / "xdg-open"),
           "FAKEBROWSER_DIR": str(state)}
    return env, state / "urls.log"


@pytest.mark.anyio
@pytest.mark.parametrize("registration", ["dcr", "preregistered-public-client"])
async def test_mcp_remote_browser_flow(authed_env, tmp_path, registration):
    """authorization_code + PKCE (S256) with `resource`, through a headless browser; the user is alice (the AS
    fixture's default login). Dynamic client registration, or the pre-registered public client `cli`."""
    env, urls_log = fake_browser(tmp_path)
    home = tmp_path / "home"
    args = [] if registration == "dcr" else ["--static-oauth-client-info", json.dumps({"client_id": "cli"})]
    async with mcp_remote_session(authed_env.broker.url, home, args, env=env) as s:
        names = {t.name for t in await H.list_all_tools(s)}
        r = await s.call_tool("ledger__list_accounts", {})
        assert not r.is_error, H.dump(r)
    assert urls_log.exists(), "the fake browser was never opened"
    auth_url = urls_log.read_text().splitlines()[0]
    q = parse_qs(urlparse(auth_url).query)
    assert auth_url.startswith(authed_env.auth_server.issuer + "/"), auth_url
    assert q.get("code_challenge_method") == ["S256"] and q.get("code_challenge"), q
    assert q.get("resource") == [authed_env.broker.url], q
    assert "mcp:tools" in q["scope"][0].split(), q
    toks = remember(authed_env, home)
    assert toks, f"mcp-remote stored no token under {home / '.mcp-auth'}"
    claims = H.jwt_claims(toks[-1]["access_token"])
    assert claims["sub"] == "alice" and claims["aud"] == authed_env.broker.url, claims
    if registration == "dcr":
        assert claims["client_id"] not in ("cli", "alice-agent", "bob-agent", "svc"), claims
    else:
        assert claims["client_id"] == "cli", claims
    # the catalog follows the granted scope (the challenge's mcp:tools) and this client (no deny rule applies)
    assert names == MCP_TOOLS_ONLY, sorted(names ^ MCP_TOOLS_ONLY)


def test_no_tokens_in_broker_log_after_mcp_remote(auth_env):
    """RS-20 once more, now including the tokens mcp-remote obtained on its own."""
    text = auth_env.broker.proc.stderr_path.read_text(errors="replace")
    leaked = [t[:24] + "…" for t in auth_env.issued if len(t) > 12 and t in text]
    assert not leaked, f"broker log contains tokens: {leaked}"
    assert "eyJ" not in text, "broker log contains JWT-looking text"
