"""The asyncio side of the engine process: tickets in, their events out, disconnects abort.

`EngineBridge` talks to the `EngineProcess`. Its reader thread hands each message (an engine
step's events, packed) to `_deliver`; one `call_soon_threadsafe` per message moves it to the
event loop, which unpacks it, hands each stream its rows and events and wakes each once. A
handler opens its tickets with `bridge.open(...)` and reads `Batch`es: everything that arrived
since its last read, one entry per request, so a slow client gets several tokens per chunk
instead of falling behind. Reads that take new tokens are paced (`EngineBridge.pace`): with
hundreds of streams, one chunk per stream per engine step would cost the HTTP process more than
it has, and slow down the answer to new requests. If the engine process dies, every open ticket
fails (503) and /health says so.

A client that disconnects (the ASGI `http.disconnect`, watched while the handler waits) aborts
its tickets at once, which frees their slots; leaving `open` early does the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import count

from ..outputs import Sample
from ..runtime.service import Failed, Finished, Ticket, Tokens
from .engine_process import EngineProcess, unpack_block
from .errors import APIError


class Disconnected(Exception):
    """The client went away; its tickets are aborted."""


@dataclass
class Batch:
    """Events of one read, with each request's index made global over the tickets opened together."""

    tokens: list[Tokens] = field(default_factory=list)
    finished: list[Finished] = field(default_factory=list)


