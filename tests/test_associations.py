"""Associations and fan-out: `Associate`/`Dissociate` and `@correlate(..., via=name)`.

An event correlated via an association reaches every instance associated with its value,
each handled and committed as for a direct key, in each instance's order; the runtime's
end result must equal a plain sequential model of the event stream, on every store.
Cluster mode is tested in test_cluster.py, the testing harness in test_testing.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from _postgres_server import pg_schema, postgres_dsn  # noqa: F401
from anyio.abc import TaskStatus
from hypothesis import given, settings
from hypothesis import strategies as st

from sagaflow import (
    Admin,
    Associate,
    Complete,
    DispatchMeta,
    Dissociate,
    Registry,
    RetryPolicy,
    Runtime,
    Schedule,
    Send,
    Unmatched,
    correlate,
    on,
)
from sagaflow._associations import AssociationCache
from sagaflow._clock import VirtualClock
from sagaflow.exceptions import RegistrationError
from sagaflow.stores import (
    Association,
    Changes,
    MemoryStore,
    SQLiteStore,
    Store,
)
from sagaflow.testing import advance

T0 = 1_700_000_000.0
SAGA = "tags"

# -- messages and the saga -------------------------------------------------------------


@attrs.frozen
class Open:
    key: str


@attrs.frozen
class Tag:
    key: str
    value: str


@attrs.frozen
class Untag:
    key: str
    value: str


@attrs.frozen
class Ping:
    key: str
    n: int


@attrs.frozen
class Shout:
    value: str
    n: int


@attrs.frozen
class Close:
    key: str


@attrs.frozen
class Heard:
    key: str
    what: str


@attrs.define
class Log:
    key: str = ""
    heard: list[str] = attrs.Factory(list)


@attrs.define
class TagSaga:
    """Keeps what it heard in order; `Shout` reaches it through its tags."""

    flaky: set[tuple[str, int]] = attrs.Factory(set)
    """`(key, n)`: the `Shout` handler raises the first time it gets these."""

    @correlate(Open, Tag, Untag, Ping, Close)
    def key(self, event: Open | Tag | Untag | Ping | Close) -> str:
        return event.key

    @correlate(Shout, via="tag")
    def tag(self, event: Shout) -> str:
        return event.value

    @on(Open, start=True)
    def open(self, state: Log, event: Open) -> None:
        state.key = event.key

    @on(Tag)
    def tagged(self, state: Log, event: Tag) -> Associate:
        state.heard.append(f"tag {event.value}")
        return Associate("tag", event.value)

    @on(Untag)
    def untagged(self, state: Log, event: Untag) -> Dissociate:
        state.heard.append(f"untag {event.value}")
        return Dissociate("tag", event.value)

    @on(Ping)
    def ping(self, state: Log, event: Ping) -> Send[Heard]:
        state.heard.append(f"ping {event.n}")
        return Send(Heard(state.key, f"ping {event.n}"))

    @on(Shout)
    def shout(self, state: Log, event: Shout) -> Send[Heard]:
        if (state.key, event.n) in self.flaky:
            self.flaky.discard((state.key, event.n))
            raise RuntimeError(f"flaky shout {event.n} at {state.key}")
        state.heard.append(f"shout {event.n}")
        return Send(Heard(state.key, f"shout {event.n}"))

    @on(Close)
    def close(self, state: Log, event: Close) -> Complete:
        return Complete()


def make_registry(saga: TagSaga | None = None) -> Registry:
    registry = Registry()
    registry.register(saga or TagSaga(), state=Log, name=SAGA)
    return registry


@attrs.define
class Dispatched:
    calls: list[tuple[Any, DispatchMeta]] = attrs.Factory(list)

    async def __call__(self, command: Any, meta: DispatchMeta) -> None:
        await anyio.lowlevel.checkpoint()
        self.calls.append((command, meta))

    def per_key(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for command, meta in self.calls:
            assert meta.key == command.key  # sent by the instance it names
            out.setdefault(command.key, []).append(command.what)
        return out


@attrs.define
class Harness:
    runtime: Runtime
    store: Store
    clock: VirtualClock
    dispatched: Dispatched
    unmatched: list[Unmatched]

    async def states(self) -> dict[str, list[str]]:
        return {
            r.key: json.loads(r.state)["heard"] for r in await self.store.list_instances(saga=SAGA)
        }

    async def associations(self) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for a in await self.store.list_associations(saga=SAGA):
            assert a.name == "tag"
            found.setdefault(a.key, set()).add(a.value)
        return found


@asynccontextmanager
async def running(
    store: Store, registry: Registry | None = None, **options: Any
) -> AsyncIterator[Harness]:
    clock = VirtualClock(start=T0)
    dispatched = Dispatched()
    unmatched: list[Unmatched] = []
    options.setdefault("retry", RetryPolicy(max_attempts=3, initial_delay=1.0, jitter=False))
    with anyio.fail_after(60):
        async with Runtime(
            registry or make_registry(),
            store=store,
            dispatch=dispatched,
            clock=clock,
            on_unmatched=unmatched.append,
            **options,
        ) as runtime:
            yield Harness(runtime, store, clock, dispatched, unmatched)


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh store of each kind (the runtime opens and closes it)."""
    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "sqlite":
        yield SQLiteStore(tmp_path / "tags.db")
    else:
        from sagaflow.stores import PostgresStore

        dsn = request.getfixturevalue("postgres_dsn")
        yield PostgresStore(dsn, schema=request.getfixturevalue("pg_schema"))


