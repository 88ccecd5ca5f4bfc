"""Tune the fused alpha/sampling kernel (issue 4): time and accuracy of its launch layouts and passes.

On random bf16 logit rows of the real vocabulary width (151,936) at batch 64 and 256, for each
configuration of mixing_fast's module constants (BLOCK, PROGRAMS, ROW_WARPS, STATS_WARPS,
SAMPLE_WARPS; REFINE_POINTS): ms per call (CUDA events over 20 calls) and the largest
|alpha - alpha_float64| over those rows, over peaked and nearly identical full-width rows, and
over the adversarial rows of the tests at two temperatures and brackets. Stage 1 sweeps the
layout with the default passes, stage 2 the passes with the fastest accurate layout. The exact
torch path (`step.sample_step`) is timed in the same run as the baseline, and a torch profile of
the default configuration at batch 256 says which kernel the time goes to.

    PYTHONPATH=src python3 benchmarks/sampler_sweep.py [--quick | --solves]   (CUDA; JSON last)

--solves times and checks the grid-point count x refining-pass combinations of SOLVES instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import optimal_sampling.engines.fast.mixing_fast as mf
from optimal_sampling.config import MixConfig, SamplingParams
from optimal_sampling.mixing.alpha import solve_alpha
from optimal_sampling.mixing.logprobs import tempered_logprobs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_decode import graph_ms, timed  # noqa: E402  (benchmarks/ is the script's directory)
from test_fast_engine import adversarial_logits  # noqa: E402

VOCAB = 151936
LAYOUTS = [  # BLOCK, PROGRAMS, ROW_WARPS, STATS_WARPS, SAMPLE_WARPS; the first is mixing_fast's default
    (256, 2112, 4, 4, 4), (512, 528, 4, 4, 4), (512, 2112, 4, 4, 4), (256, 4224, 2, 2, 2),
    (1024, 1056, 8, 8, 8), (128, 2112, 4, 4, 4), (128, 4224, 4, 4, 4), (512, 1056, 16, 16, 16),
]  # fmt: skip
PASSES = [(4, 4, 8), (4, 4, 8, 8)]  # REFINE_POINTS
SOLVES = [
    (4, (4, 4, 8, 8)),
    (4, (4, 4, 8)),
    (4, (4, 8, 8)),
    (4, (8, 8)),
    (4, (4, 8)),
    (8, (4, 4, 8)),
]  # grid: a power of 2


def configure(layout, passes) -> None:
    mf.BLOCK, mf.PROGRAMS, mf.ROW_WARPS, mf.STATS_WARPS, mf.SAMPLE_WARPS = layout
    mf.REFINE_POINTS = passes


def reference(base, teacher, mix, temperature) -> torch.Tensor:
    exact = MixConfig(alpha_min=mix.alpha_min, alpha_max=mix.alpha_max, solver_iterations=80)
    t = temperature or 1.0
    return solve_alpha(tempered_logprobs(base.double(), t), tempered_logprobs(teacher.double(), t), exact)


def cases():
    torch.manual_seed(0)
    rows = []
    for batch in (64, 256):
        b = (torch.randn(batch, VOCAB, device="cuda") * 3).to(torch.bfloat16)
        t = (b.float() + torch.randn(batch, VOCAB, device="cuda")).to(torch.bfloat16)
        rows.append((f"random{batch}", b, t, 1.0, (0.5, 1.0)))
    b = torch.randn(64, VOCAB, device="cuda") * 2
    b[:, :64] += 12 * torch.rand(64, 64, device="cuda")  # a peaked head, like a language model's
    rows.append(("peaked64", b, b + torch.randn_like(b), 0.7, (0.0, 1.0)))
    rows.append(("near_identical64", b, b + 1e-2 * torch.randn_like(b), 1.0, (0.5, 1.0)))
    small_b, small_t = (x.cuda() for x in adversarial_logits())
    for temperature in (1.0, 0.6):
        for bracket in ((0.5, 1.0), (0.0, 1.0)):
            rows.append((f"adversarial_T{temperature}_{bracket[0]}", small_b, small_t, temperature, bracket))
    return rows


def run(case) -> torch.Tensor:
    _, b, t, temperature, bracket = case
    mix, params = (
        MixConfig(alpha_min=bracket[0], alpha_max=bracket[1]),
        SamplingParams(temperature=temperature),
    )
    seeds = torch.arange(b.shape[0], device="cuda")
    return mf.fused_outputs(b, t, seeds, seeds, mix, params)


def errors(all_cases, references) -> dict:
    out = {}
    for case, want in zip(all_cases, references, strict=True):
        alpha = run(case)[4].double()
        out[case[0]] = (alpha - want).abs().max().item()
    return out


def time_ms(case) -> float:
    return graph_ms(lambda: run(case))


def measure(layout, passes, all_cases, references) -> dict:
    configure(layout, passes)
    try:
        errs = errors(all_cases, references)
        times = {name: time_ms(case) for case in all_cases if (name := case[0]).startswith("random")}
    except Exception as err:  # a layout that does not compile or launch is reported, not fatal
        return {"layout": layout, "passes": passes, "error": f"{type(err).__name__}: {str(err)[:200]}"}
    result = {"layout": layout, "passes": passes, "ms": times,
              "max_err": max(errs.values()), "errors": errs}  # fmt: skip
    print(json.dumps(result), flush=True)
    return result


def torch_path_errors(all_cases, references) -> dict:
    """The exact torch path's |alpha - alpha_float64| on the same rows (what float32 allows)."""
    from optimal_sampling.mixing.step import sample_step

    out = {}
    for (name, b, t, temperature, bracket), want in zip(all_cases, references, strict=True):
        mix = MixConfig(alpha_min=bracket[0], alpha_max=bracket[1])
        seeds = torch.arange(b.shape[0], device="cuda")
        alpha = sample_step(b, t, seeds, seeds, mix, SamplingParams(temperature=temperature)).alpha
        out[name] = (alpha.double() - want).abs().max().item()
    return out


