"""`optimal-sampling report`: PNG plots and an HTML summary of one or more `generate` outputs.

Each input file is one run (e.g. one alpha method); runs are drawn side by side (one panel per
run) or overlaid (alpha by position). Per-token plots need the diagnostics (`generate
--diagnostics`); files without them still get the importance-weight plot and summary row.
Plots are drawn with matplotlib's object API on the Agg canvas: no pyplot, no display needed.

The effective sample size of a run's sequence weights w_i = exp(log_weight_base_i), normalised
to sum to one, is (sum w)^2 / sum w^2: how many of its samples are worth as draws from the base.
"""

from __future__ import annotations

import html
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError

MAX_SCATTER_POINTS = 5000
PANEL_SIZE = (4.5, 3.4)


@dataclass
class Run:
    label: str
    path: Path
    records: list[dict]

    def column(self, name: str) -> np.ndarray:
        """A per-sample scalar column as floats (missing or null values dropped)."""
        values = [r.get(name) for r in self.records]
        return np.array([v for v in values if isinstance(v, (int, float))], dtype=float)

    def tokens(self, name: str) -> np.ndarray:
        """A per-token column of every sample, flattened (null entries dropped)."""
        lists = (r.get(name) or [] for r in self.records)
        return np.array([v for v in itertools.chain.from_iterable(lists) if v is not None], dtype=float)

    @property
    def has_diagnostics(self) -> bool:
        return any(r.get("alphas") for r in self.records)

    @property
    def num_tokens(self) -> int:
        return sum(len(r.get("token_ids") or []) for r in self.records)


# ============================================================================ command


def run(files: list[str], out: str, labels: list[str] | None = None) -> int:
    if labels and len(labels) != len(files):
        raise UsageError(f"--label was given {len(labels)} times for {len(files)} files")
    check_matplotlib()
    runs = load_runs(files, labels)
    index = write_report(runs, Path(out))
    print(f"optimal-sampling: wrote {index}")
    return 0


def check_matplotlib() -> None:
    """Plots need the `report` extra: say so in one line before anything is read or created."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise UsageError('report needs matplotlib: pip install "optimal-sampling[report]"') from None


def load_runs(files: list[str], labels: list[str] | None = None) -> list[Run]:
    from .store import read_records

    runs = []
    for position, file in enumerate(files):
        records = read_records(file)
        if not records:
            raise ValueError(f"{file} holds no samples")
        label = labels[position] if labels else default_label(Path(file))
        runs.append(Run(label, Path(file), records))
    _make_labels_unique(runs)
    return runs


def default_label(path: Path) -> str:
    """The alpha method from the run's metadata sidecar, else the file name."""
    from .store import META_SUFFIX

    meta = path.with_name(path.name + META_SUFFIX)
    try:
        params = json.loads(meta.read_text(encoding="utf-8"))["params"]
    except (OSError, ValueError, KeyError, TypeError):
        return path.stem
    method = params.get("alpha_method", path.stem)
    return f"fixed {params.get('fixed_alpha')}" if method == "fixed" else method


