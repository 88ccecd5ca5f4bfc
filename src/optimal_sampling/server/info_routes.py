"""Service endpoints (SGLang's names): GET /health, GET /get_model_info, GET /get_server_info,
POST /abort_request."""

from __future__ import annotations

import dataclasses
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..version import package_version
from .openai_routes import server_of
from .protocol import AbortRequest

router = APIRouter()
public = APIRouter()  # no API key: load balancers and orchestrators probe it


@public.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while the engine thread runs, 503 otherwise."""
    alive = server_of(request).bridge.alive()
    return JSONResponse(
        {} if alive else {"error": "the engine is not running"}, status_code=200 if alive else 503
    )


@router.get("/get_model_info")
async def model_info(request: Request) -> dict:
    server = server_of(request)
    info, settings = server.pair.info, server.settings
    return {
        "model_path": settings.model_base or info.base_path,
        "teacher_model_path": settings.model_teacher or info.teacher_path,
        "tokenizer_path": info.base_path,
        "served_model_name": settings.served_model_name,
        "is_generation": True,
        "vocab_size": info.vocab_size,
        "max_context": info.max_context,
        "eos_token_ids": sorted(info.eos_ids),
    }


@router.get("/get_server_info")
async def server_info(request: Request) -> dict:
    """Configuration, and the engine loop's state: running/waiting requests, tokens/s."""
    server = server_of(request)
    info = server.pair.info
    return {
        "version": package_version(),
        "served_model_name": server.settings.served_model_name,
        "engine": info.engine,
        "device": info.device,
        "max_batch_size": info.engine_config.max_batch_size,
        "max_context": info.max_context,
        "mix": dataclasses.asdict(info.mix),
        "engine_config": dataclasses.asdict(info.engine_config),
        "uptime_s": time.time() - server.started,
        **(await server.bridge.call("stats")),
    }


@router.post("/abort_request")
async def abort_request(body: AbortRequest, request: Request) -> dict:
    """Abort the request with id `rid` (a /generate `rid` or a response id), or all of them."""
    bridge = server_of(request).bridge
    return {"aborted_tickets": bridge.abort(None if body.abort_all else body.rid)}
