"""SchedulerPool: requests of many sampling settings over one engine (what a server needs).

A `Scheduler` runs requests of one (mixing, sampling) setting, because an engine step samples
all its rows with one setting (the fast engine captures one step per setting). The pool keeps one
Scheduler per setting in use, all sharing the engine's free slots, and steps them in turn, so a
step of the engine holds rows of one setting and requests of every setting make progress.

Invariants:
- the setting of a scheduler is the engine-facing part of SamplingParams (temperature, top-k,
  top-p, min-p, diagnostics); max_tokens, n and seed already live on each Request and stop rules
  in the checker, so requests that differ only there share one scheduler and one batch;
- on an engine that refills (continuous batching) every scheduler with work steps each round;
  on one that admits only when all its slots are free (the reference engine's waves) one setting
  runs at a time, and when its wave ends the next setting with work takes its turn (round robin);
- a scheduler without work is dropped, so settings used once hold nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from ..config import MixConfig, SamplingParams
from ..engines.base import Engine
from ..outputs import Sample
from .requests import Request, RequestState, StopChecker
from .scheduler import Scheduler


def setting_of(params: SamplingParams) -> SamplingParams:
    """The part of params a step depends on: everything but max_tokens, n, stop and seed."""
    return dataclasses.replace(params, max_tokens=1, n=1, stop=(), seed=None)


class SchedulerPool:
    """Continuous batching of requests with different sampling settings on one engine."""

    def __init__(
        self,
        engine: Engine,
        mix: MixConfig,
        checker: StopChecker,
        on_append: Callable[[RequestState], None] | None = None,
    ):
        """checker decides every request's stop (it may route by request to per-request rules)."""
        self.engine, self.mix, self.checker, self.on_append = engine, mix, checker, on_append
        self.free = list(range(engine.max_slots - 1, -1, -1))
        self.schedulers: dict[SamplingParams, Scheduler] = {}  # least recently served first
        self.current: SamplingParams | None = None  # the setting that holds a wave-only engine

    def add(self, requests: Iterable[Request], params: SamplingParams) -> None:
        key = setting_of(params)
        if key not in self.schedulers:
            self.schedulers[key] = Scheduler(
                self.engine, self.mix, key, self.checker, self.free, self.on_append
            )
        self.schedulers[key].add(requests)

    def abort(self, requests: Iterable[Request]) -> None:
        requests = list(requests)
        for scheduler in self.schedulers.values():
            scheduler.abort(requests)

    def has_work(self) -> bool:
        return any(s.has_work() for s in self.schedulers.values())

    def counts(self) -> tuple[int, int]:
        """(requests holding a slot, requests waiting for one)."""
        running = sum(
            len(s.active) + len(s.pending[0] if s.pending else ()) for s in self.schedulers.values()
        )
        return running, sum(len(s.waiting) for s in self.schedulers.values())

    def step(self) -> tuple[list[Sample], int]:
        """One round: (samples finished, tokens produced)."""
        finished: list[Sample] = []
        produced = 0
        for key in self._turn():
            done, tokens = self.schedulers[key].step()
            finished += done
            produced += tokens
        for key in [k for k, s in self.schedulers.items() if not s.has_work()]:
            del self.schedulers[key]
            self.current = None if self.current == key else self.current
        return finished, produced

    def _turn(self) -> list[SamplingParams]:
        """The settings that step this round."""
        busy = [k for k, s in self.schedulers.items() if s.has_work()]
        if self.engine.supports_refill:
            return busy
        holder = self.schedulers.get(self.current)
        if holder is None or not holder.running():  # a wave ended: the next setting's turn
            others = [k for k in busy if k != self.current]
            self.current = (others or busy or [None])[0]
            if self.current is None:
                return []
            self.schedulers[self.current] = self.schedulers.pop(self.current)  # to the back of the line
        return [self.current]
