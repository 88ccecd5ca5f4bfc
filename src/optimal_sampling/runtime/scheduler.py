"""The Scheduler: continuous batching of requests over one engine, with pipelining.

It owns the queues — waiting requests, free slots, active slots, the admission being prefilled
(`pending`) and the step whose results are still on their way to the host (`in_flight`) — and
does no I/O. Each `step()`:
1. admits waiting requests into free slots (a group at a time; the engine prefills them and draws
   their first tokens, on the fast engine beside the decode steps);
2. lets the admitted join once their first tokens are drawn (at once if nothing else runs);
3. queues one step for the active slots with tokens left to ask for (at most the engine's
   `batch_limit`, the longest-running first);
4. reads the step before (pipelined engines) or this one, and retires finished requests.

Where the engine `pipelines`, step n + 1 is queued before step n's results are read, so the host's
work (reading, stop checks, bookkeeping) runs while the device computes. A request that stops at
step n has one token drawn in step n + 1 that is dropped; the tokens kept are the same as without
pipelining (each draw's randomness is keyed by (request seed, token index)).

Several schedulers (one per sampling setting, see `pool.py`) may share one engine: they then share
its `free` slot list, and each of their steps holds rows of its own setting only. `abort` drops
requests (a server's disconnected clients); `on_append(state)` is called for every token a
request keeps, before its stop check (a server's streaming hook).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice

from ..config import MixConfig, SamplingParams
from ..engines.base import Engine, Pending, SlotRequest, admit_group
from ..outputs import Sample
from .requests import Request, RequestState, StopChecker, to_sample

DROPPED = "dropped"  # finish reason of a request dropped by `Scheduler.abort` (it yields no sample)


class Scheduler:
    """Runs requests of one (mixing, sampling) setting to completion on `engine`."""

    def __init__(
        self,
        engine: Engine,
        mix: MixConfig,
        params: SamplingParams,
        checker: StopChecker,
        free: list[int] | None = None,
        on_append: Callable[[RequestState], None] | None = None,
    ):
        """free: the engine's free slots, shared with the other schedulers of the engine (default:
        every slot, this scheduler owns the engine)."""
        self.engine, self.mix, self.params, self.checker = engine, mix, params, checker
        self.on_append = on_append
        self.pipelined = engine.pipelines
        self.limit = engine.batch_limit()
        self.group = admit_group(self.limit)
        self.waiting: deque[Request] = deque()
        self.free = list(range(engine.max_slots - 1, -1, -1)) if free is None else free
        self.active: dict[int, RequestState] = {}  # slot -> state, in admission order
        self.pending: tuple[dict[int, RequestState], Pending] | None = None
        self.in_flight: tuple[dict[int, RequestState], Pending] | None = None

    def add(self, requests: Iterable[Request]) -> None:
        self.waiting.extend(requests)

    def has_work(self) -> bool:
        return bool(self.waiting or self.active or self.pending or self.in_flight)

    def running(self) -> bool:
        """True while any slot of this scheduler is taken or a result is on its way."""
        return bool(self.active or self.pending or self.in_flight)

    def abort(self, requests: Iterable[Request]) -> None:
        """Drop requests: waiting ones at once; running ones release their slots now (a step still
        in flight writes them, as for any finished request, and its result is dropped); one still
        being admitted is released when its first token arrives. Aborted requests yield no sample."""
        gone = {id(r) for r in requests}
        self.waiting = deque(r for r in self.waiting if id(r) not in gone)
        slots = [slot for slot, st in self.active.items() if id(st.request) in gone]
        for slot in slots:
            self.active.pop(slot).finish_reason = DROPPED
        if slots:
            self.engine.release(slots)
            self.free.extend(slots)
        for state in self.pending[0].values() if self.pending else ():
            if id(state.request) in gone:
                state.finish_reason = DROPPED

    def run(self, on_tokens: Callable[[int], None] | None = None) -> Iterator[Sample]:
        """Step until every request added has finished, yielding each sample as it finishes."""
        while self.has_work():
            finished, tokens = self.step()
            if on_tokens and tokens:
                on_tokens(tokens)
            yield from finished

    def step(self) -> tuple[list[Sample], int]:
        """One iteration of the loop: (samples finished, tokens produced)."""
        finished: list[Sample] = []
        produced = 0
        # 1. admit waiting requests into free slots
        busy = bool(self.active or self.in_flight)
        refill = self.engine.supports_refill and len(self.free) >= min(self.group, len(self.waiting))
        if self.pending is None and self.waiting and self.free and (refill or not busy):
            self.pending = self._admit()
        # 2. the admitted join once their first tokens are drawn
        if self.pending is not None and (not busy or self.pending[1].ready()):
            admitted, first = self.pending
            self.pending = None
            self._append(admitted, first.to_host())
            self.active.update(admitted)
            finished += self._retire()
            produced += len(admitted)
        # 3. queue one step for the active slots with tokens left to ask for
        asking = ((slot, st) for slot, st in self.active.items() if st.issued < st.request.token_budget)
        rows = dict(islice(asking, self.limit))
        queued = (rows, self._step(rows)) if rows else None
        # 4. read the step before (pipelined) or this one, and retire finished requests
        if self.pipelined:
            queued, self.in_flight = self.in_flight, queued
        if queued is not None:
            states, results = queued
            kept = {slot: st for slot, st in states.items() if st.finish_reason is None}
            self._append(states, results.to_host(), kept)
            finished += self._retire()
            produced += len(kept)
        return finished, produced

    def _admit(self) -> tuple[dict[int, RequestState], Pending]:
        admitted: dict[int, RequestState] = {}
        while self.waiting and self.free:
            admitted[self.free.pop()] = RequestState(self.waiting.popleft())
        requests = [SlotRequest(s, st.request.base_ids, st.request.teacher_ids) for s, st in admitted.items()]
        seeds, steps = self._issue(admitted)
        return admitted, self.engine.admit(requests, seeds, steps, self.mix, self.params)

    def _step(self, rows: dict[int, RequestState]) -> Pending:
        """Pipelined, the input tokens are the slots' last tokens on the device."""
        last = None if self.pipelined else [st.tokens[-1] for st in rows.values()]
        seeds, steps = self._issue(rows)
        return self.engine.step(list(rows), last, seeds, steps, self.mix, self.params)

    @staticmethod
    def _issue(states: dict[int, RequestState]) -> tuple[list[int], list[int]]:
        """Row seeds and token indices of one more token per state (the draws' random keys)."""
        seeds = [st.request.seed for st in states.values()]
        steps = [st.issued for st in states.values()]
        for st in states.values():
            st.issued += 1
        return seeds, steps

    def _append(self, states: dict[int, RequestState], result: dict, keep: dict | None = None) -> None:
        """Row i of result belongs to the i-th state; only the states in keep (default all) take it."""
        for row, (slot, state) in enumerate(states.items()):
            if keep is None or slot in keep:
                state.append(result, row)
                if self.on_append is not None and state.finish_reason is None:
                    self.on_append(state)

    def _retire(self) -> list[Sample]:
        done = [
            slot for slot, st in self.active.items() if st.finish_reason == DROPPED or self.checker.check(st)
        ]
        if not done:
            return []
        self.engine.release(done)
        self.free.extend(done)
        states = [self.active.pop(slot) for slot in done]
        return [
            to_sample(st, self.params.collect_diagnostics) for st in states if st.finish_reason != DROPPED
        ]
