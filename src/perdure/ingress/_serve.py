"""Serving the ingress with uvicorn, around a runtime's lifetime."""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .._errors import ConfigurationError
from .._runtime import Runtime
from ._app import DEFAULT_MAX_BODY_BYTES, create_app


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


async def serve(
    runtime: Runtime,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    log_level: str = "info",
    ready: Callable[[str], None] | None = None,
) -> None:
    """Start ``runtime``, serve it over HTTP until SIGINT or SIGTERM, stop it.

    Binding to an address other than loopback needs a ``token``: without
    one, this raises :class:`ConfigurationError` instead of serving an open
    API. ``ready`` is called with the base URL once the server listens.
    """
    import uvicorn

    if token is None and not is_loopback(host):
        raise ConfigurationError(
            f"refusing to serve on {host} without a token: anyone who can reach it could "
            "run workflows. Pass a token (perdure serve --token, or PERDURE_TOKEN), or bind "
            "to 127.0.0.1"
        )
    app = create_app(runtime, token=token, max_body_bytes=max_body_bytes)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started and ready is not None:
                ready(_base_url(self, host))

    async with runtime:
        with _graceful_signals():
            await Server(config).serve()


def _base_url(server: Any, host: str) -> str:
    port = server.servers[0].sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


@contextlib.contextmanager
def _graceful_signals() -> Iterator[None]:
    """Uvicorn handles SIGINT/SIGTERM while it serves, then re-raises the signal
    under the handler it found; make that one a no-op so the runtime closes
    cleanly and the process exits 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
