"""Redis Streams, both ways (extra `sagaflow[redis]`): a consumer-group source for
`Runtime.run` and a dispatcher that appends commands to streams.

```python
import redis
from sagaflow.redis import RedisStreamDispatcher, RedisStreamSource

client = redis.Redis.from_url("redis://localhost:6379/0")
dispatch = RedisStreamDispatcher(client, registry, stream={ReserveStock: "stock"})
async with Runtime(registry, store=store, dispatch=dispatch) as runtime:
    async with RedisStreamSource(client, registry, stream="orders", group="sagas") as source:
        await runtime.run(source, id=source.event_id, trace=source.trace, ack=source.ack)
```

The wire format (one stream entry per message; field names and values are UTF-8 text):

- `type`: the message's stored type name, as the registry's serializer writes it (by
  default the class's module and qualified name, or the name given to
  `registry.message(...)`, with `@n` appended at a version `n` above 1). The source
  resolves it through the registry's allow-list only.
- `data`: the message as a JSON object (the registry's cattrs converter).
- `id`: the message id. The dispatcher writes the stable command id (the same on every
  retry and after a restart: receivers deduplicate on it); the source uses it as the
  event's dedup id, and when it is missing, `"{stream}:{entry id}"`.
- `saga`, `key`, `kind` (dispatcher only): the saga and instance that sent the command,
  and `"send"` or `"compensate"`.
- `traceparent`, `tracestate`: W3C trace context. The dispatcher writes the command's
  (`DispatchMeta.trace`), when it has one; the source hands an event's on to the runtime
  (`run(trace=source.trace)`), so the handler's span and the commands continue it.

Both ends use the synchronous `redis` client in worker threads (`anyio.to_thread`), as
the stores do with their drivers: so they work on asyncio and on trio alike (the `redis`
package's asyncio client would tie them to asyncio).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio
import anyio.abc
import anyio.to_thread
import attrs

from ._records import Consumed, DispatchMeta
from ._registry import Registry
from .exceptions import SerializationError

if TYPE_CHECKING:
    import redis

__all__ = ["RedisStreamDispatcher", "RedisStreamSource", "encode_entry"]

log = logging.getLogger("sagaflow.redis")

StreamRoute = str | Mapping[type, str] | Callable[[Any], str]
"""Where `RedisStreamDispatcher` appends a command: one stream for all, a stream per
command type (looked up along the class's bases), or a function of the command."""


def encode_entry(registry: Registry, message: object, *, id: str | None = None) -> dict[str, str]:
    """The stream entry fields of `message` (`type`, `data` and, if given, `id`).

    For a producer written in Python: `client.xadd("orders", encode_entry(registry, event,
    id="order-1:placed"))` is what `RedisStreamSource` reads.

    Raises:
        UnknownTypeError: The message's class is not on the registry's allow-list.
        SerializationError: The message cannot be encoded as JSON.
    """
    type_name, data = registry.serializer.encode(message)
    fields = {"type": type_name, "data": data}
    if id is not None:
        fields["id"] = id
    return fields


_TRACE_FIELDS = ("traceparent", "tracestate")


def _text(value: Any) -> str:
    """A reply's text: bytes unless the client was made with `decode_responses=True`."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _socket_timeout(client: Any) -> float | None:
    """The socket timeout of `client`'s connections, in seconds, if it has one."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    value = kwargs.get("socket_timeout", kwargs.get("orig_socket_timeout"))
    return float(value) if isinstance(value, int | float) else None


def _consumer_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@attrs.frozen
class _Entry:
    entry_id: str
    event: Any
    event_id: str
    trace: dict[str, str] | None


class RedisStreamSource:
    """Events from a Redis stream through a consumer group, for `Runtime.run`.

    Use it as an async context manager and pass its `event_id`, `trace` and `ack` to
    `run`:
    each entry is acknowledged (`XACK`) only once its event is committed (or was a
    duplicate, unmatched or dead-lettered in the store), so a process that dies loses
    nothing: its pending entries are read again by a consumer of the same name when it
    starts, or taken over (`XAUTOCLAIM`) by another consumer of the group once they
    have been idle for `claim_idle` seconds. While an entry waits for its commit, the
    source keeps it fresh (`XCLAIM ... JUSTID`, which counts no delivery), so a live
    consumer's slow entries are not taken from it.

    An entry that cannot be decoded (no `type`, a type name not on the allow-list, JSON
    that does not fit the class) or that was delivered more than `max_deliveries` times
    (every consumer that took it died, say) is moved to the dead-letter stream: it is
    appended there with its fields and `error`, `source_stream`, `source_id`,
    `deliveries`, and acknowledged, in one transaction.

    The iteration ends after `stop()`; until then it waits for new entries. One source
    serves one `run` at a time; after a run that failed, open the source again (`async
    with`) for the next one: it reads the entries the failed run left unacknowledged
    again, and their ids make those already committed duplicates.

    Args:
        client: A synchronous `redis.Redis` client (thread-safe, with a pool of
            connections: the source uses up to three at once).
        registry: The registry whose serializer decodes the entries.
        stream: The stream's key.
        group: The consumer group; created (with the stream) if missing, reading the
            stream from its first entry.
        consumer: This consumer's name in the group. Give a stable one (a pod name)
            to have a restarted process take its own pending entries at once; the
            default is unique per process (host, pid, random).
        count: Entries read at once.
        block: Seconds one read waits for new entries before looking around again
            (for entries to take over); below the client's socket timeout (5 s by
            default in redis-py).
        claim_idle: Seconds an entry must have been pending with another consumer
            before this one takes it over.
        max_deliveries: Deliveries after which an entry goes to the dead-letter stream.
        dead_letter_stream: The dead-letter stream's key; default `"{stream}:dead"`.

    Raises:
        ValueError: An option is out of range.
    """

    def __init__(
        self,
        client: redis.Redis,
        registry: Registry,
        *,
        stream: str,
        group: str,
        consumer: str | None = None,
        count: int = 256,
        block: float = 1.0,
        claim_idle: float = 60.0,
        max_deliveries: int = 10,
        dead_letter_stream: str | None = None,
    ) -> None:
        if count < 1 or max_deliveries < 1:
            raise ValueError("RedisStreamSource: count and max_deliveries must be >= 1")
        if not block > 0 or claim_idle < 0:
            raise ValueError(
                "RedisStreamSource: block must be > 0 seconds and claim_idle >= 0 seconds"
            )
        timeout = _socket_timeout(client)
        if timeout is not None and block >= timeout:
            raise ValueError(
                f"RedisStreamSource: block={block} s is not below the client's socket "
                f"timeout ({timeout} s), so a read that waits for entries would time out: "
                "lower block, or raise the client's socket_timeout"
            )
        self._client = client
        self._serializer = registry.serializer
        self.stream = stream
        self.group = group
        self.consumer = consumer or _consumer_name()
        self.dead_letter_stream = dead_letter_stream or f"{stream}:dead"
        self._count = count
        self._block_ms = max(1, round(block * 1000))
        self._claim_idle_ms = round(claim_idle * 1000)
        self._max_deliveries = max_deliveries
        self._buffer: deque[_Entry] = deque()
        self._inflight: deque[_Entry] = deque()
        self._held: set[str] = set()  # ids of the entries in the buffer or in flight
        self._last: _Entry | None = None
        self._history = True  # first read our own pending entries (a restart)
        self._history_from = "0"
        self._claim_from = "0-0"
        self._next_claim = 0.0
        self._stopped = False
        self._reading: anyio.CancelScope | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        # Claims and acknowledgements one at a time: a claim that ran while an entry
        # was being acknowledged would hand it out again.
        self._claims: anyio.Lock | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    def __repr__(self) -> str:
        return (
            f"<RedisStreamSource stream={self.stream!r} group={self.group!r} "
            f"consumer={self.consumer!r}>"
        )

    async def __aenter__(self) -> Self:
        if self._tg is not None:
            raise RuntimeError(f"{self!r} is already open")
        self._limiter = anyio.CapacityLimiter(3)
        self._claims = anyio.Lock()
        self._stopped = False
        self._history, self._history_from = True, "0"
        self._buffer.clear()
        self._inflight.clear()
        self._held.clear()
        await self._call(self._create_group)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        tg.start_soon(self._keep_fresh)
        self._tg = tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg, self._tg = self._tg, None
        assert tg is not None
        tg.cancel_scope.cancel()
        await tg.__aexit__(None, None, None)
        return None

    def stop(self) -> None:
        """End the iteration: a read under way is abandoned, and `run` returns once
        the events already taken are acknowledged. What the abandoned read got stays
        pending for this consumer (read again at its next start, or taken over)."""
        self._stopped = True
        if self._reading is not None:
            self._reading.cancel()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        if self._tg is None:
            raise RuntimeError(
                f"{self!r} is not open: use it as `async with RedisStreamSource(...) as source`"
            )
        buffer = self._buffer
        while not buffer:
            if self._stopped:
                raise StopAsyncIteration
            await self._fill()
        entry = buffer.popleft()
        self._inflight.append(entry)
        self._last = entry
        return entry.event

    def event_id(self, event: object) -> str:
        """The dedup id of the event just taken (for `run(id=...)`): the entry's `id`
        field, or `"{stream}:{entry id}"`.

        Raises:
            RuntimeError: `event` is not the event this source gave last.
        """
        return self._last_entry(event, "event_id").event_id

    def _last_entry(self, event: object, method: str) -> _Entry:
        last = self._last
        if last is None or last.event is not event:
            raise RuntimeError(
                f"{self!r}: {method}() is for the event the source gave last; pass it "
                f"as run(source, id=source.event_id, trace=source.trace, ack=source.ack)"
            )
        return last

    def trace(self, event: object) -> dict[str, str] | None:
        """The trace context of the event just taken (for `run(trace=...)`): the
        entry's `traceparent` and `tracestate` fields, or `None` without them.

        Raises:
            RuntimeError: `event` is not the event this source gave last.
        """
        return self._last_entry(event, "trace").trace

    async def ack(self, consumed: list[Consumed]) -> None:
        """Acknowledge the entries of events `run` is done with (for `run(ack=...)`).

        Every outcome is acknowledged: a dead-lettered event is kept in the saga
        store's dead letters (see `Admin`), not in the stream.

        Raises:
            RuntimeError: The events are not the ones this source gave, in its order.
        """
        inflight = self._inflight
        ids: list[str] = []
        for done in consumed:
            entry = inflight.popleft() if inflight else None
            if entry is None or entry.event is not done.event:
                raise RuntimeError(
                    f"{self!r}: ack() got an event this source did not give next; one "
                    "source serves one run(source, id=source.event_id, trace=source.trace, "
                    "ack=source.ack)"
                )
            ids.append(entry.entry_id)
        if ids:
            assert self._claims is not None
            async with self._claims:
                await self._call(self._client.xack, self.stream, self.group, *ids)
                # Only now: until acknowledged, a claim may still find them pending.
                self._held.difference_update(ids)

    # -- reading ---------------------------------------------------------------------

    async def _call(self, fn: Callable[..., Any], *args: Any, abandon: bool = False) -> Any:
        return await anyio.to_thread.run_sync(
            fn, *args, limiter=self._limiter, abandon_on_cancel=abandon
        )

    def _create_group(self) -> None:
        import redis

        try:
            self._client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _fill(self) -> None:
        """Read the next entries into the buffer: our own pending ones first (after a
        restart), then those of dead consumers when a look is due, then new ones."""
        if self._history:
            entries = await self._call(self._read, self._history_from)
            if not entries:
                self._history = False
                return
            await self._take(entries, counted=True)
            return
        now = anyio.current_time()
        if now >= self._next_claim:
            self._next_claim = now + max(self._claim_idle_ms / 1000 / 2, 0.05)
            assert self._claims is not None
            async with self._claims:
                claimed = await self._call(self._autoclaim)
                if claimed:
                    await self._take(claimed, counted=True)
            if claimed:
                return
        if self._stopped:
            return
        entries = []  # stays empty if `stop()` abandons the read
        with anyio.CancelScope() as self._reading:
            entries = await self._call(self._read, ">", abandon=True)
        self._reading = None
        if entries:
            await self._take(entries, counted=False)

    def _read(self, start: str) -> list[tuple[Any, Any]]:
        block = None if start != ">" else self._block_ms
        reply: Any = self._client.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=self._count, block=block
        )
        if not reply:
            return []
        entries: list[tuple[Any, Any]] = reply[0][1]
        if start != ">" and entries:
            # Paging through our own pending entries: go on after the last one.
            self._history_from = _text(entries[-1][0])
        return entries

    def _autoclaim(self) -> list[tuple[Any, Any]]:
        reply: Any = self._client.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            self._claim_idle_ms,
            start_id=self._claim_from,
            count=self._count,
        )
        next_start, entries = reply[0], reply[1]
        self._claim_from = _text(next_start)
        return [e for e in entries if e is not None]

    async def _take(self, entries: list[tuple[Any, Any]], *, counted: bool) -> None:
        """Decode entries into the buffer; dead-letter what cannot be decoded or was
        delivered too often."""
        deliveries: dict[str, int] = {}
        if counted:
            deliveries = await self._call(self._deliveries, [_text(e[0]) for e in entries])
        dead: list[tuple[str, dict[str, str], str, int]] = []
        for raw_id, raw_fields in entries:
            entry_id = _text(raw_id)
            if entry_id in self._held:
                continue  # ours already (a claim that found our own idle entries)
            fields = {_text(k): _text(v) for k, v in (raw_fields or {}).items()}
            times = deliveries.get(entry_id, 1)
            if not raw_fields:
                dead.append((entry_id, fields, "the entry was deleted from the stream", times))
                continue
            if times > self._max_deliveries:
                error = (
                    f"delivered {times} times (max_deliveries={self._max_deliveries}): "
                    "every consumer that took it stopped before acknowledging it"
                )
                dead.append((entry_id, fields, error, times))
                continue
            try:
                event = self._decode(entry_id, fields)
            except SerializationError as exc:
                dead.append((entry_id, fields, str(exc), times))
                continue
            event_id = fields.get("id") or f"{self.stream}:{entry_id}"
            trace = {k: fields[k] for k in _TRACE_FIELDS if fields.get(k)} or None
            self._buffer.append(_Entry(entry_id, event, event_id, trace))
            self._held.add(entry_id)
        if dead:
            await self._call(self._dead_letter, dead)

    def _decode(self, entry_id: str, fields: dict[str, str]) -> Any:
        where = f"entry {entry_id} of stream {self.stream!r}"
        type_name, data = fields.get("type"), fields.get("data")
        if not type_name or data is None:
            missing = " and ".join(f for f in ("type", "data") if not fields.get(f))
            raise SerializationError(
                f"{where} has no {missing} field: a message entry has `type` (the stored "
                "type name) and `data` (its JSON)"
            )
        try:
            json.loads(data)
        except ValueError as exc:
            raise SerializationError(f"{where}: its data is not JSON: {exc}") from None
        try:
            return self._serializer.decode(type_name, data)
        except SerializationError as exc:
            raise SerializationError(f"{where}: {exc}") from exc

    def _deliveries(self, ids: list[str]) -> dict[str, int]:
        pipe = self._client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(self.stream, self.group, entry_id, entry_id, 1)
        counts: dict[str, int] = {}
        for rows in pipe.execute():
            for row in rows:
                counts[_text(row["message_id"])] = int(row["times_delivered"])
        return counts

    def _dead_letter(self, dead: list[tuple[str, dict[str, str], str, int]]) -> None:
        pipe = self._client.pipeline(transaction=True)
        for entry_id, fields, error, times in dead:
            letter = {
                **fields,
                "error": error,
                "source_stream": self.stream,
                "source_id": entry_id,
                "deliveries": str(times),
            }
            pipe.xadd(self.dead_letter_stream, letter)  # type: ignore[arg-type]
            pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()

    async def _keep_fresh(self) -> None:
        """Reset the idle time of the entries we hold, so no one takes them over."""
        interval = max(self._claim_idle_ms / 1000 / 3, 0.05)
        while True:
            await anyio.sleep(interval)
            ids = [e.entry_id for e in self._inflight]
            if not ids:
                continue
            try:
                await self._call(self._touch, ids)
            except Exception as exc:  # noqa: BLE001 - tried again at the next interval
                log.warning(
                    "could not refresh %d pending entries of stream %r (group %r): %s: %s",
                    len(ids),
                    self.stream,
                    self.group,
                    type(exc).__name__,
                    exc,
                )

    def _touch(self, ids: list[str]) -> None:
        # Taken over entries may be older than new ones: the range spans them all.
        first, last = min(ids, key=_entry_order), max(ids, key=_entry_order)
        mine: Any = self._client.xpending_range(
            self.stream, self.group, first, last, 2 * len(ids) + 1000, self.consumer
        )
        held = set(ids)
        still: list[Any] = [_text(r["message_id"]) for r in mine if _text(r["message_id"]) in held]
        if still:
            self._client.xclaim(self.stream, self.group, self.consumer, 0, still, justid=True)


