"""The SuperLink's public port: a gate that passes Flower's Fleet API, and nothing else, to the SuperLink.

flwr 1.42 serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr ls``, node registration)
and the runtime API (SuperExec, ServerApp) on its one ``--host``/``--port``; ``--control-api-address`` is
deprecated and no longer separates them. The Control API has no authentication in Flower's open edition,
and the runtime API's ``acquire-task`` none either. So ``fl-offsite superlink`` binds the SuperLink to
loopback and puts this gate on the address the data owners are given: ``POST /v1/fleet/NAME`` and
``GET``/``HEAD /health`` go through unchanged (node authentication is in the headers, signed by the node), every
other request is answered 404 and logged. The gate speaks TLS with the SuperLink's own certificate.
"""
from __future__ import annotations

import contextlib
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from fl_offsite.errors import UserError

log = logging.getLogger(__name__)

FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z-]*")  # all of flwr 1.42's Fleet routes, and no other
HOP_BY_HOP = frozenset({"host", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                        "upgrade", "x-forwarded-for", "x-forwarded-proto", "forwarded"})
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
MAX_REQUEST_BYTES = 64 * 2**20  # flwr 1.42 sends arrays in 5 MB chunks; anyone may POST here before any check
START_TIMEOUT_S = 15.0


def passes(method: str, path: str) -> bool:
    """Whether the gate forwards a request: a Fleet API call or a health check, matched exactly (no prefix,
    so no ``..`` or encoded segment can reach another API)."""
    if path == "/health":
        return method in ("GET", "HEAD")
    return method == "POST" and FLEET_PATH.fullmatch(path) is not None


def gate_app(upstream: str, verify: ssl.SSLContext | bool) -> Starlette:
    """The gate as an ASGI app forwarding to ``upstream`` (``https://127.0.0.1:PORT``)."""
    clients: list[httpx.AsyncClient] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        clients.append(httpx.AsyncClient(base_url=upstream, verify=verify, timeout=httpx.Timeout(300, connect=10),
                                         limits=httpx.Limits(max_connections=64)))
        yield
        await clients.pop().aclose()

    async def forward(request: Request) -> Response:
        peer = request.client.host if request.client else "?"
        if not passes(request.method, request.url.path):
            log.warning("fl-offsite: REFUSED %s %s from %s: this port serves only the Fleet API (SuperNodes); the "
                        "Control API is on the model owner's machine only", request.method, request.url.path, peer)
            return PlainTextResponse("Not Found: this port serves only Flower's Fleet API\n", status_code=404)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_REQUEST_BYTES:
                return PlainTextResponse("Content Too Large\n", status_code=413)
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
        headers.append((b"x-forwarded-for", peer.encode()))  # the SuperLink's log shows the node, not the gate
        sent = clients[0].build_request(request.method, request.url.path, headers=headers, content=bytes(body))
        try:
            reply = await clients[0].send(sent, stream=True)
        except httpx.HTTPError as err:
            log.warning("fl-offsite: the SuperLink did not answer %s (%s)", request.url.path, type(err).__name__)
            return PlainTextResponse("Bad Gateway\n", status_code=502)
        kept = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(reply.aiter_raw(), status_code=reply.status_code, headers=kept,
                                 background=BackgroundTask(reply.aclose))

    return Starlette(routes=[Route("/{path:path}", forward, methods=METHODS)], lifespan=lifespan)


class FleetGate:
    """The gate on ``host:port`` in a thread of this process, forwarding to ``upstream``; TLS when ``certfile``,
    ``keyfile`` (served) and ``ca`` (to check the SuperLink) are given."""

    def __init__(self, host: str, port: int, upstream: str, certfile: Path | None = None,
                 keyfile: Path | None = None, ca: Path | None = None) -> None:
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca else False
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._host, self._port = host, port
        self._server = uvicorn.Server(uvicorn.Config(
            gate_app(upstream, verify), log_config=None, access_log=False, lifespan="on",
            ssl_certfile=str(certfile) if certfile else None, ssl_keyfile=str(keyfile) if keyfile else None,
            timeout_graceful_shutdown=2))
        self._thread: threading.Thread | None = None

    def start(self) -> FleetGate:
        """Bind (a taken port raises UserError) and serve; return once the gate accepts connections."""
        for name in ("httpx", "uvicorn.error"):  # not a line per forwarded request, nor the gate's start-up
            logging.getLogger(name).setLevel(logging.WARNING)
        sock = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host.strip("[]"), self._port))
        except OSError as err:
            sock.close()
            raise UserError(f"cannot listen on {self.address} for the data owners' SuperNodes: {err.strerror}; "
                            "pick another --port or --host") from None
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="fleet-gate",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the Fleet gate on {self.address} did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Close the port and end the thread (open requests get ``timeout_graceful_shutdown`` seconds)."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
