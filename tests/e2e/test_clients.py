"""A second real client: the MCP Inspector CLI (TypeScript SDK) against the broker."""

from __future__ import annotations

import json
import subprocess

import helpers as H

INSPECTOR = H.NODE_BIN_DIR / "mcp-inspector"


def inspector(url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(H.NODE22), str(INSPECTOR), "--cli", url, "--transport", "http", *args],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, start_new_session=True)


def test_inspector_lists_and_calls(broker):
    p = inspector(broker.url, "--method", "tools/list")
    assert p.returncode == 0, p.stderr[-2000:]
    names = {t["name"] for t in json.loads(p.stdout)["tools"]}
    assert {"evstdio__echo", "evsse__echo", "evhttp__echo"} <= names

    p = inspector(broker.url, "--method", "tools/call", "--tool-name", "evsse__get-sum", "--tool-arg", "a=19", "--tool-arg", "b=23")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "42" in json.loads(p.stdout)["content"][0]["text"]


def test_inspector_sees_tool_errors(broker, identity):
    """The Inspector exits 5 when the tool result has isError (an upstream tool error passes through)."""
    p = inspector(broker.url, "--method", "tools/call", "--tool-name", "identity__lookup_user",
                  "--tool-arg", "username=nobody-e2e")
    assert p.returncode == 5, f"exit {p.returncode}\n{p.stdout[-1000:]}\n{p.stderr[-1000:]}"
