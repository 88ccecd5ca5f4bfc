"""Live weight updates of a running sampler: the version counter, the step gate, aborts.

A `WeightUpdater` belongs to one sampler. It owns
- `version`: an integer, 0 for the weights the sampler was built with, raised by every update
  (of either model) and stored with every token drawn (`Sample.weight_version[s]`);
- the `StepGate`: the scheduler loop's engine calls and the updates run one at a time, and an
  update that is waiting goes before the loop's next call. So an update requested from another
  thread waits for the running step (on CUDA, for the device) and applies between two steps;
  no step ever sees half-updated weights;
- `pause`/`resume`: hold the loop's engine calls (a server's pause_generation), updates still run.

The loop sees the engine through `attach`: a `VersionedEngine` whose draws report the version
they were computed with (a column `weight_version` that `outputs.sample_columns` turns into the
Sample's fields), and an `AbortingChecker` that ends requests running across an update made with
`abort_running=True` (finish reason "abort", keeping only the tokens drawn before it).

Without abort, a request running across an update continues on the new weights; its earlier
tokens' keys and values stay in the KV caches as the old weights computed them (nothing is
recomputed), so its later log-probs are those of the new weights over that cache. Its per-token
versions say where the update fell.

Invariants: every update is validated (names, shapes, dtypes) against the engine, and where the
engine keeps its own copies also against the Hugging Face model the sampler scores with, before
any tensor is copied; a ValueError leaves all weights and the version unchanged.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from ..engines.base import Pending
from ..engines.weights import (
    NamedTensors,
    check_model_name,
    check_weights,
    copy_weights,
    hf_weight_map,
    shapes_of,
)
from .requests import RequestState, StopChecker

VERSION_FIELD = "weight_version"  # the step result column that carries each draw's weight version


class StepGate:
    """One engine call or one update at a time; updates waiting go first, pauses hold calls."""

    def __init__(self):
        self._cond = threading.Condition()
        self._busy = False
        self._updates_waiting = 0
        self._paused_by: int | None = None  # thread id of the pauser while paused

    @contextmanager
    def engine_call(self) -> Iterator[None]:
        with self._cond:
            if self._paused_by == threading.get_ident():
                raise RuntimeError("generation was paused by this thread: call continue_generation() first")
            self._cond.wait_for(lambda: not (self._busy or self._updates_waiting or self._paused_by))
            self._busy = True
        try:
            yield
        finally:
            self._release()

    @contextmanager
    def update(self) -> Iterator[None]:
        with self._cond:
            self._updates_waiting += 1
            try:
                self._cond.wait_for(lambda: not self._busy)
            finally:
                self._updates_waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            self._release()

    def pause(self) -> None:
        """Wait for the running engine call, then hold the next ones until `resume`."""
        with self._cond:
            self._cond.wait_for(lambda: not self._busy)
            self._paused_by = threading.get_ident()

    def resume(self) -> None:
        with self._cond:
            self._paused_by = None
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused_by is not None

    def _release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()


class VersionedPending:
    """A draw's results with the weight version that computed them, one entry per row."""

    def __init__(self, pending: Pending, version: int):
        self.pending, self.version = pending, version

    def ready(self) -> bool:
        return self.pending.ready()

    def to_host(self) -> dict[str, list]:
        result = self.pending.to_host()
        return {**result, VERSION_FIELD: [self.version] * len(result["tokens"])}


class VersionedEngine:
    """The engine as a scheduler loop sees it: calls run under the gate, draws carry the version.
    Everything else (attributes, `batch_limit`, ...) is the engine's own."""

    def __init__(self, engine, updater: WeightUpdater):
        self.engine, self.updater = engine, updater

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def admit(self, *args) -> Pending:
        return self._draw(self.engine.admit, args)

    def step(self, *args) -> Pending:
        return self._draw(self.engine.step, args)

    def release(self, slots: list[int]) -> None:
        with self.updater.gate.engine_call():  # a tensor-parallel proxy sends it to its helpers
            self.engine.release(slots)

    def _draw(self, call, args: tuple) -> Pending:
        with self.updater.gate.engine_call():
            return VersionedPending(call(*args), self.updater.version)


