"""Live weight updates over HTTP, under SGLang's names: POST /update_weights_from_disk,
/init_weights_update_group + /update_weights_from_distributed (a trainer broadcasts each tensor
from its rank 0 through torch.distributed: gloo on CPU, NCCL on GPUs), /pause_generation,
/continue_generation, and GET /get_weight_version. An update waits for the running engine step
and applies before the next (`runtime.weights`); running requests continue on the new weights, or
end with finish reason "abort" with `abort_all_requests`. Answers are {"success", "message"}."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .errors import APIError
from .openai_routes import server_of
from .protocol import (
    InitWeightsUpdateGroupRequest,
    UpdateWeightsFromDiskRequest,
    UpdateWeightsFromDistributedRequest,
)

router = APIRouter()


@router.post("/update_weights_from_disk")
async def update_weights_from_disk(body: UpdateWeightsFromDiskRequest, request: Request) -> JSONResponse:
    if body.model not in ("base", "teacher"):
        raise APIError(f"model must be 'base' or 'teacher', got {body.model!r}", "model")
    args = (body.model_path, body.model, body.abort_all_requests, body.weight_version)
    try:
        version = await server_of(request).bridge.call("update_weights_from_disk", *args)
    except (ValueError, TypeError, OSError) as err:
        return JSONResponse({"success": False, "message": str(err)}, status_code=400)
    return JSONResponse({"success": True, "message": "updated", "weight_version": version})


@router.get("/get_weight_version")
async def get_weight_version(request: Request) -> dict:
    return {"weight_version": await server_of(request).bridge.call("weight_version")}


async def answer(request: Request, name: str, *args, **extra) -> JSONResponse:
    """{"success": true, ...} or, for a refused update, {"success": false, "message": ...} (400)."""
    try:
        value = await server_of(request).bridge.call(name, *args)
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        return JSONResponse({"success": False, "message": str(err)}, status_code=400)
    return JSONResponse({"success": True, "message": "done", **{k: value for k in extra}})


@router.post("/init_weights_update_group")
async def init_weights_update_group(body: InitWeightsUpdateGroupRequest, request: Request) -> JSONResponse:
    if body.backend not in ("gloo", "nccl"):
        raise APIError(f"backend must be 'gloo' or 'nccl', got {body.backend!r}", "backend")
    args = (
        body.master_address,
        body.master_port,
        body.rank_offset,
        body.world_size,
        body.group_name,
        body.backend,
    )
    return await answer(request, "init_weights_update_group", *args)


@router.post("/update_weights_from_distributed")
async def update_weights_from_distributed(
    body: UpdateWeightsFromDistributedRequest, request: Request
) -> JSONResponse:
    if body.model not in ("base", "teacher"):
        raise APIError(f"model must be 'base' or 'teacher', got {body.model!r}", "model")
    if not len(body.names) == len(body.dtypes) == len(body.shapes):
        raise APIError("names, dtypes and shapes must have one entry per tensor", "names")
    args = (body.group_name, body.names, body.dtypes, body.shapes, body.model, body.abort_all_requests,
            body.weight_version)  # fmt: skip
    return await answer(request, "update_weights_from_distributed", *args, weight_version=True)


@router.post("/pause_generation")
async def pause_generation(request: Request) -> JSONResponse:
    return await answer(request, "pause_generation")


@router.post("/continue_generation")
async def continue_generation(request: Request) -> JSONResponse:
    return await answer(request, "continue_generation")
