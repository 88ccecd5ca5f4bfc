"""The asyncio side of the engine process: tickets in, their events out, disconnects abort.

`EngineBridge` talks to the `EngineProcess`. Its reader thread hands each engine step's events to
`_deliver`; one `call_soon_threadsafe` per step moves them to the event loop, which puts each on
its ticket's queue. A handler opens its tickets with `bridge.open(...)` and reads `Batch`es:
everything that arrived since its last read, one entry per request, so a slow client gets
several tokens per chunk instead of falling behind. If the engine process dies, every open
ticket fails (503) and /health says so.

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
from .engine_process import EngineProcess
from .errors import APIError


class Disconnected(Exception):
    """The client went away; its tickets are aborted."""


@dataclass
class Batch:
    """Events of one read, with each request's index made global over the tickets opened together."""

    tokens: list[Tokens] = field(default_factory=list)
    finished: list[Finished] = field(default_factory=list)


class TicketEvents:
    """The merged event stream of tickets opened together (a request with several settings)."""

    def __init__(self, ids: list[int], offsets: dict[int, int], total: int):
        self.ids, self.offsets, self.total = ids, offsets, total
        self.queue: asyncio.Queue = asyncio.Queue()
        self.done = 0

    def finished(self) -> bool:
        return self.done >= self.total

    async def next_batch(self) -> Batch:
        """Wait for events, then take all that are queued; Disconnected / APIError(503) end it."""
        items = [await self.queue.get()]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        tokens: dict[int, Tokens] = {}
        batch = Batch()
        for item in items:
            if isinstance(item, Disconnected):
                raise item
            if isinstance(item, Failed):
                self.done = self.total
                raise APIError(f"the engine failed: {item.message}", None, 503)
            index = self.offsets[item.ticket] + item.index
            if isinstance(item, Finished):
                tokens.pop(index, None)  # the sample holds them all
                batch.finished.append(Finished(item.ticket, index, item.sample))
                self.done += 1
            elif index in tokens:  # a request's tokens of several steps: one entry
                tokens[index] = merge_tokens(tokens[index], item)
            else:
                tokens[index] = Tokens(item.ticket, index, item.tokens, item.columns)
        batch.tokens = list(tokens.values())
        return batch

    async def batches(self) -> AsyncIterator[Batch]:
        while not self.finished():
            yield await self.next_batch()


def merge_tokens(first: Tokens, then: Tokens) -> Tokens:
    columns = {name: values + then.columns.get(name, []) for name, values in first.columns.items()}
    return Tokens(first.ticket, first.index, first.tokens + then.tokens, columns)


class EngineBridge:
    """Submits tickets to the engine process and routes its events to the handlers' queues."""

    def __init__(self, engine: EngineProcess):
        self.engine = engine
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

    def _deliver(self, events: list) -> None:  # the engine reader thread
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._dispatch, events)

    def _engine_exited(self) -> None:  # the engine reader thread
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._fail_open_tickets)

    def _fail_open_tickets(self) -> None:
        self._dispatch([Failed(ticket_id, "the engine process exited") for ticket_id in list(self.streams)])

    def _dispatch(self, events: list) -> None:  # the event loop
        for event in events:
            stream = self.streams.get(event.ticket)
            if stream is not None:
                stream.queue.put_nowait(event)

    @asynccontextmanager
    async def open(
        self, tickets: list[Ticket], rid: str, receive: Callable[[], Awaitable[dict]] | None = None
    ) -> AsyncIterator[TicketEvents]:
        """Submit tickets (under request id rid) and read their events; leaving early aborts them."""
        if not self.engine.alive():
            raise APIError("the engine is not running", None, 503)
        offsets, total = {}, 0
        ids = []
        for ticket in tickets:
            ticket.id = next(self.numbers)
            if not self.engine.submit(ticket):
                for ticket_id in ids:
                    self.engine.abort(ticket_id)
                raise APIError("the engine is not running", None, 503)
            ids.append(ticket.id)
            offsets[ticket.id], total = total, total + len(ticket.requests)
        stream = TicketEvents(ids, offsets, total)
        for ticket_id in ids:
            self.streams[ticket_id] = stream
        self.rids.setdefault(rid, []).extend(ids)
        watcher = asyncio.create_task(self._watch(receive, stream)) if receive is not None else None
        try:
            yield stream
        finally:
            if watcher is not None:
                watcher.cancel()
            self._close(rid, stream)

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
        stream.queue.put_nowait(Disconnected())

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
