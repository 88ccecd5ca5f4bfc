"""The fast engine against the reference engine (CPU, float32), continuous batching, and its kernels.

Triton kernels are checked through Triton's CPU interpreter when triton is installed (it is not
needed otherwise); on CUDA, tests/gpu/test_fast_gpu.py runs them compiled.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from triton_interpreter import patch_for_numpy2, run_as_script

from optimal_sampling import OptimalSampler
from optimal_sampling.config import MixConfig, SamplingParams
from optimal_sampling.engines.base import SlotRequest, admit_group, spare_slots
from optimal_sampling.engines.fast import FastEngine, supports
from optimal_sampling.engines.reference import ReferenceEngine
from optimal_sampling.mixing.alpha import solve_alpha
from optimal_sampling.mixing.logprobs import mix_logprobs, tempered_logprobs
from optimal_sampling.mixing.step import sample_step

HAS_TRITON = importlib.util.find_spec("triton") is not None
PROMPTS = [(5, 17, 42, 7, 99), tuple(range(20, 33)), (3, 250, 11, 64, 8, 9, 120, 77, 31)]


_LOADED: dict[str, torch.nn.Module] = {}


def load(path: str):
    """One float32 model per directory; engines may share it (the fast engine only re-points
    q/k/v and gate/up at views of fused copies, which leaves the model's function unchanged)."""
    if path not in _LOADED:
        _LOADED[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _LOADED[path]


def engines(tiny_pair, arch: str, slots: int = 4):
    base, teacher = (load(p) for p in tiny_pair(arch))
    reference = ReferenceEngine(base, teacher, 300, slots)
    fast = FastEngine(base, teacher, 300, max_slots=slots, max_len=128, use_graphs=False)
    return reference, fast


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "arch, prompts",
    [("llama", PROMPTS[:1]), ("qwen3", PROMPTS[1:2]), ("llama", PROMPTS), ("qwen2", PROMPTS), ("qwen3", PROMPTS),
     ("mistral", PROMPTS)],
)  # fmt: skip
def test_logits_match_reference(tiny_pair, arch, prompts):
    reference, fast = engines(tiny_pair, arch)
    requests = [SlotRequest(i, p, p[::-1] + (1,)) for i, p in enumerate(prompts)]  # teacher prompts differ
    for a, b in zip(reference.add(requests), fast.add(requests), strict=True):
        assert_close(a, b)
    slots = torch.arange(len(prompts))
    tokens = torch.tensor([p[-1] for p in prompts])
    for step in range(12):
        ref_b, ref_t = reference.decode(slots, tokens)
        fast_b, fast_t = fast.decode(slots, tokens)
        assert_close(ref_b, fast_b)
        assert_close(ref_t, fast_t)
        tokens = (ref_b + ref_t).argmax(-1) if step % 2 else (ref_b.argmax(-1) + step) % 300


def test_supports(tiny_pair):
    assert supports(load(tiny_pair("qwen3")[0]), load(tiny_pair("qwen3")[1]))
    gpt2 = load(tiny_pair("gpt2")[0])
    assert not supports(gpt2, gpt2)


def test_duplicate_prompts_share_a_prefill(tiny_pair):
    reference, fast = engines(tiny_pair, "qwen2")
    requests = [SlotRequest(i, PROMPTS[1], PROMPTS[1]) for i in range(3)]
    logits_b, logits_t = fast.add(requests)
    assert_close(logits_b[0], logits_b[2])
    out_b, _ = fast.decode(torch.tensor([2, 0]), torch.tensor([7, 7]))
    assert_close(out_b[0], out_b[1])


def test_refill_while_decoding_matches_fresh_start(tiny_pair):
    _, fast = engines(tiny_pair, "llama")
    _, alone = engines(tiny_pair, "llama")
    fast.add([SlotRequest(0, PROMPTS[0], PROMPTS[0])])
    for token in (4, 5, 6):
        fast.decode(torch.tensor([0]), torch.tensor([token]))
    fast.add([SlotRequest(1, PROMPTS[2], PROMPTS[2])])  # slot 0 keeps decoding
    alone.add([SlotRequest(3, PROMPTS[2], PROMPTS[2])])
    both_b, both_t = fast.decode(torch.tensor([0, 1]), torch.tensor([9, 9]))
    one_b, one_t = alone.decode(torch.tensor([3]), torch.tensor([9]))
    assert_close(both_b[1], one_b[0])
    assert_close(both_t[1], one_t[0])


TEXTS = ["def add(a, b):", "The quick brown fox", "Hello world!", "import numpy as np", "What is AI?"]


def test_sampler_refill_gives_same_tokens_as_alone(tiny_pair):
    base_dir, teacher_dir = tiny_pair("qwen2")
    sampler = OptimalSampler(base_dir, teacher_dir, engine="fast", device="cpu", max_batch_size=2, seed=7)
    assert isinstance(sampler.engine, FastEngine)
    together = sampler.generate(TEXTS, max_tokens=12, n=2).samples  # 10 requests through 2 slots
    for index, text in enumerate(TEXTS[:3]):
        alone = sampler.generate_iter([text], max_tokens=12, n=2, prompt_indices=[index])
        for sample in alone:
            assert sample.token_ids == together[2 * index + sample.sample_index].token_ids


def test_refills_wait_for_a_group_of_free_slots_and_keep_tokens(tiny_pair):
    """32 rows per step and 2 spare slots: 34 requests are prefilled at once, the 2 beyond the
    batch wait (their first token drawn) and take the first rows that free; later refills come
    in groups; every request keeps the tokens it gets alone."""
    base_dir, teacher_dir = tiny_pair("qwen2")
    sampler = OptimalSampler(base_dir, teacher_dir, engine="fast", device="cpu", max_batch_size=32, seed=5)
    group = admit_group(32)
    assert group == 2 and spare_slots(32) == 2
    assert (sampler.engine.max_slots, sampler.engine.batch_limit()) == (34, 32)
    sizes, rows = [], []
    add, step = sampler.engine.add, sampler.engine.decode_and_sample
    sampler.engine.add = lambda requests: sizes.append(len(requests)) or add(requests)
    sampler.engine.decode_and_sample = lambda slots, *rest: rows.append(len(slots)) or step(slots, *rest)
    texts = TEXTS * 8  # 40 requests through 32 rows; stop strings end them at different steps
    together = sampler.generate(texts, max_tokens=16, stop=["a", "e"]).samples
    assert len({len(s.token_ids) for s in together}) > 1
    assert sizes[0] == 34 and sum(sizes) == 40 and len(sizes) > 1
    assert all(size >= group for size in sizes[1:-1])
    assert rows[0] == 32 and max(rows) == 32  # never more rows than the batch limit
    for index in (0, 33, 39):
        (alone,) = sampler.generate_iter(
            [texts[index]], max_tokens=16, stop=["a", "e"], prompt_indices=[index]
        )
        assert alone.token_ids == together[index].token_ids


def test_pipelined_loop_keeps_the_tokens_of_the_step_by_step_loop(tiny_pair):
    """The fast engine's loop queues step n + 1 before reading step n (input tokens from the
    device); requests that stop at step n drop the extra token. Same samples as reading each step
    first, with stops at different steps and slots refilled while others decode."""
    base_dir, teacher_dir = tiny_pair("qwen2")
    check_pipelined_loop(
        OptimalSampler(base_dir, teacher_dir, engine="fast", device="cpu", max_batch_size=3, seed=11)
    )


def check_pipelined_loop(sampler: OptimalSampler) -> None:
    """Shared with the GPU test (tests/gpu/test_fast_gpu.py)."""
    assert sampler.engine.pipelines
    texts = TEXTS * 2
    calls = []
    run = sampler.engine.decode_and_sample
    sampler.engine.decode_and_sample = lambda slots, tokens, *rest: (
        calls.append(tokens) or run(slots, tokens, *rest)
    )
    pipelined = sampler.generate(texts, max_tokens=14, stop=["a", "e"], collect_diagnostics=True).samples
    assert calls and all(tokens is None for tokens in calls)  # every step took its tokens on the device
    sampler.engine.pipelines = False
    stepwise = sampler.generate(texts, max_tokens=14, stop=["a", "e"], collect_diagnostics=True).samples
    assert all(tokens is not None for tokens in calls[-3:])
    assert {s.finish_reason for s in stepwise} == {"stop", "length"}
    assert len({len(s.token_ids) for s in stepwise}) > 2
    for a, b in zip(pipelined, stepwise, strict=True):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        # batches differ (a stopped request rides one step more), so float32 sums round differently
        np.testing.assert_allclose(a.logprobs_q, b.logprobs_q, atol=1e-4)
        np.testing.assert_allclose(a.alphas, b.alphas, atol=1e-4)


def test_fast_and_reference_samplers_agree(tiny_pair):
    base_dir, teacher_dir = tiny_pair("llama")
    fast = OptimalSampler(base_dir, teacher_dir, engine="fast", device="cpu", seed=3)
    reference = OptimalSampler(base_dir, teacher_dir, engine="reference", device="cpu", seed=3)
    a = fast.generate(TEXTS[:3], max_tokens=10)
    b = reference.generate(TEXTS[:3], max_tokens=10)
    for x, y in zip(a.samples, b.samples, strict=True):
        assert x.token_ids == y.token_ids


# ---------------------------------------------------------------------- Triton kernels
# On CPU they run in Triton's interpreter: this file as a script (tests/triton_interpreter.py).


def adversarial_logits(vocab: int = 1536) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows: ordinary, peaked, nearly identical, identical, huge ranges, -inf entries, disjoint tops,
    a scaled copy, and two nearly identical peaked heads (one whose tail the teacher rejects)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, vocab, generator=g)
    teacher = base + torch.randn(10, vocab, generator=g)
    base[1] *= 12
    teacher[1] = base[1] + 6 * torch.randn(vocab, generator=g)
    # Nearly identical (Jeffreys ~1e-6); at ~1e-8 fp32 itself cannot resolve alpha to 1e-4.
    teacher[2] = base[2] + 1e-3 * torch.randn(vocab, generator=g)
    teacher[3] = base[3]
    base[4] *= 60
    teacher[4] = base[4].roll(1) + 40.0  # large offset between the two rows
    base[5, : vocab // 3] = float("-inf")
    teacher[5, vocab // 2 :] = float("-inf")
    base[6, 0], teacher[6, 1] = 30.0, 30.0  # each model sure of a different token
    teacher[7] = 0.2 * base[7] + 3.0
    # A language-model-like head on which the two policies nearly agree (Var_q(d) ~ 3e-3 at the
    # root), and the same row with tail tokens the teacher rejects outright.
    base[8] = 2 * torch.randn(vocab, generator=g)
    base[8, :16] += 6 * torch.rand(16, generator=g)
    teacher[8] = base[8] + 0.05 * torch.randn(vocab, generator=g)
    base[9], teacher[9] = base[8], teacher[8]
    teacher[9, base[9].argsort()[:10]] -= 15.0  # tail tokens of negligible mass: alpha barely moves
    return base, teacher


def reference_alpha(lp_b: torch.Tensor, lp_t: torch.Tensor, mix: MixConfig) -> torch.Tensor:
    """Float64 reference: the library's own solver, in float64, with many iterations."""
    exact = MixConfig(alpha_min=mix.alpha_min, alpha_max=mix.alpha_max, solver_iterations=80)
    return solve_alpha(lp_b.double(), lp_t.double(), exact)


def check_fused_sampler(device: str, temperature: float, bracket: tuple[float, float]) -> None:
    from dataclasses import replace

    from optimal_sampling.engines.fast.mixing_fast import fused_sample_step

    base, teacher = (x.to(device) for x in adversarial_logits())
    mix = MixConfig(alpha_min=bracket[0], alpha_max=bracket[1])
    params = SamplingParams(temperature=temperature)
    rows = base.shape[0]
    seeds, steps = torch.arange(rows, device=device) * 7919 + 1, torch.arange(rows, device=device)
    fused = fused_sample_step(base, teacher, seeds, steps, mix, params)
    exact = sample_step(base, teacher, seeds, steps, mix, params)
    t = temperature or 1.0
    alpha64 = reference_alpha(
        tempered_logprobs(base.double(), t), tempered_logprobs(teacher.double(), t), mix
    )
    error = (fused.alpha.double() - alpha64).abs()
    assert error.max() <= 1e-4, f"alpha off by {error.tolist()}"
    assert fused.tokens.tolist() == exact.tokens.tolist()
    # Values that depend on alpha move by |d alpha| * |log-prob range| (up to ~1e3 on row 4).
    for name in ("logprob_base", "logprob_teacher", "logprob_q"):
        torch.testing.assert_close(getattr(fused, name), getattr(exact, name), atol=1e-3, rtol=1e-3, msg=name)
    # log q at the kernel's own alpha against float64: a solved row takes log Z_q from the alpha
    # passes' sums (a Taylor step from the nearer bracket end), not from a pass of its own.
    lp64 = mix_logprobs(
        tempered_logprobs(base.double(), t), tempered_logprobs(teacher.double(), t), fused.alpha.double()
    )
    want = lp64.gather(-1, fused.tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(fused.logprob_q.double(), want, atol=2e-5, rtol=1e-6, msg="log q vs float64")
    # The packed host rows hold exactly the five outputs.
    assert fused.to_host() == replace(fused, host_rows=None).to_host()


def check_fused_entropy_and_diagnostics(device: str, temperature: float, method: str) -> None:
    """alpha of the entropy and reverse_kl_symmetry methods and the diagnostics at the fused alpha
    against float64, and the tokens against the torch step."""
    from optimal_sampling.engines.fast.mixing_fast import fused_sample_step
    from optimal_sampling.mixing.diagnostics import step_diagnostics

    base, teacher = (x.to(device) for x in adversarial_logits())
    mix = MixConfig(alpha_method=method, alpha_min=0.2, alpha_max=0.9)
    params = SamplingParams(temperature=temperature, collect_diagnostics=True)
    rows = base.shape[0]
    seeds, steps = torch.arange(rows, device=device) * 31 + 5, torch.arange(rows, device=device)
    fused = fused_sample_step(base, teacher, seeds, steps, mix, params)
    exact = sample_step(base, teacher, seeds, steps, mix, params)
    t = temperature or 1.0
    lp_b, lp_t = tempered_logprobs(base.double(), t), tempered_logprobs(teacher.double(), t)
    if method in ("entropy", "reverse_kl_symmetry"):
        exact_mix = MixConfig(alpha_method=method, alpha_min=0.2, alpha_max=0.9)
        error = (fused.alpha.double() - solve_alpha(lp_b, lp_t, exact_mix)).abs()
        assert error.max() <= 1e-4, f"alpha off by {error.tolist()}"
    assert fused.tokens.tolist() == exact.tokens.tolist()
    want = step_diagnostics(mix_logprobs(lp_b, lp_t, fused.alpha.double()), lp_b, lp_t)
    for name in ("kl_q_base", "kl_q_teacher"):
        torch.testing.assert_close(
            getattr(fused, name).double(), getattr(want, name), atol=2e-5, rtol=1e-4, msg=name
        )
    # ESS ratios span hundreds of orders of magnitude (row 4); compared in log space, as float32 holds them
    want_ratio = want.ess_ratio.float().double()
    torch.testing.assert_close(fused.ess_ratio.double().log(), want_ratio.log(), atol=1e-4, rtol=1e-4)
    assert fused.to_host() == replace(fused, host_rows=None).to_host()  # the packed rows hold all eight


def test_fused_step_covers_the_alpha_methods_with_diagnostics():
    """Which configurations the engine's captured step runs on the fused kernels (CUDA)."""
    from optimal_sampling.engines.fast.mixing_fast import fused_supported

    for method in ("kl_symmetry", "entropy", "reverse_kl_symmetry", "fixed", "ess_balance"):
        for diagnostics in (False, True):
            assert fused_supported(
                MixConfig(alpha_method=method), SamplingParams(collect_diagnostics=diagnostics)
            )
    assert fused_supported(MixConfig(), SamplingParams(top_k=50, top_p=0.9, min_p=0.05))
    assert fused_supported(
        MixConfig(constraint_to_target=True, target_top_k=5, target_top_p=0.9), SamplingParams()
    )
    # a top-k beyond what a row may collect together with a top-p: two searches, the torch step
    assert not fused_supported(MixConfig(), SamplingParams(top_k=5000, top_p=0.9))
    assert not fused_supported(
        MixConfig(constraint_to_target=True, target_top_k=5000, target_top_p=0.9), SamplingParams()
    )


def check_fixed_alpha_one_is_the_teacher(device: str) -> None:
    from optimal_sampling.engines.fast.mixing_fast import fused_sample_step

    base, teacher = (x.to(device) for x in adversarial_logits())
    mix, params = MixConfig(alpha_method="fixed", fixed_alpha=1.0), SamplingParams()
    rows = base.shape[0]
    seeds, steps = torch.arange(rows, device=device) + 11, torch.zeros(rows, dtype=torch.long, device=device)
    fused = fused_sample_step(base, teacher, seeds, steps, mix, params)
    exact = sample_step(base, teacher, seeds, steps, mix, params)
    assert fused.tokens.tolist() == exact.tokens.tolist()
    torch.testing.assert_close(fused.logprob_q, fused.logprob_teacher)


def check_decode_attention(device: str) -> None:
    from optimal_sampling.engines.fast import triton_attention
    from optimal_sampling.engines.fast.attention import decode_attention_sdpa

    g = torch.Generator().manual_seed(1)
    block, programs = triton_attention.BLOCK_N, triton_attention.PROGRAMS
    cases = [  # 32-key blocks too; programs=1: one split, whose program writes the output itself
        (3, 14, 2, 64, 100, block, programs),
        (1, 12, 2, 16, 70, block, programs),
        (3, 12, 2, 16, 150, 32, programs),
        (2, 12, 2, 16, 150, block, 1),
        (2, 4, 4, 16, 100, block, programs),  # one query head per KV head (Llama 2's MHA)
        (1, 12, 2, 16, 300, 16, programs),  # 19 blocks of keys: MAX_SPLITS caps the splits
    ]
    counters = torch.zeros(3 * 4, dtype=torch.int32, device=device)  # one buffer for every launch
    try:
        for batch, heads, kv_heads, dim, width, keys, aim in cases:
            triton_attention.BLOCK_N, triton_attention.PROGRAMS = keys, aim
            splits = triton_attention.split_plan(batch, kv_heads, width)[0]
            assert (aim > 1) == (splits > 1) and splits <= triton_attention.MAX_SPLITS
            k, v = (torch.randn(5, width, kv_heads, dim, generator=g).to(device) for _ in range(2))
            slots = torch.randint(0, 5, (batch,), generator=g).to(device)
            lengths = torch.randint(1, width + 1, (batch,), generator=g).to(device)
            for _ in range(2):  # the last split of each (row, KV head) merges, then zeroes its counter
                q = torch.randn(batch, heads, dim, generator=g).to(device)
                expected = decode_attention_sdpa(q, k, v, slots, lengths, width)
                got = triton_attention.decode_attention_triton(
                    q, k, v, slots, lengths.to(torch.int32), width, counters
                )
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
                assert not counters.any()
    finally:
        triton_attention.BLOCK_N, triton_attention.PROGRAMS = block, programs


def check_rope_decode_attention(device: str, dtype: torch.dtype = torch.float32) -> None:
    """The one-kernel RoPE + cache write + attention against rope_store's torch path, then SDPA:
    same outputs, and the step's key and value in the cache (Qwen3's q/k norms too; splits that
    hold the step's key and splits that do not)."""
    from optimal_sampling.engines.fast import triton_attention
    from optimal_sampling.engines.fast.attention import decode_attention_sdpa
    from optimal_sampling.engines.fast.model import apply_rope, rms_norm

    g = torch.Generator().manual_seed(2)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for batch, heads, kv_heads, dim, width, qk_norm in ((3, 14, 2, 64, 150, False), (2, 12, 2, 32, 70, True)):
        inv_freq = 1.0 / (1e4 ** (torch.arange(0, dim, 2).float() / dim))
        freqs = torch.arange(width).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device)
        norms = (
            [torch.rand(dim, generator=g).to(dtype).to(device) + 0.5 for _ in range(2)]
            if qk_norm
            else [None] * 2
        )
        qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=g).to(dtype).to(device)
        cache = [torch.randn(5, width, kv_heads, dim, generator=g).to(dtype).to(device) for _ in range(2)]
        slots = torch.randperm(5, generator=g)[:batch].to(device)
        positions = torch.randint(0, width, (batch,), generator=g).to(device)
        positions[0] = width - 1  # the last position: the step's key in the last split
        # expected: rope_store's torch path, then SDPA over the cache
        q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        q, k = q.unflatten(-1, (heads, dim)), k.unflatten(-1, (kv_heads, dim))
        if qk_norm:
            q, k = rms_norm(q, norms[0], 1e-6), rms_norm(k, norms[1], 1e-6)
        want_k, want_v = (c.clone() for c in cache)
        want_k[slots, positions] = apply_rope(k, cos[positions], sin[positions])
        want_v[slots, positions] = v.unflatten(-1, (kv_heads, dim))
        q = apply_rope(q, cos[positions], sin[positions])
        expected = decode_attention_sdpa(q, want_k, want_v, slots, positions + 1, width)
        got = triton_attention.rope_decode_attention(
            qkv, heads, cos, sin, *norms, 1e-6, *cache, slots, positions, width,
            torch.zeros(batch * kv_heads, dtype=torch.int32, device=device),
        )  # fmt: skip
        torch.testing.assert_close(got, expected, **tol)
        torch.testing.assert_close(cache[0], want_k, **tol)
        torch.testing.assert_close(cache[1], want_v, atol=0, rtol=0)


def check_rope_store(device: str) -> None:
    """The fused rope_store (one program per row, all heads) against the torch path: rotated q
    and k, and both written to the cache (Qwen3 norms too, heads not a power of two)."""
    from optimal_sampling.engines.fast import triton_layers
    from optimal_sampling.engines.fast.model import apply_rope, rms_norm

    g = torch.Generator().manual_seed(3)
    for heads, kv_heads, dim, qk_norm in ((14, 2, 64, False), (6, 3, 32, True)):
        n, t, width = 3, 5, 16
        freqs = torch.arange(width).float()[:, None] * (
            1.0 / (1e4 ** (torch.arange(0, dim, 2).float() / dim))
        )
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(device), emb.sin().to(device)
        norms = [torch.rand(dim, generator=g).to(device) + 0.5 for _ in range(2)] if qk_norm else [None] * 2
        qkv = torch.randn(n, t, (heads + 2 * kv_heads) * dim, generator=g).to(device)
        positions = torch.arange(t, device=device).repeat(n, 1) + 3
        rows = torch.tensor([4, 0, 2], device=device)[:, None].expand(n, t).contiguous()
        cache = [torch.zeros(5, width, kv_heads, dim, device=device) for _ in range(2)]
        q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        q, k = q.unflatten(-1, (heads, dim)), k.unflatten(-1, (kv_heads, dim))
        if qk_norm:
            q, k = rms_norm(q, norms[0], 1e-6), rms_norm(k, norms[1], 1e-6)
        want_q, want_k = (apply_rope(x, cos[positions], sin[positions]) for x in (q, k))
        got_q, got_k, got_v = triton_layers.rope_store(
            qkv, positions, rows, cos, sin, *cache, *norms, 1e-6, heads, kv_heads, True
        )
        torch.testing.assert_close(got_q, want_q, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_k, want_k, atol=1e-5, rtol=1e-5)
        assert torch.equal(got_v, v.unflatten(-1, (kv_heads, dim)))
        torch.testing.assert_close(cache[0][rows, positions], want_k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            cache[1][rows, positions], v.unflatten(-1, (kv_heads, dim)), atol=0, rtol=0
        )
        assert cache[0][1].abs().sum() == 0  # a slot no row names stays untouched


def check_log64(device: str) -> None:
    """triton_common.log64 (the float64 log of the per-row merges) against torch's, to 1e-14
    relative over the float64 range, with log 0 = -inf, log inf = inf and NaN below 0."""
    from log64_kernel import apply_log64

    x = torch.tensor(
        [1e-300, 3e-200, 1e-10, 0.5, 0.70710678, 0.99999999, 1.0, 1.0000001, 1.4142135, 1.4142136,
         1.9999999, 2.0, 3.0, 151936.0, 2.0**52 + 1, 1e300, 0.0, float("inf"), -1.0, float("nan")],
        dtype=torch.float64, device=device,
    )  # fmt: skip
    x = torch.cat(
        [x, torch.rand(12, dtype=torch.float64, device=device) * 10 ** torch.arange(-6, 6, device=device)]
    )
    out = torch.empty_like(x)
    apply_log64[(1,)](x, out, N=x.numel())
    finite = x > 0
    finite[16:20] = False
    torch.testing.assert_close(out[finite], x[finite].log(), rtol=1e-14, atol=1e-15)
    assert out[16] == float("-inf") and out[17] == float("inf") and out[18:20].isnan().all()


def run_kernel_checks(device: str) -> None:
    """Every configuration on CUDA; on the (slow) CPU interpreter one per grid layout (0 and 1 in
    the bracket, neither, and a single-point bracket, which skips the solve)."""
    configs = [(t, b) for t in (1.0, 0.6, 0.0) for b in ((0.5, 1.0), (0.0, 1.0), (0.2, 0.8), (0.7, 0.7))]
    if device == "cpu":
        configs = [(0.6, (0.0, 1.0)), (1.0, (0.2, 0.8)), (0.3, (0.7, 0.7))]
    for temperature, bracket in configs:
        check_fused_sampler(device, temperature, bracket)
    methods = (
        (1.0, "entropy"),
        (0.6, "kl_symmetry"),
        (0.0, "entropy"),
        (0.8, "fixed"),
        (0.7, "reverse_kl_symmetry"),
    )
    for temperature, method in methods:
        if device == "cuda" or temperature != 0.0:
            check_fused_entropy_and_diagnostics(device, temperature, method)
    check_fixed_alpha_one_is_the_teacher(device)
    check_log64(device)
    check_decode_attention(device)
    check_rope_decode_attention(device)
    check_rope_store(device)
    if device == "cuda":
        check_rope_decode_attention(device, torch.bfloat16)


@pytest.mark.parametrize(
    "bracket, layout",
    [
        ((0.0, 1.0), {"FIRST_IN": 0, "ZERO_AT": 0, "ONE_AT": -1}),  # -1: the last point
        ((0.5, 1.0), {"FIRST_IN": 1, "ZERO_AT": 0, "ONE_AT": -1}),
        ((0.0, 0.6), {"FIRST_IN": 1, "ZERO_AT": 1, "ONE_AT": 0}),
        ((0.2, 0.8), {"FIRST_IN": 2, "ZERO_AT": 0, "ONE_AT": 1}),
    ],
)
def test_grid_holds_the_bracket_and_both_policies(bracket, layout):
    """The grid pass evaluates 0 and 1 (Jeffreys) and [lo, hi] evenly, each point once."""
    from optimal_sampling.engines.fast.mixing_fast import GRID_POINTS, grid_layout, grid_points

    got = grid_layout(*bracket)
    assert got == {k: v % GRID_POINTS for k, v in layout.items()}
    points = grid_points(*bracket)
    assert (points[got["FIRST_IN"]], points[-1]) == bracket
    assert points[got["ZERO_AT"]] == 0.0 and abs(points[got["ONE_AT"]] - 1.0) < 1e-12
    assert len(set(points)) == len(points) == GRID_POINTS


def check_add_async_beside_decode(engine: FastEngine) -> None:
    """A request admitted with add_async while another slot decodes draws exactly the tokens it
    draws alone (its own slot and seed), and so does the slot that kept decoding. On CUDA the
    prefill runs on the prefill stream beside those decode steps; on CPU add_async is add + sample."""
    mix, params, steps = MixConfig(), SamplingParams(temperature=0.9), 24
    jobs = {0: (PROMPTS[0], 3), 1: (PROMPTS[2], 4)}  # slot: (prompt, seed)

    def admit(slot):
        prompt, seed = jobs[slot]
        return engine.add_async([SlotRequest(slot, prompt, prompt)], [seed], [0], mix, params)

    def decode(drawn: dict[int, list[int]]) -> None:
        slots = [s for s in drawn if len(drawn[s]) < steps]
        seeds, counts = [jobs[s][1] for s in slots], [len(drawn[s]) for s in slots]
        result = engine.decode_and_sample(slots, [drawn[s][-1] for s in slots], seeds, counts, mix, params)
        for slot, token in zip(slots, result.to_host()["tokens"], strict=True):
            drawn[slot].append(token)

    alone = {}
    for slot in jobs:
        alone[slot] = {slot: admit(slot).to_host()["tokens"]}
        while len(alone[slot][slot]) < steps:
            decode(alone[slot])
        engine.release([slot])
    together = {0: admit(0).to_host()["tokens"]}
    pending = admit(1)
    for _ in range(5):  # slot 0 decodes while slot 1 is being prefilled
        decode(together)
    together[1] = pending.to_host()["tokens"]
    while any(len(t) < steps for t in together.values()):
        decode(together)
    engine.release([0, 1])
    assert together == {slot: alone[slot][slot] for slot in jobs}


def test_add_async_on_cpu_is_add_then_sample(tiny_pair):
    base, teacher = (load(p) for p in tiny_pair("qwen2"))
    check_add_async_beside_decode(FastEngine(base, teacher, 300, max_slots=4, max_len=128))


def test_batch_limit_is_checked(tiny_pair):
    base, teacher = (load(p) for p in tiny_pair("qwen2"))
    assert FastEngine(base, teacher, 300, max_slots=4, max_len=64).batch_limit() == 4
    for bad in (0, 5):
        with pytest.raises(ValueError, match="max_batch"):
            FastEngine(base, teacher, 300, max_slots=4, max_len=64, max_batch=bad)


def test_batch_buckets_pad_little():
    """1, 4, 16, 32 and 64 rows, then multiples of 32: never fewer rows than asked, and a batch
    above 64 pads fewer than 32 rows (a draining batch of 129 does not run 256)."""
    from optimal_sampling.engines.fast.graphs import batch_bucket

    got = [batch_bucket(n, 256) for n in range(1, 257)]
    assert all(b >= n for n, b in enumerate(got, 1))
    assert sorted(set(got)) == [1, 4, 16, 32, 64, 96, 128, 160, 192, 224, 256]
    assert batch_bucket(2, 256) == 4 and batch_bucket(5, 256) == 16 and batch_bucket(17, 256) == 32
    assert batch_bucket(3, 2) == 2 and batch_bucket(10, 12) == 12  # capped at the slots
    assert all(b - n < 32 for n, b in enumerate(got, 1) if n > 64)
    assert batch_bucket(129, 256) == 160 and batch_bucket(200, 200) == 200


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels():
    if torch.cuda.is_available():
        run_kernel_checks("cuda")
        return
    run_as_script(__file__, timeout=600)


if __name__ == "__main__":
    patch_for_numpy2()
    run_kernel_checks("cpu")
    print("kernel checks passed")
