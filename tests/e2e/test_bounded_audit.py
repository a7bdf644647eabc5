"""Hostile callers cannot wipe the audit trail or blow up /metrics (issue 11, items 2 and 3).

- A caller with no rights sends 80 calls with 4 MB tool names: every caller-chosen string in a record is clipped
  (256 bytes plus length and hash) and no line exceeds the 8 KB ceiling, so alice's earlier record survives rotation.
- With an unprefixed server (`prefix = ""`), 300 made-up names (denied or unknown to the upstream) do not become
  metric labels: they count as `name="unknown"` and /metrics stays small.

Upstreams are real (the `ledger` example over stdio); callers carry RS256 tokens minted by the test (opslib.Minter).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

import helpers as H
import opslib as O

CEILING = 8192
FIELD_CAP = 256
HUGE = 4_000_000  # a 4 MB name fits under the default max_request_body (4 MiB) with the JSON around it


def require_bins() -> None:
    for b in (H.BROKER_BIN, H.LEDGER_BIN):
        if not b.exists():
            pytest.fail(f"{b} is missing (cargo build --all-targets)")


def all_lines(audit: Path) -> list[str]:
    """Every line of the audit file and its rotated copies, oldest first."""
    files = sorted(audit.parent.glob(audit.name + ".*"), key=lambda p: -int(p.suffix[1:])) + [audit]
    return [ln for f in files if f.exists() for ln in f.read_text().splitlines()]


# 320 MB of names through a debug build (JSON parsing, SHA-256 of each whole name): ~45 s on a quiet machine.
@pytest.mark.timeout(300)
def test_huge_names_leave_alices_record_in_place(tmp_path):
    """80 calls with 4 MB tool names from a caller with no rights leave alice's earlier audit record in one of the
    audit files (`max_file_size = "64KB"`, `keep_files = 4`: 320 KB of trail) and no audit line above the ceiling;
    the names, reasons and errors in mallory's records are clipped, and distinct names stay distinct."""
    require_bins()
    minter = O.Minter()
    try:
        b = H.start_broker(tmp_path, {"ledger": H.example_stdio_spec(H.LEDGER_BIN)}, name="broker-audit-wipe",
                           auth=minter.auth_config(),
                           policies=[{"tools": ["*"], "require_scopes": ["ledger:use"]}, {"effect": "allow"}],
                           extra_toml='[audit]\nfile = "audit.jsonl"\nmax_file_size = "64KB"\nkeep_files = 4\n')
    except Exception:
        minter.stop()
        raise
    audit = tmp_path / "audit.jsonl"
    answers: list[int] = []
    alice, mallory = f"alice-{uuid.uuid4().hex[:8]}", f"mallory-{uuid.uuid4().hex[:8]}"
    try:
        alice_tok = minter.token(b, alice, "mcp:tools ledger:use")
        H.wait_for_tools(b.url, ["ledger__list_accounts"], 30, headers=H.bearer(alice_tok))
        with H.RawSession(b.url, alice_tok) as s:
            s.initialize()
            res = s.request("tools/call", {"name": "ledger__list_accounts", "arguments": {}})["result"]
            assert not res.get("isError"), res
        O.wait_records(audit, lambda r: r["sub"] == alice and r["kind"] == "tool", "alice's call")

        with H.RawSession(b.url, minter.token(b, mallory, "mcp:tools"), timeout=60) as s:
            s.initialize()
            for i in range(80):
                # names no server offers, each different (they share their first 4 MB but the last bytes)
                name = "x" * HUGE + f"-wipe{i:02d}"
                r, rid = s.post("tools/call", {"name": name, "arguments": {"pad": "y" * 1000}})
                assert r.status_code == 200, f"call {i}: HTTP {r.status_code} {r.text[:300]}"
                msg = H.final_response(r, rid)
                assert "error" in msg, msg
                answers.append(len(r.content))
            last = s._next_id

        def mallory_done():
            return any(json.loads(ln).get("request_id") == last and json.loads(ln)["sub"] == mallory
                       for ln in all_lines(audit))
        H.poll_until(mallory_done, 30, "mallory's last record")
    finally:
        b.stop()
        minter.stop()

    lines = all_lines(audit)
    over = [len(ln) + 1 for ln in lines if len(ln) + 1 > CEILING]
    assert not over, f"{len(over)} audit line(s) above the {CEILING}-byte ceiling, the largest {max(over)} bytes"
    recs = [json.loads(ln) for ln in lines]
    assert any(r["sub"] == alice and r["kind"] == "tool" and r["name"] == "ledger__list_accounts" for r in recs), \
        f"alice's record was rotated out of the trail ({len(recs)} records left in " \
        f"{sorted(p.name for p in tmp_path.glob('audit.jsonl*'))})"
    mine = [r for r in recs if r["sub"] == mallory and r["kind"] == "tool"]
    assert len(mine) == 80, f"{len(mine)} of mallory's 80 records"
    for r in mine:
        O.check_shape(r)
        assert r["outcome"] in ("denied", "error"), r["outcome"]
        assert len(r["name"].encode()) <= FIELD_CAP and f"({HUGE + 7} bytes, sha256:" in r["name"], r["name"][-80:]
        assert r["upstream_name"] is None or len(r["upstream_name"].encode()) <= FIELD_CAP
        for key in ("reason", "error"):
            assert r[key] is None or len(r[key].encode()) <= 1024, (key, len(r[key]))
    assert len({r["name"] for r in mine}) == 80, "clipped names must stay distinguishable"
    # the error the broker answers ("unknown tool `NAME`") clips the name too
    assert max(answers) < 4096, f"an answer of {max(answers)} bytes"


