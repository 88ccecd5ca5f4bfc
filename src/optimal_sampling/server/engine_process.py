"""The engine in its own process, so that HTTP work never competes with the decode loop.

Python runs one thread at a time per process: at 256 concurrent streams the HTTP side (JSON,
detokenizing, sockets) does tens of thousands of small jobs a second, and sharing a process with
the engine loop would slow every decode step (as vLLM and SGLang also split the two). So:
- the child (`engine_main`, started with `spawn`) loads the pair (`OptimalSampler.from_configs`),
  reports a `PairInfo`, and runs a `SamplingService` whose events it sends back, one message
  per engine step, the token events packed as flat typed arrays (`pack`: a few byte strings to
  pickle instead of hundreds of objects, and nothing to build per token on the other side); a
  second thread there reads commands (submit, abort, call, stop);
- the parent (`EngineProcess`) sends commands, and its reader thread hands each message, still
  packed, to `deliver` (the bridge unpacks it on its event loop) and resolves calls (scoring,
  stats). If the child dies, `on_exit` is called once.
The child ignores SIGINT (Ctrl-C reaches the whole process group; the parent decides) and stops
when the parent says so or goes away.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import signal
import threading
from array import array
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from itertools import count

from ..config import EngineConfig, MixConfig
from ..runtime.service import Ticket, Tokens
from ..runtime.spec import SamplerSpec

log = logging.getLogger("optimal_sampling.server")
START_TIMEOUT_S = 3600.0  # the demo pair's first start converts GGUF files (minutes on 2 cores)


@dataclass(frozen=True)
class PairInfo:
    """What the HTTP side needs to know of the loaded pair."""

    base_path: str  # directories the tokenizers load from
    teacher_path: str
    vocab_size: int
    eos_ids: frozenset[int]
    max_context: int
    seed: int | None
    mix: MixConfig
    engine_config: EngineConfig
    engine: str  # the engine's class name
    device: str


class EngineProcess:
    """The parent's handle on the engine child (module docstring)."""

    def __init__(self, spec: SamplerSpec):
        self.spec = spec
        self.deliver: Callable[[tuple], None] = lambda packed: None  # a message of `pack`
        self.on_exit: Callable[[], None] = lambda: None
        self.lock = threading.Lock()
        self.calls: dict[int, Future] = {}
        self.numbers = count(1)
        self.process = None
        self.conn = None
        self.running = False

    def start(self) -> PairInfo:
        """Start the child and wait until its models are loaded (ValueError: it could not)."""
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=engine_main, args=(self.spec, child), name="optimal-sampling-engine"
        )
        self.process.start()
        child.close()
        if not self.conn.poll(START_TIMEOUT_S):
            self.process.kill()
            raise RuntimeError(f"the engine process did not start in {START_TIMEOUT_S:.0f} s")
        try:
            kind, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the engine process exited ({self.process.exitcode}) while loading") from None
        if kind != "ready":
            self.process.join(30)
            raise ValueError(value)
        self.running = True
        threading.Thread(target=self._read, name="optimal-sampling-engine-reader", daemon=True).start()
        return value

    def submit(self, ticket: Ticket) -> bool:
        """Send a ticket (its id set); False if the child is gone."""
        return self._send(("submit", ticket))

    def abort(self, ticket_id: int) -> None:
        self._send(("abort", ticket_id))

    def call(self, name: str, *args) -> Future:
        """A named call (`CALLS`) run in the child between engine steps."""
        future: Future = Future()
        call_id = next(self.numbers)
        self.calls[call_id] = future
        if not self._send(("call", (call_id, name, args))):
            self.calls.pop(call_id, None)
            future.set_exception(RuntimeError("the engine process is not running"))
        return future

    def alive(self) -> bool:
        return self.running and self.process is not None and self.process.is_alive()

    def stop(self, timeout: float = 60.0) -> None:
        """Abort what runs, stop the child and wait for it (killed if it does not end in time)."""
        if self.process is None:
            return
        self._send(("stop", None))
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    def _send(self, message) -> bool:
        with self.lock:
            try:
                self.conn.send(message)
                return True
            except (OSError, ValueError):  # the child is gone
                return False

    def _read(self) -> None:
        while True:
            try:
                kind, value = self.conn.recv()
            except (EOFError, OSError):  # the child is gone
                break
            try:
                if kind == "events":
                    self.deliver(value)
                elif kind == "result":
                    self._resolve(*value)
            except Exception:  # one bad message must not stop every stream
                log.exception("engine message %r could not be handled", kind)
        self.running = False
        for future in self.calls.values():
            future.set_exception(RuntimeError("the engine process exited"))
        self.calls.clear()
        self.on_exit()

    def _resolve(self, call_id: int, ok: bool, value) -> None:
        future = self.calls.pop(call_id, None)
        if future is not None:
            future.set_result(value) if ok else future.set_exception(value)


