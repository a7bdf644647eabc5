"""completion/complete through the broker for a prompt of a server that offers no completions.

The broker advertises `completions` for every server it fronts. The ledger example (rmcp 3.11) does not declare
the capability, and rmcp 3.11 servers answer an unadvertised method with -32601; the broker answers such a
request itself with an empty completion, as a server would that has nothing to complete."""

from __future__ import annotations

import helpers as H


def test_completion_for_a_server_without_completions_is_empty(tmp_path):
    b = H.start_broker(tmp_path, {"ledger": H.example_stdio_spec(H.LEDGER_BIN)}, name="broker-completion")
    try:
        H.wait_for_tools(b.url, ["ledger__list_accounts"], timeout=30)
        with H.RawSession(b.url, None) as s:
            s.initialize()
            m = s.request("completion/complete", {
                "ref": {"type": "ref/prompt", "name": "ledger__summarize_account"},
                "argument": {"name": "account_id", "value": "AC"},
            })
        assert "result" in m, f"expected an empty completion, got {m}"
        assert m["result"]["completion"]["values"] == [], m
    finally:
        b.stop()
