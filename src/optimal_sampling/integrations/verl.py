"""A verl agent loop that draws rollouts from the geometric mixture q (tested with verl 0.9.1).

Importing this module registers `OptimalSamplingAgentLoop` under the agent name
"optimal_sampling" (verl's `@register`); verl's AgentLoopWorker instantiates it once per dataset
row (rows already repeated `rollout.n` times) and awaits `run(sampling_params, **row)`.

What one run returns (`AgentLoopOutput`):
- `prompt_ids`: verl's own rendering of the row's `raw_prompt` (its Continuous Token builder, the
  ids the trainer sees); the teacher reads the same ids unless the row has `teacher_prompt_ids`.
- `response_ids`: exactly the sampled tokens (at most `rollout.response_length`), mask all 1.
- `response_logprobs`: log q per token, the distribution each token was drawn from; verl turns it
  into `rollout_log_probs`, the behaviour policy of `algorithm.rollout_correction`.
- `extra_fields`: per token `logprobs_base` (log π_θ), `logprobs_teacher` (log π_t), `alphas`,
  each as long as `response_ids`; per sample `log_weight_base` (Σ log π_θ − Σ log q),
  `weight_version`, `finish_reason`; and `turn_scores`/`tool_rewards` (empty, as verl's single
  turn loop) so batches from both loops concatenate.

Where the samples come from (first that applies): a sampler given to `use_sampler` in this
process; `sampler_factory` ("module:callable" returning an `OptimalSampler`, called once per
process) or `server_url` (our server's SGLang-native `POST /generate`, token ids in) from the
agent-loop config entry; else the `OPTIMAL_SAMPLING_URL` environment variable. A server started
with `--api-key` gets it from the entry's `api_key` or `OPTIMAL_SAMPLING_API_KEY`.

Requests that arrive within `batch_window_s` of each other with equal sampling settings go out
as one call, and equal prompts among them as one prompt with n samples (one prefill). Every
sample still draws with its own seed: in-process, prompt indices never repeat within a sampler's
life (reproducible from the sampler's seed); over HTTP, each prompt gets a fresh seed.

Not covered: multi-turn/tool loops, multimodal prompts, `repetition_penalty` (refused), and
verl's weight sync, which targets verl's own rollout replicas: push the trainer's weights into the
sampler yourself (`update_weights*` in process, `/update_weights_from_disk` on the server).
"""

from __future__ import annotations

import asyncio
import importlib
import math
import os
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, register
from verl.utils.profiler import simple_timer

TESTED_VERL = "0.9.1"
AGENT_NAME = "optimal_sampling"
URL_ENV = "OPTIMAL_SAMPLING_URL"
API_KEY_ENV = "OPTIMAL_SAMPLING_API_KEY"
PER_TOKEN_EXTRAS = ("logprobs_base", "logprobs_teacher", "alphas")


@dataclass(frozen=True)
class Settings:
    """The sampling settings of one request; requests with equal settings are batched together."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    teacher_ids: tuple[int, ...] | None = None


@dataclass
class Completion:
    """One sample: its tokens and their per-token importance data."""

    token_ids: list[int]
    logprobs_q: list[float]
    logprobs_base: list[float]
    logprobs_teacher: list[float]
    alphas: list[float]
    finish_reason: str
    weight_version: int | None


# ------------------------------------------------------------------------------ backends


class SamplerBackend:
    """An in-process `OptimalSampler`. One generation at a time (a sampler's engine serves one
    caller), run in a worker thread so verl's event loop keeps going."""

    def __init__(self, sampler):
        self.sampler = sampler
        self._lock = threading.Lock()
        self._prompts_drawn = 0  # prompt indices handed out: each batch gets new ones, so new seeds

    async def complete(
        self, prompts: list[Prompt], counts: list[int], settings: Settings
    ) -> list[list[Completion]]:
        return await asyncio.to_thread(self._complete, prompts, counts, settings)

    def _complete(
        self, prompts: list[Prompt], counts: list[int], settings: Settings
    ) -> list[list[Completion]]:
        with self._lock:
            first = self._prompts_drawn
            self._prompts_drawn += len(prompts)
            count_of = {first + i: c for i, c in enumerate(counts)}
            samples = self.sampler.generate_iter(
                prompt_ids=[p.ids for p in prompts], teacher_prompt_ids=teacher_ids_of(prompts),
                n=max(counts), prompt_indices=list(count_of), skip=lambda i, k: k >= count_of[i],
                collect_diagnostics=True, max_tokens=settings.max_tokens, temperature=settings.temperature,
                top_p=settings.top_p, top_k=settings.top_k,
            )  # fmt: skip
            out: list[list] = [[] for _ in prompts]
            for s in sorted(samples, key=lambda s: (s.prompt_index, s.sample_index)):
                out[s.prompt_index - first].append(completion_of_sample(s))
        return out


