"""CLI: `check`, `tools --json` (test 10) and the stdio front (test 11)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

import helpers as H
from conftest import EVERYTHING_BASE_TOOLS, require_broker


def run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    require_broker()
    return subprocess.run([str(H.BROKER_BIN), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, start_new_session=True)


def test_check_reports_typo_with_file_line_and_key(tmp_path):
    """10a. A typo'd key -> non-zero exit; stderr names the file, the line and the key."""
    cfg = tmp_path / "typo-servers.toml"
    lines = [
        "# e2e config with a typo",          # 1
        "[broker]",                           # 2
        'listen = "127.0.0.1:0"',             # 3
        "",                                   # 4
        "[servers.good]",                     # 5
        'transport = "stdio"',                # 6
        f'command = "{H.EVERYTHING_BIN}"',    # 7
        'args = ["stdio"]',                   # 8
        "",                                   # 9
        "",                                   # 10
        "[servers.a]",                        # 11
        'transport = "stdio"',                # 12
        'comand = "x"',                       # 13  <- the typo
    ]
    cfg.write_text("\n".join(lines) + "\n")
    p = run(["check", "--config", str(cfg)])
    assert p.returncode != 0, f"check accepted a typo'd key\nstdout: {p.stdout}\nstderr: {p.stderr}"
    err = p.stderr
    assert str(cfg) in err or cfg.name in err, f"file not named in stderr: {err}"
    assert "comand" in err, f"key not named in stderr: {err}"
    without_path = err.replace(str(cfg), "<cfg>")
    assert re.search(r"(?<![\d.])13(?![\d.])", without_path), f"line 13 not named in stderr: {err}"

    # the same file with the typo fixed is valid: exit 0 (10b)
    # (`sh`, not a made-up name: `check` also looks the command up where its spawn will)
    cfg.write_text("\n".join(lines[:-1] + ['command = "sh"']) + "\n")
    p = run(["check", "--config", str(cfg)])
    assert p.returncode == 0, f"fixed config rejected: exit {p.returncode}\nstderr: {p.stderr}"


def test_check_valid_config(tmp_path):
    """10b. A valid config -> exit 0."""
    cfg = tmp_path / "ok.toml"
    cfg.write_text(H.render_config({
        "evstdio": H.everything_stdio_spec(),
        "evhttp": {"transport": "http", "url": "http://127.0.0.1:9/mcp", "timeout": "30s", "prefix": "",
                   "tools": {"include": ["echo*"], "exclude": ["get-env"]}},
        "evsse": {"transport": "sse", "url": "http://127.0.0.1:9/sse"},
    }, {"separator": "__", "session_idle_timeout": "1h"}))
    p = run(["check", "--config", str(cfg)])
    assert p.returncode == 0, f"exit {p.returncode}\nstderr: {p.stderr}"


def test_check_rejects_bad_values(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[broker]\nlisten = "127.0.0.1:0"\n\n[servers.x]\ntransport = "carrier-pigeon"\ncommand = "y"\n')
    p = run(["check", "--config", str(cfg)])
    assert p.returncode != 0
    assert "transport" in p.stderr or "carrier-pigeon" in p.stderr, p.stderr


def test_tools_json_lists_namespaced_catalog(tmp_path, ev_http):
    """10c. `tools --json` prints the namespaced catalog as a JSON array."""
    cfg = tmp_path / "tools.toml"
    cfg.write_text(H.render_config({
        "evstdio": H.everything_stdio_spec(),
        "evhttp": {"transport": "http", "url": ev_http.url},
    }))
    p = run(["tools", "--config", str(cfg), "--json"])
    assert p.returncode == 0, f"exit {p.returncode}\nstderr: {p.stderr[-2000:]}"
    data = json.loads(p.stdout)
    assert isinstance(data, list) and data
    for entry in data:
        assert {"name", "server", "description"} <= set(entry), entry
        assert H.TOOL_NAME_RE.match(entry["name"]), entry["name"]
    by_name = {e["name"]: e for e in data}
    for srv in ("evstdio", "evhttp"):
        for t in EVERYTHING_BASE_TOOLS:
            assert f"{srv}__{t}" in by_name, f"{srv}__{t} missing from tools --json"
    assert by_name["evhttp__echo"]["server"] == "evhttp"
    assert by_name["evhttp__echo"]["description"] == "Echoes back the input string"
    # plain output also lists the catalog
    p2 = run(["tools", "--config", str(cfg)])
    assert p2.returncode == 0 and "evhttp__echo" in p2.stdout


def test_tool_filters_and_empty_prefix(tmp_path, ev_http):
    """include/exclude globs and prefix = "" (names unchanged)."""
    cfg = tmp_path / "filters.toml"
    cfg.write_text(H.render_config({
        "ev": {"transport": "http", "url": ev_http.url, "prefix": "",
               "tools": {"include": ["echo*", "get-*"], "exclude": ["get-env"]}},
    }))
    p = run(["tools", "--config", str(cfg), "--json"])
    assert p.returncode == 0, p.stderr[-2000:]
    names = {e["name"] for e in json.loads(p.stdout)}
    assert "echo" in names and "get-sum" in names
    assert "get-env" not in names
    assert not any(n.startswith("toggle-") or n.startswith("trigger-") for n in names), names
    assert not any("__" in n for n in names), names


@pytest.mark.anyio
async def test_stdio_front(tmp_path, ev_http):
    """11. `mcp-broker stdio` driven by the SDK's stdio_client: list + call."""
    require_broker()
    cfg = tmp_path / "stdio-front.toml"
    cfg.write_text(H.render_config({
        "evstdio": H.everything_stdio_spec(),
        "evhttp": {"transport": "http", "url": ev_http.url},
    }))
    import anyio

    with anyio.fail_after(60):
        async with H.stdio_session(str(H.BROKER_BIN), ["stdio", "--config", str(cfg)]) as s:
            async def ready():
                return {"evstdio__echo", "evhttp__echo"} <= {t.name for t in await H.list_all_tools(s)}
            await H.apoll_until(ready, 30, "stdio broker to list both upstreams")
            r = await s.call_tool("evstdio__echo", {"message": "via-stdio-front"})
            assert not r.is_error and "via-stdio-front" in r.content[0].text
            r = await s.call_tool("evhttp__get-sum", {"a": 2, "b": 40})
            assert not r.is_error and "42" in r.content[0].text