class AbortingChecker:
    """A StopChecker that first ends requests running across an `abort_running=True` update:
    finish reason "abort", the tokens (and per-token columns) drawn by the new weights dropped."""

    def __init__(self, checker: StopChecker, updater: WeightUpdater):
        self.checker, self.updater = checker, updater

    def __getattr__(self, name: str):
        return getattr(self.checker, name)

    def check(self, state: RequestState) -> bool:
        versions = state.columns.get(VERSION_FIELD)
        cut = self.updater.abort_cut(versions[0]) if versions else None
        if cut is None:
            return self.checker.check(state)
        keep = bisect.bisect_left(versions, cut)  # versions never decrease along a request
        del state.tokens[keep:]
        for values in state.columns.values():
            del values[keep:]
        state.finish_reason, state.stop_reason = "abort", None
        state.text = self.checker.decode(state.tokens)
        return True


class WeightUpdater:
    """The weight version of one sampler and the updates that raise it (see the module docstring)."""

    def __init__(self):
        self.version = 0
        self.gate = StepGate()
        self.abort_versions: list[int] = []  # versions installed with abort_running=True, ascending

    def attach(self, engine, checker: StopChecker) -> tuple[VersionedEngine, AbortingChecker]:
        """What a scheduler loop runs with, so updates apply between its steps."""
        return VersionedEngine(engine, self), AbortingChecker(checker, self)

    def abort_cut(self, first_version: int) -> int | None:
        """The first abort version after a request's first token, if an abort update came since."""
        at = bisect.bisect_right(self.abort_versions, first_version)
        return self.abort_versions[at] if at < len(self.abort_versions) else None

    def update(
        self, engine, hf_model: torch.nn.Module, model: str, weights: NamedTensors,
        abort_running: bool = False, weight_version: int | None = None,
    ) -> int:  # fmt: skip
        """Copy (name, tensor) pairs into `model` of the engine (and of `hf_model` where the engine
        holds copies) between two steps; the new version. All checked before anything is copied."""
        model = check_model_name(model)
        weights = list(weights)
        shapes = shapes_of(weights)
        self.check_version(weight_version)
        engine.check_weights(model, shapes)  # here, before a tensor-parallel proxy tells its helpers
        hf_map = None if engine.shares_model_weights else hf_weight_map(hf_model)
        if hf_map is not None:
            check_weights(hf_map, shapes, model)
        with self.gate.update():
            version = self.check_version(weight_version)
            synchronize(engine.device)  # a prefill on a side stream may still read the weights
            engine.load_weights(model, weights)
            if hf_map is not None:
                copy_weights(hf_map, weights)
            synchronize(engine.device)
            self.version = version
            if abort_running:
                self.abort_versions.append(version)
        return version

    def check_version(self, weight_version: int | None) -> int:
        """The version an update installs: weight_version if given (it must exceed the current one)."""
        if weight_version is None:
            return self.version + 1
        if isinstance(weight_version, bool) or not isinstance(weight_version, int):
            raise TypeError(f"weight_version must be an integer, got {type(weight_version).__name__}")
        if weight_version <= self.version:
            raise ValueError(
                f"weight_version must exceed the current version {self.version}, got {weight_version}"
            )
        return weight_version


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def as_named_tensors(weights: object) -> Sequence[tuple[str, torch.Tensor]]:
    """A state dict (mapping) or an iterable of (name, tensor) pairs, as a list of pairs."""
    if isinstance(weights, Mapping):
        return list(weights.items())
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
        raise TypeError("weights must be a state dict or an iterable of (name, tensor) pairs")
    return list(weights)
