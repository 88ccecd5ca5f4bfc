"""Diagnose rows where the fused alpha strays from float64: the kernel's row state, its f at the
grid points and at the bracket ends, against the same quantities in float64.

    PYTHONPATH=src python3 benchmarks/sampler_diag.py [--passes]   (a CUDA machine; JSON lines)

--passes: the GPU time of each launch of one call at batch 256, and how many rows each pass settles,
on random rows and on the logits of bench_decode.py's random-weight models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_decode, when run from the repo root

import optimal_sampling.engines.fast.mixing_fast as mf
import optimal_sampling.engines.fast.triton_row_state as tm
from optimal_sampling.config import MixConfig, SamplingParams
from optimal_sampling.mixing.alpha import solve_alpha

VOCAB = 151936


def f64(b, t, s):
    """f(s) = E_q[d] - (lse_t - lse_b) and Var_q[d] in float64 for one row, s: list."""
    b, t = b.double(), t.double()
    d = t - b
    shift = torch.logsumexp(t, 0) - torch.logsumexp(b, 0)
    out = []
    for x in s:
        q = torch.softmax(b + x * d, 0)
        m = (q * d).sum()
        out.append(((m - shift).item(), (q * (d - m) ** 2).sum().item()))
    return out


def kernel_trace(b, t, mix, params):
    """alpha and, per alpha pass, the points, the kernel's f, the weight and the row state."""
    seeds = torch.arange(b.shape[0], device=b.device)
    passes: list = []
    alpha = mf.fused_outputs(b, t, seeds, seeds, mix, params, trace=passes)[4]
    shift = passes[0]["state"][:, tm.SHIFT.value]  # the precise shift, from the grid pass on
    for p, tr in enumerate(passes):
        sums = tr["parts"].sum(1)
        mean = sums[..., 1] / sums[..., 0]
        # the grid pass sums d - c; the others d - c - float32(shift'), as combine_kernel takes them
        taken = torch.zeros_like(shift) if p == 0 else shift.float().double()
        tr["f"] = mean - (shift - taken)[:, None]
        tr["w"] = sums[..., 0]
    return alpha, passes


def diagnose(name, b, t, mix, limit=3):
    want = solve_alpha(
        b.double(),
        t.double(),
        MixConfig(alpha_min=mix.alpha_min, alpha_max=mix.alpha_max, solver_iterations=80),
    )
    alpha, trace = kernel_trace(b, t, mix, SamplingParams())
    err = (alpha.double() - want).abs()
    print(name, "max err", err.max().item(), "rows > 1e-5:", (err > 1e-5).sum().item(), flush=True)
    for row in err.argsort(descending=True)[:limit].tolist():
        st = trace[0]["state"][row]
        bb, tt = b[row].double(), t[row].double()
        lse_b, lse_t = torch.logsumexp(bb, 0).item(), torch.logsumexp(tt, 0).item()
        c = st[tm.CENTRE.value].item()
        out = {
            "case": name,
            "row": row,
            "alpha": alpha[row].item(),
            "alpha64": want[row].item(),
            "lse_b": [st[tm.LSE_B.value].item(), lse_b],
            "lse_t": [st[tm.LSE_T.value].item(), lse_t],
            "centre": c,
            "shift": [st[tm.SHIFT.value].item(), lse_t - lse_b - c],
        }
        passes = []
        for tr in trace:
            pts = tr["points"][row].tolist()
            exact = f64(b[row], t[row], pts)
            passes.append(
                {
                    "s": [round(x, 7) for x in pts],
                    "f": tr["f"][row].tolist(),
                    "f64": [e[0] for e in exact],
                    "fp64": [e[1] for e in exact],
                    "w": tr["w"][row].tolist(),
                    "bracket": tr["state"][row, :4].tolist(),
                    "done": tr["state"][row, tm.DONE.value].item(),
                }
            )
        out["passes"] = passes
        print(json.dumps(out), flush=True)


def model_logits(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-position logits of the benchmark's random-weight models on random 128-token prompts:
    the rows the fused sampler meets in bench_decode.py (nearly flat, unlike trained models')."""
    from bench_decode import prompts, qwen_model

    ids = torch.tensor(prompts(batch, 5), device="cuda")
    out = []
    for size in ("0.5b", "1.5b"):
        model = qwen_model(size)
        with torch.no_grad():
            out.append(model(ids, logits_to_keep=1).logits[:, -1].contiguous())
        del model
    return out[0], out[1]


def pass_profile(batch: int = 256, models: bool = False) -> None:
    """GPU time of each launch of one fused call, and the share of rows done after each pass;
    on random rows, or (models) on the benchmark models' logits."""
    torch.manual_seed(0)
    if models:
        b, t = model_logits(batch)
    else:
        b = (torch.randn(batch, VOCAB, device="cuda") * 3).to(torch.bfloat16)
        t = (b.float() + torch.randn_like(b, dtype=torch.float32)).to(torch.bfloat16)
    seeds = torch.arange(batch, device="cuda")
    mix, params = MixConfig(), SamplingParams()

    def call():
        mf.fused_outputs(b, t, seeds, seeds, mix, params)

    for _ in range(2):
        call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = [(e.name[:24], round(e.time_range.elapsed_us() / 1e3, 4)) for e in kernels]
    _, trace = kernel_trace(b, t, mix, params)
    done = [round(tr["state"][:, tm.DONE.value].mean().item(), 3) for tr in trace]
    print(
        "passes" + (" (model logits)" if models else ""),
        json.dumps({"launch_ms": launches, "rows_done_after_each_alpha_pass": done}),
        flush=True,
    )


def main():
    if "--passes" in sys.argv:
        pass_profile()
        pass_profile(models=True)
        return
    torch.manual_seed(256)
    b = (torch.randn(256, VOCAB, device="cuda") * 3).to(torch.bfloat16)
    t = (b.float() + torch.randn_like(b, dtype=torch.float32)).to(torch.bfloat16)
    diagnose("random256_seed256", b, t, MixConfig())
    torch.manual_seed(0)
    for _ in range(2):
        torch.randn(256, VOCAB, device="cuda")  # the sweep's random rows come first
    b = torch.randn(64, VOCAB, device="cuda") * 2
    b[:, :64] += 12 * torch.rand(64, 64, device="cuda")
    diagnose("near_identical64", b, b + 1e-2 * torch.randn_like(b), MixConfig())


if __name__ == "__main__":
    main()
