"""SamplingService: one thread that owns a sampler's engine and serves requests from any thread.

A server's handlers `submit` tickets (the requests of one HTTP request, their sampling settings
and stop rules) from any thread; the service thread runs them all in one `SchedulerPool`, so
requests that arrive while others decode join the running batch at its next admission
(continuous batching across callers). Results go back through one callback, `deliver(events)`,
called on the service thread once per engine step with every event of that step (a server hands
the list to its event loop in one thread-safe call):
- `Tokens`: the new tokens (and their per-token fields) of a running request of a streaming ticket;
- `Finished`: a request's `Sample` (finish reason "abort" for requests dropped by `abort`/`stop`);
- `Failed`: the engine raised; every ticket then running gets one and the service goes on.

Invariants: only the service thread touches the engine, the pool and the tickets; other threads
talk to it through its inbox (`submit`, `abort`, `call`, `stop`) and read `stats()`, a snapshot.
A request's tokens depend only on its own seed, never on what else runs (see `Request.seed`).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import count

from ..config import SamplingParams
from ..outputs import Sample
from .pool import SchedulerPool
from .requests import Request, RequestState, StopChecker, StopRules, to_sample
from .scheduler import DROPPED

ABORTED = "abort"  # finish reason of the partial sample of a ticket aborted by its caller

RATE_WINDOW_S = 10.0  # tokens/s in stats() is measured over this window


@dataclass(frozen=True)
class Tokens:
    ticket: int
    index: int  # the request's position in its ticket
    tokens: list[int]
    columns: dict[str, list[float]]  # step field name (logprob_q, alpha, ...) -> one value per token


@dataclass(frozen=True)
class Finished:
    ticket: int
    index: int
    sample: Sample


@dataclass(frozen=True)
class Failed:
    ticket: int
    message: str


@dataclass
class Ticket:
    """Requests submitted together, with what decides their stop and what a caller is told.
    Plain data (it may cross a process boundary); the service adds its checker."""

    requests: list[Request]
    params: SamplingParams  # the engine-facing settings (max_tokens, n, seed are on the requests)
    stops: StopRules = StopRules()
    stream: bool = False
    id: int = -1  # set by the submitter, or by submit
    left: int = 0  # requests not finished yet
    sent: dict[int, int] = field(default_factory=dict)  # request index -> tokens delivered
    checker: StopChecker | None = None


class RoutingChecker:
    """The pool's stop checker: each request is checked by the checker of its ticket."""

    def __init__(self, owner: dict[int, tuple[Ticket, int]]):
        self.owner = owner

    def check(self, state: RequestState) -> bool:
        return self.owner[id(state.request)][0].checker.check(state)


