"""Secret masking in results (issue 17, `[guard] mask_results`): a real server (server-everything over
stdio) returns its environment, which carries a fake AWS key, a fake GitHub token, a connection string
with a password and a configured pattern's match; the client sees each masked and everything else
intact, over Streamable HTTP (2025-11-25 session and 2026-07-28 stateless) and the stdio front; the
audit record counts the kinds and so does `mcp_broker_masked_total`. Prompt messages are masked too
(server-everything's `args-prompt` repeats its argument). The same broker without `mask_results`
returns the secrets unchanged, so these assertions can fail.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import anyio
import httpx2
import pytest

import helpers as H
import opslib as O

AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
GH_TOKEN = "ghp_16C7e42F292c6912E7710c838347Ae178B4a"
DB_PASSWORD = "Sup3rS3cretPw"
DB_URL = f"postgres://ledger:{DB_PASSWORD}@db.internal:5432/ledger"
TICKET = "TCK-482910"
PLAIN = "just-an-ordinary-value"

UPSTREAM_ENV = {
    "FAKE_AWS_KEY": AWS_KEY,
    "FAKE_GH_TOKEN": GH_TOKEN,
    "DATABASE_URL": DB_URL,
    "SUPPORT_TICKET": TICKET,
    "PLAIN_VALUE": PLAIN,
}
SECRETS = [AWS_KEY, GH_TOKEN, DB_PASSWORD, TICKET]
GUARD = '[guard]\nmask_results = true\nmask_patterns = [{ kind = "ticket", regex = "TCK-[0-9]{6}" }]\n'
TOOL = "everything__get-env"


def require_bins() -> None:
    for b in (H.BROKER_BIN, H.EVERYTHING_BIN):
        if not b.exists():
            pytest.fail(f"{b} is missing (cargo build; the harness's node_modules)")


def servers() -> dict:
    return {"everything": H.everything_stdio_spec(env=UPSTREAM_ENV)}


def config_text(work: Path, mask: bool) -> str:
    audit = f'[audit]\nfile = "{work / "audit.jsonl"}"\n'
    return H.render_config(servers(), extra_toml=(GUARD if mask else "") + audit)


@pytest.fixture(scope="module")
def masked_broker(tmp_path_factory):
    require_bins()
    work = tmp_path_factory.mktemp("guard-mask")
    b = H.start_broker(work, servers(), name="broker-mask",
                       extra_toml=GUARD + '[audit]\nfile = "audit.jsonl"\n')
    try:
        H.wait_for_tools(b.url, [TOOL], timeout=60)
        yield b, work / "audit.jsonl"
    finally:
        b.stop()


def text_of(result) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", None) == "text")


def env_of(text: str) -> dict:
    env = json.loads(text)
    assert isinstance(env, dict), text[:300]
    return env


def assert_masked_env(text: str) -> None:
    for s in SECRETS:
        assert s not in text, f"{s!r} reached the client:\n{text[:2000]}"
    env = env_of(text)
    assert env["FAKE_AWS_KEY"] == "[masked:aws_access_key]", env
    assert env["FAKE_GH_TOKEN"] == "[masked:github_token]", env
    assert env["DATABASE_URL"] == "postgres://ledger:[masked:connection_string]@db.internal:5432/ledger", env
    assert env["SUPPORT_TICKET"] == "[masked:ticket]", env
    assert env["PLAIN_VALUE"] == PLAIN, env
    assert "PATH" in env and "[masked:" not in env["PATH"], env.get("PATH")


EXPECTED_COUNTS = {"aws_access_key": 1, "github_token": 1, "connection_string": 1, "ticket": 1}


def metric_total(base: str, kind: str) -> float:
    text = httpx2.get(f"{base}/metrics", timeout=10).text
    m = re.search(r'^mcp_broker_masked_total\{server="everything",kind="' + kind + r'"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_env_secrets_masked_over_http_with_audit_and_metric(masked_broker):
    broker, audit = masked_broker
    before = {k: metric_total(broker.base, k) for k in EXPECTED_COUNTS}

    async def run() -> str:
        async with H.http_session(broker.url) as s:
            r = await s.call_tool(TOOL, {})
            assert not r.is_error, r
            return text_of(r)

    text = anyio.run(run)
    assert_masked_env(text)
    recs = O.wait_records(audit, lambda r: r["kind"] == "tool" and r["name"] == TOOL and "masked" in r,
                          "the masked get-env call")
    rec = recs[-1]
    assert rec["masked"] == EXPECTED_COUNTS, rec
    assert rec["outcome"] == "ok", rec
    # Every other field is the usual schema.
    assert set(rec) == O.AUDIT_KEYS | {"masked"}, rec
    after = {k: metric_total(broker.base, k) for k in EXPECTED_COUNTS}
    for k, n in EXPECTED_COUNTS.items():
        assert after[k] - before[k] == n, (k, before, after)
    # No secret in the audit file either.
    raw = audit.read_text()
    for s in SECRETS:
        assert s not in raw


def test_env_secrets_masked_for_a_stateless_2026_client(masked_broker):
    broker, _ = masked_broker
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "e2e-mask", "version": "0"},
    }
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": TOOL, "arguments": {}, "_meta": meta}}
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": TOOL}
    r = httpx2.post(broker.url, headers=headers, json=body, timeout=30)
    assert r.status_code == 200, r.text[:500]
    d = H.final_response(r, 7)
    assert "result" in d, d
    texts = [c["text"] for c in d["result"]["content"] if c.get("type") == "text"]
    assert len(texts) == 1, d
    assert_masked_env(texts[0])


def test_prompt_messages_masked(masked_broker):
    broker, audit = masked_broker

    async def run():
        async with H.http_session(broker.url) as s:
            return await s.get_prompt("everything__args-prompt", {"city": AWS_KEY, "state": TICKET})

    p = anyio.run(run)
    text = p.messages[0].content.text
    assert AWS_KEY not in text and TICKET not in text, text
    assert text == "What's weather in [masked:aws_access_key], [masked:ticket]?", text
    rec = O.wait_records(audit, lambda r: r["kind"] == "prompt" and "masked" in r, "the masked prompt")[-1]
    assert rec["masked"] == {"aws_access_key": 1, "ticket": 1}, rec


def test_env_secrets_masked_over_the_stdio_front(masked_broker, tmp_path):
    _, _ = masked_broker
    cfg = tmp_path / "stdio.toml"
    cfg.write_text(config_text(tmp_path, mask=True))

    async def run() -> str:
        with anyio.fail_after(90):
            async with H.stdio_session(str(H.BROKER_BIN), ["stdio", "--config", str(cfg)]) as s:
                async def ready():
                    return TOOL in {t.name for t in await H.list_all_tools(s)}
                await H.apoll_until(ready, 60, "the stdio broker to list get-env")
                r = await s.call_tool(TOOL, {})
                return text_of(r)

    assert_masked_env(anyio.run(run))


def test_without_mask_results_secrets_pass_unchanged(tmp_path):
    """The control: the same upstream and call, `[guard]` absent."""
    require_bins()
    b = H.start_broker(tmp_path, servers(), name="broker-nomask", extra_toml='[audit]\nfile = "audit.jsonl"\n')
    try:
        H.wait_for_tools(b.url, [TOOL], timeout=60)

        async def run() -> str:
            async with H.http_session(b.url) as s:
                return text_of(await s.call_tool(TOOL, {}))

        env = env_of(anyio.run(run))
        assert env["FAKE_AWS_KEY"] == AWS_KEY
        assert env["FAKE_GH_TOKEN"] == GH_TOKEN
        assert env["DATABASE_URL"] == DB_URL
        assert env["SUPPORT_TICKET"] == TICKET
        rec = O.wait_records(tmp_path / "audit.jsonl", lambda r: r["kind"] == "tool" and r["name"] == TOOL,
                             "the unmasked call")[-1]
        assert "masked" not in rec, rec
        assert "mcp_broker_masked_total{" not in httpx2.get(f"{b.base}/metrics", timeout=10).text
    finally:
        b.stop()
