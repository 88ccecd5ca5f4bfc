"""OptimalSampler: the public facade. Loads the pair, builds the engine, turns prompts into
requests and runs them through a `Scheduler`.

Invariants: options are validated into frozen configs before any model loads; a request's
randomness depends only on (seed, prompt index, sample index, token index), so a prompt gets the
same samples in any batch, slot or engine; with tp_size 1 nothing of `distributed/` is imported.
Live weight updates (`update_weights*`) apply between the steps of a running generation, from
any thread, and every sample records the `weight_version` that drew it (runtime/weights.py).
One-off costs (graph captures, kernel compiles) are paid at construction, in `warmup`, so that a
`generate` call never pays them (unless EngineConfig(warmup=False), or for a sampling setting
warmup was not given).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from ..config import SINGLE, EngineConfig, MixConfig, ParallelConfig, SamplingParams
from ..engines.base import Engine, WarmupStats
from ..engines.weights import check_model_name
from ..models.chat import chat_prompts
from ..models.loading import (
    check_tensor_parallel_pair,
    eos_ids_of,
    load_model,
    resolve_device,
    resolve_dtype,
    shared_vocab_size,
)
from ..outputs import Sample, SamplingOutput
from .prompts import as_id_lists, as_prompt_list, check_id_call, decoded_pairs, tokenized_pairs
from .requests import PromptIds, Request, StopChecker, requests_from_ids
from .scheduler import Scheduler
from .spec import SamplerSpec
from .weight_files import read_update
from .weights import WeightUpdater, as_named_tensors


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
        warmup: bool = True,
    ):
        """warmup: capture the fast engine's graphs and compile its kernels now (see `warmup`),
        not in the first generate calls."""
        self._build(
            SamplerSpec(
                model_base, model_teacher,
                MixConfig(
                    alpha_method=alpha_method, fixed_alpha=fixed_alpha, alpha_min=alpha_min, alpha_max=alpha_max,
                    constraint_to_target=constraint_to_target, target_top_k=target_top_k,
                    target_top_p=target_top_p,
                ),
                EngineConfig(
                    engine=engine, dtype=dtype, device=device, max_batch_size=max_batch_size,
                    mem_fraction_static=mem_fraction_static, enable_torch_compile=enable_torch_compile,
                    warmup=warmup,
                ),
                ParallelConfig(tp_size),
                seed,
            )
        )  # fmt: skip

    @classmethod
    def from_configs(
        cls,
        model_base: str | None,
        model_teacher: str | None,
        mix: MixConfig | None = None,
        engine: EngineConfig | None = None,
        parallel: ParallelConfig | None = None,
        seed: int | None = None,
        warmup_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> OptimalSampler:
        """The same sampler from frozen configs (what the CLI and the tensor-parallel helpers use).
        warmup_params: the settings the construction's warmup covers (see `warmup`; None: the
        default setting); nothing is warmed where engine.warmup is False."""
        spec = SamplerSpec(
            model_base,
            model_teacher,
            mix or MixConfig(),
            engine or EngineConfig(),
            parallel or ParallelConfig(),
            seed,
        )
        for value, kind in (
            (spec.mix, MixConfig),
            (spec.engine, EngineConfig),
            (spec.parallel, ParallelConfig),
        ):
            if not isinstance(value, kind):
                raise TypeError(f"expected a {kind.__name__}, got {type(value).__name__}")
        sampler = cls.__new__(cls)
        sampler._build(spec, warmup_params)
        return sampler

    def _build(self, spec: SamplerSpec, warmup_params=None) -> None:
        started = time.perf_counter()
        self.spec, self.mix, self.engine_config = spec, spec.mix, spec.engine
        if spec.seed is not None and (isinstance(spec.seed, bool) or not isinstance(spec.seed, int)):
            raise TypeError("seed must be an integer or None")
        self.seed = spec.seed
        model_base, model_teacher = spec.model_base, spec.model_teacher
        if (model_base is None) != (model_teacher is None):
            raise ValueError("give both model_base and model_teacher, or neither for the demo pair")
        if model_base is None:
            from ..models.demo import resolve_demo_pair

            model_base, model_teacher = (str(p) for p in resolve_demo_pair())
        if spec.parallel.tp_size > 1:  # from config.json: before any helper starts or weights load
            check_tensor_parallel_pair(model_base, model_teacher, spec.parallel.tp_size)
        self.tp, self.device, load_device = self._start_tensor_parallel(spec)
        torch_dtype = resolve_dtype(self.engine_config.dtype, self.device)
        self.base = load_model(model_base, torch_dtype, load_device)
        self.teacher = load_model(model_teacher, torch_dtype, load_device)
        self.vocab_size = shared_vocab_size(self.base, self.teacher)
        self.eos_ids = eos_ids_of(self.base)
        self.engine = self._build_engine()
        self.weight_updater = WeightUpdater()
        self.construct_seconds = time.perf_counter() - started  # loading and the engine, not warmup
        self.warmup_stats = WarmupStats()
        if self.engine_config.warmup:
            self.warmup(warmup_params)

    def _start_tensor_parallel(self, spec: SamplerSpec):
        """(group, device, where models load): TP shards are cut from models loaded on the CPU."""
        if spec.parallel.tp_size == 1:
            device = resolve_device(self.engine_config.device)
            return SINGLE, device, device
        if self.engine_config.engine == "reference":
            raise ValueError("tp_size > 1 runs on the fast engine; use engine='auto' or 'fast'")
        from ..distributed.groups import start_tensor_parallel

        helper = "optimal_sampling.runtime.tp_helper"
        tp, device = start_tensor_parallel(spec.parallel.tp_size, self.engine_config.device, helper, spec)
        return tp, device, torch.device("cpu")

    def _build_engine(self) -> Engine:
        from ..engines.reference import ReferenceEngine

        if self.tp.size > 1:
            return self._build_tensor_parallel_engine()
        choice = self.engine_config.engine
        if choice == "fast" or (choice == "auto" and self.device.type == "cuda"):
            from ..engines.fast import build_fast_engine, supports

            if supports(self.base.model, self.teacher.model):
                return build_fast_engine(self.base, self.teacher, self.vocab_size, self.engine_config)
            if choice == "fast":
                raise ValueError("engine='fast' supports Llama, Mistral, Qwen2 and Qwen3 models only")
        return ReferenceEngine(
            self.base.model, self.teacher.model, self.vocab_size, self.engine_config.max_batch_size
        )

    def _build_tensor_parallel_engine(self) -> Engine:
        from ..distributed.groups import EngineProxy
        from ..engines.fast.tensor_parallel import build_tensor_parallel_engine

        engine = build_tensor_parallel_engine(
            self.base.model, self.teacher.model, self.vocab_size, self.engine_config, self.tp, self.device
        )
        return EngineProxy(engine, self.tp) if self.tp.helpers else engine

    def close(self) -> None:
        """Stop the tensor-parallel helper processes this sampler started (if any)."""
        if self.tp.helpers:
            self.engine.close()

    # ------------------------------------------------------------------ public API
    def warmup(self, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> WarmupStats:
        """Pay now the one-off costs (CUDA graph captures, kernel compiles) that `generate` calls
        with these sampling settings would otherwise pay in their first calls, for every batch
        size up to max_batch_size and every prompt length; returns what it took, also kept as
        `warmup_stats` (with `construct_seconds`, the whole one-off cost of a sampler).

        None: the default SamplingParams() (what `generate` uses without sampling options). Run at
        construction with that (or `from_configs`' warmup_params) unless warmup=False. The graphs
        depend on this sampler's mixing options and on which kernels a setting runs, not on its
        numbers: whether the temperature is 0, 1 or another value, whether top_k is off, at most
        2048 or larger, whether top_p and min_p are on, and collect_diagnostics (not max_tokens,
        n, stop or seed). So warming SamplingParams(temperature=0.7, top_p=0.9) covers every
        temperature but 0 and 1 with any top_p; a generate whose setting differs in those kinds
        captures its decode graphs during its first calls. Call it between generate calls, never
        during one; its kernels compile first on a thread pool, during which nothing else in the
        process may launch Triton kernels.
        Nothing to do on the reference engine, on the CPU, or under tensor parallelism (whose
        helpers would have to capture in lockstep: there graphs are captured on first use)."""
        if sampling_params is None:
            settings = [SamplingParams()]
        elif isinstance(sampling_params, SamplingParams):
            settings = [sampling_params]
        else:
            settings = list(sampling_params)
        if not all(isinstance(p, SamplingParams) for p in settings):
            raise TypeError("sampling_params must be a SamplingParams, a list of them, or None")
        stats = WarmupStats() if self.tp.size > 1 else self.engine.warmup(self.mix, settings)
        self.warmup_stats = stats
        return stats

    def generate(
        self,
        prompts: str | list[str] | None = None,
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
        chat_template: str = "none",
        prompt_ids: Sequence[Sequence[int]] | None = None,
        teacher_prompt_ids: Sequence[Sequence[int]] | None = None,
    ) -> SamplingOutput:
        """Generate n samples per prompt; results in prompt-major order.

        chat_template: "none" (prompts as given), "auto" (each model whose tokenizer has a chat
        template sees the prompt as one user turn), "base", "teacher" or "both".
        prompt_ids / teacher_prompt_ids: the prompts as token ids instead of text (exactly one of
        prompts and prompt_ids); the teacher reads prompt_ids too unless teacher_prompt_ids is
        given. Ids are used as they are: no chat template, no special tokens added."""
        samples = list(
            self.generate_iter(
                prompts, max_tokens=max_tokens, temperature=temperature, collect_diagnostics=collect_diagnostics,
                teacher_prompts=teacher_prompts, n=n, top_k=top_k, top_p=top_p, min_p=min_p, stop=stop, seed=seed,
                chat_template=chat_template, prompt_ids=prompt_ids, teacher_prompt_ids=teacher_prompt_ids,
            )
        )  # fmt: skip
        samples.sort(key=lambda s: (s.prompt_index, s.sample_index))
        return SamplingOutput(samples)

    def generate_iter(
        self,
        prompts: str | list[str] | None = None,
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
        chat_template: str = "none",
        prompt_ids: Sequence[Sequence[int]] | None = None,
        teacher_prompt_ids: Sequence[Sequence[int]] | None = None,
    ) -> Iterator[Sample]:
        """Yield each sample as soon as it finishes (completion order, not prompt order).

        prompt_indices: the index each prompt carries in the outputs and in its random seed
        (default 0..len-1), so a prompt gets the same samples wherever it sits in a run.
        skip(prompt_index, sample_index): requests to leave out (already done, on resume).
        on_tokens(k): called after each step with the number of tokens produced.
        prompt_ids / teacher_prompt_ids: token-id prompts, as in `generate`.
        """
        stop_strings = (stop,) if isinstance(stop, str) else tuple(stop or ())
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, n=n, top_k=top_k, top_p=top_p, min_p=min_p,
            stop=stop_strings, seed=seed, collect_diagnostics=collect_diagnostics,
        )  # fmt: skip
        if prompt_ids is not None:
            check_id_call(prompts, teacher_prompts, chat_template)
            requests = self.build_requests_from_ids(prompt_ids, teacher_prompt_ids, params, prompt_indices)
        else:
            if chat_template != "none":
                prompts, teacher_prompts = self.apply_chat_template(prompts, teacher_prompts, chat_template)
            requests = self.build_requests(prompts, teacher_prompts, params, prompt_indices)
        if skip is not None:
            requests = [r for r in requests if not skip(r.prompt_index, r.sample_index)]
        checker = StopChecker(self.base.tokenizer, self.eos_ids, params.stop)
        yield from self._run(requests, params, checker, on_tokens)

    def score(
        self,
        prompts: str | list[str] | None = None,
        completions: list[str] | list[list[int]] | None = None,
        teacher_prompts: list[str] | None = None,
        temperature: float = 1.0,
        top_k: int = -1,
        top_p: float = 1.0,
        min_p: float = 0.0,
        collect_diagnostics: bool = True,
        prompt_ids: Sequence[Sequence[int]] | None = None,
        teacher_prompt_ids: Sequence[Sequence[int]] | None = None,
    ) -> SamplingOutput:
        """Teacher-forced alpha, log pi_base, log pi_teacher and log q of given completions.

        Completions given as token ids are scored exactly; text is re-tokenized with the base
        tokenizer (which may differ from how a sampler split it). Use the same mixing and
        sampling settings as the run that produced the samples. Prompts may be token ids
        (prompt_ids / teacher_prompt_ids, as in `generate`) instead of text.
        """
        from .scoring import score_iter, score_requests

        params = SamplingParams(
            max_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            collect_diagnostics=collect_diagnostics,
        )  # fmt: skip
        if not isinstance(completions, Sequence) or isinstance(completions, str):
            raise TypeError("completions must be a list of strings or of token-id lists")
        if prompt_ids is not None:
            check_id_call(prompts, teacher_prompts, "none")
            requests = self.build_requests_from_ids(prompt_ids, teacher_prompt_ids, params)
            if len(completions) != len(requests):
                raise ValueError(
                    f"completions has {len(completions)} entries but prompt_ids has {len(requests)}"
                )
            return SamplingOutput(list(score_requests(self, requests, list(completions), params)))
        prompts = as_prompt_list("prompts", prompts)
        return SamplingOutput(list(score_iter(self, prompts, list(completions), teacher_prompts, params)))

    def apply_chat_template(
        self, prompts: str | list[str], teacher_prompts: list[str] | None = None, mode: str = "auto"
    ) -> tuple[list[str], list[str]]:
        """(base prompts, teacher prompts) wrapped in the models' chat templates per `mode`."""
        prompts = as_prompt_list("prompts", prompts)
        teacher = prompts if teacher_prompts is None else as_prompt_list("teacher_prompts", teacher_prompts)
        return chat_prompts(mode, prompts, teacher, self.base.tokenizer, self.teacher.tokenizer)

    # ------------------------------------------------------------------ live weight updates
    @property
    def weight_version(self) -> int:
        """Version of the current weights: 0 as loaded, raised by every update of either model."""
        return self.weight_updater.version

    def update_weights(
        self,
        named_tensors,
        model: str = "base",
        abort_running: bool = False,
        weight_version: int | None = None,
    ) -> int:
        """Copy a state dict, or (Hugging Face name, tensor) pairs, into `model` ("base" or
        "teacher") in place; whole or partial, any floating dtype and device, tied embeddings under
        either name. Safe from any thread: it waits for a running generation's current step and
        applies before its next one. Returns the new weight version (`weight_version` if given; it
        must exceed the current one). abort_running: requests running now end with finish reason
        "abort" and the tokens drawn before the update, instead of continuing on the new weights.
        A ValueError (naming the parameter) leaves every weight as it was."""
        loaded = self.base if check_model_name(model) == "base" else self.teacher
        weights = as_named_tensors(named_tensors)
        return self.weight_updater.update(
            self.engine, loaded.model, model, weights, abort_running, weight_version
        )

    def update_weights_from_disk(
        self, path, model: str = "base", abort_running: bool = False, weight_version: int | None = None
    ) -> int:
        """update_weights from a Hugging Face directory, a safetensors (or PyTorch .bin) file or a
        list of them; a different architecture (config.json) or a wrong name or shape (safetensors
        headers) is refused before any tensor is read."""
        loaded = self.base if check_model_name(model) == "base" else self.teacher
        weights = read_update(path, self.engine, model, loaded.model.config)
        return self.update_weights(weights, model, abort_running, weight_version)

    def update_weights_from_distributed(
        self, group, names: Sequence[str], dtypes: Sequence, shapes: Sequence[Sequence[int]], model: str = "base",
        abort_running: bool = False, weight_version: int | None = None,
    ) -> int:  # fmt: skip
        """update_weights with tensors a trainer broadcasts from its rank 0 over `group` (from
        `distributed.weights.init_weights_update_group`), in the order of names/dtypes/shapes."""
        from ..distributed.weights import receive_weights_broadcast

        weights = receive_weights_broadcast(group, names, dtypes, shapes)
        return self.update_weights(weights, model, abort_running, weight_version)

    def pause_generation(self) -> None:
        """Wait for a running generation's current step, then hold its next ones (from another
        thread) until `continue_generation`; weight updates still apply meanwhile."""
        self.weight_updater.gate.pause()

    def continue_generation(self) -> None:
        self.weight_updater.gate.resume()

    # ------------------------------------------------------------------ internals
    def build_requests(
        self,
        prompts: str | list[str],
        teacher_prompts: list[str] | None,
        params: SamplingParams,
        prompt_indices: list[int] | None = None,
    ) -> list[Request]:
        """Validate and tokenize prompts into requests, prompt-major (n per prompt)."""
        if prompts is None:
            raise TypeError("give prompts (text) or prompt_ids (token ids)")
        prompts = as_prompt_list("prompts", prompts)
        if not prompts:
            raise ValueError("prompts must not be empty")
        teacher = prompts if teacher_prompts is None else as_prompt_list("teacher_prompts", teacher_prompts)
        if len(teacher) != len(prompts):
            raise ValueError(f"teacher_prompts has {len(teacher)} entries but prompts has {len(prompts)}")
        indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
        if len(indices) != len(prompts):
            raise ValueError("prompt_indices must have one entry per prompt")
        pairs = tokenized_pairs(self.base.tokenizer, self.teacher.tokenizer, prompts, teacher, indices)
        return self.requests_from_ids(pairs, params, indices)

    def build_requests_from_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        teacher_prompt_ids: Sequence[Sequence[int]] | None,
        params: SamplingParams,
        prompt_indices: list[int] | None = None,
    ) -> list[Request]:
        """Validate token-id prompts into requests, prompt-major (n per prompt); the teacher reads
        prompt_ids unless teacher_prompt_ids is given. Samples report the ids decoded as prompt text."""
        base = as_id_lists("prompt_ids", prompt_ids)
        if not base:
            raise ValueError("prompt_ids must not be empty")
        teacher = (
            base if teacher_prompt_ids is None else as_id_lists("teacher_prompt_ids", teacher_prompt_ids)
        )
        if len(teacher) != len(base):
            raise ValueError(f"teacher_prompt_ids has {len(teacher)} entries but prompt_ids has {len(base)}")
        pairs = decoded_pairs(self.base.tokenizer, self.teacher.tokenizer, base, teacher)
        return self.requests_from_ids(pairs, params, prompt_indices)

    def requests_from_ids(
        self, prompts: list[PromptIds], params: SamplingParams, prompt_indices: list[int] | None = None
    ) -> list[Request]:
        """Requests of prompts given as token ids, prompt-major (n per prompt); sample k of the
        prompt with index i (default its position) draws with request_seed(seed, i, k), where seed
        is params.seed, else the sampler's, else a fresh random one."""
        indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
        context, vocab = self.engine.max_context(), self.vocab_size
        return requests_from_ids(
            prompts, indices, params.n, params.max_tokens, self.base_seed(params), context, vocab
        )

    def base_seed(self, params: SamplingParams) -> int:
        """The seed a call's requests are derived from: params.seed, else the sampler's, else random."""
        seed = params.seed if params.seed is not None else self.seed
        if seed is None:
            seed = random.SystemRandom().randrange(1 << 62)
            if self.tp.size > 1:  # every rank must draw the same noise: the leader's seed
                from ..distributed.groups import agree_seed

                seed = agree_seed(self.tp, seed)
        return seed

    def _run(
        self,
        requests: list[Request],
        params: SamplingParams,
        checker: StopChecker,
        on_tokens: Callable[[int], None] | None,
    ) -> Iterator[Sample]:
        engine, checker = self.weight_updater.attach(self.engine, checker)  # updates land between steps
        scheduler = Scheduler(engine, self.mix, params, checker)
        scheduler.add(requests)
        yield from scheduler.run(on_tokens)