def _make_labels_unique(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label = f"{r.label} ({r.path.stem})"


def write_report(runs: list[Run], out: Path) -> Path:
    """All plots and index.html into `out`; returns the path of index.html."""
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    for name, (title, plot) in PLOTS.items():
        figure = plot(runs)
        if figure is not None:
            figure.savefig(out / f"{name}.png", dpi=100)
            images[name] = title
    index = out / "index.html"
    index.write_text(render_html(runs, images), encoding="utf-8")
    return index


# ============================================================================ summary


def weights_ess(log_weights: np.ndarray) -> float:
    """Effective sample size (sum w)^2 / sum w^2 of weights given as logs (finite entries only)."""
    lw = log_weights[np.isfinite(log_weights)]
    if lw.size == 0:
        return float("nan")
    w = np.exp(lw - lw.max())
    return float(w.sum() ** 2 / np.square(w).sum())


def summarize(run: Run) -> dict:
    alphas, ess = run.tokens("alphas"), run.tokens("ess_ratios")
    samples = len(run.records)
    ess_base = weights_ess(run.column("log_weight_base"))
    return {
        "run": run.label,
        "file": run.path.name,
        "samples": samples,
        "tokens": run.num_tokens,
        "mean alpha": float(alphas.mean()) if alphas.size else None,
        "mean ESS ratio": float(ess.mean()) if ess.size else None,
        "ESS of sequence weights (base)": ess_base,
        "ESS / samples": ess_base / samples if samples else None,
        "ESS of sequence weights (teacher)": weights_ess(run.column("log_weight_teacher")),
    }


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def render_html(runs: list[Run], images: dict[str, str]) -> str:
    rows = [summarize(r) for r in runs]
    header = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row.values()) + "</tr>" for row in rows)
    figures = "".join(
        f'<h2>{html.escape(title)}</h2>\n<img src="{name}.png" alt="{html.escape(title)}">\n'
        for name, title in images.items()
    )
    note = "" if all(r.has_diagnostics for r in runs) else (
        "<p>Runs without per-token diagnostics (generate without <code>--diagnostics</code>) "
        "appear in the importance-weight plots only.</p>"
    )  # fmt: skip
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>optimal-sampling report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}img{{max-width:100%}}</style></head>
<body><h1>optimal-sampling report</h1>
<table><tr>{header}</tr>{body}</table>
{note}
{figures}</body></html>
"""


# ============================================================================ plots


def _figure(panels: int):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(PANEL_SIZE[0] * panels, PANEL_SIZE[1]), layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    return figure, axes


def _per_run(runs: list[Run], draw: Callable, needs_diagnostics: bool = True):
    """One panel per run; a run without the needed data gets a note instead."""
    figure, axes = _figure(len(runs))
    for ax, run in zip(axes, runs, strict=True):
        ax.set_title(run.label)
        if needs_diagnostics and not run.has_diagnostics:
            ax.text(0.5, 0.5, "no diagnostics\n(generate --diagnostics)", ha="center", va="center")
            ax.set_axis_off()
            continue
        draw(ax, run)
    return figure


def plot_alpha_histogram(runs: list[Run]):
    def draw(ax, run):
        ax.hist(run.tokens("alphas"), bins=50, range=(0.0, 1.0), color="tab:blue")
        ax.set_xlabel("alpha (teacher weight)")
        ax.set_ylabel("tokens")

    return _per_run(runs, draw)


def plot_alpha_by_position(runs: list[Run]):
    figure, axes = _figure(1)
    ax = axes[0]
    for run in runs:
        if not run.has_diagnostics:
            continue
        positions, mean, low, high = _by_position([r.get("alphas") or [] for r in run.records])
        ax.plot(positions, mean, label=run.label)
        ax.fill_between(positions, low, high, alpha=0.2)
    ax.set_xlabel("token position")
    ax.set_ylabel("alpha (mean, 10-90% band)")
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no diagnostics", ha="center", va="center")
    return figure


def _by_position(sequences: list[list]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    longest = max((len(s) for s in sequences), default=0)
    table = np.full((len(sequences), longest), np.nan)
    for row, seq in enumerate(sequences):
        table[row, : len(seq)] = [np.nan if v is None else v for v in seq]
    keep = np.isfinite(table).sum(0) > 0
    table = table[:, keep]
    positions = np.arange(longest)[keep]
    return positions, np.nanmean(table, 0), np.nanquantile(table, 0.1, 0), np.nanquantile(table, 0.9, 0)


def plot_ess_ratio(runs: list[Run]):
    def draw(ax, run):
        ratio = run.tokens("ess_ratios")
        ratio = np.log10(ratio[ratio > 0])
        ax.hist(ratio, bins=50, color="tab:green")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel("log10 ESS_base(q) / ESS_teacher(q)")
        ax.set_ylabel("tokens")

    return _per_run(runs, draw)


def plot_kl(runs: list[Run]):
    def draw(ax, run):
        kl_b, kl_t = _paired(run, "kl_q_base", "kl_q_teacher")
        step = max(1, len(kl_b) // MAX_SCATTER_POINTS)
        ax.scatter(kl_b[::step], kl_t[::step], s=4, alpha=0.3)
        top = max(float(kl_b.max(initial=0.0)), float(kl_t.max(initial=0.0)), 1e-6)
        ax.plot([0, top], [0, top], color="black", linewidth=0.8)
        ax.set_xlabel("KL(q || base)")
        ax.set_ylabel("KL(q || teacher)")

    return _per_run(runs, draw)


def _paired(run: Run, first: str, second: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [
        (a, b)
        for r in run.records
        for a, b in zip(r.get(first) or [], r.get(second) or [], strict=False)
        if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
    ]
    array = np.array(pairs, dtype=float).reshape(-1, 2)
    return array[:, 0], array[:, 1]


def plot_log_weights(runs: list[Run]):
    def draw(ax, run):
        for name, color in (("log_weight_base", "tab:blue"), ("log_weight_teacher", "tab:orange")):
            values = run.column(name)
            values = values[np.isfinite(values)]
            ax.hist(values, bins=30, alpha=0.5, color=color, label=name.replace("log_weight_", "log w "))
        ax.set_xlabel("sequence log importance weight")
        ax.set_ylabel("samples")
        ax.legend()

    return _per_run(runs, draw, needs_diagnostics=False)


PLOTS: dict[str, tuple[str, Callable]] = {
    "alpha_hist": ("alpha per token", plot_alpha_histogram),
    "alpha_by_position": ("alpha by token position", plot_alpha_by_position),
    "ess_ratio": ("ESS ratio per token", plot_ess_ratio),
    "kl": ("KL(q||base) vs KL(q||teacher) per token", plot_kl),
    "log_weights": ("sequence log importance weights", plot_log_weights),
}
