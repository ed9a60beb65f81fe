"""The edge transport's kept-alive connection, against a real HTTP/1.1 server on 127.0.0.1.

The server here closes the connection after every reply without saying so (no
``Connection: close``), as a server whose keep-alive timer ran out while the device was
training does. The transport must notice before reusing it, open a new one, and never
hand the caller an error for it.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("httpx")

from ftte.crypto.primitives import Signer  # noqa: E402
from ftte.edge.http_client import RetryPolicy, Transport  # noqa: E402

from ftte import wire  # noqa: E402
from ftte.deploy_messages import Ack, LeaveRequest  # noqa: E402
from ftte.http_auth import HEADER_SERVER_TIME  # noqa: E402


@pytest.fixture()
def closing_server():
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive unless the server says otherwise

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("content-length", "0")))
            seen.append(self.path)
            body = wire.encode(Ack("c-1", 0))
            self.send_response(200)
            self.send_header("content-type", "application/msgpack")
            self.send_header("content-length", str(len(body)))
            self.send_header(HEADER_SERVER_TIME, str(int(time.time() * 1000)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True  # close after the reply, without a Connection: close header

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_keep_alive_connection_the_server_closed_is_replaced(closing_server):
    url, seen = closing_server
    t = Transport(url, Signer(), verify=False, retry=RetryPolicy(base_s=5.0, patience_s=10.0))
    try:
        t0 = time.monotonic()
        for _ in range(3):
            time.sleep(0.05)  # the server's close reaches the client while the connection is idle
            assert t.call("leave", LeaveRequest("c-1"), (Ack,)) == Ack("c-1", 0)
        # one new connection per call, and no retry with its 5 s backoff was needed
        assert t.connections == 3 and t.requests == 3 and len(seen) == 3
        assert time.monotonic() - t0 < 4.0
    finally:
        t.close()
