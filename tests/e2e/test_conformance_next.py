"""Conformance 0.2.x in its three modes (`--requirements 2025-11-25`, `--requirements 2026-07-28`,
`--suite all`): the suite's checks against its own reference server (../shared/conformance-ref, installed
by scripts/conformance.sh) directly and through the broker (one upstream, prefix = ""). A check that
passes directly must pass through the broker, except those in ALLOWED_LOST, each with its reason. Both
totals are printed per mode. The suite and the reference server are installed by scripts/test.sh
(scripts/conformance.sh --install-only); scripts/conformance.sh runs the same comparison by hand."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import helpers as H
from conftest import SUMMARY_LINES

sys.path.insert(0, str(H.ROOT / "scripts"))
import conformance_compare as C  # noqa: E402

SUITE_JS = H.HARNESS_DIR / "conformance-next" / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
REF_DIR = H.HARNESS_DIR / "conformance-ref"
REF_LISTEN_RE = re.compile(r"^conformance-ref listening on (http://127\.0\.0\.1:\d+/mcp)\s*$")

# Checks no intermediary can pass, with the reason. None today: the broker speaks 2026-07-28 to a
# 2026-07-28 upstream (server/discover), relays its input_required results and listens for its list
# changes, so every check that passes directly passes through it.
ALLOWED_LOST: dict[str, str] = {}


MODES = ["2025-11-25", "2026-07-28", "all"]


def run_suite(url: str, mode: str, out_dir: Path) -> dict[str, dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    which = ["--suite", "all"] if mode == "all" else ["--requirements", mode]
    p = subprocess.run([str(H.NODE22), str(SUITE_JS), "server", "--url", url, *which, "-o", str(out_dir)],
                       capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL, cwd=str(out_dir))
    out = p.stdout + p.stderr
    (out_dir / "conformance.log").write_text(out)
    assert re.search(r"^Total:", out, re.M), f"no 'Total:' line in conformance output (exit {p.returncode}):\n{out[-3000:]}"
    checks = C.load(out_dir)
    assert checks, f"no checks.json written under {out_dir}"
    return checks


def run_suite_scenario(url: str, scenario: str, out_dir: Path) -> dict[str, dict]:
    """One scenario of the suite (a retry), as run_suite's checks."""
    out_dir.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([str(H.NODE22), str(SUITE_JS), "server", "--url", url, "--scenario", scenario,
                        "-o", str(out_dir)], capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL, cwd=str(out_dir))
    (out_dir / "conformance.log").write_text(p.stdout + p.stderr)
    return C.load(out_dir)


@pytest.fixture(scope="module")
def ref_and_broker(tmp_path_factory):
    """The reference server, and a broker in front of it; shared by the three modes."""
    missing = [p for p in (SUITE_JS, REF_DIR / "node_modules" / ".bin" / "tsx") if not p.exists()]
    if missing:
        pytest.fail(f"conformance 0.2 harness missing ({missing}); run scripts/test.sh --harness-only")
    tmp = tmp_path_factory.mktemp("conformance-next")
    env = {"PORT": "0", "NODE_OPTIONS": f"--require {REF_DIR / 'loopback.cjs'}",
           "PATH": f"{H.NODE22.parent}:{os.environ.get('PATH', '')}"}
    ref = H.Proc("conformance-ref", [str(REF_DIR / "node_modules" / ".bin" / "tsx"), str(REF_DIR / "everything-server.ts")],
                 tmp, env=env)
    broker = None
    try:
        url = ref.wait_line(REF_LISTEN_RE, 60).group(1)
        broker = H.start_broker(tmp, {"ref": {"transport": "http", "url": url, "prefix": ""}},
                                name="broker-conformance-next")
        yield tmp, url, broker
    finally:
        if broker:
            broker.stop()
        ref.stop()


@pytest.mark.parametrize("mode", MODES)
def test_conformance_next_through_broker(mode, ref_and_broker, artifacts):
    tmp, url, broker = ref_and_broker
    direct = run_suite(url, mode, tmp / "direct" / mode)
    via = run_suite(broker.url, mode, tmp / "broker" / mode)
    dp, bp = C.passed(direct), C.passed(via)
    lost = C.lost(direct, via)
    # A few checks hinge on the reference server's own timing (server-sse-polling closes a stream and
    # answers 100 ms later): under load one can be lost once. Each lost scenario is run once more through
    # the broker; a check that then passes is reported as passing on retry, not hidden.
    retried = []
    for scenario in sorted({k.split("/", 1)[0] for k in lost}):
        again = run_suite_scenario(broker.url, scenario, tmp / "broker-retry" / mode / scenario)
        for k in [k for k in lost if k.split("/", 1)[0] == scenario]:
            if again.get(k, {}).get("status") == "SUCCESS":
                retried.append(k)
                del lost[k]
    what = "--suite all" if mode == "all" else f"--requirements {mode}"
    line = f"conformance 0.2 {what}: direct {dp} passed, through mcp-broker {bp} passed, {len(lost)} lost"
    if retried:
        line += f" ({len(retried)} passed only on a retry: {', '.join(retried)})"
    SUMMARY_LINES.append(line)
    print(line)
    unexpected = {k: m for k, m in lost.items() if k not in ALLOWED_LOST}
    now_pass = sorted(k for k in ALLOWED_LOST if k not in lost)
    (artifacts / f"conformance-{mode}-summary.json").write_text(json.dumps(
        {"direct": dp, "broker": bp, "lost": lost, "unexpected": unexpected, "allowed_but_passing": now_pass,
         "gained": C.gained(direct, via)}, indent=2))
    if now_pass:
        SUMMARY_LINES.append("  allow-listed checks now passing through the broker (trim ALLOWED_LOST): " + ", ".join(now_pass))
    assert not unexpected, "checks that pass directly but fail through the broker:\n" + "\n".join(
        f"{k}: {m[:500]}" for k, m in unexpected.items())