def torch_path_ms(case, repeat: int = 5) -> float:
    """The exact float32 torch path on the same rows: the baseline the fused kernels replace."""
    from optimal_sampling.mixing.step import sample_step

    _, b, t, temperature, bracket = case
    mix, params = (
        MixConfig(alpha_min=bracket[0], alpha_max=bracket[1]),
        SamplingParams(temperature=temperature),
    )
    seeds = torch.arange(b.shape[0], device="cuda")
    sample_step(b, t, seeds, seeds, mix, params)
    return 1e3 * timed(lambda: sample_step(b, t, seeds, seeds, mix, params), repeat)


def profile_default(case) -> list:
    configure(LAYOUTS[0], PASSES[0])
    run(case)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run(case)
        torch.cuda.synchronize()
    table = []
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA or getattr(event, "device_time_total", 0) > 0:
            table.append((event.key[:60], round(event.device_time_total / 5 / 1e3, 4), event.count // 5))
    table.sort(key=lambda row: -row[1])
    for row in table[:12]:
        print("profile", row, flush=True)
    return table[:12]


def main() -> None:
    all_cases = cases()
    references = [
        reference(c[1], c[2], MixConfig(alpha_min=c[4][0], alpha_max=c[4][1]), c[3]) for c in all_cases
    ]
    out: dict = {"card": torch.cuda.get_device_name()}
    out["torch_path_errors"] = torch_path_errors(all_cases, references)
    print("torch sample_step (float32) alpha errors:", out["torch_path_errors"], flush=True)
    out["torch_path_ms"] = {c[0]: torch_path_ms(c) for c in all_cases if c[0].startswith("random")}
    print("torch sample_step ms:", out["torch_path_ms"], flush=True)
    if "--solves" in sys.argv:  # the shipped layout; grid points x refining passes (SOLVES)
        results = []
        for grid, passes in SOLVES:
            mf.GRID_POINTS = grid
            results.append({"grid": grid, **measure(LAYOUTS[0], passes, all_cases, references)})
        mf.GRID_POINTS = SOLVES[0][0]
        out.update(solves=results)
        print(json.dumps(out))
        return
    if "--quick" in sys.argv:  # the shipped layout and passes, and the profile
        out["profile_b256"] = profile_default(all_cases[1])
        out.update(quick=[measure(LAYOUTS[0], PASSES[0], all_cases, references)])
        print(json.dumps(out))
        return
    out["profile_b256"] = profile_default(all_cases[1])
    stage1 = [measure(layout, PASSES[0], all_cases, references) for layout in LAYOUTS]
    ran = [r for r in stage1 if "error" not in r]
    ok = [r for r in ran if r["max_err"] <= 1e-4] or ran
    best = min(ok, key=lambda r: r["ms"]["random256"])["layout"]
    stage2 = [measure(best, passes, all_cases, references) for passes in PASSES[1:]]
    out.update(stage1=stage1, stage2=stage2, best_layout=best)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
