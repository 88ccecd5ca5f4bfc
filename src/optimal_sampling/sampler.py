"""OptimalSampler: the loop engine -> mixing -> sampling, with stopping and outputs.

The loop, per iteration:
1. admit waiting requests into free slots (prefill) and draw their first token;
2. decode one token for every active slot;
3. retire finished requests, yielding their samples at once (callers may stream them to disk).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from itertools import islice

import torch

from .config import EngineConfig, MixConfig, SamplingParams
from .engines.base import Engine, SlotRequest, admit_group
from .loading import LoadedModel, load_model, resolve_device, resolve_dtype, shared_vocab_size
from .outputs import Sample, SamplingOutput
from .requests import Request, RequestState, StopChecker, to_sample
from .sampling import request_seed
from .step import sample_step


class FirstDraw:
    """Results already on the host (a first draw on engines without add_async, or a step of an
    engine without decode_and_sample): the same ready() / to_host() as PendingAdd and HostCopy."""

    def __init__(self, result: dict):
        self.result = result

    def ready(self) -> bool:
        return True

    def to_host(self) -> dict:
        return self.result


def eos_ids_of(loaded: LoadedModel) -> set[int]:
    """Every end-of-sequence id the tokenizer and the generation config name."""
    ids: set[int] = set()
    candidates = [loaded.tokenizer.eos_token_id]
    gen = getattr(loaded.model, "generation_config", None)
    if gen is not None:
        candidates.append(gen.eos_token_id)
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _as_prompt_list(name: str, prompts: object) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name} must be a list of strings")
    return list(prompts)


class OptimalSampler:
    """Sample from q proportional to pi_base^(1-alpha) pi_teacher^alpha, token by token, exactly."""

    def __init__(
        self,
        model_base: str | None = None,
        model_teacher: str | None = None,
        alpha_method: str = "kl_symmetry",
        fixed_alpha: float = 0.5,
        alpha_min: float = 0.5,
        alpha_max: float = 1.0,
        constraint_to_target: bool = False,
        target_top_k: int = -1,
        target_top_p: float = 1.0,
        dtype: str = "auto",
        device: str = "auto",
        seed: int | None = None,
        engine: str = "auto",
        max_batch_size: int = 64,
        mem_fraction_static: float = 0.85,
        enable_torch_compile: bool = False,
        tp_size: int = 1,
    ):
        spawn_kwargs = {k: v for k, v in locals().items() if k != "self"}  # what self-started TP helpers rebuild
        self.mix = MixConfig(
            alpha_method=alpha_method, fixed_alpha=fixed_alpha, alpha_min=alpha_min, alpha_max=alpha_max,
            constraint_to_target=constraint_to_target, target_top_k=target_top_k, target_top_p=target_top_p,
        )  # fmt: skip
        self.engine_config = EngineConfig(
            engine=engine, dtype=dtype, device=device, max_batch_size=max_batch_size,
            mem_fraction_static=mem_fraction_static, enable_torch_compile=enable_torch_compile,
        )  # fmt: skip
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError("seed must be an integer or None")
        self.seed = seed
        if (model_base is None) != (model_teacher is None):
            raise ValueError("give both model_base and model_teacher, or neither for the demo pair")
        if model_base is None:
            from .demo import resolve_demo_pair

            model_base, model_teacher = (str(p) for p in resolve_demo_pair())
        self.tp, self.device, load_device = self._start_tensor_parallel(tp_size, spawn_kwargs)
        torch_dtype = resolve_dtype(self.engine_config.dtype, self.device)
        self.base = load_model(model_base, torch_dtype, load_device)
        self.teacher = load_model(model_teacher, torch_dtype, load_device)
        self.vocab_size = shared_vocab_size(self.base, self.teacher)
        self.eos_ids = eos_ids_of(self.base)
        self.engine = self._build_engine()

    def _start_tensor_parallel(self, tp_size: int, spawn_kwargs: dict):
        """(group, device, where models load): TP shards are cut from models loaded on the CPU."""
        from .distributed import SINGLE, start_tensor_parallel

        if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
            raise ValueError(f"tp_size must be a positive integer, got {tp_size!r}")
        if tp_size == 1:
            device = resolve_device(self.engine_config.device)
            return SINGLE, device, device
        if self.engine_config.engine == "reference":
            raise ValueError("tp_size > 1 runs on the fast engine; use engine='auto' or 'fast'")
        tp, device = start_tensor_parallel(tp_size, self.engine_config.device, spawn_kwargs)
        return tp, device, torch.device("cpu")

    def _build_engine(self) -> Engine:
        from .engines.reference import ReferenceEngine

        if self.tp.size > 1:
            return self._build_tensor_parallel_engine()
        choice = self.engine_config.engine
        if choice == "fast" or (choice == "auto" and self.device.type == "cuda"):
            from .engines.fast import build_fast_engine, supports

            if supports(self.base.model, self.teacher.model):
                return build_fast_engine(self.base, self.teacher, self.vocab_size, self.engine_config)
            if choice == "fast":
                raise ValueError("engine='fast' supports Llama, Mistral, Qwen2 and Qwen3 models only")
        return ReferenceEngine(
            self.base.model, self.teacher.model, self.vocab_size, self.engine_config.max_batch_size
        )

    def _build_tensor_parallel_engine(self) -> Engine:
        from .distributed import EngineProxy
        from .engines.fast.tensor_parallel import build_tensor_parallel_engine

        engine = build_tensor_parallel_engine(
            self.base.model, self.teacher.model, self.vocab_size, self.engine_config, self.tp, self.device
        )
        return EngineProxy(engine, self.tp) if self.tp.helpers else engine

    def close(self) -> None:
        """Stop the tensor-parallel helper processes this sampler started (if any)."""
        close = getattr(self.engine, "close", None)
        if self.tp.helpers and close is not None:
            close()

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        prompts: str | list[str],
        max_tokens: int = 100,
        temperature: float = 1.0,
        collect_diagnostics: bool = False,
        teacher_prompts: list[str] | None = None,
        n: int = 1,
        top_k: int = -1,
        top_p: float = 1.0,
        min_p: float = 0.0,
        stop: str | list[str] | None = None,
        seed: int | None = None,
    ) -> SamplingOutput:
        """Generate n samples per prompt; results in prompt-major order."""
        samples = list(
            self.generate_iter(
                prompts, max_tokens=max_tokens, temperature=temperature, collect_diagnostics=collect_diagnostics,
                teacher_prompts=teacher_prompts, n=n, top_k=top_k, top_p=top_p, min_p=min_p, stop=stop, seed=seed,
            )
        )  # fmt: skip
        samples.sort(key=lambda s: (s.prompt_index, s.sample_index))
        return SamplingOutput(samples)

    def generate_iter(
        self,
        prompts: str | list[str],
        max_tokens: int = 100,
        temperature: float = 1.0,
        collect_diagnostics: bool = False,
        teacher_prompts: list[str] | None = None,
        n: int = 1,
        top_k: int = -1,
        top_p: float = 1.0,
        min_p: float = 0.0,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        prompt_indices: list[int] | None = None,
        skip: Callable[[int, int], bool] | None = None,
        on_tokens: Callable[[int], None] | None = None,
    ) -> Iterator[Sample]:
        """Yield each sample as soon as it finishes (completion order, not prompt order).

        prompt_indices: the index each prompt carries in the outputs and in its random seed
        (default 0..len-1), so a prompt gets the same samples wherever it sits in a run.
        skip(prompt_index, sample_index): requests to leave out (already done, on resume).
        on_tokens(k): called after each step with the number of tokens produced.
        """
        stop_strings = (stop,) if isinstance(stop, str) else tuple(stop or ())
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, n=n, top_k=top_k, top_p=top_p, min_p=min_p,
            stop=stop_strings, seed=seed, collect_diagnostics=collect_diagnostics,
        )  # fmt: skip
        requests = self.build_requests(prompts, teacher_prompts, params, prompt_indices)
        if skip is not None:
            requests = [r for r in requests if not skip(r.prompt_index, r.sample_index)]
        checker = StopChecker(self.base.tokenizer, self.eos_ids, params.stop)
        yield from self._run(requests, params, checker, on_tokens)

    def score(
        self,
        prompts: str | list[str],
        completions: list[str] | list[list[int]],
        teacher_prompts: list[str] | None = None,
        temperature: float = 1.0,
        top_k: int = -1,
        top_p: float = 1.0,
        min_p: float = 0.0,
        collect_diagnostics: bool = True,
    ) -> SamplingOutput:
        """Teacher-forced alpha, log pi_base, log pi_teacher and log q of given completions.

        Completions given as token ids are scored exactly; text is re-tokenized with the base
        tokenizer (which may differ from how a sampler split it). Use the same mixing and
        sampling settings as the run that produced the samples.
        """
        from .scoring import score_iter

        params = SamplingParams(
            max_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            collect_diagnostics=collect_diagnostics,
        )  # fmt: skip
        prompts = _as_prompt_list("prompts", prompts)
        if not isinstance(completions, Sequence) or isinstance(completions, str):
            raise TypeError("completions must be a list of strings or of token-id lists")
        return SamplingOutput(list(score_iter(self, prompts, list(completions), teacher_prompts, params)))

    # ------------------------------------------------------------------ internals
    def build_requests(
        self,
        prompts: str | list[str],
        teacher_prompts: list[str] | None,
        params: SamplingParams,
        prompt_indices: list[int] | None = None,
    ) -> list[Request]:
        """Validate and tokenize prompts into requests, prompt-major (n per prompt)."""
        prompts = _as_prompt_list("prompts", prompts)
        if not prompts:
            raise ValueError("prompts must not be empty")
        teacher = prompts if teacher_prompts is None else _as_prompt_list("teacher_prompts", teacher_prompts)
        if len(teacher) != len(prompts):
            raise ValueError(f"teacher_prompts has {len(teacher)} entries but prompts has {len(prompts)}")
        indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
        if len(indices) != len(prompts):
            raise ValueError("prompt_indices must have one entry per prompt")
        base_seed = params.seed if params.seed is not None else self.seed
        if base_seed is None:
            from .distributed import agree_seed

            base_seed = agree_seed(self.tp, random.SystemRandom().randrange(1 << 62))
        context = self.engine.max_context()
        requests = []
        for index, prompt, teacher_prompt in zip(indices, prompts, teacher):
            base_ids = self._tokenize(self.base, prompt, index, "prompt")
            teacher_ids = self._tokenize(self.teacher, teacher_prompt, index, "teacher prompt")
            longest = max(len(base_ids), len(teacher_ids))
            if longest >= context:
                raise ValueError(f"prompt {index} has {longest} tokens; the models' context is {context}")
            budget = min(params.max_tokens, context - longest)
            for k in range(params.n):
                seed_k = request_seed(base_seed, index, k)
                requests.append(Request(index, k, prompt, teacher_prompt, base_ids, teacher_ids, seed_k, budget))
        return requests

    @staticmethod
    def _tokenize(loaded: LoadedModel, text: str, index: int, what: str) -> tuple[int, ...]:
        ids = tuple(loaded.tokenizer(text)["input_ids"])
        if not ids:
            raise ValueError(f"{what} {index} is empty after tokenization")
        return ids

    def _run(
        self,
        requests: list[Request],
        params: SamplingParams,
        checker: StopChecker,
        on_tokens: Callable[[int], None] | None,
    ) -> Iterator[Sample]:
        """Continuous batching. Where the engine `pipelines` (the fast engine keeps each slot's last
        token on the device), step n + 1 is queued before step n's results are read, so the host's
        work (reading, stop checks, bookkeeping) runs while the device computes. A request that
        stops (EOS, stop string) at step n has one token drawn in step n + 1 that is dropped; the
        tokens kept are the same as without pipelining (each draw's randomness is keyed by
        (request seed, token index)). A step takes at most the engine's batch limit of rows, the
        longest-running first; an engine with spare slots thus holds requests prefilled ahead,
        which take a row as soon as one frees."""
        engine = self.engine
        pipelined = getattr(engine, "pipelines", False)
        limit = engine.batch_limit()
        waiting = deque(requests)
        free = list(range(engine.max_slots - 1, -1, -1))
        active: dict[int, RequestState] = {}  # slot -> state, in the engine's row order
        pending = None  # (admitted states, their first draw) while the engine prefills them
        in_flight = None  # (states, results on their way to the host) of a step not read yet
        group = admit_group(limit)
        while waiting or active or pending or in_flight:
            # 1. admit waiting requests into free slots (a group at a time); the engine prefills
            #    them and draws their first tokens, on the fast engine beside the decode steps
            refill = engine.supports_refill and len(free) >= min(group, len(waiting))
            if pending is None and waiting and free and (refill or not (active or in_flight)):
                admitted = {}
                while waiting and free:
                    admitted[free.pop()] = RequestState(waiting.popleft())
                pending = admitted, self._admit(admitted, params)
            # 2. the admitted join once their first tokens are drawn (at once if nothing else runs)
            if pending is not None and (not (active or in_flight) or pending[1].ready()):
                admitted, first = pending
                pending = None
                self._append(admitted, first.to_host())
                active.update(admitted)
                yield from self._retire(active, free, checker, params)
                if on_tokens:
                    on_tokens(len(admitted))
            # 3. queue one decode step for the active slots with tokens left to ask for (at most
            #    `limit`, in admission order)
            asking = ((slot, st) for slot, st in active.items() if st.issued < st.request.token_budget)
            rows = dict(islice(asking, limit))
            queued = (rows, self._decode(rows, params, pipelined)) if rows else None
            # 4. read the step before (pipelined) or this one, and retire finished requests
            if pipelined:
                queued, in_flight = in_flight, queued
            if queued is not None:
                states, results = queued
                kept = {slot: st for slot, st in states.items() if st.finish_reason is None}
                self._append(states, results.to_host(), kept)
                yield from self._retire(active, free, checker, params)
                if on_tokens:
                    on_tokens(len(kept))

    def _admit(self, admitted: dict[int, RequestState], params: SamplingParams):
        """Prefill the admitted requests and draw their first tokens: a handle with ready() and
        to_host(). The fast engine on CUDA runs it on its prefill stream (add_async); not the
        tensor-parallel one, whose ranks must run every collective in one order."""
        engine = self.engine
        requests = [SlotRequest(s, st.request.base_ids, st.request.teacher_ids) for s, st in admitted.items()]
        seeds, steps = self._issue(admitted)
        if getattr(engine, "overlaps_prefill", False):
            return engine.add_async(requests, seeds, steps, self.mix, params)
        logits_b, logits_t = engine.add(requests)
        return FirstDraw(self._sample(seeds, steps, logits_b, logits_t, params))

    @staticmethod
    def _issue(states: dict[int, RequestState]) -> tuple[list[int], list[int]]:
        """Row seeds and token indices of one more token per state (the draws' random keys)."""
        seeds = [st.request.seed for st in states.values()]
        steps = [st.issued for st in states.values()]
        for st in states.values():
            st.issued += 1
        return seeds, steps

    def _sample(self, seeds: list[int], steps: list[int], logits_b, logits_t, params: SamplingParams) -> dict:
        """One token per row from given logits, by the engine's sampler if it has one."""
        engine_sample = getattr(self.engine, "sample", None)
        if engine_sample is not None:
            return engine_sample(logits_b, logits_t, seeds, steps, self.mix, params).to_host()
        device = logits_b.device
        seeds_t = torch.tensor(seeds, dtype=torch.long, device=device)
        steps_t = torch.tensor(steps, dtype=torch.long, device=device)
        return sample_step(logits_b, logits_t.to(device), seeds_t, steps_t, self.mix, params).to_host()

    def _decode(self, rows: dict[int, RequestState], params: SamplingParams, pipelined: bool):
        """Queue one token for every row: a handle with to_host(). As one captured step where the
        engine offers it; pipelined, the input tokens are the slots' last tokens on the device."""
        engine = self.engine
        last = None if pipelined else [st.tokens[-1] for st in rows.values()]
        seeds, steps = self._issue(rows)
        if hasattr(engine, "decode_and_sample"):
            result = engine.decode_and_sample(list(rows), last, seeds, steps, self.mix, params)
            return result.copy_to_host()
        slots = torch.tensor(list(rows), dtype=torch.long, device=engine.device)
        logits_b, logits_t = engine.decode(slots, torch.tensor(last, dtype=torch.long, device=engine.device))
        return FirstDraw(self._sample(seeds, steps, logits_b, logits_t, params))

    @staticmethod
    def _append(states: dict[int, RequestState], result: dict, keep: dict | None = None) -> None:
        """Row i of result belongs to the i-th state; only the states in keep (default all) take it."""
        for row, (slot, state) in enumerate(states.items()):
            if keep is None or slot in keep:
                state.append(result, row)

    def _retire(self, active, free, checker: StopChecker, params: SamplingParams) -> Iterator[Sample]:
        done = [slot for slot, state in active.items() if checker.check(state)]
        if not done:
            return
        self.engine.release(done)
        for slot in done:
            free.append(slot)
            yield to_sample(active.pop(slot), params.collect_diagnostics)
