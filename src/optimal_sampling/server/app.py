"""The FastAPI app over one engine process, and `run_server` (uvicorn) that `serve` calls.

`run_server` starts the engine process (it loads the models; a mistake there is a ValueError
before anything listens), loads the tokenizers here, and serves. On Ctrl-C / SIGTERM uvicorn
stops accepting connections and gives running requests `shutdown_timeout` seconds; those still
running are then aborted (each ends with finish reason "abort" and a proper end of its stream),
the engine process is stopped, and `run_server` returns (exit status 0).
With an API key every route but /health needs `Authorization: Bearer KEY` (or `X-API-Key`).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import signal
from contextlib import asynccontextmanager

import uvicorn
from fastapi import Depends, FastAPI, Request

from ..runtime.spec import SamplerSpec
from . import info_routes, openai_routes, sglang_routes, weights_routes
from .bridge import EngineBridge
from .engine_process import EngineProcess
from .errors import APIError, install_error_handlers
from .state import ServedPair, ServerSettings, ServerState

ABORT_GRACE_S = 2.0  # after the abort at shutdown, time for handlers to send their last chunks


async def check_api_key(request: Request) -> None:
    key = request.app.state.server.settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    bearer = header[7:].strip() if header.lower().startswith("bearer ") else None
    given = bearer if bearer is not None else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise APIError("invalid or missing API key", "authorization", 401)


def create_app(engine: EngineProcess, pair: ServedPair, settings: ServerSettings) -> FastAPI:
    """The app over a started engine process; its lifespan stops the engine."""
    interval = None if settings.stream_interval_ms is None else settings.stream_interval_ms / 1000.0
    state = ServerState(pair, EngineBridge(engine, interval), settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.bridge.start()
        try:
            yield
        finally:
            state.bridge.stop()

    app = FastAPI(title="optimal-sampling", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    secured = [Depends(check_api_key)]
    for module in (openai_routes, sglang_routes, info_routes, weights_routes):
        app.include_router(module.router, dependencies=secured)
    app.include_router(info_routes.public)
    return app


def run_server(
    spec: SamplerSpec,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    shutdown_timeout: float = 10.0,
    log_level: str = "info",
) -> None:
    """Load the pair in an engine process, serve until Ctrl-C / SIGTERM, shut down cleanly."""
    engine = EngineProcess(spec)
    try:
        pair = ServedPair.load(engine.start())
        app = create_app(engine, pair, settings)
        config = uvicorn.Config(
            app, host=host, port=port, log_level=log_level,
            timeout_graceful_shutdown=shutdown_timeout + ABORT_GRACE_S,
        )  # fmt: skip
        # uvicorn re-raises the signal that stopped it once its graceful shutdown is done, under
        # the handlers it found: with these that is a no-op, and a clean shutdown exits with 0.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, ignore_signal)
        gc.freeze()  # what is loaded by now lives as long as the server: the collector skips it
        GracefulServer(config, app.state.server.bridge, shutdown_timeout).run()
    finally:
        engine.stop()


def ignore_signal(signum: int, frame) -> None:
    return None


class GracefulServer(uvicorn.Server):
    """uvicorn's server, but requests still running `grace` seconds into a shutdown are aborted,
    before uvicorn's own deadline (ABORT_GRACE_S later) would cut their connections."""

    def __init__(self, config: uvicorn.Config, bridge: EngineBridge, grace: float):
        super().__init__(config)
        self.bridge, self.grace = bridge, grace

    async def shutdown(self, sockets=None) -> None:
        asyncio.get_running_loop().call_later(self.grace, self.bridge.abort, None)
        await super().shutdown(sockets)
