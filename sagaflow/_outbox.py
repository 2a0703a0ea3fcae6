"""The outbox dispatcher: per-instance order, bounded concurrency, retries, give-ups."""

from __future__ import annotations

import functools
import heapq
import inspect
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import anyio
import attrs

from ._calls import Interrupt, call
from ._clock import SystemClock
from ._hooks import Hooks, trace_carrier, traced
from ._records import DispatchMeta
from ._retry import RetryPolicy
from ._serialization import Serializer
from ._sync import Activity
from .exceptions import DispatcherError, DispatchError
from .stores._protocol import (
    COMPENSATION_FAILED,
    COMPLETING,
    Changes,
    OutboxRecord,
    OutboxUpdate,
    Store,
)

__all__ = [
    "Counters",
    "Dispatchers",
    "Outbox",
    "call_dispatch",
    "checked_dispatcher",
    "error_text",
    "note_failure",
    "returned_false",
]

log = logging.getLogger("sagaflow.outbox")

_Ref = tuple[str, str]


@attrs.define(eq=False)
class Counters:
    """Mutable counters behind `Runtime.statistics()`."""

    events_handled: int = 0
    events_duplicate: int = 0
    events_unmatched: int = 0
    events_dead_lettered: int = 0
    dead_letters: int = 0
    handler_retries: int = 0
    commands_dispatched: int = 0
    command_retries: int = 0
    commands_failed: int = 0
    batches_committed: int = 0
    conflicts: int = 0
    orphan_sagas: int = 0


@attrs.define(eq=False)
class _Entry:
    row: OutboxRecord
    command: Any = None
    decoded: bool = False
    generation: int = 0


