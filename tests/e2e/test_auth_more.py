"""Inbound auth beyond JWTs and rules: RFC 7662 introspection of opaque tokens issued by the real
authorization server, and the OPA Rego policy (examples/policies/broker.rego) driving what each
caller sees and may call, end to end."""

from __future__ import annotations

import anyio
import httpx2

import helpers as H

REPO_ROOT = H.ROOT
REGO = REPO_ROOT / "examples" / "policies" / "broker.rego"


def _init(url: str, token: str) -> httpx2.Response:
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
    return httpx2.post(url, json=body, timeout=15, headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
        "Authorization": f"Bearer {token}"})


def test_opaque_token_is_introspected(tmp_path, auth_server):
    broker = H.start_broker(
        tmp_path, {"ledger": H.example_stdio_spec(H.LEDGER_BIN)},
        auth={"issuer": auth_server.issuer, "required_scopes": ["mcp:tools"],
              "introspection": {"endpoint": auth_server.issuer + "/token/introspection",
                                "client_id": "svc", "client_secret": "svc-secret"}},
        policies=[{"effect": "allow"}], name="broker-introspect")
    try:
        # No `resource`: oidc-provider issues an opaque (non-JWT) access token.
        opaque = auth_server.token("alice-agent", "alice-secret", scope="mcp:tools")
        assert opaque.count(".") != 2, "expected an opaque token"
        assert _init(broker.url, opaque).status_code == 200
        names = H.wait_for_tools(broker.url, ["ledger__list_accounts"], 30, headers=H.bearer(opaque))
        assert "ledger__get_account" in names

        # An opaque token without the required scope: introspection says so, the broker answers 403.
        thin = auth_server.token("svc", "svc-secret", scope="")
        r = _init(broker.url, thin)
        assert r.status_code == 403, r.text
        assert 'error="insufficient_scope"' in r.headers["www-authenticate"]

        # A made-up opaque token is inactive: 401 invalid_token.
        r = _init(broker.url, "not-a-real-token-0123456789")
        assert r.status_code == 401
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
        assert opaque not in broker.proc.stderr_tail(10_000)
    finally:
        broker.stop()


def test_rego_policy_decides_lists_and_calls(tmp_path, auth_server):
    port = H.free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    broker = H.start_broker(
        tmp_path, {"ledger": H.example_stdio_spec(H.LEDGER_BIN)},
        broker={"listen": f"127.0.0.1:{port}"},
        auth={"issuer": auth_server.issuer, "required_scopes": ["mcp:tools"]},
        name="broker-rego", extra_toml=f'[policy_engine]\nrego = "{REGO}"\n')
    try:
        alice = auth_server.token("alice-agent", "alice-secret", scope="mcp:tools pii:read audit:read", resource=url)
        bob = auth_server.token("bob-agent", "bob-secret", scope="mcp:tools", resource=url)
        a = H.wait_for_tools(url, ["ledger__get_customer_pii"], 30, headers=H.bearer(alice))
        b = H.wait_for_tools(url, ["ledger__list_accounts"], 30, headers=H.bearer(bob))
        assert {"ledger__get_customer_pii", "ledger__get_audit_log"} <= a
        assert not {"ledger__get_customer_pii", "ledger__get_audit_log"} & b

        async def calls():
            async with H.http_session(url, headers=H.bearer(bob)) as s:
                r = await s.call_tool("ledger__get_customer_pii", {"customer_id": "CUST-001"})
                assert r.is_error and r.content[0].text == "PII access requires the pii:read scope."
                # The policy reads call arguments: closing needs ledger:close, freezing does not.
                r = await s.call_tool("ledger__update_account_status",
                                      {"account_id": "ACC-1002", "status": "closed", "reason": "test"})
                assert r.is_error and "ledger:close" in r.content[0].text
                r = await s.call_tool("ledger__update_account_status",
                                      {"account_id": "ACC-1002", "status": "frozen", "reason": "test"})
                assert not r.is_error, r.content

        anyio.run(calls)
    finally:
        broker.stop()
