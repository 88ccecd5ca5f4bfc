"""`optimal-sampling validate` on tiny pairs, and its float64 reference solver against SciPy."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from scipy.optimize import brentq

from optimal_sampling.cli import main
from optimal_sampling.jobs import validate


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_torch_thread):
    """Every test of this module runs with one intra-op thread (see conftest)."""


def table_rows(out: str) -> dict[str, str]:
    rows = {}
    for line in out.splitlines()[2:]:
        parts = line.split("  ")
        parts = [p.strip() for p in parts if p.strip()]
        if len(parts) >= 2 and parts[1] in ("PASS", "FAIL", "SKIP"):
            rows[parts[0]] = parts[1]
    return rows


def test_good_pair_passes_every_check(tiny_pair, capsys):
    base, teacher = tiny_pair("llama")
    assert main(["validate", "--base", base, "--teacher", teacher, "--max-tokens", "6", "--steps", "4"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 10 and set(rows.values()) == {"PASS"}, rows


def test_padded_teacher_logits_pass(tiny_pair, capsys):
    base, teacher = tiny_pair("qwen2", teacher_width=320)  # teacher has 20 padded logits
    assert main(["validate", "--base", base, "--teacher", teacher, "--max-tokens", "4", "--steps", "2",
                 "--prompt", "def add(a, b):"]) == 0  # fmt: skip
    assert "logits base 300 / teacher 320" in capsys.readouterr().out


def test_incompatible_tokenizers_fail_with_exit_1(tiny_pair, tmp_path, capsys):
    """Exit 1 (a failed check, shown in the table), not 2: the pair exists, it is just not usable."""
    base, teacher = tiny_pair("llama")
    bad = tmp_path / "teacher"
    shutil.copytree(teacher, bad)
    spec = json.loads((bad / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (50, 51))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (bad / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    assert main(["validate", "--base", base, "--teacher", str(bad)]) == 1
    rows = table_rows(capsys.readouterr().out)
    assert rows.pop("tokenizers compatible") == "FAIL" and set(rows.values()) == {"SKIP"}


def test_a_failed_check_exits_1(tiny_pair, capsys, monkeypatch):
    base, teacher = tiny_pair("llama")
    monkeypatch.setattr(validate, "ALPHA_TOLERANCE", -1.0)
    assert main(["validate", "--base", base, "--teacher", teacher, "--max-tokens", "2", "--steps", "1"]) == 1
    rows = table_rows(capsys.readouterr().out)
    assert rows["alpha solver: kl_symmetry"] == "FAIL" and rows["cached == uncached"] == "PASS"


def test_missing_model_is_a_usage_error(tmp_path, capsys):
    assert main(["validate", "--base", str(tmp_path / "a"), "--teacher", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.startswith("optimal-sampling: error: model path not found")


@pytest.mark.parametrize("method", ["kl_symmetry", "ess_balance"])
def test_reference_alpha_matches_brentq(method):
    gen = torch.Generator().manual_seed(0)
    lp_b = torch.log_softmax(3 * torch.randn(6, 50, generator=gen, dtype=torch.float64), -1)
    lp_t = torch.log_softmax(3 * torch.randn(6, 50, generator=gen, dtype=torch.float64), -1)
    ours = validate.reference_alpha(lp_b, lp_t, method)
    gap = validate._kl_gap if method == "kl_symmetry" else validate._ess_gap
    for row in range(6):

        def f(a: float, row: int = row) -> float:
            return float(
                gap(lp_b[row : row + 1], lp_t[row : row + 1], torch.tensor([a], dtype=torch.float64))
            )

        expected = brentq(f, 0.0, 1.0, xtol=1e-14) if f(0.0) < 0 < f(1.0) else (0.0 if f(0.0) >= 0 else 1.0)
        assert float(ours[row]) == pytest.approx(expected, abs=1e-12)
