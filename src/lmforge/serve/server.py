"""Running the application: uvicorn on a socket bound here, so the real port is known before
the first request (port 0 picks a free one).

Owns `bind`, `serve` (blocking, in the main thread: uvicorn turns Ctrl-C / SIGTERM into a
graceful shutdown that lets requests in flight finish) and `ServerThread` (the same server on a
background thread, for tests, benchmarks and notebooks; `stop()` shuts it down the same way).
"""

from __future__ import annotations

import socket
import sys
import threading
import time

import uvicorn

from lmforge.serve.app import create_app
from lmforge.serve.state import ServerState

# Requests in flight get this long to finish after Ctrl-C / SIGTERM before connections are cut.
GRACEFUL_SECONDS = 60
# The decode thread gives up the GIL inside every torch call and needs it back to go on; while the
# event loop's thread runs Python, it waits up to Python's switch interval (5 ms by default), which
# is longer than a whole decode step. The server process asks for shorter turns.
SWITCH_INTERVAL_SECONDS = 0.0002


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host is one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP; with
    # proto 0 every streamed event after the headers waited for the client's delayed ACK (~40 ms)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port "
                         "(0 picks a free one) or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _server(state: ServerState, access_log: bool) -> uvicorn.Server:
    config = uvicorn.Config(create_app(state), log_level="info" if access_log else "warning",
                            access_log=access_log, timeout_graceful_shutdown=GRACEFUL_SECONDS,
                            lifespan="on", ws="none")
    return uvicorn.Server(config)


def serve(state: ServerState, sock: socket.socket, access_log: bool = False) -> None:
    """Serve until Ctrl-C / SIGTERM, then let the requests in flight finish and return."""
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    _server(state, access_log).run(sockets=[sock])


class ServerThread:
    """The server on a background thread: `with ServerThread(state) as url: ...`."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = _server(state, access_log=False)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="lmforge-serve", daemon=True)

    def start(self, timeout: float = 30.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
