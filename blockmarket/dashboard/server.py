"""The dashboard's HTTP side: the page and its assets (package data), server-sent events, two JSON APIs.

A stdlib ``ThreadingHTTPServer`` on a daemon thread (portable; each page's event stream holds one
thread). Routes:

* ``/`` (``index.html``), ``/app.js``, ``/style.css``: shipped with the package, nothing from a CDN.
* ``/events``: ``text/event-stream``; a ``snapshot`` event first, then ``view``, ``status``, ``roster``,
  ``metrics`` and ``reload`` events as they happen, a comment every 10 s to keep proxies from closing it.
* ``/api/state``: the snapshot as JSON. ``/api/matrix?market=M&agent=ID``: that agent's matrix in the
  newest answer (404 when there is none).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from blockmarket.dashboard.feed import RESYNC, DashboardFeed, sse
from runtime.http import SmallHandler

log = logging.getLogger(__name__)

ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
KEEPALIVE_S = 10.0


def asset(name: str) -> bytes:
    return (resources.files("blockmarket.dashboard") / "static" / name).read_bytes()


class DashboardServer:
    """Serves the page for ``feed`` on host:port (0: an ephemeral port) until :meth:`close`."""

    def __init__(self, feed: DashboardFeed, host: str, port: int) -> None:
        self.feed = feed
        self.closing = threading.Event()
        self._httpd = ThreadingHTTPServer((host, port), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="dashboard-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        host = "127.0.0.1" if host == "0.0.0.0" else str(host)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def start(self) -> str:
        self._thread.start()
        return self.url

    def close(self) -> None:
        self.closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server, feed = self, self.feed

        class Handler(SmallHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path in ASSETS:
                    name, content_type = ASSETS[url.path]
                    self._send(200, asset(name), content_type)
                elif url.path == "/events":
                    self._events()
                elif url.path == "/api/state":
                    self._json(200, feed.snapshot())
                elif url.path == "/api/matrix":
                    query = parse_qs(url.query)
                    found = feed.matrix(query.get("market", [""])[0], query.get("agent", [""])[0])
                    self._json(200, found) if found else self._json(404, {"error": "no answer for it yet"})
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _events(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                client = feed.hub.subscribe()
                try:
                    self._write(sse("snapshot", feed.snapshot()))
                    while not server.closing.is_set():
                        try:
                            message = client.get(timeout=KEEPALIVE_S)
                        except queue.Empty:
                            message = b": keepalive\n\n"
                        self._write(sse("snapshot", feed.snapshot()) if message == RESYNC else message)
                except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                    pass  # the page went away
                finally:
                    feed.hub.unsubscribe(client)

            def _write(self, data: bytes) -> None:
                self.wfile.write(data)
                self.wfile.flush()

            def _json(self, code: int, body: Any) -> None:
                self._send(code, json.dumps(body).encode(), "application/json")

        return Handler
