"""The HTTP layer: one model pair served over the OpenAI API and SGLang's native /generate.

Two processes: the engine process owns the models and runs every request in one engine loop
(continuous batching across HTTP requests; `engine_process`, around the runtime's
`SamplingService`), and this one speaks HTTP, so JSON and sockets never slow a decode step.
Modules, one job each: `protocol` (request schemas), `inputs` (fields -> tickets, checked
against the models), `tokenizing` (prompts -> ids, cheaply), `bridge` (tickets in, events out,
paced streams, disconnects abort), `fields` and `openai_format` (response bodies),
`openai_routes`, `sglang_routes`, `info_routes`, `weights_routes`, `errors` (OpenAI-style error
bodies), `state` (what routes share), `app` (FastAPI + uvicorn), `fake_engine` (a stand-in for
the models, for load tests of the HTTP side).
Needs the `serve` extra (fastapi, uvicorn); `require_serve_extra` says so in one line.
"""

from __future__ import annotations

import importlib.util

from ..errors import UsageError

SERVE_MODULES = ("fastapi", "uvicorn")


def require_serve_extra() -> None:
    """UsageError naming the extra when fastapi or uvicorn is missing."""
    missing = [name for name in SERVE_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"serving needs {' and '.join(missing)}: pip install 'optimal-sampling[serve]'")
