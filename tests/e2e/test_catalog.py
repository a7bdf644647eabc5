"""Catalog aggregation: tools, prompts and resources of all upstreams behind one endpoint (tests 1-3)."""

from __future__ import annotations

from collections import Counter

import anyio
import pytest

import helpers as H
from conftest import EVERYTHING_BASE_TOOLS, EVERYTHING_SERVERS, IDENTITY_TOOLS, LEDGER_TOOLS

pytestmark = pytest.mark.anyio


async def _noop_sampling(ctx, params):  # declares the sampling capability, never called here
    raise AssertionError("unexpected sampling request")


async def _noop_elicit(ctx, params):
    raise AssertionError("unexpected elicitation request")


CAPS = dict(sampling_callback=_noop_sampling, elicitation_callback=_noop_elicit)


async def test_tools_list_aggregates_all_upstreams(broker, ev_http):
    """1. Namespaced tools from all five upstreams; valid unique names; metadata forwarded unchanged."""
    async with H.http_session(broker.url) as s:
        tools = await H.list_all_tools(s)
    names = [t.name for t in tools]

    bad = [n for n in names if not H.TOOL_NAME_RE.match(n)]
    assert not bad, f"tool names violating ^[A-Za-z0-9_-]{{1,64}}$: {bad}"
    dups = [n for n, c in Counter(names).items() if c > 1]
    assert not dups, f"duplicate tool names: {dups}"

    expected = [f"{srv}__{t}" for srv in EVERYTHING_SERVERS for t in EVERYTHING_BASE_TOOLS]
    expected += [f"ledger__{t}" for t in LEDGER_TOOLS]
    expected += [f"identity__{t}" for t in IDENTITY_TOOLS]
    missing = sorted(set(expected) - set(names))
    assert not missing, f"missing namespaced tools: {missing}\npresent: {sorted(names)}"

    # the broker's copy of each upstream tool equals the upstream's own
    async with H.http_session(ev_http.url, **CAPS) as d:
        direct = {t.name: t for t in await H.list_all_tools(d)}
    by_name = {t.name: t for t in tools}
    compared = 0
    for srv in EVERYTHING_SERVERS:
        for name, dt in direct.items():
            bt = by_name.get(f"{srv}__{name}")
            if bt is None:
                continue
            compared += 1
            assert bt.description == dt.description, f"{srv}__{name}: description differs"
            assert H.dump(bt.input_schema) == H.dump(dt.input_schema), f"{srv}__{name}: inputSchema differs"
            assert H.dump(bt.annotations) == H.dump(dt.annotations), f"{srv}__{name}: annotations differ"
            assert H.dump(bt.output_schema) == H.dump(dt.output_schema), f"{srv}__{name}: outputSchema differs"
    assert compared >= 3 * len(EVERYTHING_BASE_TOOLS)


async def test_tools_list_is_stable(broker):
    async with H.http_session(broker.url) as s:
        a = [t.name for t in await H.list_all_tools(s)]
        b = [t.name for t in await H.list_all_tools(s)]
    assert a == b, "tools/list order changed between two calls"


@pytest.mark.parametrize("server", EVERYTHING_SERVERS)
async def test_echo_on_each_transport_matches_direct(broker, ev_http, server):
    """2. echo through the broker returns exactly what server-everything returns directly."""
    msg = f"hello via {server} \u2713"
    async with H.http_session(ev_http.url) as d:
        direct = await d.call_tool("echo", {"message": msg})
    async with H.http_session(broker.url) as s:
        via = await s.call_tool(f"{server}__echo", {"message": msg})
    assert not via.is_error, H.dump(via)
    assert H.dump(via.content) == H.dump(direct.content)
    assert msg in via.content[0].text


async def test_structured_content_forwarded(broker, ev_http):
    async with H.http_session(ev_http.url) as d:
        direct = await d.call_tool("get-structured-content", {"location": "Chicago"})
    assert direct.structured_content is not None
    async with H.http_session(broker.url) as s:
        via = await s.call_tool("evhttp__get-structured-content", {"location": "Chicago"})
    assert not via.is_error
    assert via.structured_content == direct.structured_content
    assert H.dump(via.content) == H.dump(direct.content)


