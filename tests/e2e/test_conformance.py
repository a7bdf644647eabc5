"""Conformance transparency (test 13): the official conformance suite gives the same verdicts
directly against server-everything and through the broker (one upstream, prefix = "")."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

import helpers as H
from conftest import SUMMARY_LINES

TOTAL_RE = re.compile(r"^Total:\s*(\d+)\s+passed,\s*(\d+)\s+failed", re.M)


def run_conformance(url: str, out_dir: Path) -> tuple[int, int, dict[tuple[str, str], str], str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([str(H.NODE22), str(H.CONFORMANCE_JS), "server", "--url", url, "-o", str(out_dir)],
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                       cwd=str(out_dir))
    out = p.stdout + p.stderr
    (out_dir / "conformance.log").write_text(out)
    m = TOTAL_RE.search(out)
    assert m, f"no 'Total:' line in conformance output (exit {p.returncode}):\n{out[-3000:]}"
    checks: dict[tuple[str, str], str] = {}
    for f in sorted(out_dir.glob("*/checks.json")):
        scenario = re.sub(r"-\d{4}-\d\d-\d\dT[\d-]+Z$", "", f.parent.name)
        for c in json.loads(f.read_text()):
            checks[(scenario, c["id"])] = c["status"]
    assert checks, f"no checks.json written under {out_dir}"
    return int(m.group(1)), int(m.group(2)), checks, out


def test_conformance_transparency(tmp_path, artifacts):
    ev = H.start_everything("streamableHttp", tmp_path, name="everything-conformance")
    broker = None
    try:
        dp, df, direct, _ = run_conformance(ev.url, tmp_path / "direct")
        line = f"conformance directly against server-everything: Total: {dp} passed, {df} failed"
        SUMMARY_LINES.append(line)
        print(line)
        assert dp > 0, "conformance passed nothing even directly: harness problem"
        if not H.BROKER_BIN.exists():
            pytest.fail(f"broker binary {H.BROKER_BIN} is missing")

        broker = H.start_broker(tmp_path, {"ev": {"transport": "http", "url": ev.url, "prefix": ""}},
                                name="broker-conformance")
        H.wait_for_tools(broker.url, ["echo"], 30)
        bp, bf, via, _ = run_conformance(broker.url, tmp_path / "broker")
        line = f"conformance through mcp-broker (prefix=\"\"):      Total: {bp} passed, {bf} failed"
        SUMMARY_LINES.append(line)
        print(line)

        regressions = sorted(f"{s}/{c}: direct SUCCESS, broker {via.get((s, c), 'MISSING')}"
                             for (s, c), st in direct.items() if st == "SUCCESS" and via.get((s, c)) != "SUCCESS")
        improved = sorted(f"{s}/{c}" for (s, c), st in via.items() if st == "SUCCESS" and direct.get((s, c)) != "SUCCESS")
        report = {"direct": {"passed": dp, "failed": df}, "broker": {"passed": bp, "failed": bf},
                  "regressions": regressions, "passes_only_through_broker": improved}
        (artifacts / "conformance-summary.json").write_text(json.dumps(report, indent=2))
        if improved:
            SUMMARY_LINES.append("  checks passing only through the broker: " + ", ".join(improved))
        assert not regressions, "checks that pass directly but fail through the broker:\n" + "\n".join(regressions)
        assert bp >= dp
    finally:
        if broker:
            broker.stop()
        ev.stop()
