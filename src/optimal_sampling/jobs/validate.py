"""`optimal-sampling validate`: check a model pair the way a careful user would before a long run.

Checks, each a row of a pass/fail table (exit code 1 if any row fails):
1. tokenizers compatible: the same id means the same token string in both tokenizers;
2. logit widths: both models have a logit for every id the tokenizers share, EOS ids included;
3. alpha solver: `solve_alpha` on the models' real next-token distributions (every position of a
   few prompts) against a float64 bisection reference written here, per method, on [0, 1];
4. greedy at alpha = 0 / alpha = 1 equals the base's / teacher's own `generate(do_sample=False)`;
5. cached equals uncached: the engine's prefill + decode logits against one full forward pass of
   the same tokens (total variation distance of the two softmaxes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import MixConfig

DEFAULT_PROMPTS = (
    "def fibonacci(n):",
    "The capital of France is",
    "Explain in one sentence what a hash table is.",
)
ALPHA_TOLERANCE = 1e-4
TIE_TOLERANCE_HALF = 2e-2  # relative to the largest |logit|: a few bf16 roundings through a forward pass
SOLVER_METHODS = ("kl_symmetry", "ess_balance", "reverse_kl_symmetry", "entropy")
BISECTION_STEPS = 60
MAX_SOLVER_ROWS = 64


@dataclass
class Check:
    name: str
    passed: bool | None  # None: skipped
    detail: str

    @property
    def result(self) -> str:
        return {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]


# ============================================================================ command


def run(
    base: str | None, teacher: str | None, dtype: str = "auto", device: str = "auto", engine: str = "auto",
    prompts: tuple[str, ...] = (), max_tokens: int = 16, steps: int = 8,
) -> int:  # fmt: skip
    """Print the table; 0 when every check passed, else 1."""
    from ..models.loading import quiet_transformers

    quiet_transformers()
    for name, value in (("max_tokens", max_tokens), ("steps", steps)):
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    checks = validate_pair(
        base, teacher, dtype, device, engine, tuple(prompts) or DEFAULT_PROMPTS, max_tokens, steps
    )
    print(format_table(checks))
    failed = [c.name for c in checks if c.passed is not True]
    print(
        f"\n{len(checks) - len(failed)}/{len(checks)} checks passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


def format_table(checks: list[Check]) -> str:
    width = max(len("check"), *(len(c.name) for c in checks))
    lines = [f"{'check':<{width}}  result  detail", f"{'-' * width}  ------  {'-' * 40}"]
    lines += [f"{c.name:<{width}}  {c.result:<6}  {c.detail}" for c in checks]
    return "\n".join(lines)


def validate_pair(
    base: str | None,
    teacher: str | None,
    dtype: str = "auto",
    device: str = "auto",
    engine: str = "auto",
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    max_tokens: int = 16,
    steps: int = 8,
) -> list[Check]:
    """Every check, in order; after a tokenizer mismatch the model checks are skipped."""
    pair, tokenizer_check = check_tokenizers(base, teacher)
    names = ["logit widths", *(f"alpha solver: {m}" for m in SOLVER_METHODS),
             "greedy alpha=0 == base generate", "greedy alpha=1 == teacher generate", "cached == uncached",
             "engine == transformers"]  # fmt: skip
    if pair is None:
        return [tokenizer_check, *(Check(n, None, "skipped: tokenizers incompatible") for n in names)]
    from ..runtime.sampler import OptimalSampler

    sampler = OptimalSampler(
        pair.base_path, pair.teacher_path, dtype=dtype, device=device, engine=engine, seed=0
    )
    checks = [tokenizer_check, _guard("logit widths", lambda: check_logit_widths(sampler))]
    rows = _guard_value(lambda: next_token_logits(sampler, prompts))
    for method in SOLVER_METHODS:
        checks.append(_guard(f"alpha solver: {method}", lambda m=method: check_solver(rows, m)))
    for alpha, who in ((0.0, "base"), (1.0, "teacher")):
        name = f"greedy alpha={alpha:g} == {who} generate"
        checks.append(_guard(name, lambda a=alpha, w=who: check_greedy(sampler, prompts, a, w, max_tokens)))
    checks.append(_guard("cached == uncached", lambda: check_cache(sampler, prompts, steps)))
    checks.append(
        _guard("engine == transformers", lambda: check_engine_vs_transformers(sampler, prompts, steps))
    )
    return checks


def check_tokenizers(base: str | None, teacher: str | None):
    """(resolved pair or None, the check); a missing model is a usage error, not a failed check."""
    from ..models.loading import real_vocab_size
    from ..models.pair import resolve_model_pair

    name = "tokenizers compatible"
    try:
        pair = resolve_model_pair(base, teacher)
    except ValueError as err:
        if "not compatible" not in str(err):
            raise
        return None, Check(name, False, str(err))
    shared = min(real_vocab_size(pair.base_tokenizer), real_vocab_size(pair.teacher_tokenizer))
    return pair, Check(name, True, f"{shared} shared ids map to the same tokens")


def _guard(name: str, fn: Callable[[], tuple[bool, str]]) -> Check:
    """Run one check; an exception inside it is a failure of that check, not of the command."""
    try:
        passed, detail = fn()
    except Exception as err:  # noqa: BLE001 - any error is that check's failure
        passed, detail = False, f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return Check(name, passed, detail)


def _guard_value(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - reported by every check that needs the value
        return err


# ============================================================================ widths


def check_logit_widths(sampler) -> tuple[bool, str]:
    from ..models.loading import logit_width, real_vocab_size

    width_b, width_t = logit_width(sampler.base.model), logit_width(sampler.teacher.model)
    tok_b, tok_t = real_vocab_size(sampler.base.tokenizer), real_vocab_size(sampler.teacher.tokenizer)
    detail = f"logits base {width_b} / teacher {width_t}, tokenizers {tok_b} / {tok_t}, shared {sampler.vocab_size}"
    missing = min(tok_b, tok_t) - min(width_b, width_t)
    if missing > 0:
        return False, f"{detail}; {missing} token ids have no logit in one model"
    outside = sorted(i for i in sampler.eos_ids if i >= sampler.vocab_size)
    if outside:
        return (
            False,
            f"{detail}; EOS ids {outside} are outside the shared vocabulary (a sample could never stop)",
        )
    return True, detail


# ============================================================================ alpha solver


@torch.inference_mode()
def next_token_logits(sampler, prompts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of both models at every position of every prompt, [R, V] each (float64, on CPU)."""
    rows_b, rows_t = [], []
    for prompt in prompts:
        ids = _prompt_ids(sampler, prompt)
        rows_b.append(_full_logits(sampler.base.model, ids, sampler.vocab_size))
        rows_t.append(_full_logits(sampler.teacher.model, ids, sampler.vocab_size))
    logits_b, logits_t = torch.cat(rows_b)[:MAX_SOLVER_ROWS], torch.cat(rows_t)[:MAX_SOLVER_ROWS]
    return logits_b.double().cpu(), logits_t.double().cpu()