class ServerBackend:
    """Our server's SGLang-native `POST /generate`, one request per batch: `input_ids` (and
    `teacher_input_ids`), one `sampling_params` per prompt with its `n` and a fresh `seed`."""

    def __init__(
        self,
        url: str,
        seed: int | None = None,
        timeout_s: float = 3600.0,
        api_key: str | None = None,
        transport=None,
    ):
        self.url = url.rstrip("/")
        self.timeout_s, self.transport = timeout_s, transport
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._rng = random.Random(seed)  # seed None: fresh seeds from the OS

    async def complete(
        self, prompts: list[Prompt], counts: list[int], settings: Settings
    ) -> list[list[Completion]]:
        import httpx

        body = self.request_body(prompts, counts, settings)
        async with httpx.AsyncClient(
            timeout=self.timeout_s, transport=self.transport, headers=self.headers
        ) as client:
            response = await client.post(f"{self.url}/generate", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"{self.url}/generate answered {response.status_code}: {response.text[:500]}")
        items = response.json()
        items = [items] if isinstance(items, dict) else items
        if len(items) != sum(counts):
            raise RuntimeError(f"{self.url}/generate returned {len(items)} samples, expected {sum(counts)}")
        out, start = [], 0
        for c in counts:  # the server answers prompt-major
            out.append([completion_of_item(item) for item in items[start : start + c]])
            start += c
        return out

    def request_body(self, prompts: list[Prompt], counts: list[int], settings: Settings) -> dict:
        params = [
            {
                "max_new_tokens": settings.max_tokens, "temperature": settings.temperature,
                "top_p": settings.top_p, "top_k": settings.top_k, "n": c, "seed": self._rng.randrange(2**31),
            }
            for c in counts
        ]  # fmt: skip
        body = {
            "input_ids": [list(p.ids) for p in prompts],
            "sampling_params": params,
            "collect_diagnostics": True,
        }
        teacher = teacher_ids_of(prompts)
        if teacher is not None:
            body["teacher_input_ids"] = [list(t) for t in teacher]
        return body


def teacher_ids_of(prompts: list[Prompt]) -> list[tuple[int, ...]] | None:
    """Teacher prompts for a batch: None when every teacher reads the base ids."""
    if all(p.teacher_ids is None for p in prompts):
        return None
    return [p.teacher_ids if p.teacher_ids is not None else p.ids for p in prompts]


def completion_of_sample(sample) -> Completion:
    return Completion(
        token_ids=list(sample.token_ids), logprobs_q=list(sample.logprobs_q),
        logprobs_base=list(sample.logprobs_base), logprobs_teacher=list(sample.logprobs_teacher),
        alphas=list(sample.alphas or []), finish_reason=sample.finish_reason, weight_version=sample.weight_version,
    )  # fmt: skip


def completion_of_item(item: dict) -> Completion:
    """One /generate output object. JSON has no infinities: the server sends a non-finite value
    as null, which can only be a log-probability of −inf here."""
    meta = item["meta_info"]

    def floats(name: str) -> list[float]:
        return [-math.inf if v is None else float(v) for v in meta.get(name) or []]

    return Completion(
        token_ids=list(item["output_ids"]), logprobs_q=floats("logprobs_q"), logprobs_base=floats("logprobs_base"),
        logprobs_teacher=floats("logprobs_teacher"), alphas=floats("alphas"),
        finish_reason=meta.get("finish_reason", {}).get("type", "unknown"), weight_version=meta.get("weight_version"),
    )  # fmt: skip


# ------------------------------------------------------------------------------ batching


class Coalescer:
    """Gathers the requests of one event loop for `window_s`, then sends each group of equal
    settings to the backend as one call, equal prompts merged into one with a sample count."""

    def __init__(self, backend, window_s: float):
        self.backend, self.window_s = backend, window_s
        self._pending: dict[Settings, list[tuple[Prompt, asyncio.Future]]] = {}
        self._timer: asyncio.TimerHandle | None = None

    async def draw(self, prompt: Prompt, settings: Settings) -> Completion:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.setdefault(settings, []).append((prompt, future))
        if self._timer is None:
            self._timer = loop.call_later(self.window_s, self._flush)
        return await future

    def _flush(self) -> None:
        batches, self._pending, self._timer = self._pending, {}, None
        for settings, items in batches.items():
            asyncio.ensure_future(self._send(settings, items))

    async def _send(self, settings: Settings, items: list[tuple[Prompt, asyncio.Future]]) -> None:
        slots: dict[Prompt, list[asyncio.Future]] = {}
        for prompt, future in items:
            slots.setdefault(prompt, []).append(future)
        try:
            results = await self.backend.complete(list(slots), [len(f) for f in slots.values()], settings)
        except Exception as error:  # every waiting rollout fails with the cause
            for _, future in items:
                if not future.done():
                    future.set_exception(error)
            return
        for futures, completions in zip(slots.values(), results):
            for future, completion in zip(futures, completions):
                if not future.done():
                    future.set_result(completion)


_chosen: SamplerBackend | ServerBackend | None = None
_backends: dict[tuple, Any] = {}  # (kind, key) -> backend, one per process
_coalescers: dict[tuple, Coalescer] = {}  # (backend id, event loop id) -> coalescer