class TicketEvents:
    """The merged event stream of tickets opened together (a request with several settings).

    The bridge pushes rows of unpacked blocks (`push_rows`) and other events (`push`) and wakes
    the reader once per message; `next_batch` turns everything pushed since into one `Batch`.
    `pace()` (seconds) spaces the reads that take new tokens: the first tokens and the end (a
    finished sample, an error, a disconnect) are taken at once, those between at most once per
    pace, so that a server with many streams writes far fewer, larger chunks."""

    def __init__(self, ids: list[int], offsets: dict[int, int], total: int, pace: Callable[[], float]):
        self.ids, self.offsets, self.total, self.pace = ids, offsets, total, pace
        self.rows: list[tuple[tuple, list[int], int]] = []  # (unpacked block, its rows, index offset)
        self.events: list = []  # Finished / Failed / Disconnected, in order
        self.waiter: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None  # wakes the reader when tokens pushed are due
        self.due = 0.0  # the event loop's time from which new tokens are taken
        self.done = 0

    def finished(self) -> bool:
        return self.done >= self.total

    def push_rows(self, block: tuple, rows: list[int], ticket: int) -> None:
        self.rows.append((block, rows, self.offsets[ticket]))

    def push(self, event) -> None:
        self.events.append(event)

    def wake(self, now: float) -> None:
        """Wake the reader if what was pushed is to be taken now, else once it is due."""
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.events or now >= self.due:
            waiter.set_result(None)
        elif self.timer is None:
            self.timer = waiter.get_loop().call_at(self.due, self._due)

    def _due(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.events and not (self.rows and loop.time() >= self.due):
            self.waiter = loop.create_future()
            if self.rows:
                self.timer = loop.call_at(self.due, self._due)
            try:
                await self.waiter
            finally:
                self.waiter = None
                if self.timer is not None:
                    self.timer.cancel()
                    self.timer = None

    async def next_batch(self) -> Batch:
        """Wait for events, then take all that came; Disconnected / APIError(503) end it."""
        await self._wait()
        if self.rows:
            self.due = asyncio.get_running_loop().time() + self.pace()
        rows, self.rows = self.rows, []
        events, self.events = self.events, []
        tokens = gather_rows(rows)
        batch = Batch()
        for item in events:
            if isinstance(item, Disconnected):
                raise item
            if isinstance(item, Failed):
                self.done = self.total
                raise APIError(f"the engine failed: {item.message}", None, 503)
            index = self.offsets[item.ticket] + item.index
            tokens.pop(index, None)  # the sample holds them all
            batch.finished.append(Finished(item.ticket, index, item.sample))
            self.done += 1
        batch.tokens = list(tokens.values())
        return batch

    async def batches(self) -> AsyncIterator[Batch]:
        while not self.finished():
            yield await self.next_batch()


def gather_rows(rows: list[tuple[tuple, list[int], int]]) -> dict[int, Tokens]:
    """The rows of unpacked blocks as one Tokens per request (global index), tokens in order."""
    out: dict[int, Tokens] = {}
    for (tickets, indices, ids, columns), picked, offset in rows:
        for k in picked:
            index = offset + indices[k]
            entry = out.get(index)
            if entry is None:
                entry = out[index] = Tokens(tickets[k], index, [], {})
            entry.tokens.append(ids[k])
            for name, values in columns.items():
                entry.columns.setdefault(name, []).append(values[k])
    return out


AUTO_CHUNKS_PER_S = 4000.0  # what the automatic pace keeps all streams together under


def auto_interval(streams: int) -> float:
    """The automatic pace: each of `streams` streams gets an equal share of AUTO_CHUNKS_PER_S
    chunks a second (a few streams: a chunk per engine step; 256: one per 64 ms). Writing a
    chunk (JSON, detokenizing, a socket write) costs the HTTP process tens of microseconds
    whatever its size, and one process serves every stream."""
    return streams / AUTO_CHUNKS_PER_S


class EngineBridge:
    """Submits tickets to the engine process and routes its events to the handlers' streams."""

    def __init__(self, engine: EngineProcess, stream_interval: float | None = None):
        """stream_interval: least seconds between two chunks of new tokens of a stream (None:
        `auto_interval`)."""
        self.engine, self.stream_interval = engine, stream_interval
        self.streaming = 0  # streams open for streamed tickets
        engine.deliver, engine.on_exit = self._deliver, self._engine_exited
        self.loop: asyncio.AbstractEventLoop | None = None
        self.streams: dict[int, TicketEvents] = {}
        self.rids: dict[str, list[int]] = {}  # request id -> its tickets, while they run
        self.numbers = count(1)

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()

    def stop(self) -> None:
        self.engine.stop()

    def alive(self) -> bool:
        return self.engine.alive()

    def _deliver(self, packed: tuple) -> None:  # the engine reader thread
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._dispatch, packed)

    def _engine_exited(self) -> None:  # the engine reader thread
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._fail_open_tickets)

    def _fail_open_tickets(self) -> None:
        self._dispatch(
            ([], [Failed(ticket_id, "the engine process exited") for ticket_id in list(self.streams)])
        )

    def _dispatch(self, packed: tuple) -> None:  # the event loop
        """One message of the engine process: each stream gets its rows and events, and one wake-up."""
        blocks, others = packed
        woken: set[TicketEvents] = set()
        for block in blocks:
            block = unpack_block(block)
            rows_of: dict[int, list[int]] = {}
            for k, ticket in enumerate(block[0]):
                rows_of.setdefault(ticket, []).append(k)
            for ticket, rows in rows_of.items():
                stream = self.streams.get(ticket)
                if stream is not None:
                    stream.push_rows(block, rows, ticket)
                    woken.add(stream)
        for event in others:
            stream = self.streams.get(event.ticket)
            if stream is not None:
                stream.push(event)
                woken.add(stream)
        now = self.loop.time()
        for stream in woken:
            stream.wake(now)

    @asynccontextmanager
    async def open(
        self, tickets: list[Ticket], rid: str, receive: Callable[[], Awaitable[dict]] | None = None
    ) -> AsyncIterator[TicketEvents]:
        """Submit tickets (under request id rid) and read their events; leaving early aborts them."""
        stream = TicketEvents(*self._submit(tickets), self.pace)
        streamed = any(ticket.stream for ticket in tickets)
        self.streaming += streamed
        for ticket_id in stream.ids:
            self.streams[ticket_id] = stream
        self.rids.setdefault(rid, []).extend(stream.ids)
        watcher = asyncio.create_task(self._watch(receive, stream)) if receive is not None else None
        try:
            yield stream
        finally:
            if watcher is not None:
                watcher.cancel()
            self.streaming -= streamed
            self._close(rid, stream)

    def _submit(self, tickets: list[Ticket]) -> tuple[list[int], dict[int, int], int]:
        """Number and send the tickets: (their ids, each one's first request index, the requests)."""
        if not self.engine.alive():
            raise APIError("the engine is not running", None, 503)
        ids, offsets, total = [], {}, 0
        for ticket in tickets:
            ticket.id = next(self.numbers)
            if not self.engine.submit(ticket):
                for ticket_id in ids:
                    self.engine.abort(ticket_id)
                raise APIError("the engine is not running", None, 503)
            ids.append(ticket.id)
            offsets[ticket.id], total = total, total + len(ticket.requests)
        return ids, offsets, total

    def pace(self) -> float:
        """Seconds between two chunks of new tokens of a stream: the server's setting, else
        `auto_interval` of the streams open now."""
        return auto_interval(self.streaming) if self.stream_interval is None else self.stream_interval

    def _close(self, rid: str, stream: TicketEvents) -> None:
        for ticket_id in stream.ids:
            self.streams.pop(ticket_id, None)
            if not stream.finished():
                self.engine.abort(ticket_id)
        left = [t for t in self.rids.get(rid, []) if t not in stream.ids]
        if left:
            self.rids[rid] = left
        else:
            self.rids.pop(rid, None)

    async def _watch(self, receive: Callable[[], Awaitable[dict]], stream: TicketEvents) -> None:
        """Abort the tickets when the client disconnects (the body is already read)."""
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # the connection's channel is gone: the same as a disconnect
            pass
        for ticket_id in stream.ids:
            self.engine.abort(ticket_id)
        stream.push(Disconnected())
        stream.wake(0.0)

    def abort(self, rid: str | None) -> int:
        """Abort the tickets of one request id (None: all); returns how many tickets."""
        ids = [t for r, ts in self.rids.items() if rid is None or r == rid for t in ts]
        for ticket_id in ids:
            self.engine.abort(ticket_id)
        return len(ids)

    async def collect(
        self, tickets: list[Ticket], rid: str, receive: Callable[[], Awaitable[dict]] | None = None
    ) -> list[Sample]:
        """Every sample of the tickets, in request order (Disconnected if the client left)."""
        async with self.open(tickets, rid, receive) as stream:
            samples: list[Sample | None] = [None] * stream.total
            async for batch in stream.batches():
                for event in batch.finished:
                    samples[event.index] = event.sample
        return samples

    async def call(self, name: str, *args) -> object:
        """A named call in the engine process (between steps: `engine_process.CALLS`), awaited."""
        return await asyncio.wrap_future(self.engine.call(name, *args))
