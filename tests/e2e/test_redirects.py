"""Upstream redirects (issue 11, item 4): an http or sse upstream's 3xx is not followed by default, a
redirect to another origin never is (it would carry the server's `x-api-key` there: reqwest strips
only Authorization, Cookie and Proxy-Authorization off-origin), and `follow_redirects = "same_origin"`
follows one whose scheme, host and port are the original request's.

A real MCP server cannot be made to redirect on demand, so the redirecting upstreams here are small
`http.server` servers on loopback ports; a server on another port is another origin.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import httpx2
import pytest

import helpers as H

SECRET = "secret-123"


class Recorder:
    """An HTTP server on 127.0.0.1:<free port> that records every request (method, path, headers).

    `redirects` maps a path to a Location answered with 307. With `proxy_port`, any other path is
    relayed to http://127.0.0.1:<proxy_port> (request body and headers forwarded, the response
    streamed back chunk by chunk, so an SSE stream stays live): a server-everything reached through
    a same-origin redirect. Without it, any other path is answered 404.
    """

    def __init__(self, redirects: dict[str, str] | None = None, proxy_port: int | None = None):
        self.redirects = dict(redirects or {})
        self.proxy_port = proxy_port
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0: every answer ends by closing the connection, so a relayed stream needs no
            # framing of its own.
            protocol_version = "HTTP/1.0"

            def handle_one(self):
                with outer.lock:
                    outer.requests.append((self.command, self.path,
                                           {k.lower(): v for k, v in self.headers.items()}))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                path = self.path.split("?")[0]
                if path in outer.redirects:
                    self.send_response(307)
                    self.send_header("Location", outer.redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif outer.proxy_port is not None:
                    self.relay(body)
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def relay(self, body):
                conn = http.client.HTTPConnection("127.0.0.1", outer.proxy_port, timeout=120)
                skip = {"host", "connection", "content-length", "transfer-encoding", "keep-alive"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in skip:
                            self.send_header(k, v)
                    self.end_headers()
                    while chunk := resp.read1(65536):
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except (OSError, http.client.HTTPException):
                    pass
                finally:
                    conn.close()

            do_GET = do_POST = do_DELETE = handle_one  # noqa: N815 - http.server API

            def log_message(self, *args):  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def seen(self) -> list[tuple[str, str, dict[str, str]]]:
        with self.lock:
            return list(self.requests)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _unavailable_logged(broker: H.Broker, server: str) -> str:
    """Wait for the broker's "upstream unavailable" line for `server` and return the log tail."""
    def logged():
        tail = broker.proc.stderr_tail(400)
        lines = [l for l in tail.splitlines() if "upstream unavailable" in l and f"server={server} " in l]
        return lines[-1] if lines else None
    return H.poll_until(logged, 20, f"the broker to log {server} unavailable")


@pytest.mark.parametrize("transport", ["http", "sse"])
def test_a_redirect_to_another_origin_is_not_followed(tmp_path, transport):
    """With the default `follow_redirects`, an upstream answering 307 to another origin: the target
    receives nothing (least of all x-api-key); the server is down, saying the redirect was not
    followed. (`same_origin` with a cross-origin 307: the next test's `cross` server.)"""
    target = Recorder()
    path = "/mcp" if transport == "http" else "/sse"
    redirector = Recorder(redirects={path: f"{target.origin}{path}"})
    broker = None
    try:
        servers = {
            "redir": {"transport": transport, "url": f"{redirector.origin}{path}",
                      "headers": {"x-api-key": SECRET}, "required": True, "connect_timeout": "5s"},
        }
        broker = H.start_broker(tmp_path, servers)
        H.poll_until(lambda: redirector.seen(), 20, "the broker to ask the redirector")
        anyio.run(anyio.sleep, 1)  # a following client would have reached the target by now
        leaked = [h.get("x-api-key") for _, _, h in target.seen()]
        assert target.seen() == [], f"the other origin was contacted (x-api-key: {leaked})"
        line = _unavailable_logged(broker, "redir")
        assert "HTTP 307" in line and "redirects are not followed" in line, line
        # the redirector was asked (with the key: it is the configured server), the target never
        assert all(h.get("x-api-key") == SECRET for _, _, h in redirector.seen())
        assert target.seen() == [], f"the other origin was contacted: {target.seen()}"

        r = httpx2.get(f"{broker.base}/readyz", timeout=10)
        assert r.status_code == 503 and "redir" in r.text, r.text
        names = anyio.run(H.tool_names, broker.url)
        assert not any(n.startswith("redir__") for n in names), names
        assert SECRET not in broker.proc.stderr_tail(1000)
    finally:
        if broker:
            broker.stop()
        redirector.stop()
        target.stop()


@pytest.mark.parametrize("transport", ["http", "sse"])
def test_same_origin_redirect_is_followed_only_when_allowed(tmp_path, transport):
    """`follow_redirects = "same_origin"`: a 307 from /old<path> to <path> on the same server (which
    relays to server-everything) is followed and the tools appear; the same upstream under the default
    is not followed; a 307 to another origin still is not, and that origin receives nothing."""
    mode = "streamableHttp" if transport == "http" else "sse"
    ev = H.start_everything(mode, tmp_path, name=f"everything-{mode}-behind-redirect")
    target = Recorder()
    path = "/mcp" if transport == "http" else "/sse"
    front = Recorder(proxy_port=ev.port)
    front.redirects = {f"/old{path}": f"{front.origin}{path}", f"/cross{path}": f"{target.origin}{path}"}
    broker = None
    try:
        servers = {
            "same": {"transport": transport, "url": f"{front.origin}/old{path}",
                     "headers": {"x-api-key": SECRET}, "follow_redirects": "same_origin"},
            "plain": {"transport": transport, "url": f"{front.origin}/old{path}",
                      "headers": {"x-api-key": SECRET}, "connect_timeout": "5s"},
            "cross": {"transport": transport, "url": f"{front.origin}/cross{path}",
                      "headers": {"x-api-key": SECRET}, "follow_redirects": "same_origin",
                      "connect_timeout": "5s"},
        }
        broker = H.start_broker(tmp_path, servers)
        H.wait_for_tools(broker.url, ["same__echo"], 30)

        async def call():
            async with H.http_session(broker.url) as s:
                r = await s.call_tool("same__echo", {"message": "through-a-redirect"})
                assert not r.is_error and "through-a-redirect" in r.content[0].text, H.dump(r)
                names = {t.name for t in await H.list_all_tools(s)}
                assert not any(n.startswith(("plain__", "cross__")) for n in names), names

        anyio.run(call)
        line = _unavailable_logged(broker, "plain")
        assert "redirects are not followed" in line, line
        line = _unavailable_logged(broker, "cross")
        assert "another origin" in line, line
        # the redirect was really taken: /old<path> answered 307, then <path> was asked with the key
        seen = front.seen()
        assert any(p.startswith(f"/old{path}") for _, p, _ in seen), seen
        followed = [h for _, p, h in seen if p.split("?")[0] == path]
        assert followed and all(h.get("x-api-key") == SECRET for h in followed), seen
        assert target.seen() == [], f"the other origin was contacted: {target.seen()}"
    finally:
        if broker:
            broker.stop()
        front.stop()
        target.stop()
        ev.stop()
