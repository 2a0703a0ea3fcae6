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

from ._calls import Interrupt, Watch, call
from ._clock import SystemClock
from ._hooks import Hooks, trace_carrier, traced
from ._records import DispatchMeta
from ._retry import RetryPolicy
from ._serialization import Serializer
from ._sync import Activity, Wakeup
from .exceptions import DispatcherError, DispatchError
from .stores._protocol import (
    COMPENSATION_FAILED,
    COMPLETING,
    Changes,
    OutboxRecord,
    OutboxUpdate,
    PendingCommand,
    Store,
)

__all__ = [
    "Counters",
    "Dispatchers",
    "Outbox",
    "OutboxCore",
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
class QueuedCommand:
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


def call_dispatch(
    dispatch: Callable[[Any, DispatchMeta], Any],
    command: Any,
    meta: DispatchMeta,
    timeout: float | None,
    watch: Watch | None = None,
) -> Awaitable[Any]:
    """Call the dispatcher within `dispatch_timeout` (see `_calls.call`): the awaitable
    of its result, which is `False` for a failed attempt (`returned_false`).

    Raises:
        TimeoutError: The call took longer than `timeout`.
        RuntimeError: The dispatcher raised a cancellation nobody asked for.
    """
    return call(
        dispatch(command, meta),
        timeout,
        lambda: (
            f"the dispatch of {type(command).__name__} for {meta.saga}/{meta.key} "
            f"(attempt {meta.attempt})"
        ),
        "dispatch_timeout",
        watch,
    )


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

    async def run(
        self, concurrency: int, dispatch: Callable[[_Ref, Watch], Awaitable[None]]
    ) -> None:
        """Run `concurrency` workers calling `dispatch(ref, watch)`, and the retry timer.

        Each worker keeps one cancel scope for its dispatcher calls (`Watch`); once a
        call's deadline cancelled it, `dispatch` returns and the worker takes a new one.
        """
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(Watch().run, functools.partial(self._worker, dispatch))
            tg.start_soon(self._retry_loop)

    async def _worker(
        self, dispatch: Callable[[_Ref, Watch], Awaitable[None]], watch: Watch
    ) -> None:
        while not watch.expired:
            while not self._ready:
                if self._ready_event.is_set():
                    self._ready_event = anyio.Event()
                await self._ready_event.wait()
            ref = self._ready.popleft()
            try:
                await dispatch(ref, watch)
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


class CommandQueue(deque[QueuedCommand]):
    """An instance's commands in memory, in order: all it has in the store, or, when
    `partial`, its first ones (the rest wait in the store until these are done)."""

    partial: bool = False


@attrs.define(eq=False, kw_only=True)
class OutboxCore:
    """What both outboxes share: per-instance queues dispatched in order by a pool of
    workers, and what becomes of a failed attempt.

    `Outbox` (one process) and `ClusterOutbox` (several processes sharing PostgreSQL)
    differ only in where their commands come from and how they record what became of
    them: they implement `_record_retry` and `_give_up`.
    """

    dispatch: Callable[[Any, DispatchMeta], Any]
    serializer: Serializer
    policy: RetryPolicy
    activity: Activity
    counters: Counters
    on_failed: Callable[[OutboxRecord, Any], None]
    clock: Any = attrs.field(factory=SystemClock)
    concurrency: int = 16
    hooks: Hooks | None = None
    dispatch_timeout: float | None = None
    capacity: int = 4096
    """The most commands held in memory."""

    _queues: dict[_Ref, CommandQueue] = attrs.field(factory=dict, init=False)
    _busy: set[_Ref] = attrs.field(factory=set, init=False)
    _held: set[_Ref] = attrs.field(factory=set, init=False)
    _awaiting: set[_Ref] = attrs.field(factory=set, init=False)
    _dispatchers: Dispatchers = attrs.field(init=False)
    _flush_event: anyio.Event = attrs.field(factory=anyio.Event, init=False)
    _flushing: bool = attrs.field(default=False, init=False)
    """`_flush_event` is set (read on every delivery: cheaper than asking it)."""
    _flush_retry: float | None = attrs.field(default=None, init=False)
    _depth: int = attrs.field(default=0, init=False)

    @_dispatchers.default
    def _make_dispatchers(self) -> Dispatchers:
        return Dispatchers(self.activity, self.clock)

    @property
    def depth(self) -> int:
        """Commands held in memory: waiting, retrying or in flight."""
        return self._depth

    def _make_ready(self, ref: _Ref) -> None:
        self._busy.add(ref)
        self._dispatchers.put([ref])

    def _mark_dirty(self) -> None:
        if not self._flushing:
            self._flushing = True
            self.activity.begin()
            self._flush_event.set()

    @staticmethod
    def _insert(queue: CommandQueue, entry: QueuedCommand) -> None:
        """Put `entry` in its place in `queue` (by seq: an operator's retry puts a dead
        letter back at its old place)."""
        if not queue or queue[-1].row.seq < entry.row.seq:
            queue.append(entry)
        else:
            at = next(i for i, e in enumerate(queue) if e.row.seq > entry.row.seq)
            queue.insert(at, entry)

    async def _attempt(self, ref: _Ref, entry: QueuedCommand, watch: Watch) -> bool:
        """Dispatch `entry` once; returns whether it went out.

        A failed attempt is counted, then retried later or given up (`_attempt_failed`);
        `False` tells the caller to leave the instance alone meanwhile.
        """
        row = entry.row
        attempt = row.attempts + 1
        hooks = self.hooks
        try:
            if not entry.decoded:
                entry.command = self.serializer.decode(row.type_name, row.payload)
                entry.decoded = True
            trace = None if row.trace is None else trace_carrier(row.trace)
            meta = DispatchMeta(row.id, row.saga, row.key, attempt, row.kind, trace)
            span = None if hooks is None else hooks.dispatching(entry.command, meta)
            if span is None:
                result = await call_dispatch(
                    self.dispatch, entry.command, meta, self.dispatch_timeout, watch
                )
                if result is False:
                    raise returned_false()
            else:
                assert hooks is not None
                with span:
                    # The receiver continues the dispatch span: hand it its context.
                    meta = traced(hooks, meta)
                    result = await call_dispatch(
                        self.dispatch, entry.command, meta, self.dispatch_timeout, watch
                    )
                    if result is False:  # inside the span: it sees a raised failure
                        raise returned_false()
        except Exception as exc:  # noqa: BLE001 - any failure of the dispatcher counts
            self._attempt_failed(ref, entry, attempt, exc)
            return False
        self.counters.commands_dispatched += 1
        return True

    def _attempt_failed(
        self, ref: _Ref, entry: QueuedCommand, attempt: int, exc: Exception
    ) -> None:
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
            self._record_retry(OutboxUpdate(row.id, attempt, due, error))
            self._dispatchers.retry_at(ref, due)
            return
        self._busy.discard(ref)
        self._awaiting.add(ref)
        entry.row = attrs.evolve(row, attempts=attempt, error=error)
        self._give_up(ref, entry)

    def _record_retry(self, update: OutboxUpdate) -> None:
        """Record a failed attempt that will be retried."""
        raise NotImplementedError

    def _give_up(self, ref: _Ref, entry: QueuedCommand) -> None:
        """Hand a command that failed for good (`entry.row` says how) to its instance."""
        raise NotImplementedError


@attrs.define(eq=False, kw_only=True)
class Outbox(OutboxCore):
    """Dispatches committed commands, one at a time per instance, in their order.

    A command that fails is retried after a backoff; later commands of its instance
    wait (other instances do not). One that fails for good is handed back to the
    instance through `on_failed`, and the instance stays held until `release` is called.
    Delivered rows are removed from the store in batches by a flusher task.

    Memory is bounded: at most `capacity` commands are held. The shards hand over what
    they commit while there is room; past that, commands stay in the store only
    ("spilled"), and a puller reads them back a page at a time (`Store.pending_commands`,
    by instance, skipping instances whose first command waits for a retry) as room frees
    up. While anything may be spilled, the outbox cannot tell from memory whether an
    instance has commands left, so completed instances end through the store
    (`Store.drained_instances`), a page at a time too.
    """

    store: Store
    on_empty: Callable[[_Ref], None]
    sweep_interval: float = 5.0
    sagas: Collection[str] | None = None
    """The registered sagas: rows of others are kept in the store, not dispatched."""
    page: int = 512
    """Rows read from the store at a time."""

    _busy: set[_Ref] = attrs.field(factory=set, init=False)
    _held: set[_Ref] = attrs.field(factory=set, init=False)
    _awaiting: set[_Ref] = attrs.field(factory=set, init=False)
    _known: set[str] = attrs.field(factory=set, init=False)
    _pull_lock: anyio.Lock = attrs.field(factory=anyio.Lock, init=False)
    _generation: int = attrs.field(default=0, init=False)
    _completing: set[_Ref] = attrs.field(factory=set, init=False)
    _deletes: list[str] = attrs.field(factory=list, init=False)
    _updates: list[OutboxUpdate] = attrs.field(factory=list, init=False)
    _carriers: int = attrs.field(default=0, init=False)
    _carried: anyio.Event = attrs.field(factory=anyio.Event, init=False)
    _swept_away: set[str] | None = attrs.field(default=None, init=False)
    # -- spilling: what the store may hold that memory does not
    _spilled: bool = attrs.field(default=False, init=False)
    _spills: int = attrs.field(default=0, init=False)
    _cursor: _Ref | None = attrs.field(default=None, init=False)
    _cycle_spills: int = attrs.field(default=0, init=False)
    _cycle_later: float = attrs.field(default=math.inf, init=False)
    _later: float = attrs.field(default=math.inf, init=False)
    _finish_due: bool = attrs.field(default=False, init=False)
    # Deletes of delivered commands are numbered as they are recorded, and known until
    # committed: the look for drained instances waits for those recorded before it was
    # asked for (`_finish_after`), or the store would still show their rows.
    _delete_seq: int = attrs.field(default=0, init=False)
    _uncommitted: dict[str, int] = attrs.field(factory=dict, init=False)
    _finish_after: int = attrs.field(default=0, init=False)
    _drained: dict[_Ref, None] = attrs.field(factory=dict, init=False)
    _pull: Wakeup = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if self.capacity < 1 or self.page < 1:
            raise ValueError("the outbox's capacity and page must be >= 1")
        self._pull = Wakeup(self.clock, self.sweep_interval, dirty=False)

    def next_wakeup(self) -> float | None:
        """When the earliest retry (of a command or of a failed flush) falls due, `-inf`
        while the store must be read for commands that fit in memory now."""
        wakeups = [self._dispatchers.next_retry(), self._flush_retry]
        if self._pull.dirty:
            wakeups.append(-math.inf)
        elif self._later < math.inf and self._depth < self.capacity:
            wakeups.append(self._later)  # a spilled instance's retry falls due
        return min((w for w in wakeups if w is not None), default=None)

    def has_pending(self, ref: _Ref) -> bool:
        """Whether the instance may still have commands waiting or in flight."""
        if ref in self._queues:
            return True
        if self._spilled and ref not in self._drained:
            # It may have commands in the store only: let the store tell, later.
            self._want_finish()
            return True
        return False

    def _want_finish(self) -> None:
        """Look for drained instances in the store once every delete recorded so far
        is committed (a read before that would still see their rows, and miss them)."""
        self._finish_due = True
        self._finish_after = self._delete_seq

    def _finish_ready(self) -> bool:
        floor = min(self._uncommitted.values(), default=self._delete_seq)
        return floor >= self._finish_after

    def _record_delete(self, row_id: str) -> None:
        self._deletes.append(row_id)
        self._uncommitted[row_id] = self._delete_seq
        self._delete_seq += 1

    def add(self, rows: list[OutboxRecord], commands: list[Any] | None = None) -> None:
        """Hand over committed rows, in their order; `commands` are their decoded values.

        Rows that do not fit in memory stay in the store, to be read back later; so do
        the rows of an instance whose earlier rows are in the store only.
        """
        known, queues, drained = self._known, self._queues, self._drained
        held, awaiting, busy = self._held, self._awaiting, self._busy
        self._generation += 1
        generation = self._generation
        ready: list[_Ref] = []
        for i, row in enumerate(rows):
            if row.id in known:
                continue
            ref = (row.saga, row.key)
            queue = queues.get(ref)
            if queue is None:
                if self._spilled or self._depth >= self.capacity:
                    self._spill()  # its earlier rows may be in the store only
                    continue
                queue = queues[ref] = CommandQueue()
                if ref not in held and ref not in awaiting and ref not in busy:
                    busy.add(ref)
                    ready.append(ref)
            elif queue.partial:
                continue  # it follows rows that are in the store only
            elif self._depth >= self.capacity:
                queue.partial = True
                self._spill()
                continue
            known.add(row.id)
            if drained:  # empty unless commands were spilled: nothing to look up
                drained.pop(ref, None)
            if commands is not None:
                entry = QueuedCommand(row, commands[i], True, generation)
            else:
                entry = QueuedCommand(row, None, False, generation)
            if not queue or queue[-1].row.seq < row.seq:
                queue.append(entry)  # (`_insert`'s common case)
            else:
                self._insert(queue, entry)
            self._depth += 1
        self._dispatchers.put(ready)

    def _spill(self) -> None:
        self._spilled = True
        self._spills += 1

    def completing(self, ref: _Ref) -> None:
        """The instance completed: call `on_empty` once its queue has drained."""
        if ref in self._queues:
            self._completing.add(ref)
        elif self.has_pending(ref):
            self._pull.poke()  # the store tells when it has no commands left
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
                self._drop_queue(ref, queue)

    def release(self, ref: _Ref) -> None:
        """Resume dispatching an instance held after a give-up or a failed compensation."""
        self._held.discard(ref)
        self._awaiting.discard(ref)
        queue = self._queues.get(ref)
        if queue is None:
            if ref in self._completing:
                self._completing.discard(ref)
                self._empty(ref)
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
            queue.clear()  # a worker dispatching it stops
        self._held.discard(ref)
        self._awaiting.discard(ref)
        self._completing.discard(ref)
        self._drained.pop(ref, None)

    def _forget_id(self, row_id: str) -> None:
        # The id stays known while its deletion waits for the flusher, so that a read
        # of the store meanwhile does not take the row for a new one.
        self._record_delete(row_id)
        self._mark_dirty()

    def _drop_queue(self, ref: _Ref, queue: CommandQueue) -> None:
        """The instance's queue is empty: it leaves memory."""
        del self._queues[ref]
        if queue.partial:
            self._spill()  # its next rows are in the store: not empty yet
            self._completing.discard(ref)  # the read that takes them says if it completed
            # ... or, when the page that cut it held its last rows, the next look for
            # drained instances does (else a completed instance waits for ever).
            self._want_finish()
            self._pull.poke()
        elif self._spilled and self._depth <= self.capacity - min(self.page, self.capacity):
            self._pull.poke()  # room for a page of spilled commands

    def _empty(self, ref: _Ref) -> None:
        """The completed instance has no command left: it may end."""
        drained = self._drained
        drained[ref] = None
        while len(drained) > self.capacity:
            del drained[next(iter(drained))]
        self.on_empty(ref)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the workers, the retry timer, the flusher and the puller until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._dispatchers.run, self.concurrency, self._dispatch_head)
            tg.start_soon(self._flush_loop)
            tg.start_soon(self._pull_loop)
            task_status.started()

    async def _dispatch_head(self, ref: _Ref, watch: Watch) -> None:
        """Dispatch the instance's commands in order until its queue is empty or waits."""
        queue = self._queues.get(ref)
        held, awaiting = self._held, self._awaiting
        while queue and ref not in held and ref not in awaiting:
            if watch.expired:  # (a call ended just as its deadline passed)
                self._dispatchers.put([ref])  # the rest in the worker's next scope
                return
            entry = queue[0]
            row = entry.row
            if row.due and row.due > self.clock.now():  # read back while it backs off
                self._dispatchers.retry_at(ref, row.due)
                return
            if row.attempts and not await self._still_pending(ref, entry):
                continue  # an operator aborted the instance meanwhile: it was dropped
            if not await self._attempt(ref, entry, watch):
                return
            if queue and queue[0] is entry:
                queue.popleft()
            elif entry in queue:  # an operator's retry went in front of it meanwhile
                queue.remove(entry)
            else:
                continue  # dropped meanwhile (the instance was deleted)
            self._depth -= 1
            self._record_delete(row.id)
            if not self._flushing:
                self._mark_dirty()
        self._busy.discard(ref)
        if queue is None or queue or self._queues.get(ref) is not queue:
            return
        self._drop_queue(ref, queue)
        if ref in self._completing:
            self._completing.discard(ref)
            self._empty(ref)

    async def _still_pending(self, ref: _Ref, entry: QueuedCommand) -> bool:
        """Before a retry, whether the command is still in the store.

        An operator may abort an instance (`Admin.abort`) while its commands back off
        here: they are dropped instead of tried again. A failed read says yes.
        """
        generation = self._generation
        try:
            present = {r.id for r in await self.store.list_outbox(saga=ref[0], key=ref[1])}
        except Exception as exc:  # noqa: BLE001 - the attempt goes ahead; nothing is lost
            log.error("could not read the outbox of %s/%s: %s", *ref, error_text(exc))
            return True
        if entry.row.id in present:
            return True
        queue = self._queues.get(ref)
        gone: list[QueuedCommand] = []
        if queue is not None:
            gone = [e for e in queue if e.row.id not in present and e.generation <= generation]
            for gone_entry in gone:
                queue.remove(gone_entry)
                self._depth -= 1
                self._known.discard(gone_entry.row.id)
        log.info(
            "dropped %d command(s) of %s/%s waiting for a retry: their rows are gone from "
            "the store (the instance was aborted)",
            len(gone),
            *ref,
            extra={"saga": ref[0], "key": ref[1]},
        )
        return False

    def _record_retry(self, update: OutboxUpdate) -> None:
        self._updates.append(update)
        self._mark_dirty()

    def _give_up(self, ref: _Ref, entry: QueuedCommand) -> None:
        self.on_failed(entry.row, entry.command if entry.decoded else None)

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
        uncommitted = self._uncommitted
        for row_id in deletes:
            uncommitted.pop(row_id, None)
        if self._finish_due and self._finish_ready():
            self._pull.poke()

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
            self._flushing = False
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

    # -- reading the store: spilled commands, operators' changes, finished instances --

    async def recover(self) -> None:
        """Start on what a previous run left in the store: its commands (as many as fit,
        the rest a page at a time later) and its completed instances."""
        self._spill()
        self._finish_due = True
        await self.sweep()

    def next_sweep(self) -> float:
        """When the store is next read unasked (operators' changes)."""
        return self._pull.next_poll

    async def _pull_loop(self) -> None:
        failures = 0
        while True:
            await self._pull.wait(self._later if self._depth < self.capacity else math.inf)
            self.activity.begin()
            try:
                await self.sweep()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the next look tries again
                failures += 1
                log.error("could not read the outbox: %s", error_text(exc))
                self._pull.next_poll = self.clock.now() + self.policy.delay(failures)
                self.activity.end()
                await self.clock.sleep_until(self._pull.next_poll)
                self._pull.poke()
                continue
            self.activity.end()

    async def sweep(self) -> None:
        """Read the store: instances an operator resumed, commands not in memory (spilled
        ones, a previous run's, dead letters put back) as far as they fit, and completed
        instances whose commands are all done.

        An operator may put a dead letter back in the outbox, resume or abort an
        instance whose compensation failed, or abort any instance; the runtime notices
        within one `sweep_interval`.
        """
        async with self._pull_lock:
            await self._release_resumed()
            await self._read_pending()
            # Whether or not the read got through (memory may be full): an instance with
            # no command left in the store has none left at all (one in memory is skipped).
            if self._finish_due and self._finish_ready():
                self._finish_due = False
                await self._finish()

    async def _release_resumed(self) -> None:
        """Release the held instances an operator resumed or aborted."""
        held_before = set(self._held)
        failed = {
            (r.saga, r.key) for r in await self.store.list_instances(status=COMPENSATION_FAILED)
        }
        # What the shards changed while we read is theirs: only act on what we saw.
        for ref in held_before - failed:
            if ref in self._held:  # resumed (or aborted) by an operator
                if ref not in self._queues:
                    self._spill()  # its commands are in the store: read them back
                self.release(ref)
        self._held.update(failed)

    async def _read_pending(self) -> None:
        """Take the commands of instances not in memory, a page at a time, while they fit.

        Reads on from where the last read stopped (memory full, or a round through the
        whole outbox done), so every instance gets its turn.
        """
        while True:
            if self._cursor is None:  # a new round through the outbox
                self._cycle_spills = self._spills
                self._cycle_later = math.inf
            room = self.capacity - self._depth
            if room <= 0:
                return
            generation = self._generation
            swept_away: set[str] = set()
            self._swept_away = swept_away  # rows whose deletion commits while we read
            try:
                found = await self.store.pending_commands(
                    after=self._cursor, limit=self.page, sagas=self.sagas
                )
            finally:
                self._swept_away = None
            full = len(found) == self.page
            groups: dict[_Ref, list[PendingCommand]] = {}
            for pending in found:
                row = pending.row
                groups.setdefault((row.saga, row.key), []).append(pending)
            last = next(reversed(groups), None)
            for ref, rows in groups.items():
                taken = self._take(ref, rows, swept_away, generation, cut=full and ref == last)
                if taken is None:
                    return  # no room left: go on from here next time
                self._cursor = ref
            if not full:
                self._cursor = None
                self._later = self._cycle_later
                if self._spills != self._cycle_spills:
                    self._pull.poke()  # commands spilled behind the read: read again
                elif self._later == math.inf:
                    self._spilled = False  # memory holds every command now
                return

    def _take(
        self,
        ref: _Ref,
        rows: list[PendingCommand],
        swept_away: set[str],
        generation: int,
        *,
        cut: bool,
    ) -> bool | None:
        """Take an instance's rows read from the store, if it is not in memory yet.

        Returns whether it was taken, or `None` if there was no room for it.
        """
        if ref in self._queues or ref in self._held or ref in self._busy:
            return False  # in memory already (its later rows come when these are done)
        status = rows[0].status
        if status == COMPENSATION_FAILED:
            self._held.add(ref)
            return False
        known = self._known
        fresh = [p.row for p in rows if p.row.id not in known and p.row.id not in swept_away]
        if not fresh:
            return False
        head = fresh[0]
        if head.due > self.clock.now():
            self._cycle_later = min(self._cycle_later, head.due)  # read it back then
            return False
        room = self.capacity - self._depth
        if room <= 0:
            return None
        queue = self._queues[ref] = CommandQueue(
            QueuedCommand(row, None, False, generation) for row in fresh[:room]
        )
        queue.partial = cut or len(fresh) > room
        known.update(e.row.id for e in queue)
        self._depth += len(queue)
        if status == COMPLETING:
            self._completing.add(ref)
        if ref not in self._awaiting:
            self._make_ready(ref)
        return True

    async def _finish(self) -> None:
        """End the completed instances whose commands are all done, a page at a time."""
        after: _Ref | None = None
        while True:
            refs = await self.store.drained_instances(
                after=after, limit=self.page, sagas=self.sagas
            )
            for ref in refs:
                if ref not in self._queues and ref not in self._busy:
                    self._empty(ref)
            if len(refs) < self.page:
                return
            after = refs[-1]