def use_sampler(sampler) -> None:
    """Make every "optimal_sampling" agent loop of this process draw from `sampler` (an
    `OptimalSampler`); None returns to the configured route."""
    if sampler is None:
        return use_backend(None)
    key = ("sampler", id(sampler))  # one backend per sampler: its prompt indices (seeds) never restart
    if key not in _backends or _backends[key].sampler is not sampler:
        _backends[key] = SamplerBackend(sampler)
    use_backend(_backends[key])


def use_backend(backend: SamplerBackend | ServerBackend | None) -> None:
    """Route every "optimal_sampling" agent loop of this process to `backend` (e.g. a
    `ServerBackend` with its own seed, timeout or httpx transport); None returns to the config."""
    global _chosen
    _chosen = backend


def backend_for(
    server_url: str | None,
    sampler_factory: str | None,
    seed: int | None,
    timeout_s: float,
    api_key: str | None = None,
):
    """The backend a loop uses: the chosen one, else its config's factory or URL, else the env URL."""
    if _chosen is not None:
        return _chosen
    if sampler_factory:
        key = ("factory", sampler_factory)
        if key not in _backends:
            _backends[key] = SamplerBackend(load_callable(sampler_factory)())
        return _backends[key]
    url = server_url or os.environ.get(URL_ENV)
    if not url:
        raise ValueError(
            f"agent loop {AGENT_NAME!r} has no sampler: call use_sampler(sampler), or give sampler_factory or "
            f"server_url in its agent-loop config entry, or set {URL_ENV}"
        )
    key = ("server", url)
    if key not in _backends:
        api_key = api_key or os.environ.get(API_KEY_ENV)
        _backends[key] = ServerBackend(url, seed=seed, timeout_s=timeout_s, api_key=api_key)
    return _backends[key]


def load_callable(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"sampler_factory must be 'module:callable', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def coalescer_for(backend, window_s: float) -> Coalescer:
    key = (id(backend), id(asyncio.get_running_loop()))
    if key not in _coalescers or _coalescers[key].backend is not backend:
        _coalescers[key] = Coalescer(backend, window_s)
    return _coalescers[key]


# ------------------------------------------------------------------------------ the agent loop


def settings_of(sampling_params: dict[str, Any], max_tokens: int) -> Settings:
    """verl's sampling params (temperature, top_p, top_k, repetition_penalty, logprobs) as ours;
    log q comes back whatever `logprobs` says (it costs nothing)."""
    penalty = sampling_params.get("repetition_penalty", 1.0)
    if penalty not in (None, 1.0):
        raise ValueError(f"repetition_penalty={penalty} is not supported by optimal sampling")
    top_k = sampling_params.get("top_k", -1)
    return Settings(
        max_tokens=max_tokens,
        temperature=float(sampling_params.get("temperature", 1.0)),
        top_p=float(sampling_params.get("top_p", 1.0)),
        top_k=-1 if top_k is None or top_k <= 0 else int(top_k),  # verl's "off" may be 0 or -1
    )


def output_of(
    prompt_ids: Sequence[int], completion: Completion, limit: int, metrics: dict
) -> AgentLoopOutput:
    n = min(len(completion.token_ids), limit)
    extras = {name: list(getattr(completion, name)[:n]) for name in PER_TOKEN_EXTRAS}
    extras.update(
        log_weight_base=sum(completion.logprobs_base[:n]) - sum(completion.logprobs_q[:n]),
        weight_version=completion.weight_version,
        finish_reason=completion.finish_reason,
        turn_scores=[],
        tool_rewards=[],
    )
    return AgentLoopOutput(
        prompt_ids=list(prompt_ids),
        response_ids=completion.token_ids[:n],
        response_mask=[1] * n,
        response_logprobs=completion.logprobs_q[:n],
        num_turns=2,
        metrics=metrics,
        extra_fields=extras,
    )


@register(AGENT_NAME)
class OptimalSamplingAgentLoop(AgentLoopBase):
    """Single-turn rollouts from q; see the module docstring for the contract. Options come as
    keys of this loop's entry in verl's `agent_loop_config_path` file."""

    def __init__(
        self,
        *args,
        server_url: str | None = None,
        sampler_factory: str | None = None,
        batch_window_s: float = 0.005,
        seed: int | None = None,
        timeout_s: float = 3600.0,
        api_key: str | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.backend = backend_for(server_url, sampler_factory, seed, timeout_s, api_key)
        self.batch_window_s = batch_window_s
        self.response_length = self.rollout_config.response_length

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> AgentLoopOutput:
        messages = list(kwargs["raw_prompt"])
        self._assert_mm_supported(bool(await self.process_multi_modal_info(messages)))
        prompt_ids = await self.ct_build_initial_tokens(messages)
        teacher_ids = kwargs.get("teacher_prompt_ids")
        prompt = Prompt(
            tuple(prompt_ids), tuple(int(t) for t in teacher_ids) if teacher_ids is not None else None
        )
        metrics: dict = {}
        with simple_timer("generate_sequences", metrics):
            coalescer = coalescer_for(self.backend, self.batch_window_s)
            completion = await coalescer.draw(prompt, settings_of(sampling_params, self.response_length))
        metrics["num_preempted"] = -1
        return output_of(prompt_ids, completion, self.response_length, metrics)
