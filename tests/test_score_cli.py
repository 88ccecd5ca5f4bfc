"""`optimal-sampling score` on our own generate output reproduces its per-token fields."""

from __future__ import annotations

import json

import numpy as np

from optimal_sampling.cli import main


def test_score_cli_reproduces_generate_records(tiny_pair, tmp_path, capsys):
    base, teacher = tiny_pair("llama")
    common = ["--base", base, "--teacher", teacher, "--device", "cpu", "--alpha-method", "ess_balance"]
    samples = tmp_path / "samples.jsonl"
    assert main(["generate", *common, "--prompt", "What is AI?", "--prompt", "Hello", "--n", "2",
                 "--max-tokens", "8", "--temperature", "0.8", "--output", str(samples), "--quiet",
                 "--diagnostics", "--chat-template", "none"]) == 0  # fmt: skip
    scored = tmp_path / "scored.jsonl"
    assert (
        main(["score", *common, "--input", str(samples), "--output", str(scored), "--temperature", "0.8"])
        == 0
    )
    generated = [json.loads(line) for line in samples.read_text().splitlines()]
    rescored = [json.loads(line) for line in scored.read_text().splitlines()]
    assert len(rescored) == len(generated) == 4
    for g, s in zip(generated, rescored):
        assert (s["prompt_index"], s["sample_index"], s["token_ids"]) == (
            g["prompt_index"],
            g["sample_index"],
            g["token_ids"],
        )
        for name in ("logprobs_base", "logprobs_teacher", "logprobs_q", "alphas", "ess_ratios"):
            np.testing.assert_allclose(s[name], g[name], atol=2e-4, rtol=1e-4, err_msg=name)
        assert abs(s["log_weight_base"] - g["log_weight_base"]) < 1e-3


def test_score_cli_bad_input_exits_2(tiny_pair, tmp_path, capsys):
    base, teacher = tiny_pair("llama")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')
    out = tmp_path / "out.jsonl"
    code = main(["score", "--base", base, "--teacher", teacher, "--input", str(bad), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bad.jsonl:2: no string field 'prompt'" in err[0]
    assert not out.exists()