Block = tuple  # (tickets, indices, tokens, {column: values}): one row per token, as `array`s


def pack(events: list) -> tuple[list[Block], list]:
    """(token events as blocks, the other events): what a message carries. A block holds one row
    per token (ticket, request index, token id, one value per column) in flat typed arrays, which
    pickle as a few byte strings instead of hundreds of objects; one block per set of columns."""
    groups: dict[tuple[str, ...], list[Tokens]] = {}
    others = []
    for event in events:
        if type(event) is Tokens:
            groups.setdefault(tuple(event.columns), []).append(event)
        else:
            others.append(event)
    return [pack_block(names, tokens) for names, tokens in groups.items()], others


def pack_block(names: tuple[str, ...], events: list[Tokens]) -> Block:
    tickets = array("q", [e.ticket for e in events for _ in e.tokens])
    indices = array("q", [e.index for e in events for _ in e.tokens])
    tokens = array("q", [t for e in events for t in e.tokens])
    columns = {name: typed([v for e in events for v in e.columns[name]]) for name in names}
    return tickets, indices, tokens, columns


def typed(values: list) -> array | list:
    """Ints or floats as a typed array (one byte string to pickle); anything else as it is."""
    kinds = {type(v) for v in values}
    if not kinds <= {int, float}:
        return values
    try:
        return array("q" if kinds == {int} else "d", values)
    except OverflowError:  # an int beyond 64 bits
        return values


def unpack_block(block: Block) -> tuple[list[int], list[int], list[int], dict[str, list]]:
    """A block's arrays as lists (the HTTP side reads them row by row)."""
    tickets, indices, tokens, columns = block
    lists = {n: v.tolist() if isinstance(v, array) else v for n, v in columns.items()}
    return tickets.tolist(), indices.tolist(), tokens.tolist(), lists


# ---------------------------------------------------------------------------------------- the child


def call_score(sampler, service, requests, completions, params):
    from ..runtime.scoring import score_requests

    return list(score_requests(sampler, requests, completions, params))


def call_stats(sampler, service):
    return {**service.stats(), "weight_version": getattr(sampler, "weight_version", 0)}


def call_update_weights_from_disk(sampler, service, path, model, abort_running, weight_version):
    return sampler.update_weights_from_disk(path, model, abort_running, weight_version)


def call_weight_version(sampler, service):
    return getattr(sampler, "weight_version", 0)


WEIGHT_GROUPS: dict[str, object] = {}  # the engine process's groups to trainers, by name


def call_init_weights_update_group(sampler, service, address, port, rank_offset, world_size, name, backend):
    from ..distributed.weights import init_weights_update_group

    if name in WEIGHT_GROUPS:
        raise ValueError(f"a weight update group named {name!r} exists already")
    device = "cpu" if backend == "gloo" else str(sampler.device)
    WEIGHT_GROUPS[name] = init_weights_update_group(
        address, port, rank_offset, world_size, name, backend, device
    )
    return name


def call_update_weights_from_distributed(
    sampler, service, name, names, dtypes, shapes, model, abort, version
):
    if name not in WEIGHT_GROUPS:
        raise ValueError(f"no weight update group named {name!r}: POST /init_weights_update_group first")
    return sampler.update_weights_from_distributed(
        WEIGHT_GROUPS[name], names, dtypes, shapes, model, abort, version
    )


def call_pause_generation(sampler, service):
    sampler.pause_generation()


