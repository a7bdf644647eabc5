"""Operator experience (issue 15, items 2 and 3): `transport` inferred, `check` looking each stdio command up
where its spawn will, a child that exits before `initialize` shown with its status and stderr in the `tools`
summary, and a missing executable tried once, not retried."""

from __future__ import annotations

import subprocess
import time

import helpers as H
from conftest import require_broker


def run(args: list[str], cwd=None, timeout: float = 60) -> subprocess.CompletedProcess:
    require_broker()
    return subprocess.run([str(H.BROKER_BIN), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          stdin=subprocess.DEVNULL, start_new_session=True)


def test_check_fails_naming_a_missing_command_and_finds_one_beside_the_config(tmp_path):
    """No `transport` (inferred from `command` and `url`); a missing command is an error naming the server, the
    key and its line; a `./script` is looked for in the config file's folder, not where `check` runs."""
    cfg = tmp_path / "servers.toml"
    script = tmp_path / "server.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    lines = [
        "[broker]",                               # 1
        'listen = "127.0.0.1:0"',                 # 2
        "",                                       # 3
        "[servers.local]",                        # 4
        'command = "./server.sh"',                # 5
        "",                                       # 6
        "[servers.web]",                          # 7
        'url = "http://127.0.0.1:9/mcp"',         # 8
        "",                                       # 9
        "[servers.gone]",                         # 10
        'args = ["x"]',                           # 11
        'command = "mcp-server-that-does-not-exist"',  # 12
    ]
    cfg.write_text("\n".join(lines) + "\n")
    p = run(["check", "--config", str(cfg)], cwd="/")
    assert p.returncode != 0, p.stdout
    assert f"{cfg}:12:" in p.stderr, p.stderr
    assert "`servers.gone.command`" in p.stderr and "mcp-server-that-does-not-exist" in p.stderr, p.stderr
    assert "not found" in p.stderr, p.stderr
    # without the missing server it passes, run from another folder: ./server.sh is the config's neighbour
    cfg.write_text("\n".join(lines[:9]) + "\n")
    p = run(["check", "--config", str(cfg)], cwd="/")
    assert p.returncode == 0, p.stderr
    assert "ok (2 servers)" in p.stdout, p.stdout
    # a script that is there but not executable is refused too
    script.chmod(0o644)
    p = run(["check", "--config", str(cfg)], cwd="/")
    assert p.returncode != 0 and f"{cfg}:5:" in p.stderr and "not executable" in p.stderr, p.stderr


def test_tools_shows_a_crashing_childs_exit_status_and_stderr_quickly(tmp_path):
    """A child that writes a line to stderr and exits 3: `tools` says so for that server, at once (no retries
    to wait out), and a missing executable is named with why."""
    crash = tmp_path / "crash.sh"
    crash.write_text("#!/bin/sh\necho 'fatal: no API key configured (set FOO_KEY)' >&2\nexit 3\n")
    crash.chmod(0o755)
    cfg = tmp_path / "servers.toml"
    cfg.write_text(H.render_config({
        "crashy": {"command": str(crash)},
        "gone": {"command": str(tmp_path / "no-such-server")},
    }))
    started = time.monotonic()
    p = run(["tools", "--config", str(cfg)], timeout=60)
    took = time.monotonic() - started
    assert p.returncode != 0, p.stdout
    summary = [line for line in p.stderr.splitlines() if line.startswith("error: server `")]
    crashy = next((line for line in summary if "`crashy`" in line), "")
    assert "exit status 3" in crashy, p.stderr
    assert "fatal: no API key configured (set FOO_KEY)" in crashy, p.stderr
    gone = next((line for line in summary if "`gone`" in line), "")
    assert "no-such-server" in gone and "No such file or directory" in gone, p.stderr
    assert "see the log above" not in p.stderr, p.stderr
    assert took < 10, f"tools took {took:.1f}s"


def test_a_missing_executable_is_tried_once_and_a_reload_tries_again(tmp_path):
    """`serve` with a server whose command does not exist: one attempt in the log, no backoff retries; once the
    file is fixed, the reload starts it."""
    cmd = tmp_path / "later.sh"
    b = H.start_broker(tmp_path, {"later": {"command": str(cmd), "inherit_env": ["PATH"]}},
                       broker={"watch_config": True})
    try:
        H.poll_until(lambda: "not retried" in b.proc.stderr_path.read_text(), 10, "the failure logged")
        time.sleep(3)  # long enough for several backoff retries (0.5 s, 1 s, ...) if there were any
        log = b.proc.stderr_path.read_text()
        assert log.count("cannot start") == 1, log
        assert "upstream unavailable" not in log, log
        # the executable appears, and the file changes: the reload builds the server afresh
        cmd.write_text("#!/bin/sh\nexit 0\n")
        cmd.chmod(0o755)
        b.config_path.write_text(b.config_path.read_text() + "\n# touched\n")
        H.poll_until(lambda: "exited before `initialize`" in b.proc.stderr_path.read_text(), 15,
                     "the reload to try the server again")
    finally:
        b.stop()
