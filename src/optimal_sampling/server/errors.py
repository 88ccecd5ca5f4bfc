"""Errors as OpenAI-style bodies: `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx.

Every mistake of a client (malformed JSON, a wrong type, a value out of range, an unknown model, a
bad API key, a prompt too long for the context) becomes one such body naming the field, and the
server goes on serving. Handlers raise `APIError`; `install_error_handlers` maps FastAPI's own
errors (validation, unknown routes) and anything unexpected (500) to the same shape.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("optimal_sampling.server")

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    503: "server_error",
}


class APIError(Exception):
    """A request the server refuses: HTTP status, message, and the field at fault (None: no field)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_body(message: str, param: str | None, status: int) -> dict:
    kind = TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.param, err.status), status_code=err.status)


def from_value_error(err: Exception, param: str | None, names: dict[str, str] | None = None) -> APIError:
    """A lower layer's ValueError/TypeError as a 400; its message starts with the option's name
    (`max_tokens must be ...`), which names the field (renamed through names, e.g. to max_new_tokens)."""
    message = str(err)
    first = message.split(" ", 1)[0]
    if first.isidentifier():
        param = (names or {}).get(first, first)
        message = param + message[len(first) :]
    return APIError(message, param)


TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def validation_param(loc: tuple) -> str:
    """A pydantic location ('body', 'sampling_params', 'SGLangSampling', 'temperature') as a dotted
    field name ('sampling_params.temperature'): the body and union members' type tags left out."""
    parts = [
        str(p)
        for p in loc
        if p != "body" and not (isinstance(p, str) and ("[" in p or p[:1].isupper() or p in TYPE_TAGS))
    ]
    return ".".join(parts) if parts else "body"


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request"}
    param = validation_param(tuple(first.get("loc", ("body",))))
    if first.get("type") == "json_invalid":
        param, message = (
            "body",
            f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
        )
    else:
        message = f"{param}: {first['msg']}"
    return JSONResponse(error_body(message, param, 400), status_code=400)


async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(exc.detail), None, exc.status_code), status_code=exc.status_code)


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed")
    return JSONResponse(error_body(f"{type(exc).__name__}: {exc}", None, 500), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
