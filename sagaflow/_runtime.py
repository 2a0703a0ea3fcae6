"""`Runtime`: routes events to shards, runs the outbox and the timer, and waits for quiet."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterable, Callable, Mapping
from datetime import timedelta
from types import TracebackType
from typing import Any, Self, cast

import anyio
import attrs

from ._actions import CommandFailed
from ._associations import Fanout
from ._batch import EVENT, FAILED, FINALIZE, FIRE, VIA, Item
from ._calls import interrupt_in, seconds
from ._clock import SystemClock
from ._cluster import Cluster, ClusterOutbox, cluster_store
from ._hooks import Hooks, capture, trace_text, wants_counts
from ._intake import Intake
from ._outbox import Counters, Outbox, checked_dispatcher, error_text
from ._records import Unmatched
from ._registry import HandlerSpec, Registry, SagaSpec, Via
from ._replies import ReplyCorrelate
from ._report import call_hook, unmatched
from ._retry import RetryPolicy
from ._shard import Shard, shard_index
from ._sync import Ack, Activity, Mailbox
from ._timer import Timer
from .exceptions import MessageError, RuntimeClosedError, SerializationError
from .stores._protocol import (
    COMPENSATION_FAILED,
    OutboxRecord,
    ScheduleRecord,
    Store,
)
from .typing import Acknowledge, Clock, Dispatch

__all__ = ["Runtime", "Statistics"]

log = logging.getLogger("sagaflow.runtime")

_Target = tuple[SagaSpec, HandlerSpec, str, Via | None]
"""Where an event goes: a saga, its handler, the key (or the association value looked
up, with the `Via` correlate function that returned it)."""


class Settled(Ack):
    """Tells the timer when a due schedule's shard is done with it."""

    def __init__(self, timer: Timer, schedule_id: str) -> None:
        super().__init__(1)
        self._timer = timer
        self._schedule_id = schedule_id

    def done(self, error: BaseException | None = None) -> None:
        self._timer.settled(self._schedule_id)


@attrs.frozen
class Statistics:
    """A snapshot of what a runtime is doing and has done.

    Attributes:
        queued_events: Items waiting in the shards' mailboxes.
        in_flight: Units of work under way (batches, dispatches, flushes).
        outbox_depth: Commands waiting or being dispatched.
        next_due: The earliest due time the timer knows of, if any.
        cached_states: Instance states held in memory.
        events_handled: Handler calls whose result was committed.
        events_duplicate: Events skipped because their id was already applied.
        events_unmatched: Events that reached no instance, or no saga handles (see
            `on_unmatched`).
        events_dead_lettered: Events whose handler kept failing (or could not be applied).
        dead_letters: Dead letters kept, of every kind: events and due schedules that
            could not be applied, and commands and compensations that failed for good
            with no `CommandFailed` handler to take them (each logged at WARNING).
        handler_retries: Handler calls that raised and were tried again.
        commands_dispatched: Successful dispatcher calls.
        command_retries: Dispatcher calls that raised and were tried again.
        commands_failed: Commands that failed for good.
        batches_committed: Store commits of handled batches.
        conflicts: Batches handled again after losing a concurrency race.
        orphan_sagas: Saga names with rows in the store that no registered saga
            answers to, found when the runtime started (each logged at WARNING).
    """

    queued_events: int
    in_flight: int
    outbox_depth: int
    next_due: float | None
    cached_states: int
    events_handled: int
    events_duplicate: int
    events_unmatched: int
    events_dead_lettered: int
    dead_letters: int
    handler_retries: int
    commands_dispatched: int
    command_retries: int
    commands_failed: int
    batches_committed: int
    conflicts: int
    orphan_sagas: int


