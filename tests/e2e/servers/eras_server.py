"""An MCP server of both protocol eras (official Python SDK `mcp` 2.x, Streamable HTTP) for tests/e2e/test_eras.py.

    python eras_server.py [PORT]

PORT (default 0) 0 picks a free port on 127.0.0.1. Prints exactly one line
`eras server listening on http://127.0.0.1:PORT/mcp` on stdout once it accepts connections.

One endpoint serves both eras, the SDK's own way (`StreamableHTTPSessionManager` routes on the
`MCP-Protocol-Version` header):
  * 2025-11-25 (and older): the `initialize` handshake, `Mcp-Session-Id` sessions; a tool's client input arrives
    through real server->client requests (`elicitation/create`, `sampling/createMessage`) sent mid-call;
  * 2026-07-28: `server/discover` and self-contained POSTs without a session; a tool's client input is asked for
    with an `input_required` result (`inputRequests` + a sealed `requestState`, SEP-2322) and the tool runs when
    the client retries with `inputResponses`.
The tool is written once: its parameters are filled by SDK resolvers (`Resolve(fn)` returning `Elicit[...]` /
`Sample`), and the SDK picks the transport from the request's negotiated protocol version.

Tool `ask(topic)`:
  1. elicits a form {name: str, colour: str} ("Tell me about yourself (topic: TOPIC)");
  2. samples the client's LLM with the prompt "Write one line about TOPIC";
  3. sends three progress notifications (1/3, 2/3, 3/3; messages "elicited", "sampled", "done") when the request
     carried a progress token;
  then returns one text block:
     `ask[TOPIC] elicited name=NAME colour=COLOUR | sampled=SAMPLED_TEXT | model=MODEL | era=PROTOCOL_VERSION
      | via=VIA`
  where PROTOCOL_VERSION is the era the request arrived in and VIA how the answers came: `input_responses`
  (2026-07-28: the client's retry carried `inputResponses`) or `server_requests` (older eras).
Tool `echo(message)`: returns `echo: MESSAGE` (a call that needs no client input).
Resource `eras://note` and tool `touch()`, which announces that the resource was updated (SEP-2575 listen
streams; and the calling 2025 session).
Tool `route(region, note)`: returns `routed to REGION NOTE`; `region` carries `x-mcp-header: Region`, so a
2026-07-28 call must mirror it in an `Mcp-Param-Region` header (the SDK rejects it otherwise).

Logs every POST's `MCP-Protocol-Version` header on stderr (`POST /mcp mcp-protocol-version=...`), for debugging.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from typing import Annotated

from mcp_types import CreateMessageResult, SamplingMessage, TextContent
from pydantic import BaseModel, Field

from mcp.server.mcpserver import Context, Elicit, MCPServer, Resolve, Sample


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


class Profile(BaseModel):
    name: str = Field(description="Your name")
    colour: str = Field(description="Your favourite colour")


mcp = MCPServer("eras-server", instructions="Test server of both MCP protocol eras (mcp-broker e2e).")


def ask_profile(topic: str) -> Elicit[Profile]:
    """Resolver: ask the user (elicitation/create, or an inputRequests entry in 2026-07-28)."""
    return Elicit(f"Tell me about yourself (topic: {topic})", Profile)


def ask_model(topic: str) -> Sample:
    """Resolver: ask the client's LLM (sampling/createMessage, or an inputRequests entry in 2026-07-28)."""
    return Sample(
        [SamplingMessage(role="user", content=TextContent(type="text", text=f"Write one line about {topic}"))],
        max_tokens=64,
        system_prompt="You are the eras test server's helper.",
    )


@mcp.tool()
async def ask(
    topic: str,
    profile: Annotated[Profile, Resolve(ask_profile)],
    sampled: Annotated[CreateMessageResult, Resolve(ask_model)],
    ctx: Context,
) -> str:
    """Elicit a profile, sample the client's LLM, report progress, and return both answers."""
    await ctx.report_progress(1, 3, "elicited")
    text = sampled.content.text if isinstance(sampled.content, TextContent) else repr(sampled.content)
    await ctx.report_progress(2, 3, "sampled")
    await ctx.report_progress(3, 3, "done")
    via = "input_responses" if ctx.input_responses else "server_requests"
    return (f"ask[{topic}] elicited name={profile.name} colour={profile.colour} | sampled={text} "
            f"| model={sampled.model} | era={ctx.protocol_version} | via={via}")


@mcp.tool()
async def echo(message: str) -> str:
    """Echo the message back."""
    return f"echo: {message}"


@mcp.tool()
async def route(region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})], note: str = "") -> str:
    """A tool whose `region` argument is mirrored in an `Mcp-Param-Region` header (SEP-2243): in 2026-07-28 the
    SDK refuses a call whose header is missing or differs from the argument."""
    return f"routed to {region} {note}".strip()


@mcp.resource("eras://note", name="note", mime_type="text/plain")
def note() -> str:
    """A resource whose updates `touch` announces."""
    return "a note"


@mcp.tool()
async def touch(ctx: Context) -> str:
    """Announce that eras://note changed: on `subscriptions/listen` streams (2026-07-28) and, for a 2025-era
    session, with notifications/resources/updated on that session."""
    await ctx.notify_resource_updated("eras://note")
    try:
        await ctx.request_context.session.send_resource_updated("eras://note")
    except Exception:  # noqa: BLE001 - a 2026-07-28 request has no session to notify
        pass
    return "touched eras://note"


class RoundLog:
    """ASGI wrapper that logs every POST's protocol-version header (stderr), so a failing test shows the era used."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            pv = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"mcp-protocol-version"), "-")
            log(f"POST {scope['path']} mcp-protocol-version={pv}")
        await self.app(scope, receive, send)


async def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int, nargs="?", default=0)
    args = ap.parse_args()
    # Bind first, so port 0 works and the announced URL names the real port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(128)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"

    app = RoundLog(mcp.streamable_http_app(host="127.0.0.1"))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))

    async def announce():
        while not server.started:
            await asyncio.sleep(0.02)
        print(f"eras server listening on {url}", flush=True)

    asyncio.get_running_loop().create_task(announce())
    await server.serve(sockets=[sock])


if __name__ == "__main__":
    asyncio.run(main())
