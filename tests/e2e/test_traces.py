"""`[telemetry]`: spans arrive at an OTLP/HTTP receiver, and trace context goes upstream.

The receiver is a small HTTP server (POST /v1/traces) decoding bodies with the published OTLP
protobuf definitions (PyPI `opentelemetry-proto`). Upstreams: the `ledger` example over stdio (real),
and a tiny Python MCP server over HTTP. That one is a fake on purpose, and only to observe the
request headers the broker sends (server-everything does not show them): it answers initialize,
tools/list and tools/call with plain JSON.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

import helpers as H


class Receiver:
    """Collects decoded spans from OTLP/HTTP protobuf exports."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                req = trace_service_pb2.ExportTraceServiceRequest()
                req.ParseFromString(body)
                with outer.lock:
                    for rs in req.resource_spans:
                        service = {a.key: a.value.string_value for a in rs.resource.attributes}.get("service.name")
                        for ss in rs.scope_spans:
                            for s in ss.spans:
                                outer.spans.append({
                                    "service": service,
                                    "name": s.name,
                                    "trace_id": s.trace_id.hex(),
                                    "span_id": s.span_id.hex(),
                                    "parent": s.parent_span_id.hex(),
                                    "attrs": {a.key: a.value.string_value for a in s.attributes},
                                    "path": self.path,
                                    "auth": self.headers.get("x-collector-key"),
                                })
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.spans)


class HeaderSeeingUpstream:
    """A minimal MCP server over HTTP (JSON replies) recording the headers of each tools/call."""

    def __init__(self, version: str | None = None) -> None:
        """`version`: the protocol revision to answer with (default: the one the broker asks for)."""
        self.calls: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(405)
                self.send_header("content-length", "0")
                self.end_headers()

            def do_DELETE(self):  # noqa: N802
                self.do_GET()

            def do_POST(self):  # noqa: N802
                msg = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))))
                if "id" not in msg:
                    self.send_response(202)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                method, params = msg.get("method"), msg.get("params") or {}
                if method == "initialize":
                    result = {"protocolVersion": version or params.get("protocolVersion", "2025-06-18"),
                              "capabilities": {"tools": {}}, "serverInfo": {"name": "headers", "version": "1"}}
                elif method == "tools/list":
                    result = {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]}
                elif method == "tools/call":
                    outer.calls.append({"traceparent": self.headers.get("traceparent"),
                                        "meta": params.get("_meta") or {}})
                    result = {"content": [{"type": "text", "text": "echoed"}]}
                else:
                    out = {"jsonrpc": "2.0", "id": msg["id"], "error": {"code": -32601, "message": "not found"}}
                    return self.reply(out)
                self.reply({"jsonrpc": "2.0", "id": msg["id"], "result": result})

            def reply(self, out: dict) -> None:
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/mcp"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_spans_reach_the_collector_and_traceparent_goes_upstream(tmp_path):
    rx = Receiver()
    up = HeaderSeeingUpstream()
    old = HeaderSeeingUpstream(version="2025-06-18")
    telemetry = (
        "[telemetry]\n"
        f'otlp_endpoint = "http://127.0.0.1:{rx.port}"\n'
        'service_name = "broker-under-test"\n'
        'headers = { "x-collector-key" = "${COLLECTOR_KEY}" }\n'
    )
    b = H.start_broker(tmp_path, {"ledger": H.example_stdio_spec(H.LEDGER_BIN),
                                  "hdr": {"transport": "http", "url": up.url},
                                  "old": {"transport": "http", "url": old.url}},
                       name="broker-traces", extra_toml=telemetry, env={"COLLECTOR_KEY": "k-123"})
    try:
        H.wait_for_tools(b.url, ["ledger__get_account", "hdr__echo", "old__echo"], 30)
        client_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        header_trace = "0af7651916cd43dd8448eb211c80319c"
        with H.RawSession(b.url, None) as s:
            s.initialize()
            r, rid = s.post("tools/call", {"name": "ledger__get_account", "arguments": {"account_id": "ACC-1001"}})
            assert not H.final_response(r, rid)["result"].get("isError")
            r, rid = s.post("tools/call", {"name": "hdr__echo", "arguments": {},
                                           "_meta": {"traceparent": f"00-{client_trace}-00f067aa0ba902b7-01"}})
            assert not H.final_response(r, rid)["result"].get("isError")
            r, rid = s.post("tools/call", {"name": "ledger__nonexistent_tool", "arguments": {}})
            H.final_response(r, rid)
            # The client's trace context as an HTTP header this time.
            body = {"jsonrpc": "2.0", "id": 900, "method": "tools/call", "params": {"name": "old__echo", "arguments": {}}}
            r = s.client.post(s.url, json=body,
                              headers={**s.headers(), "traceparent": f"00-{header_trace}-b7ad6b7169203331-01"})
            assert not H.final_response(r, 900)["result"].get("isError")
    finally:
        b.stop()  # the exporter is flushed on exit

    spans = rx.snapshot()
    assert spans, "no spans arrived"
    assert all(s["service"] == "broker-under-test" and s["path"] == "/v1/traces" for s in spans)
    assert all(s["auth"] == "k-123" for s in spans)
    calls = [s for s in spans if s["name"] == "mcp tools/call"]

    ledger = next(s for s in calls if s["attrs"].get("mcp.upstream.name") == "get_account")
    assert ledger["attrs"]["mcp.server"] == "ledger"
    assert ledger["attrs"]["gen_ai.tool.name"] == "ledger__get_account"
    assert ledger["attrs"]["mcp.decision"] == "allow"
    assert ledger["attrs"]["mcp.outcome"] == "ok"
    children = {s["name"]: s for s in spans if s["parent"] == ledger["span_id"]}
    assert "mcp upstream" in children and "mcp credential" in children, children.keys()
    assert children["mcp upstream"]["trace_id"] == ledger["trace_id"]

    # The HTTP upstreams: the client's trace continues through the broker to the upstream.
    hdr = next(s for s in calls if s["attrs"].get("mcp.server") == "hdr")
    assert hdr["trace_id"] == client_trace and hdr["parent"] == "00f067aa0ba902b7"
    upstream_span = next(s for s in spans if s["parent"] == hdr["span_id"] and s["name"] == "mcp upstream")
    assert len(up.calls) == 1, up.calls
    sent = up.calls[0]
    assert sent["traceparent"] == f"00-{client_trace}-{upstream_span['span_id']}-01", sent
    assert sent["meta"].get("traceparent") == sent["traceparent"]

    unknown = next(s for s in calls if s["attrs"].get("gen_ai.tool.name") == "ledger__nonexistent_tool")
    assert unknown["attrs"]["mcp.decision"] == "deny"

    # A 2025-era upstream: the header only (`_meta.traceparent` is reserved from 2026-07-28, SEP-414).
    old_span = next(s for s in calls if s["attrs"].get("mcp.server") == "old")
    assert old_span["trace_id"] == header_trace and old_span["parent"] == "b7ad6b7169203331"
    old_upstream = next(s for s in spans if s["parent"] == old_span["span_id"] and s["name"] == "mcp upstream")
    assert len(old.calls) == 1, old.calls
    assert old.calls[0]["traceparent"] == f"00-{header_trace}-{old_upstream['span_id']}-01", old.calls
    assert "traceparent" not in old.calls[0]["meta"], old.calls
