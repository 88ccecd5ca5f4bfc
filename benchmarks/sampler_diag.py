"""Diagnose rows where the fused alpha strays from float64: the kernel's row state, its f at the
grid points and at the bracket ends, against the same quantities in float64.

    PYTHONPATH=src python3 benchmarks/sampler_diag.py [--passes]   (a CUDA machine; JSON lines)

--passes: the GPU time of each launch of one call at batch 256, and how many rows each pass settles.
"""

from __future__ import annotations

import json
import sys

import torch

import optimal_sampling.engines.fast.mixing_fast as mf
import optimal_sampling.engines.fast.triton_mix as tm
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
    """Run the fused solve step by step and keep every pass's points and f."""
    batch, vocab = b.shape
    splits = mf.split_count(batch, vocab)
    chunk = -(-vocab // (splits * mf.BLOCK)) * mf.BLOCK
    rows = (b, t, b.stride(0), t.stride(0), vocab, chunk, chunk // mf.BLOCK)
    lo, hi = mix.alpha_min, mix.alpha_max
    layout = mf.grid_layout(lo, hi)
    state = torch.empty(batch, tm.STATE, dtype=torch.float64, device=b.device)
    row_parts = torch.empty(batch, splits, tm.ROW_STATS, dtype=torch.float64, device=b.device)
    maxima = torch.empty(batch, splits, mf.GRID_POINTS, dtype=torch.float32, device=b.device)
    gmax = torch.empty(batch, mf.GRID_POINTS, dtype=torch.float32, device=b.device)
    tm.row_kernel[(batch, splits)](*rows, 1.0, lo, hi, row_parts, maxima, SPLITS=splits, K=mf.GRID_POINTS,
                                   **layout, MAXIMA=True, TEMPERED=False, BLOCK=mf.BLOCK, num_warps=mf.ROW_WARPS)
    tm.row_combine_kernel[(batch,)](row_parts, maxima, gmax, state, SPLITS=splits, K=mf.GRID_POINTS,
                                    MAXIMA=True, TEMPERED=False, num_warps=1)
    trace = [{"state0": state.clone()}]
    alpha = torch.empty(batch, device=b.device)
    counts = (mf.GRID_POINTS, *mf.REFINE_POINTS)
    j = torch.arange(mf.GRID_POINTS, device=b.device, dtype=torch.float32)
    first = layout["FIRST_IN"]
    grid = lo + (hi - lo) * (j - first) / (mf.GRID_POINTS - 1 - first)
    grid[:first] = torch.tensor([v for v in (0.0, 1.0) if v not in (lo, hi)], device=b.device)
    points, refs = gmax, gmax
    shift_parts = torch.empty(batch, splits, tm.SHIFT_STATS, dtype=torch.float64, device=b.device)
    for p, k in enumerate(counts):
        g, last = p == 0, p == len(counts) - 1
        kn = 4 if last else counts[p + 1]
        parts = torch.empty(batch, splits, k, tm.STATS, dtype=torch.float64, device=b.device)
        tm.stats_kernel[(batch, splits)](*rows, 1.0, lo, hi, points, refs, state, parts, shift_parts, SPLITS=splits, K=k,
                                         GRID=g, **layout, BLOCK=mf.BLOCK, num_warps=mf.STATS_WARPS)
        nxt, nref = (torch.empty(batch, kn, device=b.device) for _ in range(2))
        tm.combine_kernel[(batch,)](parts, shift_parts, gmax, state, points, nxt, nref, alpha, lo, hi, SPLITS=splits, K=k,
                                    KG=mf.GRID_POINTS, KN=kn, GRID=g, LAST=last, **layout, num_warps=1)
        sums = parts.sum(1)
        f = sums[..., 1] / sums[..., 0]
        if g:
            trace[0]["shift_parts"] = shift_parts.sum(1)
        trace.append({"points": (grid.expand(batch, -1) if g else points).clone(), "f": f, "w": sums[..., 0],
                      "refs": refs.clone(), "state": state.clone()})
        points, refs = nxt, nref
    return alpha, trace


def diagnose(name, b, t, mix, limit=3):
    want = solve_alpha(b.double(), t.double(), MixConfig(alpha_min=mix.alpha_min, alpha_max=mix.alpha_max,
                                                         solver_iterations=80))
    alpha, trace = kernel_trace(b, t, mix, SamplingParams())
    err = (alpha.double() - want).abs()
    print(name, "max err", err.max().item(), "rows > 1e-5:", (err > 1e-5).sum().item(), flush=True)
    for row in err.argsort(descending=True)[:limit].tolist():
        st = trace[0]["state0"][row]
        bb, tt = b[row].double(), t[row].double()
        lse_b, lse_t = torch.logsumexp(bb, 0).item(), torch.logsumexp(tt, 0).item()
        c = st[8].item()
        out = {"case": name, "row": row, "alpha": alpha[row].item(), "alpha64": want[row].item(),
               "lse_b": [st[6].item(), lse_b], "lse_t": [st[7].item(), lse_t], "centre": c,
               "shift": [st[9].item(), lse_t - lse_b - c]}
        passes = []
        for tr in trace[1:]:
            pts = tr["points"][row].tolist()
            exact = f64(b[row], t[row], pts)
            passes.append({"s": [round(x, 7) for x in pts], "f": tr["f"][row].tolist(),
                           "f64": [e[0] for e in exact], "fp64": [e[1] for e in exact],
                           "w": tr["w"][row].tolist(),
                           "bracket": tr["state"][row, :4].tolist(), "done": tr["state"][row, 11].item()})
        out["passes"] = passes
        print(json.dumps(out), flush=True)


def pass_profile(batch: int = 256) -> None:
    """GPU time of each launch of one fused call, and the share of rows done after each pass."""
    torch.manual_seed(0)
    b = (torch.randn(batch, VOCAB, device="cuda") * 3).to(torch.bfloat16)
    t = (b.float() + torch.randn_like(b, dtype=torch.float32)).to(torch.bfloat16)
    seeds = torch.arange(batch, device="cuda")
    mix, params = MixConfig(), SamplingParams()
    for _ in range(2):
        mf.fused_outputs(b, t, seeds, seeds, mix, params)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        mf.fused_outputs(b, t, seeds, seeds, mix, params)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = [(e.name[:24], round(e.time_range.elapsed_us() / 1e3, 4)) for e in kernels]
    _, trace = kernel_trace(b, t, mix, params)
    done = [round(tr["state"][:, 11].mean().item(), 3) for tr in trace[1:]]
    print("passes", json.dumps({"launch_ms": launches, "rows_done_after_each_alpha_pass": done}), flush=True)


def main():
    if "--passes" in sys.argv:
        pass_profile()
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