class Runtime:
    """Runs a registry's sagas: routes events, persists state, dispatches commands.

    Use it as an async context manager; leaving the context drains what is due now
    (queued events, due schedules, commands not waiting for a retry) and stops.

    Args:
        registry: The sagas to run.
        store: Where instances, the outbox and schedules live.
        dispatch: Called as `await dispatch(command, meta)` for every command: an
            `async def` function, or an object with an `async def __call__`. Raising or
            returning `False` means failure (retried per `retry`, then `CommandFailed`);
            any other result is success.
        retry: The retry policy for commands and handlers.
        clock: Time source (`now()` and `sleep_until(t)`); the default is the wall clock.
        shards: How many shard workers handle events concurrently. Each shard handles
            one batch at a time, so more shards let more handlers wait on I/O at once
            and more commits be in flight (PostgreSQL); with handlers that never wait,
            `shards=1` is the fastest (fewer, larger commits).
        max_batch: The most items one shard handles in one commit.
        queue_size: Items a shard's mailbox holds before `publish` waits (backpressure).
            A longer queue adds latency and memory, not throughput.
        cache_size: Instance states kept in memory, over all shards; as many
            association lookups (instance keys) are kept besides.
        dispatch_concurrency: Commands dispatched at once (one per instance at a time).
        outbox_capacity: The most commands held in memory, waiting, retrying or in
            flight. More wait in the store and are read back a page at a time as room
            frees up, so memory stays bounded however many pile up while a downstream
            service is down (see the how-to "When things go wrong"). In cluster mode,
            the most commands one process claims.
        dedup_retention: How long an event id stays known after it was applied, so a
            redelivered event is not applied again (a `timedelta` or seconds).
        conflict_retries: How often a batch that lost a concurrency race is handled
            again before its events fail.
        on_unmatched: Called with an `Unmatched` record when an event reaches no
            instance that could take it, or no saga handles its type.
        hooks: Metrics and tracing callbacks (see `Hooks`).
        sweep_interval: Seconds between looks at the store for commands and instances
            an operator changed while the runtime runs (see `Admin`).
        handler_timeout: How long one call of an async handler may take (seconds or a
            `timedelta`; `None`: no limit). A call that takes longer is cancelled and
            counts as a failed attempt: retried per the retry policy, then
            dead-lettered with an error saying it timed out. A sync handler cannot be
            interrupted: one that blocks holds its shard until it returns.
        dispatch_timeout: How long one dispatcher call may take (seconds or a
            `timedelta`; `None`: no limit). A call that takes longer is cancelled and
            counts as a failed attempt: retried, then `CommandFailed`.
        shutdown_timeout: How long leaving the context waits for the work due now
            (seconds or a `timedelta`; `None`: as long as it takes). Work still in
            flight then is stopped and stays in the store for the next start: the
            runtime logs a WARNING saying so.
        cluster: Share the store with other runtime processes (needs a store that
            supports it, such as `PostgresStore`): `publish` goes through the store's
            shared inbox, commands and due schedules are claimed with leases, and no
            state is cached between batches. See the how-to "Scaling out".
        gauge_interval: Seconds (or a `timedelta`) between two countings of the
            store's rows (`Store.count_rows`: instances by status, commands in the
            outbox, due schedules, dead letters) handed to `hooks.rows_counted`, for
            gauges: counted when the runtime starts and then at this interval, and only
            if the hooks override `rows_counted`. `None`: never.

    Timeouts are measured in real time (the event loop's clock), not through `clock`:
    they guard against calls that hang.

    Raises:
        DispatcherError: `dispatch` is not an async callable (a plain `def` function,
            say); a `TypeError`.
        TypeError: `cluster=True` with a store that cannot be shared.
        ValueError: An option is out of range (a timeout that is not positive).
    """

    def __init__(
        self,
        registry: Registry,
        *,
        store: Store,
        dispatch: Dispatch,
        retry: RetryPolicy | None = None,
        clock: Clock | None = None,
        shards: int = 2,
        max_batch: int = 256,
        queue_size: int = 512,
        cache_size: int = 10_000,
        dispatch_concurrency: int = 16,
        outbox_capacity: int = 4096,
        dedup_retention: timedelta | float = timedelta(days=7),
        conflict_retries: int = 16,
        on_unmatched: Callable[[Unmatched], None] | None = None,
        hooks: Hooks | None = None,
        sweep_interval: float = 5.0,
        cluster: bool = False,
        handler_timeout: timedelta | float | None = 60.0,
        dispatch_timeout: timedelta | float | None = 60.0,
        shutdown_timeout: timedelta | float | None = 30.0,
        gauge_interval: timedelta | float | None = 15.0,
    ) -> None:
        if not registry.sagas:
            raise ValueError("the registry has no sagas: register at least one first")
        if min(shards, max_batch, queue_size, dispatch_concurrency, outbox_capacity) < 1:
            raise ValueError(
                "shards, max_batch, queue_size, dispatch_concurrency and outbox_capacity "
                "must be >= 1"
            )
        dispatch = checked_dispatcher(dispatch)
        handler_limit = seconds(handler_timeout, "handler_timeout")
        dispatch_limit = seconds(dispatch_timeout, "dispatch_timeout")
        self._shutdown_timeout = seconds(shutdown_timeout, "shutdown_timeout")
        self._gauge_interval = seconds(gauge_interval, "gauge_interval")
        self._registry = registry
        self._store = store
        self._dispatch = dispatch
        self._on_unmatched = on_unmatched
        self._hooks = hooks
        self._policy = retry or RetryPolicy()
        self._clock: Clock = clock or SystemClock()
        retention = (
            dedup_retention.total_seconds()
            if isinstance(dedup_retention, timedelta)
            else float(dedup_retention)
        )
        self._activity = Activity()
        self._counters = Counters()
        self._outbox: Outbox | ClusterOutbox = Outbox(
            store=store,
            dispatch=dispatch,
            serializer=registry.serializer,
            policy=self._policy,
            activity=self._activity,
            counters=self._counters,
            on_failed=self._command_failed,
            on_empty=self._outbox_empty,
            clock=self._clock,
            concurrency=dispatch_concurrency,
            hooks=hooks,
            sweep_interval=sweep_interval,
            sagas=frozenset(registry.sagas),
            dispatch_timeout=dispatch_limit,
            capacity=outbox_capacity,
        )
        self._timer = Timer(
            store, self._clock, self._activity, self._fire, sagas=sorted(registry.sagas)
        )
        self._cluster: Cluster | None = None
        if cluster:
            self._cluster = Cluster(
                store=cluster_store(store),
                registry=registry,
                dispatch=dispatch,
                policy=self._policy,
                clock=self._clock,
                activity=self._activity,
                counters=self._counters,
                on_failed=self._command_failed,
                fire=self._fire,
                route=lambda saga, key: self._shard(saga, key).mailbox,
                concurrency=dispatch_concurrency,
                capacity=outbox_capacity,
                hooks=hooks,
                dispatch_timeout=dispatch_limit,
            )
            self._outbox, self._timer = self._cluster.outbox, self._cluster.timer
        # Another process may change any instance between two batches: no cache.
        per_shard_cache = 0 if cluster else max(1, cache_size // shards)
        self._shards = [
            Shard(
                store=store,
                serializer=registry.serializer,
                clock=self._clock,
                policy=self._policy,
                activity=self._activity,
                counters=self._counters,
                outbox=cast(Outbox, self._outbox),  # ClusterOutbox offers the same calls
                notify_timer=self._timer.notify,
                on_unmatched=on_unmatched,
                hooks=hooks,
                dedup_retention=retention,
                max_batch=max_batch,
                cache_size=per_shard_cache,
                conflict_retries=conflict_retries,
                mailbox=Mailbox(queue_size),
                handler_timeout=handler_limit,
                index=index,
                shards=shards,
            )
            for index in range(shards)
        ]
        self._tg: anyio.abc.TaskGroup | None = None
        self._running = False

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<Runtime {state} sagas={sorted(self._registry.sagas)} store={self._store!r}>"

    @property
    def store(self) -> Store:
        """The store this runtime uses."""
        return self._store

    @property
    def registry(self) -> Registry:
        """The registry this runtime runs."""
        return self._registry

    async def __aenter__(self) -> Self:
        if self._running:
            raise RuntimeError("this Runtime is already running")
        await self._store.open()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            await self._recover()
            await tg.start(self._outbox.run)
            for shard in self._shards:
                tg.start_soon(shard.run)
            tg.start_soon(self._timer.run)
            if self._cluster is not None:
                await tg.start(self._cluster.run)
            if self._gauge_interval is not None and wants_counts(self._hooks):
                tg.start_soon(self._count_rows, self._gauge_interval)
        except BaseException as exc:
            tg.cancel_scope.cancel()
            await tg.__aexit__(type(exc), exc, exc.__traceback__)
            await self._store.close()
            raise
        self._tg = tg
        self._running = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg = self._tg
        assert tg is not None
        interrupt: BaseException | None = None
        stopping: BaseException | None = None  # what ended the finishing work, if anything
        try:
            if exc is None:
                await self._finish_due_work()
        except BaseException as error:  # noqa: BLE001 - passed on below, or taken back
            # The task group's own cancellation (a runtime task failed meanwhile) must
            # reach its __aexit__, which takes it back; any other goes on from here.
            stopping = error
        self._running = False
        self._tg = None
        tg.cancel_scope.cancel()
        try:
            # The body's own exception is not the task group's business: it propagates
            # from here unchanged, not wrapped in an ExceptionGroup.
            if stopping is None:
                await tg.__aexit__(None, None, None)
            elif await tg.__aexit__(type(stopping), stopping, stopping.__traceback__):
                stopping = None  # it was the group's own cancellation, now taken back
        except BaseExceptionGroup as group:
            # KeyboardInterrupt and SystemExit surface as themselves, so that
            # `except KeyboardInterrupt` works around the runtime.
            interrupt = interrupt_in(group)
            if interrupt is None:
                raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._store.close()
        if interrupt is not None:
            raise interrupt
        if stopping is not None:
            raise stopping
        return None

    async def _count_rows(self, interval: float) -> None:
        """Hand the store's row counts to `hooks.rows_counted`, now and every `interval`.

        Not work in hand: `drain()` never waits for a count.
        """
        assert self._hooks is not None
        while True:
            try:
                counts = await self._store.count_rows(now=self._clock.now())
            except Exception as exc:  # noqa: BLE001 - a gauge must not stop the runtime
                log.warning("could not count the store's rows for gauges: %s", error_text(exc))
            else:
                call_hook(self._hooks.rows_counted, counts)
            await self._clock.sleep_until(self._clock.now() + interval)

    async def _finish_due_work(self) -> None:
        """`drain()` for at most `shutdown_timeout`; say what stays in the store after."""
        with anyio.move_on_after(self._shutdown_timeout) as scope:
            await self.drain()
        if scope.cancelled_caught:
            stats = self.statistics()
            log.warning(
                "stopping after waiting %g s (shutdown_timeout) for the work due now, with "
                "%d event(s) queued, %d task(s) under way and %d command(s) not yet "
                "dispatched: what was committed (state, commands, schedules) stays in the "
                "store for the next start; events not yet committed were never "
                "acknowledged to their publishers",
                self._shutdown_timeout,
                stats.queued_events,
                stats.in_flight,
                stats.outbox_depth,
            )

    async def _recover(self) -> None:
        """Pick up what a previous run left: held instances, commands, finished ones."""
        await self._adopt()
        for record in await self._store.list_instances(status=COMPENSATION_FAILED):
            self._outbox.hold((record.saga, record.key))
        await self._outbox.recover()

    async def _adopt(self) -> None:
        """Take over the rows of renamed sagas; report the rows no saga is registered for."""
        sagas = self._registry.sagas
        for spec in sagas.values():
            for alias in spec.aliases:
                moved = await self._store.rename_saga(alias, spec.name)
                if moved:
                    log.info(
                        "saga %r took over %d instance(s) stored under its old name %r",
                        spec.name,
                        moved,
                        alias,
                        extra={"saga": spec.name},
                    )
        for name in sorted(await self._store.saga_names() - sagas.keys()):
            self._counters.orphan_sagas += 1
            log.warning(
                "the store holds instances, schedules or commands of saga %r, which is not "
                "registered: they are kept, and skipped until a saga of that name (or with "
                "aliases=(%r,)) is registered; `sagaflow check` lists them",
                name,
                name,
                extra={"saga": name},
            )

    def _check_running(self) -> None:
        if not self._running:
            raise RuntimeClosedError(
                "the runtime is not running; use it inside `async with Runtime(...)`"
            )

    def _shard(self, saga: str, key: str) -> Shard:
        return self._shards[shard_index(saga, key, len(self._shards))]

    def _targets(self, event: object) -> list[_Target]:
        targets: list[_Target] = []
        for spec, handler, correlate in self._registry.routes(type(event)):
            key = correlate(event)
            if key is None:
                continue
            via = correlate if type(correlate) is Via else None
            if type(key) is not str:
                raise _bad_key(spec, key, event, via)
            targets.append((spec, handler, key, via))
        return targets

    def _items(
        self, event: object, target: _Target, id: str | None, ack: Ack, trace: str | None
    ) -> list[tuple[Shard, Item]]:
        """The items one target of an event makes, with the shard each goes to: an event
        for a key goes to its instance's shard, one routed via an association to every
        shard (each finds its own instances)."""
        spec, handler, key, via = target
        if via is None:
            item = Item(EVENT, spec, key, event, handler, id, ack, trace=trace)
            return [(self._shard(spec.name, key), item)]
        fanout = Fanout(spec.name, via.name, key, len(self._shards))
        return [
            (shard, Item(VIA, spec, key, event, handler, id, ack, trace=trace, fanout=fanout))
            for shard in self._shards
        ]

    async def _look_up(self, event: object, targets: list[_Target]) -> list[_Target]:
        """Cluster mode: `targets` with those routed via an association replaced by the
        instances associated in the store now (one read each); report those that find
        none as unmatched."""
        found: list[_Target] = []
        for spec, handler, key, via in targets:
            if via is None:
                found.append((spec, handler, key, None))
                continue
            keys = (await self._store.find_associated(spec.name, via.name, [key])).get(key, [])
            found += [(spec, handler, k, None) for k in keys]
            if not keys:
                reason = Fanout(spec.name, via.name, key, 0).reason()
                unmatched(
                    [Unmatched(event, spec.name, None, reason)],
                    self._counters,
                    self._on_unmatched,
                    self._hooks,
                )
        return found

    async def publish(self, event: object, *, id: str | None = None) -> None:
        """Route an event to its sagas and return once its effects are committed.

        With `cluster=True` the event is first written to the store's shared inbox, and
        whichever process takes it handles it; this still returns once it is committed.

        An event whose type no saga handles is reported as unmatched (a WARNING log
        record, the `events_unmatched` counter and the `on_unmatched` hook), not
        applied. One that every saga's correlate function declined (returned `None`)
        is not reported: that is the sagas' decision.

        An event a saga correlates `via=` an association reaches every instance of that
        saga associated with the value its correlate function returned (see
        `Associate`), each as if published for that instance's key; none is reported as
        unmatched. In cluster mode the value is looked up in the store when the event
        is accepted.

        With `hooks` that capture traces (`Hooks.capture_trace`), the trace current in
        the calling task is kept with the event: the handler's span continues it, and
        the commands and schedules it produces carry it on (see the how-to "Tracing").

        Args:
            event: The event (any attrs or dataclass instance a saga handles).
            id: With an id, a redelivered event is applied at most once per instance
                (for `dedup_retention`).

        Raises:
            RuntimeClosedError: The runtime is not running.
            MessageError: `event` is not a message (a string, a dict, a class...);
                a `TypeError`.
            TypeError: A correlate function returned something other than `str`/`None`.
        """
        self._check_running()
        targets = self._targets(event)
        if not targets:
            self._not_routed(event, "publish")
            return
        await self._publish(event, targets, id, capture(self._hooks))

    async def _deliver(self, event: object, saga: str, key: str, id: str | None) -> None:
        """Publish `event` to the instance `(saga, key)` alone, as if its saga's correlate
        function had returned `key` (`Admin.retry` of a dead letter whose event reached
        the instance through an association).

        Raises:
            LookupError: The saga does not handle the event's type.
        """
        self._check_running()
        route = next((r for r in self._registry.routes(type(event)) if r[0].name == saga), None)
        if route is None:
            raise LookupError(f"saga {saga!r} does not handle {type(event).__qualname__}")
        await self._publish(event, [(route[0], route[1], key, None)], id, capture(self._hooks))

    async def _publish(
        self, event: object, targets: list[_Target], id: str | None, trace: str | None
    ) -> None:
        if self._cluster is not None:
            if any(via is not None for *_, via in targets):
                targets = await self._look_up(event, targets)
            if targets:
                await self._cluster.publish(event, [t[:3] for t in targets], id, trace)
            return
        ack = Ack(0)
        items = [pair for target in targets for pair in self._items(event, target, id, ack, trace)]
        ack.pending = len(items)
        for shard, item in items:
            self._activity.begin()
            await shard.mailbox.put(item)
        if not self._running:  # it stopped while we waited for room: nobody takes them
            raise RuntimeClosedError(
                "the runtime stopped before this event could be handled; publish it "
                "again to a running runtime"
            )
        await ack.wait()

    async def run(
        self,
        source: AsyncIterable[Any],
        *,
        id: Callable[[Any], str | None] | None = None,
        trace: Callable[[Any], Mapping[str, str] | None] | None = None,
        ack: Acknowledge | None = None,
    ) -> int:
        """Feed events from an async iterable or anyio receive stream.

        Publishing waits while the shards' mailboxes are full (backpressure). Returns
        once every event consumed from `source` is committed. Events are routed as by
        `publish`: one that no saga handles is reported as unmatched, and an item that
        is not a message stops the run with `MessageError` (after the events consumed
        before it are committed).

        With `ack`, the run tells you which consumed events are done, so that a broker
        message is acknowledged (or an offset committed) only once nothing of it can
        be lost: `ack` is called with a list of `Consumed` records (event, id,
        `Outcome`), the next events in consumption order whose effects are committed
        or that were duplicates, unmatched or dead-lettered. Calls come one at a time
        from a task of the run, in batches (whatever is done by then), and are awaited
        if `ack` returns an awaitable; an event whose handler waits for a retry holds
        back the acknowledgement of the events consumed after it. An event that
        cannot be committed (the store fails, the runtime stops) ends the run with its
        error once the events before it are acknowledged: it and the events after it
        are never acknowledged, so a broker delivers them again (with an `id`, none is
        applied twice). If `ack` raises, the run stops consuming and raises it. The
        run returns once every consumed event was acknowledged.

        Args:
            source: Events, e.g. a `MemoryObjectReceiveStream` or an async generator.
            id: Returns the dedup id of an event (or `None`), like `publish(id=...)`.
            trace: Returns the trace context an event arrived with (a carrier such as
                `{"traceparent": ...}` read from a broker message's headers), or `None`.
                Without it, each event keeps the trace current in the task calling
                `run` when it is consumed, if the hooks capture traces.
            ack: Called as `ack(consumed)` with the events that are done, in order
                (see above); an `async def` function or a plain one.

        `id` and `trace` are called with each event as it is consumed, before the next
        one is taken from `source`, so they may answer from the message it came in.

        Returns:
            How many events were consumed.

        Raises:
            RuntimeClosedError: The runtime is not running (or stopped during an
                acknowledged run).
            MessageError: `source` gave something that is not a message.
        """
        self._check_running()
        if ack is not None:
            return await self._run_acked(source, id, trace, ack)
        ack_all = Ack(1, poison_raises=False)  # held open until the source is exhausted
        try:
            count = await self._feed(source, id, trace, ack_all)
        except Exception:
            # The source failed: what it gave before is committed before its error
            # surfaces. Cancelled or interrupted, `run` does not wait: the shards may
            # be stopping too, and what was not committed was never acknowledged.
            ack_all.pending -= 1
            await ack_all.wait()
            raise
        ack_all.pending -= 1
        await ack_all.wait()
        return count

    async def _run_acked(
        self,
        source: AsyncIterable[Any],
        id: Callable[[Any], str | None] | None,
        trace: Callable[[Any], Mapping[str, str] | None] | None,
        ack: Acknowledge,
    ) -> int:
        """`run` with acknowledgements: one `Tracker` per event, settled in order."""
        # Room for the events in the mailboxes and as many again under way or waiting
        # for their acknowledgement.
        intake = Intake(ack, limit=2 * sum(s.mailbox.limit for s in self._shards))
        count = 0
        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(intake.deliver)
                with intake.consuming:
                    try:
                        count = await self._feed(source, id, trace, intake)
                    except Exception as exc:  # noqa: BLE001 - raised once the rest is acked
                        failure = exc
                intake.close()
        except BaseExceptionGroup as group:
            interrupt = interrupt_in(group)
            if interrupt is None:
                raise
            raise interrupt from None
        if intake.error is not None:
            raise intake.error
        if failure is not None:
            raise failure
        return count

    async def _feed(
        self,
        source: AsyncIterable[Any],
        id: Callable[[Any], str | None] | None,
        trace: Callable[[Any], Mapping[str, str] | None] | None,
        sink: Ack | Intake,
    ) -> int:
        """Route the events of `source` to the shards' mailboxes, each with its id and
        trace, counted down on one `Ack` (plain `run`) or tracked one by one by the
        `Intake` (`run(ack=...)`). Returns how many events were consumed."""
        count = 0
        activity = self._activity
        hooks = self._hooks
        intake = sink if type(sink) is Intake else None
        all_shards = self._shards
        shards = len(all_shards)
        routes = self._registry.routes
        ack: Ack
        async for event in source:
            count += 1
            event_id = id(event) if id is not None else None
            if trace is not None:
                carried = trace_text(trace(event))
            else:
                carried = None if hooks is None else capture(hooks)
            route = routes(type(event))
            if len(route) == 1 and type(route[0][2]) is not Via:
                # The common case, spelled out: one saga, correlated by key.
                spec, handler, correlate = route[0]
                key = correlate(event)
                if type(key) is str:
                    if intake is None:
                        ack = sink  # type: ignore[assignment]
                        ack.pending += 1
                    else:
                        ack = intake.track(event, event_id, 1)
                    item = Item(EVENT, spec, key, event, handler, event_id, ack, trace=carried)
                    mailbox = all_shards[hash((spec.name, key)) % shards].mailbox  # shard_index
                    activity.begin()
                    if len(mailbox) < mailbox.limit:
                        mailbox.put_unbounded(item)  # room: no need to suspend
                    else:
                        await mailbox.put(item)
                    if intake is not None and intake.full():
                        await intake.room()
                    continue
            targets = self._targets(event)
            if not targets:
                self._not_routed(event, "run")
            # One item per target, or one per shard for a target routed via an association.
            items = sum(1 if target[3] is None else shards for target in targets)
            if intake is None:
                ack = cast(Ack, sink)
                ack.pending += items
            else:
                ack = intake.track(event, event_id, items)
            for target in targets:
                for shard, item in self._items(event, target, event_id, ack, carried):
                    activity.begin()
                    mailbox = shard.mailbox
                    if len(mailbox) < mailbox.limit:
                        mailbox.put_unbounded(item)  # room: no need to suspend
                    else:
                        await mailbox.put(item)
            if intake is not None and intake.full():
                await intake.room()
        return count

    def _not_routed(self, event: object, via: str) -> None:
        """`event` reached no saga: refuse what is not a message, report the rest.

        Off the hot path: only for events that no saga took.
        """
        routes = self._registry.routes(type(event))
        if routes:
            # Every correlate function returned None: not for these sagas, unless it is
            # a reply whose command id none of them made.
            self._unknown_reply(event, routes)
            return
        problem = _not_a_message(event, self._registry)
        if problem is not None:
            raise MessageError(
                f"{via}() takes a message, an instance of an attrs class or dataclass that "
                f"a saga handles, but was given {problem}",
                value=event,
            )
        unmatched(
            [Unmatched(event, None, None, self._unrouted_reason(type(event)))],
            self._counters,
            self._on_unmatched,
            self._hooks,
        )

    def _unknown_reply(self, event: object, routes: tuple[Any, ...]) -> None:
        """Report a reply whose command id no saga that correlates it by id made."""
        sagas = [spec.name for spec, _, fn in routes if isinstance(fn, ReplyCorrelate)]
        ids = {fn.fn(event) for _, _, fn in routes if isinstance(fn, ReplyCorrelate)}
        ids.discard(None)
        if not ids:
            return
        shown = ", ".join(map(repr, sorted(map(str, ids))))
        reason = (
            f"its command id {shown} names no instance of saga(s) "
            f"{', '.join(map(repr, sagas))}, which correlate {type(event).__name__} as a "
            "reply: it must be the `meta.id` a command of one of them was dispatched with"
        )
        saga = sagas[0] if len(sagas) == 1 else None
        unmatched(
            [Unmatched(event, saga, None, reason)], self._counters, self._on_unmatched, self._hooks
        )

    def _unrouted_reason(self, cls: type) -> str:
        if issubclass(cls, CommandFailed):
            return (
                "CommandFailed is delivered by the runtime to the instance whose command "
                "failed; it cannot be published"
            )
        internal = sorted(
            spec.name for spec in self._registry.sagas.values() if spec.handler_for(cls)
        )
        if internal:
            return (
                f"saga(s) {', '.join(map(repr, internal))} take {cls.__name__} only from "
                "their own to_self schedules (internal=True)"
            )
        return "no saga handles this type"

    async def drain(self) -> None:
        """Wait until no event is queued or being handled and nothing is due now.

        Schedules and retries due later do not hold it.
        """
        self._check_running()
        activity = self._activity
        while True:
            await activity.wait_idle()
            if not self._due_now():
                if activity.count == 0:
                    return
                continue
            # Something is due now but its task has not woken up yet: let it run, and
            # wait for it only if it still has not begun (checked with no await between).
            await anyio.sleep(0)
            if activity.count == 0 and self._due_now():
                await activity.wait_begin()

    def _due_now(self) -> bool:
        now = self._clock.now()
        wakeups = [
            self._timer.next_wakeup(),
            self._outbox.next_wakeup(),
            self._outbox.next_sweep(),
            *(s.next_wakeup() for s in self._shards),
            None if self._cluster is None else self._cluster.next_wakeup(),
        ]
        return any(w is not None and w <= now for w in wakeups)

    def statistics(self) -> Statistics:
        """A frozen snapshot of queue depths and counters."""
        c = self._counters
        return Statistics(
            queued_events=sum(len(s.mailbox) for s in self._shards),
            in_flight=self._activity.count,
            outbox_depth=self._outbox.depth,
            next_due=self._timer.next_due,
            cached_states=sum(s.cached for s in self._shards),
            events_handled=c.events_handled,
            events_duplicate=c.events_duplicate,
            events_unmatched=c.events_unmatched,
            events_dead_lettered=c.events_dead_lettered,
            dead_letters=c.dead_letters,
            handler_retries=c.handler_retries,
            commands_dispatched=c.commands_dispatched,
            command_retries=c.command_retries,
            commands_failed=c.commands_failed,
            batches_committed=c.batches_committed,
            conflicts=c.conflicts,
            orphan_sagas=c.orphan_sagas,
        )

    # -- callbacks from the outbox and the timer -----------------------------------

    def _spec(self, saga: str) -> SagaSpec | None:
        return self._registry.sagas.get(saga)

    def _command_failed(self, row: OutboxRecord, command: Any) -> None:
        spec = self._spec(row.saga)
        if spec is None:
            log.error("command %s belongs to unknown saga %r; kept in the outbox", row.id, row.saga)
            return
        self._activity.begin()
        self._shard(row.saga, row.key).mailbox.put_unbounded(
            Item(FAILED, spec, row.key, command, row=row)
        )

    def _associations_changed(self) -> None:
        """Associations were put in the store behind the runtime's back (testing)."""
        for shard in self._shards:
            shard.associations.clear()

    def _schedule_added(self, due: float) -> None:
        """A schedule was put in the store behind the timer's back (`Admin.retry`)."""
        self._timer.notify(due)

    def _outbox_empty(self, ref: tuple[str, str]) -> None:
        spec = self._spec(ref[0])
        if spec is None:
            return
        self._activity.begin()
        self._shard(*ref).mailbox.put_unbounded(Item(FINALIZE, spec, ref[1]))

    def _fire(self, rows: list[ScheduleRecord]) -> int:
        taken = 0
        for row in rows:
            spec = self._spec(row.saga)
            if spec is None:
                log.error("schedule %s belongs to unknown saga %r; kept", row.id, row.saga)
                continue
            taken += 1
            self._timer.taken(row.id)
            self._activity.begin()
            self._shard(row.saga, row.key).mailbox.put_unbounded(
                Item(FIRE, spec, row.key, ack=Settled(self._timer, row.id), schedule=row)
            )
        return taken


def _not_a_message(event: object, registry: Registry) -> str | None:
    """What is wrong with `event` as a message, or `None` if it is one."""
    if isinstance(event, type):
        name = event.__qualname__
        return f"the class {name} itself, not an instance of it: pass {name}(...)"
    cls = type(event)
    if attrs.has(cls) or dataclasses.is_dataclass(cls):
        return None
    try:
        registry.serializer.name_of(cls)  # a class registered with registry.message
    except SerializationError:
        pass
    else:
        return None
    shown = repr(event)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    hint = ""
    if isinstance(event, dict):
        hint = ": build the event from its class instead of a dict of its fields"
    elif isinstance(event, str | bytes):
        hint = ": build the event from its class instead of its text"
    return f"a {cls.__qualname__} ({shown}){hint}"


def _bad_key(spec: SagaSpec, key: object, event: object, via: Via | None) -> TypeError:
    if via is not None:
        return TypeError(
            f"the correlate function {via.method} of saga {spec.name!r} returned {key!r} "
            f"({type(key).__name__}) for {type(event).__qualname__}; it routes via the "
            f"association {via.name!r}, so it must return the value looked up (a str, "
            "as given to Associate) or None"
        )
    return TypeError(
        f"the correlate function of saga {spec.name!r} returned {key!r} "
        f"({type(key).__name__}) for {type(event).__qualname__}; "
        "it must return a str key or None"
    )