def error_text(exc: BaseException) -> str:
    """An exception as `"Type: message"`, the form stored and given to `CommandFailed`."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def checked_dispatcher(dispatch: object) -> Callable[[Any, DispatchMeta], Awaitable[Any]]:
    """The dispatcher to call, checked once: a plain `def` is refused here, not on its
    first command.

    Coroutine functions, objects whose `__call__` is `async def` and `functools.partial`
    of either are used as they are. Other callables that may return an awaitable (a
    wrapper of a coroutine function, a builtin) are wrapped so that a call returning
    something that cannot be awaited fails that attempt with a clear error.

    Raises:
        DispatcherError: `dispatch` is not callable, a class, a plain `def` function or
            method, or an object whose `__call__` is a plain `def`.
    """
    target = dispatch
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.iscoroutinefunction(target):
        return dispatch  # type: ignore[return-value]
    fix = "(command, meta)` function, or an object with an `async def __call__`"
    if not callable(target):
        raise DispatcherError(
            f"the dispatcher {dispatch!r} is not callable: pass an `async def {fix}"
        )
    if isinstance(target, type):
        name = target.__qualname__
        raise DispatcherError(
            f"the dispatcher {name} is a class, not an instance of it: pass dispatch={name}(...)"
        )
    if inspect.isfunction(target) or inspect.ismethod(target):
        if inspect.iscoroutinefunction(inspect.unwrap(target)):
            return _awaiting(dispatch, target.__qualname__)  # a wrapper of one
        raise DispatcherError(
            f"the dispatcher {target.__qualname__!r} is a plain `def` function, but the "
            "runtime awaits what the dispatcher returns: define it with `async def "
            f"{target.__name__}{fix}"
        )
    call = type(target).__call__
    if inspect.iscoroutinefunction(call):
        return dispatch  # type: ignore[return-value]
    name = f"a {type(target).__qualname__} object"
    if inspect.isfunction(call):
        raise DispatcherError(
            f"the dispatcher ({name}) has a plain `def __call__`, but the runtime awaits "
            "what the dispatcher returns: define it as `async def __call__(self, command, "
            "meta)`"
        )
    return _awaiting(dispatch, name)


def _awaiting(dispatch: Any, name: str) -> Callable[[Any, DispatchMeta], Awaitable[Any]]:
    """`dispatch`, failing the attempt clearly when a call gives no awaitable."""

    async def call(command: Any, meta: DispatchMeta) -> Any:
        result = dispatch(command, meta)
        if not inspect.isawaitable(result):
            raise DispatcherError(
                f"the dispatcher {name} returned {result!r} for a {type(command).__name__}, "
                "which cannot be awaited: define it with `async def`"
            )
        return await result

    return call


def returned_false() -> DispatchError:
    """The error of an attempt whose dispatcher returned `False`."""
    return DispatchError(
        "the dispatcher returned False, which reports a failed dispatch "
        "(return None or True for success, or raise to say why it failed)"
    )


async def call_dispatch(
    dispatch: Callable[[Any, DispatchMeta], Any],
    command: Any,
    meta: DispatchMeta,
    timeout: float | None,
) -> Any:
    """Call the dispatcher within `dispatch_timeout` (see `_calls.call`).

    Raises:
        TimeoutError: The call took longer than `timeout`.
        RuntimeError: The dispatcher raised a cancellation nobody asked for.
        DispatchError: The dispatcher returned `False` (a failed attempt).
    """
    result = await call(
        dispatch(command, meta),
        timeout,
        lambda: (
            f"the dispatch of {type(command).__name__} for {meta.saga}/{meta.key} "
            f"(attempt {meta.attempt})"
        ),
        "dispatch_timeout",
    )
    if result is False:
        raise returned_false()


def note_failure(
    row: OutboxRecord,
    attempt: int,
    exc: BaseException,
    *,
    retryable: bool,
    policy: RetryPolicy,
    clock: Any,
    counters: Counters,
    hooks: Hooks | None,
) -> tuple[str, float | None]:
    """Count a failed dispatch, and log and report it if it is tried again.

    Shared by the in-process outbox and the cluster one, which differ only in how they
    keep the retry and hand over a give-up.

    Returns:
        The error as stored (`"Type: message"`) and the due time of the next attempt,
        or `None` when the command failed for good.
    """
    error = error_text(exc)
    extra = {"saga": row.saga, "key": row.key, "command_id": row.id}
    if retryable and not policy.gives_up_after(attempt):
        now = clock.now()
        due: float = now + policy.delay(attempt)
        counters.command_retries += 1
        if hooks is not None:
            trace = trace_carrier(row.trace)
            hooks.command_retry(
                DispatchMeta(row.id, row.saga, row.key, attempt, row.kind, trace),
                error,
                due - now,
            )
        log.warning(
            "command %s of %s/%s failed (attempt %d), retrying: %s",
            row.type_name,
            row.saga,
            row.key,
            attempt,
            error,
            extra=extra,
        )
        return error, due
    # Logged once its instance has dealt with it: at INFO if its CommandFailed handler
    # took it, at WARNING as a dead letter if not (`_batch.py`, `_report.py`).
    counters.commands_failed += 1
    return error, None


@attrs.define(eq=False)
class Dispatchers:
    """The instances that have a command to dispatch, the workers that take them in turn,
    and the timer that brings an instance back when its retry falls due.

    Both outboxes (the in-process one and the cluster one) dispatch through one of these;
    they differ in where commands come from and how delivery is recorded. An instance put
    here counts as work in hand (`Activity`) until a worker is done with it; one waiting
    for a retry does not, until its retry falls due.
    """

    activity: Activity
    clock: Any
    _ready: deque[_Ref] = attrs.field(factory=deque, init=False)
    _ready_event: anyio.Event = attrs.field(factory=anyio.Event, init=False)
    _retries: list[tuple[float, int, _Ref]] = attrs.field(factory=list, init=False)
    _retry_seq: int = attrs.field(default=0, init=False)
    _retry_scope: anyio.CancelScope | None = attrs.field(default=None, init=False)
    _retry_target: float = attrs.field(default=math.inf, init=False)
    _retry_event: anyio.Event = attrs.field(factory=anyio.Event, init=False)

    def put(self, refs: list[_Ref]) -> None:
        """Hand these instances to the workers."""
        if refs:
            self.activity.begin(len(refs))
            self._ready.extend(refs)
            self._ready_event.set()

    def retry_at(self, ref: _Ref, due: float) -> None:
        """Hand the instance to the workers again at `due`."""
        self._retry_seq += 1
        heapq.heappush(self._retries, (due, self._retry_seq, ref))
        if self._retry_scope is not None and due < self._retry_target:
            self._retry_scope.cancel()
        self._retry_event.set()

    def next_retry(self) -> float | None:
        """When the earliest retry falls due, if one waits."""
        return self._retries[0][0] if self._retries else None

    async def run(self, concurrency: int, dispatch: Callable[[_Ref], Awaitable[None]]) -> None:
        """Run `concurrency` workers calling `dispatch(ref)`, and the retry timer."""
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(self._worker, dispatch)
            tg.start_soon(self._retry_loop)

    async def _worker(self, dispatch: Callable[[_Ref], Awaitable[None]]) -> None:
        while True:
            while not self._ready:
                if self._ready_event.is_set():
                    self._ready_event = anyio.Event()
                await self._ready_event.wait()
            ref = self._ready.popleft()
            try:
                await dispatch(ref)
            except (KeyboardInterrupt, SystemExit) as exc:
                raise Interrupt(exc) from None
            finally:
                self.activity.end()

    async def _retry_loop(self) -> None:
        while True:
            if not self._retries:
                self._retry_event = anyio.Event()
                await self._retry_event.wait()
                continue
            self._retry_target = self._retries[0][0]
            with anyio.CancelScope() as scope:
                self._retry_scope = scope
                await self.clock.sleep_until(self._retry_target)
            self._retry_scope = None
            self._retry_target = math.inf
            now = self.clock.now()
            due: list[_Ref] = []
            while self._retries and self._retries[0][0] <= now:
                due.append(heapq.heappop(self._retries)[2])
            self.put(due)


@attrs.define(eq=False)
class Outbox:
    """Dispatches committed commands, one at a time per instance, in their order.

    A command that fails is retried after a backoff; later commands of its instance
    wait (other instances do not). One that fails for good is handed back to the
    instance through `on_failed`, and the instance stays held until `release` is called.
    Delivered rows are removed from the store in batches by a flusher task.
    """

    store: Store
    dispatch: Callable[[Any, DispatchMeta], Any]
    serializer: Serializer
    policy: RetryPolicy
    activity: Activity
    counters: Counters
    on_failed: Callable[[OutboxRecord, Any], None]
    on_empty: Callable[[_Ref], None]
    clock: Any = attrs.field(factory=SystemClock)
    concurrency: int = 16
    sweep_interval: float = 5.0
    hooks: Hooks | None = None
    sagas: Collection[str] | None = None
    """The registered sagas: rows of others are kept in the store, not dispatched."""
    dispatch_timeout: float | None = None

    _queues: dict[_Ref, deque[_Entry]] = attrs.field(factory=dict, init=False)
    _busy: set[_Ref] = attrs.field(factory=set, init=False)
    _held: set[_Ref] = attrs.field(factory=set, init=False)
    _awaiting: set[_Ref] = attrs.field(factory=set, init=False)
    _known: set[str] = attrs.field(factory=set, init=False)
    _sweep_lock: anyio.Lock = attrs.field(factory=anyio.Lock, init=False)
    _next_sweep: float = attrs.field(default=math.inf, init=False)
    _generation: int = attrs.field(default=0, init=False)
    _flush_retry: float | None = attrs.field(default=None, init=False)
    _completing: set[_Ref] = attrs.field(factory=set, init=False)
    _dispatchers: Dispatchers = attrs.field(init=False)
    _deletes: list[str] = attrs.field(factory=list, init=False)
    _updates: list[OutboxUpdate] = attrs.field(factory=list, init=False)
    _flush_event: anyio.Event = attrs.field(factory=anyio.Event, init=False)
    _carriers: int = attrs.field(default=0, init=False)
    _carried: anyio.Event = attrs.field(factory=anyio.Event, init=False)
    _swept_away: set[str] | None = attrs.field(default=None, init=False)
    _depth: int = attrs.field(default=0, init=False)
    _closing: bool = attrs.field(default=False, init=False)

    @_dispatchers.default
    def _make_dispatchers(self) -> Dispatchers:
        return Dispatchers(self.activity, self.clock)

    @property
    def depth(self) -> int:
        """Commands waiting or in flight."""
        return self._depth

    def next_wakeup(self) -> float | None:
        """When the earliest retry (of a command or of a failed flush) falls due."""
        retry = self._dispatchers.next_retry()
        if self._flush_retry is None:
            return retry
        return self._flush_retry if retry is None else min(retry, self._flush_retry)

    def has_pending(self, ref: _Ref) -> bool:
        """Whether the instance still has commands waiting or in flight."""
        return ref in self._queues

    def add(self, rows: list[OutboxRecord], commands: list[Any] | None = None) -> None:
        """Hand over committed rows, in their order; `commands` are their decoded values."""
        known, queues = self._known, self._queues
        held, awaiting, busy = self._held, self._awaiting, self._busy
        self._generation += 1
        generation = self._generation
        ready: list[_Ref] = []
        for i, row in enumerate(rows):
            if row.id in known:
                continue
            known.add(row.id)
            ref = (row.saga, row.key)
            if commands is not None:
                entry = _Entry(row, commands[i], True, generation)
            else:
                entry = _Entry(row, None, False, generation)
            queue = queues.get(ref)
            if queue is None:
                queues[ref] = deque((entry,))
                if ref not in held and ref not in awaiting and ref not in busy:
                    busy.add(ref)
                    ready.append(ref)
            elif queue[-1].row.seq < row.seq:
                queue.append(entry)
            else:
                # An operator's retry puts a dead letter back at its old place.
                at = next(i for i, e in enumerate(queue) if e.row.seq > row.seq)
                queue.insert(at, entry)
            self._depth += 1
        self._dispatchers.put(ready)

    def completing(self, ref: _Ref) -> None:
        """The instance completed: call `on_empty` once its queue has drained."""
        if ref in self._queues:
            self._completing.add(ref)
        else:
            self.on_empty(ref)

    def hold(self, ref: _Ref) -> None:
        """Stop dispatching the instance's commands (compensation failed)."""
        self._awaiting.discard(ref)
        self._held.add(ref)

    def drop_head(self, ref: _Ref, row_id: str) -> None:
        """Remove the instance's first command (it failed for good and was handled)."""
        queue = self._queues.get(ref)
        if queue and queue[0].row.id == row_id:
            queue.popleft()
            self._depth -= 1
            self._forget_id(row_id)
            if not queue:
                del self._queues[ref]

    def release(self, ref: _Ref) -> None:
        """Resume dispatching an instance held after a give-up or a failed compensation."""
        self._held.discard(ref)
        self._awaiting.discard(ref)
        queue = self._queues.get(ref)
        if queue is None:
            if ref in self._completing:
                self._completing.discard(ref)
                self.on_empty(ref)
            return
        if ref not in self._busy:
            self._make_ready(ref)

    def forget(self, ref: _Ref) -> None:
        """Drop everything known about an instance (it was deleted)."""
        queue = self._queues.pop(ref, None)
        if queue:
            self._depth -= len(queue)
            for entry in queue:
                self._forget_id(entry.row.id)
        self._held.discard(ref)
        self._awaiting.discard(ref)
        self._completing.discard(ref)

    def _forget_id(self, row_id: str) -> None:
        # The id stays known while its deletion waits for the flusher, so that a sweep
        # reading the store meanwhile does not take the row for a new one.
        self._deletes.append(row_id)
        self._mark_dirty()

    def _make_ready(self, ref: _Ref) -> None:
        self._busy.add(ref)
        self._dispatchers.put([ref])

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the workers, the retry timer and the flusher until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._dispatchers.run, self.concurrency, self._dispatch_head)
            tg.start_soon(self._flush_loop)
            tg.start_soon(self._sweep_loop)
            task_status.started()

    async def _dispatch_head(self, ref: _Ref) -> None:
        """Dispatch the instance's commands in order until its queue is empty or waits."""
        queue = self._queues.get(ref)
        hooks, dispatch, timeout = self.hooks, self.dispatch, self.dispatch_timeout
        held, awaiting = self._held, self._awaiting
        while queue and ref not in held and ref not in awaiting:
            entry = queue[0]
            row = entry.row
            attempt = row.attempts + 1
            try:
                if not entry.decoded:
                    entry.command = self.serializer.decode(row.type_name, row.payload)
                    entry.decoded = True
                meta = DispatchMeta(
                    row.id, row.saga, row.key, attempt, row.kind, trace_carrier(row.trace)
                )
                if hooks is None:
                    await call_dispatch(dispatch, entry.command, meta, timeout)
                else:
                    span = hooks.dispatching(entry.command, meta)
                    if span is None:
                        await call_dispatch(dispatch, entry.command, meta, timeout)
                    else:
                        with span:
                            meta = traced(hooks, meta)
                            await call_dispatch(dispatch, entry.command, meta, timeout)
            except Exception as exc:  # noqa: BLE001 - any failure of the dispatcher counts
                self._failed(ref, entry, attempt, exc)
                return
            self.counters.commands_dispatched += 1
            queue.popleft()
            self._depth -= 1
            self._deletes.append(row.id)  # not cached: a commit may take the list meanwhile
            self._mark_dirty()
        self._busy.discard(ref)
        if queue is None or queue:
            return
        del self._queues[ref]
        if ref in self._completing:
            self._completing.discard(ref)
            self.on_empty(ref)

    def _failed(self, ref: _Ref, entry: _Entry, attempt: int, exc: Exception) -> None:
        row = entry.row
        error, due = note_failure(
            row,
            attempt,
            exc,
            retryable=entry.decoded,
            policy=self.policy,
            clock=self.clock,
            counters=self.counters,
            hooks=self.hooks,
        )
        if due is not None:
            entry.row = attrs.evolve(row, attempts=attempt, due=due, error=error)
            self._updates.append(OutboxUpdate(row.id, attempt, due, error))
            self._mark_dirty()
            self._dispatchers.retry_at(ref, due)
            return
        self._busy.discard(ref)
        self._awaiting.add(ref)
        self.on_failed(
            attrs.evolve(row, attempts=attempt, error=error),
            entry.command if entry.decoded else None,
        )

    def _mark_dirty(self) -> None:
        if not self._flush_event.is_set():
            self.activity.begin()
            self._flush_event.set()

    # -- recording delivered and retried commands -----------------------------------
    #
    # A shard about to commit a batch takes the pending deletes and updates into its
    # own transaction (one commit instead of two); the flusher writes them itself only
    # when no shard batch is under way to carry them.

    def begin_carrying(self) -> None:
        """A shard batch started: it will take the pending records into its commit."""
        self._carriers += 1

    def end_carrying(self) -> None:
        """The shard batch took the pending records (or ended without a commit)."""
        self._carriers -= 1
        self._carried.set()

    def take_records(self) -> tuple[list[str], list[OutboxUpdate]]:
        """Hand the pending deletes and updates to a commit about to happen."""
        deletes, self._deletes = self._deletes, []
        updates, self._updates = self._updates, []
        return deletes, updates

    def recorded(self, deletes: list[str]) -> None:
        """The deletes taken by `take_records` are committed."""
        self._known.difference_update(deletes)
        if self._swept_away is not None:
            self._swept_away.update(deletes)

    def give_back(self, deletes: list[str], updates: list[OutboxUpdate]) -> None:
        """The commit that took these records failed: they are pending again."""
        if deletes or updates:
            self._deletes[:0] = deletes
            self._updates[:0] = updates
            self._mark_dirty()

    async def _flush_loop(self) -> None:
        failures = 0
        while True:
            await self._flush_event.wait()
            # Let more deliveries pile up behind this flush: one commit for many rows.
            await anyio.lowlevel.checkpoint()
            while self._carriers and (self._deletes or self._updates):
                self._carried = anyio.Event()
                await self._carried.wait()
            self._flush_event = anyio.Event()
            deletes, updates = self.take_records()
            if not deletes and not updates:
                self.activity.end()
                continue
            try:
                await self.store.commit(Changes(outbox_deletes=deletes, outbox_updates=updates))
                self.recorded(deletes)
                failures = 0
                continue
            except Exception as exc:  # noqa: BLE001 - a store hiccup must not kill the runtime
                # Until it is recorded, a delivered command would be dispatched again
                # after a restart (at least once): nothing is lost. Try again later,
                # not counted as work in hand, so drain() does not wait for the backoff.
                failures += 1
                log.error("could not record delivered commands: %s", error_text(exc))
                self._deletes[:0] = deletes
                self._updates[:0] = updates
            finally:
                self.activity.end()
            self._flush_retry = self.clock.now() + self.policy.delay(failures)
            await self.clock.sleep_until(self._flush_retry)
            self._flush_retry = None
            self._mark_dirty()

    async def recover(self) -> None:
        """Load the commands a previous run left in the store, in order."""
        await self.sweep()

    async def sweep(self) -> None:
        """Pick up what changed in the store behind the runtime's back.

        An operator may put a dead letter back in the outbox, resume or abort an
        instance whose compensation failed, or abort any instance; the runtime notices
        within one `sweep_interval`.
        """
        async with self._sweep_lock:
            held_before = set(self._held)
            generation = self._generation
            # Rows whose deletion commits while we read are delivered: not new ones.
            swept_away: set[str] = set()
            self._swept_away = swept_away
            try:
                failed = {
                    (r.saga, r.key)
                    for r in await self.store.list_instances(status=COMPENSATION_FAILED)
                }
                completing = {
                    (r.saga, r.key) for r in await self.store.list_instances(status=COMPLETING)
                }
                rows = await self.store.list_outbox()
            finally:
                self._swept_away = None
            sagas = self.sagas
            rows = [
                row
                for row in rows
                if row.id not in swept_away and (sagas is None or row.saga in sagas)
            ]
            # What the shards changed while we read is theirs: only act on what we saw.
            for ref in held_before - failed:
                if ref in self._held:  # resumed (or aborted) by an operator
                    if ref in completing:
                        self._completing.add(ref)
                    self.release(ref)
            self._held.update(failed)
            self._drop_gone({row.id for row in rows}, generation)
            self.add(rows)

    def _drop_gone(self, present: set[str], generation: int) -> None:
        """Drop queued commands whose rows an operator deleted (an aborted instance)."""
        for ref, queue in list(self._queues.items()):
            in_flight = ref in self._busy
            gone = [
                e
                for i, e in enumerate(queue)
                if e.generation <= generation
                and e.row.id not in present
                and not (i == 0 and in_flight)
            ]
            for entry in gone:
                queue.remove(entry)
                self._depth -= 1
                self._forget_id(entry.row.id)
            if not queue:
                del self._queues[ref]
                self._busy.discard(ref)
                self._completing.discard(ref)

    def next_sweep(self) -> float:
        """When the next sweep is due."""
        return self._next_sweep

    async def _sweep_loop(self) -> None:
        while True:
            self._next_sweep = self.clock.now() + self.sweep_interval
            await self.clock.sleep_until(self._next_sweep)
            self.activity.begin()
            try:
                await self.sweep()
            except Exception as exc:  # noqa: BLE001 - the next sweep tries again
                log.error("could not read the outbox: %s", error_text(exc))
            finally:
                self.activity.end()
