"""Importance ratios pi_base / q on a real pair: the demo Qwen2.5-Coder 0.5B (base) / 1.5B (teacher),
on the CPU in float32, through `OptimalSampler.generate` with chat templates (issue 19: which
correction mode suits mixture data). Per alpha method: per-token log-ratio quantiles, the share of
token ratios above 3, per-sequence log-ratios, and the ESS fraction of the self-normalised sequence
weights per prompt group. Prints a table, then one JSON line last.

    PYTHONPATH=src python3 benchmarks/ratios_demo.py [--n 8] [--max-tokens 32] [--methods kl_symmetry,fixed]
"""

from __future__ import annotations

import argparse
import json
import math
import time

from optimal_sampling import OptimalSampler
from optimal_sampling.integrations.trl import importance_summary

PROMPTS = [
    "Write a Python function that reverses a string.",
    "Write a function that checks whether a number is prime.",
    "Explain what a hash table is in two sentences.",
    "Write a SQL query that counts the rows of a table named users.",
]


def quantiles(values: list[float]) -> list[float]:
    ordered = sorted(values)
    return [ordered[round(q * (len(ordered) - 1))] for q in (0.0, 0.25, 0.5, 0.75, 1.0)]


def measure(method: str, n: int, max_tokens: int) -> dict:
    mix = {"alpha_method": method} | ({"fixed_alpha": 0.5} if method == "fixed" else {})
    sampler = OptimalSampler(device="cpu", seed=0, max_batch_size=len(PROMPTS) * n, **mix)
    start = time.perf_counter()
    out = sampler.generate(PROMPTS, max_tokens=max_tokens, n=n, chat_template="auto", seed=1)
    seconds = time.perf_counter() - start
    token_logs = [b - q for s in out.samples for b, q in zip(s.logprobs_base, s.logprobs_q)]
    groups = [out.samples[i * n : (i + 1) * n] for i in range(len(PROMPTS))]
    ess = [
        importance_summary([s.logprobs_base for s in g], [s.logprobs_q for s in g])["sequence_ess_fraction"]
        for g in groups
    ]
    return {
        "method": method, "samples": len(out.samples), "tokens": len(token_logs), "seconds": round(seconds, 1),
        "token_log_ratio_quantiles": [round(x, 3) for x in quantiles(token_logs)],
        "token_share_above_3": round(sum(x > math.log(3) for x in token_logs) / len(token_logs), 4),
        "sequence_log_ratio_quantiles": [round(x, 2) for x in quantiles([s.log_weight_base for s in out.samples])],
        "ess_fraction_per_group": [round(x, 3) for x in ess],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--methods", default="kl_symmetry")
    args = parser.parse_args()
    rows = [measure(m, args.n, args.max_tokens) for m in args.methods.split(",")]
    for r in rows:
        print(f"{r['method']:20} token log-ratio q0/25/50/75/100 {r['token_log_ratio_quantiles']}  "
              f"above 3: {r['token_share_above_3']:.1%}  sequence log-ratio {r['sequence_log_ratio_quantiles']}  "
              f"ESS fraction per group {r['ess_fraction_per_group']}")  # fmt: skip
    print(json.dumps({"pair": "demo Qwen2.5-Coder 0.5B/1.5B Q4_K_M, float32 CPU", "rows": rows}))


if __name__ == "__main__":
    main()