class SamplingService:
    """Continuous batching over one sampler for callers on other threads (module docstring)."""

    def __init__(self, sampler, deliver: Callable[[list], None]):
        self.sampler, self.deliver = sampler, deliver
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.tickets: dict[int, Ticket] = {}
        self.owner: dict[int, tuple[Ticket, int]] = {}  # id(request) -> (ticket, index)
        self.states: dict[int, RequestState] = {}  # id(request) -> state, once it has a token
        self.touched: dict[int, RequestState] = {}  # id(request) -> state, given tokens this step
        self.pool = self._new_pool()
        self.numbers = count(1)
        self.rate: deque[tuple[float, int]] = deque()  # (time, tokens) of the steps in the window
        self.rate_sum = 0  # tokens in the window
        self.total_tokens = 0
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="optimal-sampling-engine", daemon=True)
        self.stopped = threading.Event()
        self._publish()

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        self.thread.start()

    def submit(self, ticket: Ticket) -> int:
        """Queue a ticket; returns its id (events carry it): the one it has, or a new one. The
        ids a submitter sets itself must be unique."""
        if ticket.id < 0:
            ticket.id = next(self.numbers)
        self.inbox.put(("submit", ticket))
        return ticket.id

    def abort(self, ticket_id: int) -> None:
        """Drop a ticket's unfinished requests, freeing their slots; each yields a Finished "abort"."""
        self.inbox.put(("abort", ticket_id))

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the service thread between steps (model access that must not race the
        engine, e.g. scoring); the future holds its result or exception."""
        future: Future = Future()
        self.inbox.put(("call", (fn, future)))
        return future

    def stop(self, timeout: float | None = 30.0) -> None:
        """Abort what still runs, end the thread and wait for it."""
        if self.thread.is_alive():
            self.inbox.put(("stop", None))
            self.thread.join(timeout)

    def stats(self) -> dict:
        """running/waiting requests, tokens/s over the last RATE_WINDOW_S seconds, total tokens."""
        return dict(self.snapshot)

    def alive(self) -> bool:
        return self.thread.is_alive()

    # ------------------------------------------------------------------ the service thread
    def _run(self) -> None:
        try:
            while self._handle_inbox(block=not self.pool.has_work()):
                if self.pool.has_work():
                    self._step()
                self._publish()
        finally:
            self._abort_all()
            self._refuse_queued()
            self._publish()
            self.stopped.set()

    def _refuse_queued(self) -> None:
        """After stop: tickets still queued end as aborts, calls with an error."""
        while True:
            try:
                kind, value = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self._on_submit(value)
                self._on_abort(value.id)
            elif kind == "call":
                value[1].set_exception(RuntimeError("the service has stopped"))

    def _handle_inbox(self, block: bool) -> bool:
        """Apply every queued command (waiting for one if block); False once asked to stop."""
        try:
            item = self.inbox.get(timeout=1.0) if block else self.inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, value = item
            if kind == "stop":
                return False
            getattr(self, f"_on_{kind}")(value)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return True

    def _on_submit(self, ticket: Ticket) -> None:
        ticket.checker = ticket.stops.checker(self.sampler.base.tokenizer, self.sampler.eos_ids)
        self.tickets[ticket.id] = ticket
        ticket.left = len(ticket.requests)
        for index, request in enumerate(ticket.requests):
            self.owner[id(request)] = (ticket, index)
        self.pool.add(ticket.requests, ticket.params)

    def _on_abort(self, ticket_id: int) -> None:
        ticket = self.tickets.get(ticket_id)
        if ticket is None:
            return
        live = [r for r in ticket.requests if id(r) in self.owner]
        self.pool.abort(live)
        self._send([self._aborted(ticket, r) for r in live])
        self._forget(ticket)

    def _on_call(self, value: tuple[Callable[[], object], Future]) -> None:
        fn, future = value
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as err:  # handed to the caller
                future.set_exception(err)

    def _step(self) -> None:
        try:
            _, produced = self.pool.step()
        except Exception as err:  # the engine failed: tell every caller, start over
            self._fail_all(f"{type(err).__name__}: {err}")
            return
        self._count(produced)
        events: list = []
        for state in self.touched.values():
            owner = self.owner.get(id(state.request))
            if owner is not None:
                events += self._events_of(owner[0], owner[1], state)
        self.touched.clear()
        if events:
            self._send(events)

    def _events_of(self, ticket: Ticket, index: int, state: RequestState) -> list:
        if state.finish_reason == DROPPED:
            return []
        if state.finish_reason is not None:
            sample = to_sample(state, ticket.params.collect_diagnostics)
            ticket.left -= 1
            self.owner.pop(id(state.request))
            self.states.pop(id(state.request), None)
            if ticket.left == 0:
                self.tickets.pop(ticket.id, None)
            return [Finished(ticket.id, index, sample)]
        if not ticket.stream:
            return []
        sent = ticket.sent.get(index, 0)
        ticket.sent[index] = len(state.tokens)
        columns = {name: values[sent:] for name, values in state.columns.items()}
        return [Tokens(ticket.id, index, state.tokens[sent:], columns)]

    def _on_append(self, state: RequestState) -> None:
        self.states[id(state.request)] = state
        self.touched[id(state.request)] = state  # a step may give a request two tokens (admission + decode)

    def _aborted(self, ticket: Ticket, request: Request) -> Finished:
        """The partial sample of a dropped request (no tokens if it never ran)."""
        state = self.states.get(id(request)) or RequestState(request)
        # a copy: a state still being admitted stays the scheduler's, marked dropped
        partial = dataclasses.replace(state, finish_reason=ABORTED, text=ticket.checker.decode(state.tokens))
        return Finished(ticket.id, self.owner[id(request)][1], to_sample(partial, False))

    def _send(self, events: list) -> None:
        try:
            self.deliver(events)
        except Exception:  # a receiver that has gone (its event loop closed) must not stop the engine
            pass

    def _forget(self, ticket: Ticket) -> None:
        for request in ticket.requests:
            self.owner.pop(id(request), None)
            self.states.pop(id(request), None)
        self.tickets.pop(ticket.id, None)

    def _abort_all(self) -> None:
        for ticket_id in list(self.tickets):
            self._on_abort(ticket_id)

    def _fail_all(self, message: str) -> None:
        self._send([Failed(ticket_id, message) for ticket_id in self.tickets])
        for ticket in list(self.tickets.values()):
            self._forget(ticket)
        taken = sorted(set(range(self.pool.engine.max_slots)) - set(self.pool.free))
        if taken:
            self.pool.engine.release(taken)
        self.touched.clear()
        self.pool = self._new_pool()

    def _new_pool(self) -> SchedulerPool:
        """The pool, over the engine as the sampler's weight updater attaches it (where there is one):
        live updates then apply between two steps and every draw carries its weight version."""
        engine, checker = self.sampler.engine, RoutingChecker(self.owner)
        updater = getattr(self.sampler, "weight_updater", None)
        if updater is not None:
            engine, checker = updater.attach(engine, checker)
        return SchedulerPool(engine, self.sampler.mix, checker, self._on_append)

    def _count(self, produced: int) -> None:
        now = time.monotonic()
        self.total_tokens += produced
        self.rate.append((now, produced))
        self.rate_sum += produced

    def _publish(self) -> None:
        running, waiting = self.pool.counts()
        now = time.monotonic()
        while self.rate and self.rate[0][0] < now - RATE_WINDOW_S:
            self.rate_sum -= self.rate.popleft()[1]
        window = max(1e-3, min(RATE_WINDOW_S, now - self.started))
        self.snapshot = {
            "running": running,
            "waiting": waiting,
            "tickets": len(self.tickets),
            "tokens_per_s": self.rate_sum / window,
            "total_tokens": self.total_tokens,
        }
