"""Progress of a generation run: a tqdm bar on a terminal, plain periodic log lines otherwise.

Both show samples done / total, tokens per second and an ETA; the ETA is based on the samples
finished in this run only (a resumed run's earlier samples took no time here).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Counts samples and tokens; renders to `stream` (stderr by default)."""

    def __init__(
        self,
        total: int,
        done: int = 0,
        stream: TextIO | None = None,
        enabled: bool = True,
        interval_s: float = 10.0,
        tty: bool | None = None,
    ):
        self.total, self.done_before, self.done = total, done, done
        self.tokens = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interval_s = interval_s
        self.start = self._last_log = time.monotonic()
        is_tty = self.stream.isatty() if tty is None else tty
        self.bar = self._make_bar() if enabled and is_tty else None

    def _make_bar(self):
        from tqdm import tqdm

        return tqdm(
            total=self.total,
            initial=self.done,
            unit="sample",
            file=self.stream,
            dynamic_ncols=True,
            smoothing=0.1,
        )

    def add_tokens(self, count: int) -> None:
        self.tokens += count
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.token_rate():.1f} tok/s", refresh=False)
            self.bar.update(0)
        self._maybe_log()

    def add_sample(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        self._maybe_log()

    def token_rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float:
        finished = self.done - self.done_before
        if finished <= 0:
            return float("nan")
        elapsed = time.monotonic() - self.start
        return elapsed / finished * (self.total - self.done)

    def line(self) -> str:
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.done}/{self.total} samples ({percent:.0f}%), {self.tokens} tokens, "
            f"{self.token_rate():.1f} tok/s, ETA {format_duration(self.eta_s())}"
        )

    def _maybe_log(self) -> None:
        if self.bar is not None or not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_log >= self.interval_s:
            self._last_log = now
            print(f"optimal-sampling: {self.line()}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled:
            elapsed = time.monotonic() - self.start
            print(
                f"optimal-sampling: {self.done - self.done_before} samples, {self.tokens} tokens in "
                f"{format_duration(elapsed)} ({self.token_rate():.1f} tok/s)",
                file=self.stream,
                flush=True,
            )