def call_continue_generation(sampler, service):
    sampler.continue_generation()


CALLS = {
    "score": call_score,
    "stats": call_stats,
    "update_weights_from_disk": call_update_weights_from_disk,
    "weight_version": call_weight_version,
    "init_weights_update_group": call_init_weights_update_group,
    "update_weights_from_distributed": call_update_weights_from_distributed,
    "pause_generation": call_pause_generation,
    "continue_generation": call_continue_generation,
}
# Run on a thread of their own, not between engine steps on the loop's thread: they wait for a
# trainer (group, broadcast) or hold the loop (pause), and a weight update takes the step gate
# itself (runtime.weights), so it still applies while generation is paused.
OFF_LOOP_CALLS = frozenset(
    {"update_weights_from_disk", "init_weights_update_group", "update_weights_from_distributed",
     "pause_generation", "continue_generation", "weight_version"}
)  # fmt: skip


def pair_info(sampler) -> PairInfo:
    return PairInfo(
        sampler.base.path, sampler.teacher.path, sampler.vocab_size, frozenset(sampler.eos_ids),
        sampler.engine.max_context(), sampler.seed, sampler.mix, sampler.engine_config,
        type(sampler.engine).__name__, str(sampler.device),
    )  # fmt: skip


def warm_temperatures(sampler, temperatures: tuple[float, ...]) -> None:
    """Capture now the graphs requests at these temperatures would otherwise capture on first use
    (construction warmed temperature 1 only); a request meeting a capture stalls every stream."""
    from ..config import SamplingParams

    if temperatures:
        sampler.warmup([SamplingParams(temperature=t) for t in temperatures])


def engine_main(spec: SamplerSpec, conn) -> None:
    """The child: load, report, serve commands until told to stop or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ..models.loading import quiet_transformers
    from ..runtime.sampler import OptimalSampler
    from ..runtime.service import SamplingService

    quiet_transformers()
    try:
        if hasattr(spec, "load_sampler"):  # a stand-in (fake_engine.FakeSpec)
            sampler = spec.load_sampler()
        else:
            sampler = OptimalSampler.from_configs(
                spec.model_base, spec.model_teacher, spec.mix, spec.engine, spec.parallel, spec.seed
            )
            warm_temperatures(sampler, spec.warmup_temperatures)
    except Exception as err:  # told to the parent, which reports it in one line
        conn.send(("failed", " ".join(f"{type(err).__name__}: {err}".split())))
        return
    lock = threading.Lock()

    def send(message) -> None:
        with lock:
            conn.send(message)

    gc.freeze()  # the loaded models' objects: the collector, busy with served tokens, skips them
    service = SamplingService(sampler, lambda events: send(("events", pack(events))))
    service.start()
    send(("ready", pair_info(sampler)))
    try:
        serve_commands(conn, sampler, service, send)
    finally:
        service.stop()
        sampler.close()


def serve_commands(conn, sampler, service, send: Callable) -> None:
    while True:
        try:
            kind, value = conn.recv()
        except (EOFError, OSError):  # the parent went away
            return
        if kind == "stop":
            return
        if kind == "submit":
            service.submit(value)
        elif kind == "abort":
            service.abort(value)
        elif kind == "call":
            call_id, name, args = value
            run = partial(CALLS[name], sampler, service, *args)
            future = run_off_loop(run) if name in OFF_LOOP_CALLS else service.call(run)
            future.add_done_callback(lambda done, call_id=call_id: send(("result", result_of(call_id, done))))


def run_off_loop(run: Callable) -> Future:
    """run() on a daemon thread of its own; its result or exception in a Future."""
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(run())
        except BaseException as err:  # delivered to the HTTP handler, which answers success: false
            future.set_exception(err)

    threading.Thread(target=work, name="engine-call", daemon=True).start()
    return future


def result_of(call_id: int, done: Future) -> tuple[int, bool, object]:
    error = done.exception()
    if error is None:
        return call_id, True, done.result()
    return call_id, False, error if is_picklable(error) else RuntimeError(str(error))


def is_picklable(value) -> bool:
    import pickle

    try:
        pickle.dumps(value)
        return True
    except Exception:
        return False