def _prompt_ids(sampler, prompt: str) -> list[int]:
    ids = list(sampler.base.tokenizer(prompt)["input_ids"])
    if not ids:
        raise ValueError(f"prompt {prompt!r} is empty after tokenization")
    return ids


def _full_logits(model, ids: list[int], vocab: int) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    return out.logits[0, :, :vocab]  # [L, V]


def check_solver(rows: object, method: str) -> tuple[bool, str]:
    if isinstance(rows, Exception):
        raise rows
    logits_b, logits_t = rows
    config = MixConfig(alpha_method=method, alpha_min=0.0, alpha_max=1.0)
    from ..mixing import solve_alpha, tempered_logprobs

    # the sampler solves on float32 log-probs of the model's logits
    lp_b32, lp_t32 = tempered_logprobs(logits_b.float(), 1.0), tempered_logprobs(logits_t.float(), 1.0)
    alpha = solve_alpha(lp_b32, lp_t32, config).double()
    lp_b, lp_t = torch.log_softmax(logits_b, -1), torch.log_softmax(logits_t, -1)
    reference = reference_alpha(lp_b, lp_t, method)
    error = (alpha - reference).abs()
    worst = float(error.max())
    detail = f"max |alpha - float64 reference| = {worst:.1e} over {len(error)} distributions"
    return worst <= ALPHA_TOLERANCE, detail


def reference_alpha(lp_b: torch.Tensor, lp_t: torch.Tensor, method: str) -> torch.Tensor:
    """alpha in [0, 1] per row, float64: bisection for the root methods, closed forms otherwise."""
    if method == "entropy":
        h_b, h_t = _entropy(lp_b), _entropy(lp_t)
        return h_b / (h_b + h_t)
    if method == "reverse_kl_symmetry":
        kl_tb, kl_bt = _kl(lp_t, lp_b), _kl(lp_b, lp_t)
        return kl_tb / (kl_tb + kl_bt)
    objective = _kl_gap if method == "kl_symmetry" else _ess_gap
    return bisect_increasing(lambda a: objective(lp_b, lp_t, a), lp_b.shape[0], lp_b.dtype)


