#!/usr/bin/env python3
"""Compare two `conformance server -o DIR` result trees (direct vs through the broker).

    conformance_compare.py DIRECT_DIR BROKER_DIR [--json OUT]

Prints both totals (SUCCESS checks counted from checks.json) and every check that passes directly but
not through the broker, with its status and the suite's error message. Used by scripts/conformance.sh
and imported by tests/e2e/test_conformance_next.py.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

_STAMP = re.compile(r"-\d{4}-\d\d-\d\dT[\d-]+Z$")


def load(out_dir: Path) -> dict[str, dict]:
    """{"scenario/check-id": check} for every check under out_dir (a repeated id gets #2, #3...)."""
    checks: dict[str, dict] = {}
    for f in sorted(Path(out_dir).glob("*/checks.json")):
        scenario = _STAMP.sub("", f.parent.name)
        scenario = scenario.removeprefix("server-")
        for c in json.loads(f.read_text()):
            key, n = f"{scenario}/{c['id']}", 1
            while key in checks:
                n += 1
                key = f"{scenario}/{c['id']}#{n}"
            checks[key] = c
    return checks


def passed(checks: dict[str, dict]) -> int:
    return sum(1 for c in checks.values() if c.get("status") == "SUCCESS")


def lost(direct: dict[str, dict], broker: dict[str, dict]) -> dict[str, str]:
    """Checks passing directly but not through the broker: key -> status and message."""
    out = {}
    for k, c in sorted(direct.items()):
        if c.get("status") != "SUCCESS":
            continue
        b = broker.get(k)
        if b is not None and b.get("status") == "SUCCESS":
            continue
        if b is None:
            out[k] = "MISSING (not reported through the broker)"
        else:
            msg = b.get("errorMessage") or b.get("description") or ""
            out[k] = f"{b.get('status')}: {msg}"
    return out


def gained(direct: dict[str, dict], broker: dict[str, dict]) -> list[str]:
    return sorted(k for k, b in broker.items() if b.get("status") == "SUCCESS" and direct.get(k, {}).get("status") != "SUCCESS")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    d, b = load(Path(argv[0])), load(Path(argv[1]))
    lo = lost(d, b)
    print(f"  direct:  {passed(d)} passed of {len(d)} checks")
    print(f"  broker:  {passed(b)} passed of {len(b)} checks")
    print(f"  lost through the broker: {len(lo)}")
    for k, m in lo.items():
        m = m if len(m) <= 400 else m[:400] + "…"
        print(f"    - {k}: {m}")
    g = gained(d, b)
    if g:
        print(f"  passing only through the broker: {', '.join(g)}")
    if len(argv) >= 4 and argv[2] == "--json":
        Path(argv[3]).write_text(json.dumps({"direct": passed(d), "broker": passed(b), "lost": lo, "gained": g}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