async def test_ledger_tool_through_broker(broker, ledger_bin):
    async with H.stdio_session(str(ledger_bin), ["stdio"]) as d:
        direct = await d.call_tool("list_accounts", {})
    assert not direct.is_error, H.dump(direct)
    async with H.http_session(broker.url) as s:
        via = await s.call_tool("ledger__list_accounts", {})
    assert not via.is_error, H.dump(via)
    assert H.dump(via.content) == H.dump(direct.content)
    if direct.structured_content is not None:
        assert via.structured_content == direct.structured_content


async def test_identity_tool_through_broker(broker, identity):
    async with H.http_session(identity.url) as d:
        direct = await d.call_tool("list_users", {})
    assert not direct.is_error, H.dump(direct)
    assert direct.structured_content is not None
    async with H.http_session(broker.url) as s:
        via = await s.call_tool("identity__list_users", {})
        assert not via.is_error, H.dump(via)
        assert via.structured_content == direct.structured_content
        assert H.dump(via.content) == H.dump(direct.content)
        # an upstream tool error stays a tool result with isError, not a protocol error
        err = await s.call_tool("identity__lookup_user", {"username": "no-such-user-e2e"})
    assert err.is_error
    assert "no-such-user-e2e" in str(H.dump(err.content))


async def test_prompts_list_and_get(broker, ev_http):
    """3a. prompts/list is namespaced; prompts/get with arguments equals the direct result."""
    async with H.http_session(ev_http.url) as d:
        dprompts = {p.name: p for p in (await d.list_prompts()).prompts}
        dget = await d.get_prompt("args-prompt", {"city": "Lisbon", "state": "Estremadura"})
    async with H.http_session(broker.url) as s:
        prompts = {p.name: p for p in (await s.list_prompts()).prompts}
        for srv in EVERYTHING_SERVERS:
            for name in dprompts:
                assert f"{srv}__{name}" in prompts, f"{srv}__{name} missing from prompts/list: {sorted(prompts)}"
        bp = prompts["evhttp__args-prompt"]
        assert H.dump(bp.arguments) == H.dump(dprompts["args-prompt"].arguments)
        assert bp.description == dprompts["args-prompt"].description
        got = await s.get_prompt("evhttp__args-prompt", {"city": "Lisbon", "state": "Estremadura"})
    assert H.dump(got.messages) == H.dump(dget.messages)
    assert "Lisbon" in str(H.dump(got.messages))


async def test_resources_list_read_and_templates(broker, ev_http):
    """3b. resources are exposed as <server>+<uri>; reading returns the upstream contents."""
    async with H.http_session(ev_http.url) as d:
        dres = (await d.list_resources()).resources
        dtpl = (await d.list_resource_templates()).resource_templates
        first = dres[0]
        dread = await d.read_resource(first.uri)
        dyn = await d.read_resource("demo://resource/dynamic/text/3")
    async with H.http_session(broker.url) as s:
        res = {str(r.uri): r for r in (await s.list_resources()).resources}
        for r in dres:
            exposed = f"evhttp+{r.uri}"
            assert exposed in res, f"{exposed} not in resources/list: {sorted(res)[:20]}"
            assert res[exposed].name == r.name
            assert res[exposed].mime_type == r.mime_type
        assert f"evstdio+{first.uri}" in res and f"evsse+{first.uri}" in res

        exposed = f"evhttp+{first.uri}"
        got = await s.read_resource(exposed)
        assert len(got.contents) == len(dread.contents)
        assert str(got.contents[0].uri) == exposed
        assert got.contents[0].text == dread.contents[0].text

        tpls = {t.uri_template: t for t in (await s.list_resource_templates()).resource_templates}
        for t in dtpl:
            assert f"evhttp+{t.uri_template}" in tpls, f"template evhttp+{t.uri_template} missing: {sorted(tpls)}"
        got_dyn = await s.read_resource("evhttp+demo://resource/dynamic/text/3")
        assert str(got_dyn.contents[0].uri) == "evhttp+demo://resource/dynamic/text/3"
        assert got_dyn.contents[0].text.split(" created at")[0] == dyn.contents[0].text.split(" created at")[0] == "Resource 3: This is a plaintext resource"