def bisect_increasing(fn: Callable[[torch.Tensor], torch.Tensor], rows: int, dtype) -> torch.Tensor:
    """Root in [0, 1] of an increasing fn per row, or the end of [0, 1] the root lies beyond."""
    lo, hi = torch.zeros(rows, dtype=dtype), torch.ones(rows, dtype=dtype)
    below, above = fn(lo) >= 0, fn(hi) <= 0
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        positive = fn(mid) > 0
        hi, lo = torch.where(positive, mid, hi), torch.where(positive, lo, mid)
    return torch.where(below, 0.0, torch.where(above, 1.0, (lo + hi) / 2)).to(dtype)


def _mix(lp_b: torch.Tensor, lp_t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax((1 - alpha).unsqueeze(-1) * lp_b + alpha.unsqueeze(-1) * lp_t, -1)


def _kl_gap(lp_b, lp_t, alpha) -> torch.Tensor:
    """KL(q||base) - KL(q||teacher) = E_q[lp_t - lp_b], increasing in alpha."""
    lp_q = _mix(lp_b, lp_t, alpha)
    return (lp_q.exp() * (lp_t - lp_b)).sum(-1)


def _ess_gap(lp_b, lp_t, alpha) -> torch.Tensor:
    """log sum base^2/q - log sum teacher^2/q: increasing in alpha (zero where the ESS balance)."""
    lp_q = _mix(lp_b, lp_t, alpha)
    return torch.logsumexp(2 * lp_b - lp_q, -1) - torch.logsumexp(2 * lp_t - lp_q, -1)


def _entropy(lp: torch.Tensor) -> torch.Tensor:
    return -(lp.exp() * lp).sum(-1)


def _kl(lp_p: torch.Tensor, lp_q: torch.Tensor) -> torch.Tensor:
    return (lp_p.exp() * (lp_p - lp_q)).sum(-1)


# ============================================================================ greedy vs generate


def check_greedy(
    sampler, prompts: tuple[str, ...], alpha: float, who: str, max_tokens: int
) -> tuple[bool, str]:
    """Greedy decoding of q at a fixed alpha against the model's own greedy `generate`.

    Where the two diverge, the model's own logits at that prefix decide: a gap between the two
    tokens' logits within the dtype's rounding (a near-tie) passes with a note; anything else fails.
    """
    loaded = sampler.base if who == "base" else sampler.teacher
    failures, ties = [], []
    for index, prompt in enumerate(prompts):
        ids = _prompt_ids(sampler, prompt)
        ours = _greedy_sample(sampler, prompt, alpha, max_tokens)
        theirs = _hf_greedy(loaded.model, ids, sampler.eos_ids, max_tokens)
        if _same_greedy(ours, theirs, sampler.eos_ids):
            continue
        at = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b)
        gap, tolerance = _logit_gap(loaded.model, ids + ours[:at], ours[at], theirs[at], sampler.vocab_size)
        note = f"prompt {index} token {at}: logit gap {gap:.2g}"
        (ties if gap <= tolerance else failures).append(note)
    if failures:
        return False, "differs: " + "; ".join(failures)
    detail = f"{len(prompts)} prompts x up to {max_tokens} tokens identical"
    return True, detail if not ties else f"{detail} up to near-ties ({'; '.join(ties)})"


@torch.inference_mode()
def _logit_gap(model, prefix: list[int], ours: int, theirs: int, vocab: int) -> tuple[float, float]:
    """|z[ours] - z[theirs]| of the model's next-token logits after prefix, and the tie tolerance."""
    logits = _full_logits(model, prefix, vocab)[-1].double()
    scale = max(1.0, float(logits.abs().max()))
    relative = TIE_TOLERANCE_HALF if logits_dtype(model) in (torch.float16, torch.bfloat16) else 1e-5
    return abs(float(logits[ours] - logits[theirs])), relative * scale


def logits_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _greedy_sample(sampler, prompt: str, alpha: float, max_tokens: int) -> list[int]:
    # The sampler fixes its mixing at construction; validate swaps it to reuse the loaded models.
    saved = sampler.mix
    sampler.mix = dataclasses.replace(saved, alpha_method="fixed", fixed_alpha=alpha)
    try:
        return sampler.generate([prompt], max_tokens=max_tokens, temperature=0.0, seed=0).generated_ids[0]
    finally:
        sampler.mix = saved