def test_metrics_stay_small_after_made_up_names(tmp_path):
    """A ledger with `prefix = ""` (names unchanged, so any name routes to it): 300 made-up names, half denied by a
    policy rule and half unknown to the upstream, leave /metrics under 1 MB, with no made-up name as a label; they
    count as `name="unknown"`, while a catalog name keeps its own series."""
    require_bins()
    b = H.start_broker(tmp_path, {"ledger": H.example_stdio_spec(H.LEDGER_BIN, prefix="")},
                       name="broker-metrics-cardinality",
                       policies=[{"servers": ["ledger"], "tools": ["deny-*"], "effect": "deny",
                                  "message": "deny-* is refused (cardinality e2e)"}])
    try:
        H.wait_for_tools(b.url, ["list_accounts"], 30)
        before = O.scrape(b.base)
        with H.RawSession(b.url, None) as s:
            s.initialize()
            assert not s.request("tools/call", {"name": "list_accounts", "arguments": {}})["result"].get("isError")
            for i in range(300):
                # under the broker's 1 KB name bound, so each name is resolved, decided and counted
                name = f"{'deny' if i % 2 else 'madeup'}-{i:03d}-{uuid.uuid4().hex}-" + "z" * 900
                msg = s.request("tools/call", {"name": name, "arguments": {}})
                assert "error" in msg or msg["result"].get("isError"), msg
        m = O.scrape(b.base)
    finally:
        b.stop()
    size = len(m.text.encode())
    assert size < 1_000_000, f"/metrics grew to {size} bytes (from {len(before.text.encode())})"
    assert "madeup-" not in m.text and "deny-" not in m.text and "zzzz" not in m.text, \
        "a made-up name became a label value"
    req = "mcp_broker_requests_total"
    assert m.get(req, kind="tool", server="ledger", name="list_accounts", outcome="ok") >= 1
    unknown = sum(v for lbl, v in m.series(req).items() if dict(lbl).get("name") == "unknown")
    assert unknown == 300, f"{unknown} requests counted as name=\"unknown\""
    assert m.get(req, kind="tool", server="ledger", name="unknown", outcome="denied") == 150
    names = {dict(lbl).get("name") for lbl in m.series(req)}
    assert names <= {"list_accounts", "unknown", "tools", "prompts", "resources", "resource_templates", ""}, names
