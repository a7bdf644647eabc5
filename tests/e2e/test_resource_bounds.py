"""Issue 11, item 7: server prefixes that fold to one resource URI prefix are refused by `check`, and
resource policy decides on the normalised URI (another spelling of a denied URI is denied too)."""

from __future__ import annotations

import json
import subprocess

import pytest

import helpers as H
from conftest import require_broker, require_example


def run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    require_broker()
    return subprocess.run([str(H.BROKER_BIN), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, start_new_session=True)


def test_check_refuses_prefixes_that_share_a_resource_uri_prefix(tmp_path):
    """`team_a` and `team-a` are distinct tool prefixes, but both would route `team-a+…` URIs."""
    cfg = tmp_path / "collide.toml"
    cfg.write_text(H.render_config({
        "team_a": H.everything_stdio_spec(),
        "team-a": H.everything_stdio_spec(),
    }))
    p = run(["check", "--config", str(cfg)])
    assert p.returncode != 0, f"check accepted colliding prefixes\nstdout: {p.stdout}\nstderr: {p.stderr}"
    err = p.stderr
    assert f"{cfg}:" in err or f"{cfg.name}:" in err, err
    assert "`servers.team-a.prefix`" in err and "`team_a`" in err and "`team-a+`" in err, err

    cfg.write_text(H.render_config({
        "team_a": H.everything_stdio_spec(),
        "team_b": H.everything_stdio_spec(),
    }))
    p = run(["check", "--config", str(cfg)])
    assert p.returncode == 0, f"distinct prefixes rejected: {p.stderr}"


DENIED = "Retention policies are not for you."


@pytest.fixture(scope="module")
def ledger_broker(tmp_path_factory):
    require_broker()
    require_example(H.LEDGER_BIN)
    broker = H.start_broker(
        tmp_path_factory.mktemp("resource-bounds"),
        {"ledger": H.example_stdio_spec(H.LEDGER_BIN)},
        name="broker-resource-bounds",
        policies=[
            {"effect": "deny", "resources": ["ledger://policies/retention"], "message": DENIED},
            # Before normalised matching this `*` crossed `/` and refused every account too.
            {"effect": "deny", "resources": ["ledger://*"], "message": "one segment only"},
        ],
    )
    try:
        H.wait_for_tools(broker.url, ["ledger__list_accounts"], timeout=30)
        yield broker
    finally:
        broker.stop()


@pytest.mark.parametrize("uri", [
    "ledger+ledger://policies/retention",
    "ledger+LEDGER://policies/retention",
    "ledger+ledger://POLICIES/retention",
    "ledger+ledger://policies/%72etention",
    "ledger+ledger://policies/./retention",
    "ledger+ledger://policies/x/../retention",
    "ledger+ledger://accounts/../policies/retention",
])
def test_every_spelling_of_a_denied_uri_is_refused(ledger_broker, uri):
    with H.RawSession(ledger_broker.url, None) as s:
        s.initialize()
        r = s.request("resources/read", {"uri": uri})
    assert "error" in r, f"{uri} was read: {json.dumps(r)[:300]}"
    msg = json.dumps(r["error"])
    assert DENIED in msg or "readers resolve differently" in msg, f"{uri}: not a policy refusal: {msg}"


def test_a_star_no_longer_crosses_a_slash(ledger_broker):
    """`ledger://*` denies one segment; `ledger://accounts/ACC-1001` (two) is read."""
    with H.RawSession(ledger_broker.url, None) as s:
        s.initialize()
        r = s.request("resources/read", {"uri": "ledger+ledger://accounts/ACC-1001"})
    assert "result" in r, r
    assert r["result"]["contents"][0]["uri"] == "ledger+ledger://accounts/ACC-1001", r