@torch.inference_mode()
def _hf_greedy(model, ids: list[int], eos_ids: set[int], max_tokens: int) -> list[int]:
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_tokens, eos_token_id=sorted(eos_ids) or None,
        pad_token_id=min(eos_ids) if eos_ids else 0, repetition_penalty=1.0,
    )  # fmt: skip
    input_ids = torch.tensor([ids], device=device)
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    return out[0, len(ids) :].tolist()


def _same_greedy(ours: list[int], theirs: list[int], eos_ids: set[int]) -> bool:
    """Equal, allowing generate() to stop at (or pad after) an EOS where ours stopped."""
    if ours == theirs:
        return True
    common = min(len(ours), len(theirs))
    shorter = ours if len(ours) <= len(theirs) else theirs
    return ours[:common] == theirs[:common] and (not shorter or shorter[-1] in eos_ids)


# ============================================================================ cache


def cache_tolerance(dtype: torch.dtype) -> float:
    return 3e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3


@torch.inference_mode()
def check_cache(sampler, prompts: tuple[str, ...], steps: int) -> tuple[bool, str]:
    """The engine's decode-step logits against its own fresh prefill of the same tokens."""
    return _compare_engine(
        sampler, prompts, steps, lambda full, start: _engine_prefill_logits(sampler, full, start)
    )


@torch.inference_mode()
def check_engine_vs_transformers(sampler, prompts: tuple[str, ...], steps: int) -> tuple[bool, str]:
    """The engine's logits against one full transformers forward pass of each model."""

    def reference(full: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(
            _full_logits(m.model, full, sampler.vocab_size)[start:] for m in (sampler.base, sampler.teacher)
        )

    return _compare_engine(sampler, prompts, steps, reference)


def _compare_engine(sampler, prompts, steps: int, reference: Callable) -> tuple[bool, str]:
    """Max total variation between the engine's cached logits and reference(tokens, first position)."""
    worst = [0.0, 0.0]
    for prompt in prompts:
        ids = _prompt_ids(sampler, prompt)
        cached_b, cached_t, tokens = _engine_logits(sampler, ids, steps)
        expected = reference(ids + tokens, len(ids) - 1)
        for which, cached in enumerate((cached_b, cached_t)):
            worst[which] = max(worst[which], _max_tv(cached, expected[which]))
    dtype = logits_dtype(sampler.base.model)
    tolerance = cache_tolerance(dtype)
    detail = (f"max total variation base {worst[0]:.1e}, teacher {worst[1]:.1e} over "
              f"{len(prompts)} prompts x {steps + 1} steps (tolerance {tolerance:g}, {str(dtype)[6:]})")  # fmt: skip
    return max(worst) <= tolerance, detail


def _engine_prefill_logits(sampler, full: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits after full[: i + 1] for i >= start, each from a fresh engine prefill."""
    from ..engines.base import SlotRequest

    engine = sampler.engine
    rows_b, rows_t = [], []
    for end in range(start + 1, len(full) + 1):
        prefix = tuple(full[:end])
        logits_b, logits_t = engine.add([SlotRequest(0, prefix, prefix)])
        engine.release([0])
        rows_b.append(logits_b[0])
        rows_t.append(logits_t[0])
    return torch.stack(rows_b), torch.stack(rows_t)


def _engine_logits(sampler, ids: list[int], steps: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Prefill then `steps` decode steps of the base's greedy tokens; logits [steps+1, V] each."""
    from ..engines.base import SlotRequest

    engine = sampler.engine
    logits_b, logits_t = engine.add([SlotRequest(0, tuple(ids), tuple(ids))])
    rows_b, rows_t, tokens = [logits_b[0]], [logits_t[0]], []
    slots = torch.tensor([0], dtype=torch.long, device=engine.device)
    try:
        for _ in range(steps):
            tokens.append(int(rows_b[-1].argmax()))
            last = torch.tensor([tokens[-1]], dtype=torch.long, device=engine.device)
            logits_b, logits_t = engine.decode(slots, last)
            rows_b.append(logits_b[0])
            rows_t.append(logits_t[0])
    finally:
        engine.release([0])
    return torch.stack(rows_b), torch.stack(rows_t), tokens


def _max_tv(a: torch.Tensor, b: torch.Tensor) -> float:
    p = torch.softmax(a.double().cpu(), -1)
    q = torch.softmax(b.double().cpu(), -1)
    return float(0.5 * (p - q).abs().sum(-1).max())