def _entry_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id (`"ms-seq"`) as something that sorts like the stream."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@attrs.define(eq=False)
class RedisStreamDispatcher:
    """A dispatcher (`Runtime(dispatch=...)`) that appends each command to a stream.

    Each entry carries the stable command id, the type name and the JSON payload, the
    saga, key and kind, and the trace context if the command has one (see the module's
    wire format), so receivers can deduplicate and decode it in any language. A command
    is dispatched once `XADD` returned; a failure (Redis unreachable) is retried like any
    dispatcher failure, under the same id.

    Args:
        client: A synchronous `redis.Redis` client.
        registry: The registry whose serializer encodes the commands.
        stream: Where commands go: one stream for all, a mapping from command type to
            stream (looked up along the class's bases), or a function of the command.
        maxlen: Trim each stream to about this many entries (`XADD MAXLEN ~`), or keep
            them all (`None`).

    Raises:
        TypeError: `stream` is none of those (a mapping whose keys are not classes or
            whose values are not strings, say).
    """

    _client: redis.Redis = attrs.field(alias="client")
    _registry: Registry = attrs.field(alias="registry")
    _stream: StreamRoute = attrs.field(alias="stream")
    _maxlen: int | None = attrs.field(default=None, kw_only=True, alias="maxlen")
    _queue: list[_Append] = attrs.field(factory=list, init=False)
    _flushing: bool = attrs.field(default=False, init=False)
    _changed: anyio.Event | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        route = self._stream
        if isinstance(route, Mapping):
            bad = [
                (k, v)
                for k, v in route.items()
                if not isinstance(k, type) or not isinstance(v, str)
            ]
            if bad:
                raise TypeError(
                    "RedisStreamDispatcher(stream={...}) maps command classes to stream "
                    f"names (str); got {bad[0][0]!r}: {bad[0][1]!r}"
                )
        elif not isinstance(route, str) and not callable(route):
            raise TypeError(
                "RedisStreamDispatcher(stream=...) takes a stream name, a mapping from "
                f"command class to stream name, or a function of the command; got {route!r}"
            )

    def stream_for(self, command: object) -> str:
        """The stream `command` goes to.

        Raises:
            LookupError: The mapping has no entry for the command's class or its bases.
            TypeError: The function returned something other than a non-empty str.
        """
        route = self._stream
        if isinstance(route, str):
            return route
        if isinstance(route, Mapping):
            for cls in type(command).__mro__:
                found = route.get(cls)
                if found is not None:
                    return found
            raise LookupError(
                f"RedisStreamDispatcher has no stream for {type(command).__qualname__}: "
                "add its class (or a base class) to stream={...}"
            )
        name = route(command)
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"the stream function of RedisStreamDispatcher returned {name!r} for "
                f"{type(command).__qualname__}; it must return a stream name (str)"
            )
        return name

    def fields(self, command: object, meta: DispatchMeta) -> dict[str, str]:
        """The entry fields of `command` (see the module's wire format)."""
        fields = encode_entry(self._registry, command, id=meta.id)
        fields.update(saga=meta.saga, key=meta.key, kind=meta.kind)
        fields.update(_trace_fields(meta.trace))
        return fields

    async def __call__(self, command: object, meta: DispatchMeta) -> None:
        append = _Append(self.stream_for(command), self.fields(command, meta))
        self._queue.append(append)
        # Group commit: whoever finds no flush under way writes everything queued by
        # then in one pipeline (one thread hop, one round trip); the others wait.
        while not append.done:
            if self._flushing:
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()
                continue
            await self._flush()
        if append.error is not None:
            raise append.error

    async def _flush(self) -> None:
        self._flushing = True
        batch, self._queue = self._queue, []
        try:
            # Shielded: once taken, a batch is written (or fails) as a whole, so that
            # none of its callers waits for a flush that was cancelled half-way.
            with anyio.CancelScope(shield=True):
                try:
                    await anyio.to_thread.run_sync(self._append_all, batch)
                except Exception as exc:  # noqa: BLE001 - each caller raises it
                    for append in batch:
                        append.error = exc
                for append in batch:
                    append.done = True
        finally:
            self._flushing = False
            changed, self._changed = self._changed, None
            if changed is not None:
                changed.set()

    def _append_all(self, batch: list[_Append]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for append in batch:
            if self._maxlen is None:
                pipe.xadd(append.stream, append.fields)  # type: ignore[arg-type]
            else:
                pipe.xadd(append.stream, append.fields, maxlen=self._maxlen, approximate=True)  # type: ignore[arg-type]
        pipe.execute()


@attrs.define(eq=False)
class _Append:
    """One command waiting to be appended by the next flush."""

    stream: str
    fields: dict[str, str]
    done: bool = False
    error: Exception | None = None


def _trace_fields(trace: Mapping[str, str] | None) -> dict[str, str]:
    """The W3C trace context fields (`traceparent`, `tracestate`) of a command's trace
    carrier, if it has one."""
    if not trace:
        return {}
    return {k: v for k, v in trace.items() if k in _TRACE_FIELDS and v}
