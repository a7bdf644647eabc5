"""`mcp-broker import` (each client's file shape, tests/fixtures/import/) and `mcp-broker init`, each followed by
`mcp-broker check` on what they wrote, with the printed variables exported."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

import helpers as H
from conftest import require_broker

FIXTURES = H.ROOT / "tests" / "fixtures" / "import"
# (fixture, servers it holds, fake secrets in it that must never be printed or written)
CASES = [
    ("claude_desktop_config.json", 7, ["ghp_FAKEfixture", "BSAfixtureFAKE", "FixturePassw0rd"]),
    ("code/.mcp.json", 5, ["sk_live_FIXTURE", "patFIXTURE"]),
    (".cursor/mcp.json", 5, ["cursorFIXTURE", "geoFIXTURE", "envfilepass"]),
    (".vscode/mcp.json", 4, ["vscodeFIXTURE"]),
]
EXPORT_RE = re.compile(r"^\s*export ([A-Z_][A-Z0-9_]*)=", re.M)


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    require_broker()
    return subprocess.run([str(H.BROKER_BIN), *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **(env or {})})


def placeholder_env(names: list[str]) -> dict[str, str]:
    # A value valid wherever the placeholder stands (a whole URL, a header, an env value, an argument).
    return {n: "https://h.example" if n.endswith("URL") else "x" for n in names}


@pytest.mark.parametrize("fixture,count,secrets", CASES, ids=[c[0] for c in CASES])
def test_import_then_check(tmp_path, fixture, count, secrets):
    out = tmp_path / "servers.toml"
    p = run(["import", str(FIXTURES / fixture), "--out", str(out)], tmp_path)
    assert p.returncode == 0, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    text = out.read_text()
    said = p.stdout + p.stderr + text
    for s in secrets:
        assert s not in said, f"secret {s} printed or written"
    assert text.count("\n[servers.") + text.startswith("[servers.") == count, text
    assert "claude mcp add --transport http broker http://127.0.0.1:8080/mcp" in p.stdout
    assert f'"args":["stdio","-c","{out}"]' in p.stdout, p.stdout
    names = EXPORT_RE.findall(p.stdout)
    # Unset, check names the first missing variable; set, it passes.
    if names:
        env_without = {k: v for k, v in os.environ.items() if k not in names}
        bad = subprocess.run([str(H.BROKER_BIN), "check", "-c", str(out)], capture_output=True, text=True,
                             timeout=60, env=env_without, stdin=subprocess.DEVNULL)
        assert bad.returncode != 0 and "is not set" in bad.stderr, bad.stderr
    # `check` resolves each command as the child would: stand-ins for the launchers the fixtures name (npx, uvx,
    # node, python) go first on PATH, and the Desktop fixture's absolute venv path is pointed at one, as it would be
    # on the machine the file came from.
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name in ("npx", "uvx", "node", "python"):
        (stubs / name).write_text("#!/bin/sh\nexit 0\n")
        (stubs / name).chmod(0o755)
    out.write_text(text.replace("/Users/me/venvs/mcp/bin/python", str(stubs / "python")))
    ok = run(["check", "-c", str(out)], tmp_path,
             {**placeholder_env(names), "PATH": f"{stubs}:{os.environ.get('PATH', '')}"})
    assert ok.returncode == 0, f"check failed on the import of {fixture}\n{ok.stderr}\n---\n{text}"
    assert f"ok ({count} server" in ok.stdout


def test_import_to_stdout_talks_on_stderr(tmp_path):
    p = run(["import", str(FIXTURES / "claude_desktop_config.json")], tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("# servers.toml for mcp-broker"), p.stdout[:200]
    assert "claude mcp add" not in p.stdout and "claude mcp add" in p.stderr
    assert "export GITHUB_PERSONAL_ACCESS_TOKEN=" in p.stderr
    assert not (tmp_path / "servers.toml").exists()


def test_import_never_overwrites_without_force(tmp_path):
    out = tmp_path / "servers.toml"
    out.write_text("# mine\n")
    p = run(["import", str(FIXTURES / ".vscode/mcp.json"), "--out", str(out)], tmp_path)
    assert p.returncode != 0 and "--force" in p.stderr, p.stderr
    assert out.read_text() == "# mine\n"
    p = run(["import", str(FIXTURES / ".vscode/mcp.json"), "--out", str(out), "--force"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "[servers.perplexity]" in out.read_text()


def test_import_refuses_what_is_not_a_client_config(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"servers": 1}')
    p = run(["import", str(bad)], tmp_path)
    assert p.returncode != 0 and "mcpServers" in p.stderr, p.stderr
    big = tmp_path / "big.json"
    big.write_text(" " * (4 * 1024 * 1024 + 1))
    p = run(["import", str(big)], tmp_path)
    assert p.returncode != 0 and "larger than" in p.stderr, p.stderr


def test_init_then_check(tmp_path):
    p = run(["init"], tmp_path)
    assert p.returncode == 0, p.stderr
    cfg = tmp_path / "servers.toml"
    assert "[servers.everything]" in cfg.read_text()
    ok = run(["check", "-c", str(cfg)], tmp_path)
    assert ok.returncode == 0, ok.stderr
    again = run(["init"], tmp_path)
    assert again.returncode != 0 and "--force" in again.stderr
    assert run(["init", "--force", "--out", str(cfg)], tmp_path).returncode == 0


def test_imported_servers_run(tmp_path, ev_http):
    """An imported Desktop-style stdio server and a Claude Code-style http server with a bearer header answer
    `tools` through the broker once the printed variables are exported."""
    src = tmp_path / "proj" / ".mcp.json"
    src.parent.mkdir()
    src.write_text(json.dumps({"mcpServers": {
        "Everything Local": {"command": str(H.EVERYTHING_BIN), "args": ["stdio"],
                             "env": {"EVERYTHING_API_KEY": "FIXTUREeverything0123456789abcdef"}},
        "everything-http": {"type": "http", "url": ev_http.url,
                            "headers": {"Authorization": "Bearer FIXTUREbearer0123456789abcdef"}},
    }}))
    out = tmp_path / "servers.toml"
    p = run(["import", str(src), "--out", str(out)], tmp_path)
    assert p.returncode == 0, p.stderr
    names = EXPORT_RE.findall(p.stdout)
    assert names == ["EVERYTHING_LOCAL_EVERYTHING_API_KEY", "EVERYTHING_HTTP_AUTHORIZATION"], p.stdout
    assert "FIXTURE" not in p.stdout + out.read_text()
    t = run(["tools", "-c", str(out), "--json"], tmp_path, placeholder_env(names))
    assert t.returncode == 0, t.stderr[-2000:]
    listed = {e["name"] for e in json.loads(t.stdout)}
    assert {"everything-local__echo", "everything-http__echo"} <= listed, sorted(listed)
