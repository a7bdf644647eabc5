"""A bounded run of the HTTP-level fuzz (scripts/fuzz_http.py, issue 11 item 8): mutated bodies, headers, methods and
params shapes at a broker in front of two ledgers, with and without [auth]; no 5xx, the broker alive, and a fresh
session's tools/list answering within 1 s every 50 mutations. Longer runs: scripts/fuzz_http.py --iterations N."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import helpers as H

sys.path.insert(0, str(H.ROOT / "scripts"))

import fuzz_http  # noqa: E402


@pytest.mark.parametrize("auth", [False, True], ids=["no-auth", "auth"])
@pytest.mark.timeout(240)
def test_http_fuzz_bounded(tmp_path: Path, auth: bool):
    for b in (H.BROKER_BIN, H.LEDGER_BIN):
        if not b.exists():
            pytest.fail(f"{b} is missing (cargo build --all-targets)")
    out = fuzz_http.run(iterations=500, seconds=150, seed=11 if auth else 7, auth=auth, work_dir=tmp_path)
    print(f"fuzz_http: {out['iterations']} iterations, {out['checks']} checks, statuses {out['statuses']}")
    assert not out["failures"], "\n".join(out["failures"])
    assert out["iterations"] >= 100, f"only {out['iterations']} iterations ran: {out}"
    assert out["checks"] >= 3, out