async def stream(events: Sequence[object]) -> AsyncIterator[object]:
    for event in events:
        yield event


async def publishing(
    runtime: Runtime, event: object, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Publish `event` in a task of its own, telling the starter once it is queued (a
    handler retry may hold `publish` until time moves)."""
    task_status.started()
    await runtime.publish(event)


# -- the sequential model --------------------------------------------------------------


@attrs.define
class Model:
    """What a stream of events means, handled one after the other."""

    tags: dict[str, set[str]] = attrs.Factory(dict)  # live instances and their tags
    heard: dict[str, list[str]] = attrs.Factory(dict)
    sent: dict[str, list[str]] = attrs.Factory(dict)
    unmatched: int = 0

    def apply(self, event: object) -> None:
        if isinstance(event, Shout):
            reached = sorted(k for k, tags in self.tags.items() if event.value in tags)
            if not reached:
                self.unmatched += 1
            for key in reached:
                self._hear(key, f"shout {event.n}", send=True)
            return
        key = event.key  # type: ignore[attr-defined]
        if isinstance(event, Open):
            self.tags.setdefault(key, set())
            self.heard.setdefault(key, [])
        elif key not in self.tags:
            self.unmatched += 1
        elif isinstance(event, Tag):
            self.tags[key].add(event.value)
            self._hear(key, f"tag {event.value}")
        elif isinstance(event, Untag):
            self.tags[key].discard(event.value)
            self._hear(key, f"untag {event.value}")
        elif isinstance(event, Ping):
            self._hear(key, f"ping {event.n}", send=True)

    def _hear(self, key: str, what: str, *, send: bool = False) -> None:
        self.heard[key].append(what)
        if send:
            self.sent.setdefault(key, []).append(what)


def model_of(events: Sequence[object]) -> Model:
    model = Model()
    for event in events:
        model.apply(event)
    return model


KEYS = ["a", "b", "c", "d"]
VALUES = ["x", "y", "z"]


@st.composite
def histories(draw: st.DrawFn) -> list[object]:
    steps = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["open", "tag", "tag", "untag", "ping", "shout", "shout"]),
                st.sampled_from(KEYS),
                st.sampled_from(VALUES[:2]),
            ),
            min_size=1,
            max_size=40,
        )
    )
    events: list[object] = []
    for n, (kind, key, value) in enumerate(steps):
        if kind == "open":
            events.append(Open(key))
        elif kind == "tag":
            events.append(Tag(key, value))
        elif kind == "untag":
            events.append(Untag(key, value))
        elif kind == "ping":
            events.append(Ping(key, n))
        else:
            events.append(Shout(value, n))
    return events


def test_the_model_on_a_known_history() -> None:
    """The model itself, on a history worked out by hand."""
    model = model_of(
        [
            Shout("x", 0),  # nobody: unmatched
            Open("a"),
            Open("b"),
            Tag("a", "x"),
            Tag("b", "x"),
            Shout("x", 5),  # a and b
            Untag("a", "x"),
            Shout("x", 7),  # b only
            Tag("c", "x"),  # c has no instance: unmatched
        ]
    )

    assert model.heard == {
        "a": ["tag x", "shout 5", "untag x"],
        "b": ["tag x", "shout 5", "shout 7"],
    }
    assert model.sent == {"a": ["shout 5"], "b": ["shout 5", "shout 7"]}
    assert model.unmatched == 2


# -- registration and actions ----------------------------------------------------------


def test_a_start_handler_cannot_be_reached_via_an_association() -> None:
    class Broken:
        @correlate(Open, via="tag")
        def tag(self, event: Open) -> str:
            return event.key

        @on(Open, start=True)
        def open(self, state: Log, event: Open) -> None:
            return None

    with pytest.raises(RegistrationError) as caught:
        Registry().register(Broken(), state=Log)

    assert str(caught.value) == (
        "saga 'Broken': start handler open takes Open, which correlate function tag routes "
        "via the association 'tag': a start event needs a direct key (an instance that does "
        "not exist yet has no associations); give it a correlate function without via="
    )


@pytest.mark.parametrize(
    ("args", "via", "message"),
    [
        pytest.param((Shout,), "", "via names an association, a non-empty", id="empty"),
        pytest.param((Shout,), 3, "via names an association, a non-empty", id="not-a-str"),
        pytest.param((), "tag", "needs the event types it routes", id="no-types"),
    ],
)
def test_correlate_via_needs_a_name_and_event_types(
    args: tuple[type, ...], via: Any, message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        correlate(*args, via=via)


@pytest.mark.anyio
async def test_a_via_correlate_function_must_return_a_str() -> None:
    class Numbers(TagSaga):
        @correlate(Shout, via="tag")
        def tag(self, event: Shout) -> Any:
            return 42

    async with running(MemoryStore(), make_registry(Numbers())) as h:
        with pytest.raises(TypeError) as caught:
            await h.runtime.publish(Shout("x", 1))

    assert str(caught.value) == (
        "the correlate function tag of saga 'tags' returned 42 (int) for Shout; it routes "
        "via the association 'tag', so it must return the value looked up (a str, as given "
        "to Associate) or None"
    )


@pytest.mark.parametrize(
    ("action", "error"),
    [
        pytest.param(
            Associate("tag", 7),  # type: ignore[arg-type]
            "handler tagged returned Associate(name='tag', value=7): the value must be a "
            "str, got int; convert it (e.g. str(...)) the same way the correlate function "
            "does",
            id="int-value",
        ),
        pytest.param(
            Dissociate("", "x"),
            "handler tagged returned Dissociate(name='', value='x'): the name must be a "
            "non-empty str, the via= of a correlate function",
            id="empty-name",
        ),
    ],
)
@pytest.mark.anyio
async def test_an_association_that_is_not_made_of_strings_dead_letters_the_event(
    action: Any, error: str
) -> None:
    """Nothing of the handler's result is applied (not its state change, nor its other
    actions), and the dead letter names saga, key, event and handler."""

    class Wrong(TagSaga):
        @on(Tag)
        def tagged(self, state: Log, event: Tag) -> Any:
            state.heard.append("changed")
            return [Send(Heard(event.key, "sent")), action]

    async with running(MemoryStore(), make_registry(Wrong())) as h:
        await h.runtime.publish(Open("a"))
        await h.runtime.publish(Tag("a", "x"))
        (letter,) = await h.store.list_dead_letters()
        states, associations = await h.states(), await h.associations()

    assert (letter.saga, letter.key, letter.kind) == (SAGA, "a", "event")
    assert letter.error == f"ActionError: saga 'tags' key 'a' handling Tag: {error}"
    assert (states, associations, h.dispatched.calls) == ({"a": []}, {}, [])


# -- routing on every store --------------------------------------------------------------


@pytest.mark.anyio
async def test_an_event_via_an_association_is_handled_as_for_its_key(store: Store) -> None:
    """The instance's state, its command (with its key in the metadata) and the
    association itself are committed together."""
    async with running(store) as h:
        await h.runtime.publish(Open("a"))
        await h.runtime.publish(Open("b"))
        await h.runtime.publish(Tag("a", "x"))
        assert await h.associations() == {"a": {"x"}}

        await h.runtime.publish(Shout("x", 1))
        await h.runtime.drain()

        assert await h.states() == {"a": ["tag x", "shout 1"], "b": []}
        assert h.dispatched.per_key() == {"a": ["shout 1"]}
        assert h.unmatched == []


@pytest.mark.anyio
async def test_a_value_associated_with_many_instances_fans_out_to_each(store: Store) -> None:
    """60 instances over 4 shards, 40 of them tagged: each of the 40 handles the event
    once and sends its own command; the others do not see it."""
    keys = [f"k{i:02}" for i in range(60)]
    tagged = keys[::3] + keys[1::3]
    async with running(store, shards=4) as h:
        await h.runtime.run(stream([*map(Open, keys), *(Tag(k, "x") for k in tagged)]))

        await h.runtime.publish(Shout("x", 1))
        await h.runtime.drain()
        states = await h.states()

    assert states == {k: ["tag x", "shout 1"] if k in tagged else [] for k in keys}
    assert h.dispatched.per_key() == {k: ["shout 1"] for k in sorted(tagged)}
    assert h.runtime.statistics().events_handled == len(keys) + 2 * len(tagged)


@pytest.mark.anyio
async def test_an_event_no_instance_is_associated_with_is_reported_once(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """With several shards, each looks at its own instances: the event is unmatched
    once, with a reason naming the association."""
    async with running(store, shards=3) as h:
        await h.runtime.publish(Open("a"))
        await h.runtime.publish(Tag("a", "x"))
        with caplog.at_level(logging.WARNING, "sagaflow.runtime"):
            await h.runtime.publish(Shout("y", 1))
        stats = h.runtime.statistics()

    assert h.unmatched == [
        Unmatched(Shout("y", 1), SAGA, None, "no instance is associated with tag='y'")
    ]
    assert stats.events_unmatched == 1
    assert [r.getMessage() for r in caplog.records] == [
        "Shout for saga 'tags' matched no instance, it was not applied: no instance is "
        "associated with tag='y'"
    ]


@pytest.mark.anyio
async def test_a_stream_is_handled_in_each_instances_order(store: Store) -> None:
    """Associations made and removed by earlier events of the same stream (even of the
    same batch) decide where a later event goes; every instance sees its events in
    stream order."""
    keys = [*KEYS, "e"]
    events: list[object] = [*map(Open, keys)]
    for n in range(30):
        key, value = keys[n % 5], VALUES[n % 3]
        events += [Tag(key, value), Shout(value, n), Ping(key, n), Shout(VALUES[(n + 1) % 3], n)]
        if n % 4 == 0:
            events += [Untag(key, value), Shout(value, 100 + n)]
    model = model_of(events)

    async with running(store, shards=3, max_batch=7) as h:
        await h.runtime.run(stream(events))
        await h.runtime.drain()
        states, associations = await h.states(), await h.associations()

    assert states == model.heard
    assert h.dispatched.per_key() == model.sent
    assert associations == {k: v for k, v in model.tags.items() if v}
    assert len(h.unmatched) == model.unmatched


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=40, deadline=None)
@given(
    events=histories(),
    shards=st.integers(min_value=1, max_value=3),
    max_batch=st.integers(min_value=1, max_value=8),
    cache_size=st.sampled_from([0, 2, 10_000]),
    flaky=st.booleans(),
)
def test_generated_streams_match_the_sequential_model(
    backend: str,
    events: list[object],
    shards: int,
    max_batch: int,
    cache_size: int,
    flaky: bool,
) -> None:
    """Also with a small association cache (lookups evicted, read again) and with
    fan-out handlers that raise once (the instance's later events wait for the retry)."""
    model = model_of(events)
    raising = {(k, e.n) for e in events if isinstance(e, Shout) for k in KEYS[e.n % 2 :: 2]}

    async def main() -> tuple[Any, ...]:
        saga = TagSaga(flaky=raising if flaky else set())
        options = {"shards": shards, "max_batch": max_batch, "cache_size": cache_size}
        async with running(MemoryStore(), make_registry(saga), **options) as h:
            fed = anyio.Event()

            async def tick() -> None:
                # Handler retries hold `run` until they are done: move time meanwhile.
                while not fed.is_set():
                    await h.runtime.drain()
                    h.clock.advance(1)
                    await anyio.sleep(0)

            async with anyio.create_task_group() as tg:
                tg.start_soon(tick)
                await h.runtime.run(stream(events))
                fed.set()
            await advance(h.runtime, h.clock, 10)
            stats = h.runtime.statistics()
            return (
                await h.states(),
                h.dispatched.per_key(),
                await h.associations(),
                len(h.unmatched),
                stats.events_dead_lettered,
            )

    states, sent, associations, unmatched, dead = anyio.run(main, backend=backend)

    assert states == model.heard
    assert sent == model.sent
    assert associations == {k: v for k, v in model.tags.items() if v}
    assert (unmatched, dead) == (model.unmatched, 0)


@pytest.mark.anyio
async def test_event_ids_deduplicate_per_instance(store: Store) -> None:
    """A redelivered fan-out event is not applied again where it was applied, but
    reaches an instance associated since then (it never saw it)."""
    async with running(store, shards=2) as h:
        await h.runtime.run(stream([Open("a"), Open("b"), Tag("a", "x")]))
        await h.runtime.publish(Shout("x", 1), id="e1")
        await h.runtime.publish(Tag("b", "x"))

        await h.runtime.publish(Shout("x", 1), id="e1")
        await h.runtime.drain()

        assert await h.states() == {"a": ["tag x", "shout 1"], "b": ["tag x", "shout 1"]}
        assert h.dispatched.per_key() == {"a": ["shout 1"], "b": ["shout 1"]}
        assert h.runtime.statistics().events_duplicate == 1


@pytest.mark.anyio
async def test_associations_end_with_their_instance(store: Store) -> None:
    """A completed instance's associations go when it ends (its tombstone keeps none): a
    later event via them is unmatched, and a new instance under the same key (a saga
    that reuses keys) starts with none."""
    registry = Registry()
    registry.register(TagSaga(), state=Log, name=SAGA, reuse_keys=True)
    async with running(store, registry) as h:
        await h.runtime.run(stream([Open("a"), Tag("a", "x"), Open("b"), Tag("b", "y")]))

        await h.runtime.publish(Close("a"))
        await h.runtime.publish(Shout("x", 1))
        await h.runtime.publish(Open("a"))
        await h.runtime.publish(Shout("x", 2))

        assert await h.associations() == {"b": {"y"}}
        assert await h.states() == {"a": [], "b": ["tag y"]}
        assert [u.reason for u in h.unmatched] == ["no instance is associated with tag='x'"] * 2


@pytest.mark.anyio
async def test_a_failed_commit_applies_no_association(store: Store) -> None:
    """The handler's `Associate` and the rest of its result are one change: a result
    that cannot be applied leaves no association behind."""

    class Wrong(TagSaga):
        @on(Tag)
        def tagged(self, state: Log, event: Tag) -> Any:
            state.heard.append("changed")
            # A schedule to itself of a message it does not handle: rejected.
            return [
                Associate("tag", event.value),
                Schedule(Heard(event.key, "x"), after=1, to_self=True),
            ]

    async with running(store, make_registry(Wrong())) as h:
        await h.runtime.publish(Open("a"))
        await h.runtime.publish(Tag("a", "x"))
        await h.runtime.publish(Shout("x", 1))

        assert (await h.states(), await h.associations()) == ({"a": []}, {})
        assert len(await h.store.list_dead_letters()) == 1
        assert [u.event for u in h.unmatched] == [Shout("x", 1)]


@pytest.mark.anyio
async def test_a_retried_fan_out_handler_holds_only_its_own_instance() -> None:
    """One instance's handler raises on a fan-out: that instance's later events (direct
    or fanned out) wait for its retry, the other instances go on at once."""
    saga = TagSaga(flaky={("a", 1)})
    async with running(MemoryStore(), make_registry(saga), shards=2) as h:
        await h.runtime.run(stream([Open("a"), Open("b"), Tag("a", "x"), Tag("b", "x")]))
        async with anyio.create_task_group() as tg:
            await tg.start(publishing, h.runtime, Shout("x", 1))
            await h.runtime.drain()
            await tg.start(publishing, h.runtime, Ping("a", 2))
            await tg.start(publishing, h.runtime, Ping("b", 3))
            await tg.start(publishing, h.runtime, Shout("x", 4))
            await h.runtime.drain()
            before = await h.states()
            await advance(h.runtime, h.clock, 1)

        assert before == {"a": ["tag x"], "b": ["tag x", "shout 1", "ping 3", "shout 4"]}
        assert await h.states() == {
            "a": ["tag x", "shout 1", "ping 2", "shout 4"],
            "b": ["tag x", "shout 1", "ping 3", "shout 4"],
        }
        assert h.runtime.statistics().handler_retries == 1


@attrs.define(eq=False)
class RefusingStore(MemoryStore):
    """Refuses (like a database refusing bad data) any commit writing a state that says
    "poison"."""

    async def commit(self, changes: Changes) -> None:
        if any("poison" in w.record.state for w in changes.writes):
            raise ValueError("this store cannot hold a poisoned state")
        await super().commit(changes)


@pytest.mark.anyio
async def test_an_instance_whose_fan_out_cannot_be_stored_is_the_only_dead_letter() -> None:
    """The store refuses one instance's effects of a fan-out: that instance's event is
    kept as a dead letter; the other instances' effects are committed."""

    class Poisoned(TagSaga):
        @on(Shout)
        def shout(self, state: Log, event: Shout) -> Send[Heard]:
            state.heard.append("poison" if state.key == "c" else f"shout {event.n}")
            return Send(Heard(state.key, f"shout {event.n}"))

    keys = ["a", "b", "c", "d"]
    async with running(RefusingStore(), make_registry(Poisoned()), shards=1) as h:
        await h.runtime.run(stream([*map(Open, keys), *(Tag(k, "x") for k in keys)]))

        await h.runtime.run(stream([Shout("x", 1)]))
        await h.runtime.drain()
        (letter,) = await h.store.list_dead_letters()

        assert await h.states() == {
            "a": ["tag x", "shout 1"],
            "b": ["tag x", "shout 1"],
            "c": ["tag x"],
            "d": ["tag x", "shout 1"],
        }
    assert (letter.saga, letter.key, letter.type_name) == (SAGA, "c", "test_associations.Shout")
    assert h.dispatched.per_key() == {"a": ["shout 1"], "b": ["shout 1"], "d": ["shout 1"]}


@attrs.define(eq=False)
class CountingStore(MemoryStore):
    """Counts the association lookups that reach the store."""

    lookups: list[tuple[str, str, list[str]]] = attrs.Factory(list)

    async def find_associated(
        self, saga: str, name: str, values: Sequence[str]
    ) -> dict[str, list[str]]:
        self.lookups.append((saga, name, list(values)))
        return await super().find_associated(saga, name, values)


@pytest.mark.anyio
async def test_lookups_are_one_store_read_per_batch_then_cached() -> None:
    """In one process, a batch of fan-out events reads the store once; the shard's
    own commits (associations made, removed, instances ended) keep the cache right,
    so later events are routed without reading the store."""
    store = CountingStore()
    async with running(store, shards=1) as h:
        await h.runtime.run(stream([Open("a"), Open("b"), Tag("a", "x"), Tag("b", "y")]))

        await h.runtime.run(stream([Shout("x", 1), Shout("y", 2), Shout("z", 3)]))
        first = list(store.lookups)
        await h.runtime.run(
            stream(
                [
                    Shout("x", 4),
                    Tag("b", "x"),
                    Untag("a", "x"),
                    Shout("x", 5),
                    Close("b"),
                    Shout("x", 6),
                    Shout("y", 7),
                ]
            )
        )
        await h.runtime.drain()

        assert first == [(SAGA, "tag", ["x", "y", "z"])]
        assert store.lookups == first
        assert await h.states() == {"a": ["tag x", "shout 1", "shout 4", "untag x"]}
        assert h.dispatched.per_key() == {
            "a": ["shout 1", "shout 4"],
            "b": ["shout 2", "shout 5"],
        }
        assert [u.event for u in h.unmatched] == [Shout("z", 3), Shout("x", 6), Shout("y", 7)]


@pytest.mark.anyio
async def test_admin_shows_associations_and_abort_removes_them(store: Store) -> None:
    async with running(store) as h:
        await h.runtime.run(stream([Open("a"), Tag("a", "y"), Tag("a", "x"), Open("b")]))
        admin = Admin(h.store)

        shown = await admin.show(SAGA, "a")
        listed = {i.key: i.associations for i in await admin.list_instances()}
        await admin.abort(SAGA, "a")
        await h.runtime.publish(Shout("x", 1))

        assert shown.associations == (
            Association(SAGA, "tag", "x", "a"),
            Association(SAGA, "tag", "y", "a"),
        )
        assert listed == {"a": shown.associations, "b": ()}
        assert await h.store.list_associations() == []
        assert [u.event for u in h.unmatched] == [Shout("x", 1)]


@pytest.mark.anyio
async def test_admin_retry_of_a_fan_out_event_reaches_its_instance_alone(store: Store) -> None:
    """The dead letter of an event that reached its instance through an association is
    retried to that instance only: the others handled it already."""

    @attrs.define
    class Once(TagSaga):
        broken: bool = True

        @on(Shout)
        def shout(self, state: Log, event: Shout) -> Send[Heard]:
            if state.key == "b" and self.broken:
                raise RuntimeError("b is broken")
            return super().shout(state, event)

    saga = Once()
    async with running(store, make_registry(saga), retry=RetryPolicy(max_attempts=1)) as h:
        await h.runtime.run(stream([Open("a"), Open("b"), Tag("a", "x"), Tag("b", "x")]))
        await h.runtime.publish(Shout("x", 1), id="e1")
        (letter,) = await h.store.list_dead_letters()
        saga.broken = False

        await Admin(h.store).retry(letter.id, runtime=h.runtime)

        assert letter.key == "b"
        assert await h.store.list_dead_letters() == []
        assert await h.states() == {"a": ["tag x", "shout 1"], "b": ["tag x", "shout 1"]}
        assert h.dispatched.per_key() == {"a": ["shout 1"], "b": ["shout 1"]}


def test_sagaflow_show_lists_the_instances_associations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sagaflow._cli import main

    path = tmp_path / "shown.db"

    async def prepare() -> None:
        async with running(SQLiteStore(path)) as h:
            await h.runtime.run(stream([Open("a"), Tag("a", "y"), Tag("a", "x"), Open("b")]))

    anyio.run(prepare)

    assert main(["show", f"sqlite:{path}", SAGA, "a"]) == 0
    text = capsys.readouterr().out
    assert main(["show", f"sqlite:{path}", SAGA, "b"]) == 0
    none = capsys.readouterr().out
    assert main(["show", f"sqlite:{path}", SAGA, "a", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)

    assert text.endswith("\n\nassociations\n  NAME  VALUE\n  tag   x\n  tag   y\n")
    assert none.endswith("\n\nassociations\n  none\n")
    assert shown["associations"] == [{"name": "tag", "value": "x"}, {"name": "tag", "value": "y"}]


@pytest.mark.anyio
async def test_an_instance_aborted_behind_the_runtimes_back_is_not_reached_any_more() -> None:
    """`Admin.abort` deletes an instance the runtime has cached, lookups included: the
    next event via its association conflicts, is handled again with fresh reads, and
    finds no instance."""
    async with running(MemoryStore(), shards=1) as h:
        await h.runtime.run(stream([Open("a"), Tag("a", "x")]))
        await h.runtime.publish(Shout("x", 1))  # the lookup of x is cached now

        await Admin(h.store).abort(SAGA, "a")
        await h.runtime.publish(Shout("x", 2))

        reason = "no instance is associated with tag='x'"
        assert await h.states() == {}
        assert h.unmatched == [Unmatched(Shout("x", 2), SAGA, None, reason)]
        assert h.runtime.statistics().conflicts == 1


def test_the_association_cache_follows_commits_and_stays_within_its_size() -> None:
    """What the shard's own commits change is applied where cached; an instance that
    ended leaves every lookup; an eviction forgets the lookups naming an instance; the
    least recently used lookups go first past `size` (keys plus one per lookup)."""
    cache = AssociationCache(6)
    cache.fill("s", "tag", "x", ["a", "b"])
    cache.fill("s", "tag", "y", ["a"])
    cache.put(Association("s", "tag", "x", "c"))
    cache.put(Association("s", "tag", "z", "c"))  # z is not cached: nothing to do
    cache.delete(Association("s", "tag", "x", "b"))
    assert (cache.get("s", "tag", "x"), cache.get("s", "tag", "y")) == ({"a", "c"}, {"a"})
    assert cache.get("s", "tag", "z") is None

    cache.forget(("s", "a"))
    assert (cache.get("s", "tag", "x"), cache.get("s", "tag", "y")) == ({"c"}, set())

    cache.evict(("s", "c"))
    assert (cache.get("s", "tag", "x"), cache.get("s", "tag", "y")) == (None, set())

    cache.fill("s", "tag", "p", ["k1", "k2"])  # weight: y 1, p 3
    cache.fill("s", "tag", "q", ["k3"])  # 6: still all there
    assert cache.get("s", "tag", "y") == set()  # y is now the most recently used
    cache.fill("s", "tag", "r", [])  # 7 > 6: p, the least recently used, goes
    assert [cache.get("s", "tag", v) for v in "ypqr"] == [set(), None, {"k3"}, set()]

    off = AssociationCache(0)
    off.fill("s", "tag", "x", ["a"])
    assert off.get("s", "tag", "x") is None
