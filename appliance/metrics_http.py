"""The HTTP server of /metrics: prometheus_client's WSGI app in a thread that sleeps in `select`
until a scrape comes (prometheus_client's own `start_http_server` wakes twice a second to look
for a shutdown); `stop` wakes it with a connection of its own.
"""

from __future__ import annotations

import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def serve(host: str, port: int, registry):
    """Serve `registry` on host:port in a daemon thread; the server (OSError when it cannot bind)."""
    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    httpd = make_server(host, port, make_wsgi_app(registry), Server, handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 3600}, name="metrics-http",
                     daemon=True).start()
    return httpd


def stop(httpd) -> None:
    """Shut the server down and close its socket: it wakes for a connection of ours."""
    done = threading.Thread(target=httpd.shutdown, daemon=True)
    done.start()
    host, port = httpd.server_address[:2]
    while done.is_alive():
        try:
            socket.create_connection((host, port), timeout=1).close()
        except OSError:
            pass
        done.join(0.1)
    httpd.server_close()
