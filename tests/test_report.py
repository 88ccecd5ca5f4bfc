"""`optimal-sampling report`: PNGs that open, an HTML page that shows them, and the summary numbers."""

from __future__ import annotations

import math
import re

import matplotlib.image
import numpy as np
import pytest

from optimal_sampling.cli import main
from optimal_sampling.jobs import report


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_torch_thread):
    """Every test of this module runs with one intra-op thread (see conftest)."""


@pytest.fixture(scope="module")
def runs(tiny_pair, tmp_path_factory):
    """Three outputs: kl_symmetry and fixed alpha with diagnostics, one without (Parquet)."""
    base, teacher = tiny_pair("llama")
    root = tmp_path_factory.mktemp("report-runs")
    common = ["generate", "--base", base, "--teacher", teacher, "--prompt", "def add(a, b):", "--prompt",
              "Hello world!", "--n", "3", "--max-tokens", "6", "--quiet"]  # fmt: skip
    files = [root / "kl.jsonl", root / "fixed.jsonl", root / "plain.parquet"]
    assert main([*common, "--diagnostics", "-o", str(files[0])]) == 0
    assert (
        main(
            [*common, "--diagnostics", "--alpha-method", "fixed", "--fixed-alpha", "0.7", "-o", str(files[1])]
        )
        == 0
    )
    assert main([*common, "-o", str(files[2])]) == 0
    return files


def test_report_writes_pngs_and_html(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    assert str(out / "index.html") in capsys.readouterr().out
    html = (out / "index.html").read_text(encoding="utf-8")
    images = re.findall(r'<img src="([^"]+)"', html)
    assert sorted(images) == sorted(f"{name}.png" for name in report.PLOTS)
    for name in images:
        pixels = matplotlib.image.imread(out / name)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    for label in ("kl_symmetry", "fixed 0.7", "plain.parquet"):
        assert label in html
    assert html.count("<tr>") == 4  # header + three runs


def test_summary_numbers(runs):
    kl, fixed, plain = report.load_runs([str(p) for p in runs])
    assert report.summarize(fixed)["mean alpha"] == pytest.approx(0.7)
    row = report.summarize(plain)
    assert row["samples"] == 6 and row["mean alpha"] is None and row["mean ESS ratio"] is None
    assert 1.0 <= row["ESS of sequence weights (base)"] <= 6.0
    assert 0.5 <= report.summarize(kl)["mean alpha"] <= 1.0


def test_weights_ess():
    assert report.weights_ess(np.zeros(8)) == pytest.approx(8.0)
    assert report.weights_ess(np.array([0.0, -1000.0, -1000.0])) == pytest.approx(1.0)
    assert report.weights_ess(np.log(np.array([1.0, 3.0]))) == pytest.approx(16 / 10)
    assert math.isnan(report.weights_ess(np.array([])))


def test_report_errors_exit_2(tmp_path, runs, capsys):
    assert main(["report", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r")]) == 2
    assert main(["report", str(runs[0]), "--label", "a", "--label", "b", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("optimal-sampling: error: ") for line in err)
