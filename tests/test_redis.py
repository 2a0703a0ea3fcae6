"""Redis Streams both ways (`sagaflow.redis`), on a real server (`SAGAFLOW_REDIS_URL`).

The source reads through a consumer group and acknowledges an entry only once its event
is committed; it takes over the pending entries of a consumer that died, reads its own
again after a restart, keeps the ones it holds from being taken, and moves entries it
cannot decode or that were delivered too often to a dead-letter stream. The dispatcher
appends each command with its stable id, type name, JSON, saga, key, kind and trace
context. Every test runs on asyncio and on trio.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import attrs
import pytest
from _redis_server import redis_client, redis_url, stream_name  # noqa: F401
from json_meaning import JsonText

from sagaflow import Consumed, DispatchMeta, Outcome, Registry, Runtime, Send, correlate, on
from sagaflow.stores import MemoryStore

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

redis_module = pytest.importorskip("sagaflow.redis")
RedisStreamDispatcher = redis_module.RedisStreamDispatcher
RedisStreamSource = redis_module.RedisStreamSource
encode_entry = redis_module.encode_entry


@attrs.frozen
class Deposited:
    account: str
    amount: int


@attrs.frozen
class Notify:
    account: str
    total: int


@attrs.frozen
class Audit(Notify):
    pass


@attrs.define
class Balance:
    total: int = 0


class AccountSaga:
    @correlate
    def account(self, event: Deposited) -> str:
        return event.account

    @on(Deposited, start=True)
    async def deposited(self, state: Balance, event: Deposited) -> Send[Notify]:
        state.total += event.amount
        return Send(Notify(event.account, state.total))


def make_registry() -> Registry:
    registry = Registry()
    registry.register(AccountSaga(), state=Balance, name="accounts")
    registry.message(Notify)
    registry.message(Audit)
    return registry


def fields_of(entry: tuple[bytes, dict[bytes, bytes]]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in entry[1].items()}


async def consume(
    runtime: Runtime, source: Any, expected: int, seen: list[Consumed] | None = None
) -> list[Consumed]:
    """Run `source` until `expected` events are acknowledged, then stop it."""
    acked: list[Consumed] = [] if seen is None else seen

    async def ack(consumed: list[Consumed]) -> None:
        await source.ack(consumed)
        acked.extend(consumed)
        if len(acked) >= expected:
            source.stop()

    await runtime.run(source, id=source.event_id, trace=source.trace, ack=ack)
    return acked


def pending(client: Any, stream: str, group: str) -> int:
    return int(client.xpending(stream, group)["pending"])


async def test_events_flow_in_and_commands_flow_out_acknowledged_after_commit(
    redis_client: Any,  # noqa: F811
    stream_name: str,  # noqa: F811
) -> None:
    """Entries become events; their commands are appended to the output stream with a
    stable id; every entry is acknowledged; an entry with an id seen before is a
    duplicate."""
    registry = make_registry()
    stream, out = f"{stream_name}:in", f"{stream_name}:out"
    events = [Deposited("a", 5), Deposited("b", 1), Deposited("a", 7)]
    for i, event in enumerate(events):
        redis_client.xadd(stream, encode_entry(registry, event, id=f"dep-{i}"))
    redis_client.xadd(stream, encode_entry(registry, events[0], id="dep-0"))  # again
    dispatch = RedisStreamDispatcher(redis_client, registry, stream=out)
    with anyio.fail_after(30):
        async with (
            Runtime(registry, store=MemoryStore(), dispatch=dispatch) as runtime,
            RedisStreamSource(redis_client, registry, stream=stream, group="g") as source,
        ):
            acked = await consume(runtime, source, 4)
            await runtime.drain()

    assert [(c.event, c.id, c.outcome) for c in acked] == [
        (events[0], "dep-0", Outcome.COMMITTED),
        (events[1], "dep-1", Outcome.COMMITTED),
        (events[2], "dep-2", Outcome.COMMITTED),
        (events[0], "dep-0", Outcome.DUPLICATE),
    ]
    assert pending(redis_client, stream, "g") == 0
    written = [fields_of(e) for e in redis_client.xrange(out)]
    notify = registry.serializer.name_of(Notify)
    # In order per instance (instances are dispatched concurrently).
    assert sorted(
        ((f["key"], f["type"], json.loads(f["data"]), f["saga"], f["kind"]) for f in written),
        key=lambda row: row[0],
    ) == [
        ("a", notify, {"account": "a", "total": 5}, "accounts", "send"),
        ("a", notify, {"account": "a", "total": 12}, "accounts", "send"),
        ("b", notify, {"account": "b", "total": 1}, "accounts", "send"),
    ]
    assert len({f["id"] for f in written}) == 3
    assert sorted(
        (registry.serializer.decode(f["type"], f["data"]) for f in written), key=repr
    ) == [Notify("a", 12), Notify("a", 5), Notify("b", 1)]


async def test_the_trace_context_of_an_entry_reaches_the_commands_it_caused(
    redis_client: Any,  # noqa: F811
    stream_name: str,  # noqa: F811
) -> None:
    """`traceparent`/`tracestate` of an event entry go with the event (`run(trace=...)`)
    into the outbox and onto the command's entry."""
    registry = make_registry()
    stream, out = f"{stream_name}:in", f"{stream_name}:out"
    traced = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    redis_client.xadd(stream, {**encode_entry(registry, Deposited("a", 1)), **traced})
    redis_client.xadd(stream, encode_entry(registry, Deposited("b", 1)))
    dispatch = RedisStreamDispatcher(redis_client, registry, stream=out)
    with anyio.fail_after(30):
        async with (
            Runtime(registry, store=MemoryStore(), dispatch=dispatch) as runtime,
            RedisStreamSource(redis_client, registry, stream=stream, group="g") as source,
        ):
            await consume(runtime, source, 2)
            await runtime.drain()

    written = {f["key"]: f.get("traceparent") for f in map(fields_of, redis_client.xrange(out))}
    assert written == {"a": traced["traceparent"], "b": None}


async def test_an_entry_without_an_id_is_deduplicated_by_its_entry_id(
    redis_client: Any,  # noqa: F811
    stream_name: str,  # noqa: F811
) -> None:
    registry = make_registry()
    entry_id = redis_client.xadd(stream_name, encode_entry(registry, Deposited("a", 1))).decode()
    async with (
        Runtime(registry, store=MemoryStore(), dispatch=_nothing) as runtime,
        RedisStreamSource(redis_client, registry, stream=stream_name, group="g") as source,
    ):
        with anyio.fail_after(30):
            acked = await consume(runtime, source, 1)

    assert [c.id for c in acked] == [f"{stream_name}:{entry_id}"]


async def _nothing(command: object, meta: DispatchMeta) -> None:
    pass


async def test_pending_entries_of_a_dead_consumer_are_taken_over(
    redis_client: Any,  # noqa: F811
    stream_name: str,  # noqa: F811
) -> None:
    """A consumer read two entries and died without acknowledging them: another
    consumer of the group takes them over once idle (here at once) and handles them."""
    registry = make_registry()
    redis_client.xgroup_create(stream_name, "g", id="0", mkstream=True)
    for i in range(2):
        redis_client.xadd(stream_name, encode_entry(registry, Deposited("a", i + 1)))
    redis_client.xreadgroup("g", "dead", {stream_name: ">"})
    async with (
        Runtime(registry, store=MemoryStore(), dispatch=_nothing) as runtime,
        RedisStreamSource(
            redis_client, registry, stream=stream_name, group="g", consumer="alive", claim_idle=0
        ) as source,
    ):
        with anyio.fail_after(30):
            acked = await consume(runtime, source, 2)
        (record,) = await runtime.store.list_instances()

    assert [c.event for c in acked] == [Deposited("a", 1), Deposited("a", 2)]
    assert json.loads(record.state) == {"total": 3}
    assert pending(redis_client, stream_name, "g") == 0


async def test_a_restarted_consumer_reads_its_own_pending_entries_first(
    redis_client: Any,  # noqa: F811
    stream_name: str,  # noqa: F811
) -> None:
    """Same consumer name: its pending entries come back at once, before new ones, with
    no wait for an idle time."""
    registry = make_registry()
    redis_client.xgroup_create(stream_name, "g", id="0", mkstream=True)
    redis_client.xadd(stream_name, encode_entry(registry, Deposited("a", 1)))
    redis_client.xreadgroup("g", "pod-1", {stream_name: ">"})  # then it died
    redis_client.xadd(stream_name, encode_entry(registry, Deposited("a", 2)))
    async with (
        Runtime(registry, store=MemoryStore(), dispatch=_nothing) as runtime,
        RedisStreamSource(
            redis_client, registry, stream=stream_name, group="g", consumer="pod-1"
        ) as source,
    ):
        with anyio.fail_after(30):
            acked = await consume(runtime, source, 2)

    assert [c.event for c in acked] == [Deposited("a", 1), Deposited("a", 2)]
    assert pending(redis_client, stream_name, "g") == 0


async def test_entries_that_cannot_be_decoded_go_to_the_dead_letter_stream(
    redis_client: Any,  # noqa: F811
    stream_name: str,  # noqa: F811
) -> None:
    """Each is appended there with its fields and the reason, and acknowledged; the
    good entries around them are handled."""
    registry = make_registry()
    good = encode_entry(registry, Deposited("a", 1))
    bad = [
        {"data": "{}"},
        {"type": "os.system", "data": '{"command": "true"}'},
        {"type": good["type"], "data": "{not json"},
        {"type": good["type"], "data": '{"account": "a"}'},
    ]
    ids = []
    for fields in [good, *bad, good]:
        ids.append(redis_client.xadd(stream_name, fields).decode())
    async with (
        Runtime(registry, store=MemoryStore(), dispatch=_nothing) as runtime,
        RedisStreamSource(redis_client, registry, stream=stream_name, group="g") as source,
    ):
        with anyio.fail_after(30):
            acked = await consume(runtime, source, 2)

    assert [c.event for c in acked] == [Deposited("a", 1), Deposited("a", 1)]
    assert pending(redis_client, stream_name, "g") == 0
    letters = [fields_of(e) for e in redis_client.xrange(f"{stream_name}:dead")]
    assert [(f["source_stream"], f["source_id"], f["deliveries"]) for f in letters] == [
        (stream_name, entry_id, "1") for entry_id in ids[1:5]
    ]
    assert [{k: f[k] for k in fields} for f, fields in zip(letters, bad, strict=True)] == bad
    errors = [f["error"] for f in letters]
    assert "has no type field" in errors[0]
    assert "'os.system' is not on sagaflow's allow-list" in errors[1]
    assert "its data is not JSON" in errors[2]
    assert "amount" in errors[3]
    assert all(
        f"entry {i} of stream {stream_name!r}" in e for i, e in zip(ids[1:5], errors, strict=True)
    )


async def test_an_entry_delivered_too_many_times_goes_to_the_dead_letter_stream(
    redis_client: Any,  # noqa: F811
    stream_name: str,  # noqa: F811
) -> None:
    registry = make_registry()
    redis_client.xgroup_create(stream_name, "g", id="0", mkstream=True)
    poison = redis_client.xadd(stream_name, encode_entry(registry, Deposited("a", 1))).decode()
    redis_client.xreadgroup("g", "dead-1", {stream_name: ">"})
    redis_client.xclaim(stream_name, "g", "dead-2", 0, [poison])  # delivered twice
    redis_client.xadd(stream_name, encode_entry(registry, Deposited("b", 1)))
    async with (
        Runtime(registry, store=MemoryStore(), dispatch=_nothing) as runtime,
        RedisStreamSource(
            redis_client,
            registry,
            stream=stream_name,
            group="g",
            claim_idle=0,
            max_deliveries=2,
        ) as source,
    ):
        with anyio.fail_after(30):
            acked = await consume(runtime, source, 1)

    assert [c.event for c in acked] == [Deposited("b", 1)]
    (letter,) = [fields_of(e) for e in redis_client.xrange(f"{stream_name}:dead")]
    assert (letter["source_id"], letter["deliveries"]) == (poison, "3")
    assert letter["error"].startswith("delivered 3 times (max_deliveries=2)")
    assert pending(redis_client, stream_name, "g") == 0


async def test_entries_held_by_a_live_consumer_are_kept_fresh(
    redis_client: Any,  # noqa: F811
    stream_name: str,  # noqa: F811
) -> None:
    """While its event waits (a handler blocked here), the source resets the entry's idle
    time, without counting a delivery: another consumer would not take it over."""
    gate = anyio.Event()
    started = anyio.Event()

    class Slow(AccountSaga):
        @on(Deposited, start=True)
        async def deposited(self, state: Balance, event: Deposited) -> Send[Notify]:
            started.set()
            await gate.wait()
            return await super().deposited(state, event)

    registry = Registry()
    registry.register(Slow(), state=Balance, name="accounts")
    entry = redis_client.xadd(stream_name, encode_entry(registry, Deposited("a", 1))).decode()

    def idle() -> tuple[int, int]:
        (row,) = redis_client.xpending_range(stream_name, "g", entry, entry, 1)
        return int(row["time_since_delivered"]), int(row["times_delivered"])

    async with (
        Runtime(registry, store=MemoryStore(), dispatch=_nothing) as runtime,
        RedisStreamSource(
            redis_client, registry, stream=stream_name, group="g", claim_idle=0.6
        ) as source,
        anyio.create_task_group() as tg,
    ):
        with anyio.fail_after(30):
            tg.start_soon(consume, runtime, source, 1)
            await started.wait()
            # The idle time grows, then drops back: refreshed, not redelivered.
            before = idle()[0]
            while idle()[0] <= before:
                before = max(before, idle()[0])
                await anyio.sleep(0.02)
            assert idle()[1] == 1
            gate.set()

    assert pending(redis_client, stream_name, "g") == 0


async def test_a_taken_over_entry_is_kept_fresh_with_the_newer_ones(
    redis_client: Any,  # noqa: F811
    stream_name: str,  # noqa: F811
) -> None:
    """An entry taken over from a dead consumer is older than the new entry read before
    it: both are refreshed while their events wait."""
    gate = anyio.Event()
    started: list[str] = []

    class Slow(AccountSaga):
        @on(Deposited, start=True)
        async def deposited(self, state: Balance, event: Deposited) -> Send[Notify]:
            started.append(event.account)
            await gate.wait()
            return await super().deposited(state, event)

    registry = Registry()
    registry.register(Slow(), state=Balance, name="accounts")
    redis_client.xgroup_create(stream_name, "g", id="0", mkstream=True)
    old = redis_client.xadd(stream_name, encode_entry(registry, Deposited("a", 1))).decode()
    redis_client.xreadgroup("g", "dead", {stream_name: ">"})
    new = redis_client.xadd(stream_name, encode_entry(registry, Deposited("b", 1))).decode()

    def idle(entry: str) -> tuple[int, int, str]:
        (row,) = redis_client.xpending_range(stream_name, "g", entry, entry, 1)
        return (
            int(row["time_since_delivered"]),
            int(row["times_delivered"]),
            row["consumer"].decode(),
        )

    async def refreshed(entry: str) -> None:
        before = idle(entry)[0]
        while idle(entry)[0] >= before:
            before = max(before, idle(entry)[0])
            await anyio.sleep(0.02)

    async with (
        Runtime(registry, store=MemoryStore(), dispatch=_nothing, shards=2) as runtime,
        RedisStreamSource(
            redis_client,
            registry,
            stream=stream_name,
            group="g",
            consumer="alive",
            claim_idle=0.6,
            block=0.1,
        ) as source,
    ):
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume, runtime, source, 2)
                while idle(old)[2] != "alive":
                    await anyio.sleep(0.02)
                await refreshed(old)
                await refreshed(new)
                assert (idle(old)[1:], idle(new)[1:]) == ((2, "alive"), (1, "alive"))
                gate.set()

    assert sorted(started) == ["a", "b"]
    assert pending(redis_client, stream_name, "g") == 0


async def test_a_claim_that_finds_our_own_entries_does_not_hand_them_out_twice(
    redis_client: Any,  # noqa: F811
    stream_name: str,  # noqa: F811
) -> None:
    """With `claim_idle=0`, the source's own look for idle entries claims the entry it is
    handling; it is still handled and acknowledged once."""
    gate = anyio.Event()

    class Slow(AccountSaga):
        @on(Deposited, start=True)
        async def deposited(self, state: Balance, event: Deposited) -> Send[Notify]:
            await gate.wait()
            return await super().deposited(state, event)

    registry = Registry()
    registry.register(Slow(), state=Balance, name="accounts")
    entry = redis_client.xadd(stream_name, encode_entry(registry, Deposited("a", 1))).decode()

    def deliveries() -> int:
        rows = redis_client.xpending_range(stream_name, "g", entry, entry, 1)
        return int(rows[0]["times_delivered"]) if rows else 0

    acked: list[Consumed] = []
    async with (
        Runtime(registry, store=MemoryStore(), dispatch=_nothing) as runtime,
        RedisStreamSource(
            redis_client, registry, stream=stream_name, group="g", claim_idle=0, block=0.05
        ) as source,
    ):
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume, runtime, source, 1, acked)
                while deliveries() < 3:
                    await anyio.sleep(0.02)
                gate.set()
        (record,) = await runtime.store.list_instances()

    assert [c.outcome for c in acked] == [Outcome.COMMITTED]
    assert json.loads(record.state) == {"total": 1}
    assert runtime.statistics().events_duplicate == 0


async def test_stop_ends_a_run_that_waits_for_new_entries(
    redis_client: Any,  # noqa: F811
    stream_name: str,  # noqa: F811
) -> None:
    registry = make_registry()
    async with (
        Runtime(registry, store=MemoryStore(), dispatch=_nothing) as runtime,
        RedisStreamSource(redis_client, registry, stream=stream_name, group="g", block=4) as source,
    ):
        counted: list[int] = []

        async def run() -> None:
            counted.append(await runtime.run(source, id=source.event_id, ack=source.ack))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await anyio.wait_all_tasks_blocked()
                source.stop()

    assert counted == [0]


async def test_the_source_must_be_open_and_serve_one_run(
    redis_client: Any,  # noqa: F811
    stream_name: str,  # noqa: F811
) -> None:
    registry = make_registry()
    source = RedisStreamSource(redis_client, registry, stream=stream_name, group="g")
    with pytest.raises(RuntimeError, match="is not open: use it as `async with"):
        await source.__anext__()
    with pytest.raises(RuntimeError, match="event_id\\(\\) is for the event the source gave"):
        source.event_id(Deposited("a", 1))
    with pytest.raises(RuntimeError, match="trace\\(\\) is for the event the source gave"):
        source.trace(Deposited("a", 1))
    with pytest.raises(RuntimeError, match="ack\\(\\) got an event this source did not give"):
        await source.ack([Consumed(Deposited("a", 1), None, Outcome.COMMITTED)])


def test_source_options_are_checked(redis_client: Any) -> None:  # noqa: F811
    registry = make_registry()
    with pytest.raises(ValueError, match="count and max_deliveries must be >= 1"):
        RedisStreamSource(redis_client, registry, stream="s", group="g", max_deliveries=0)
    with pytest.raises(ValueError, match="block must be > 0 seconds"):
        RedisStreamSource(redis_client, registry, stream="s", group="g", block=0)
    client = type(redis_client)(socket_timeout=2)
    with pytest.raises(ValueError, match=r"block=3 s is not below the client's socket timeout"):
        RedisStreamSource(client, registry, stream="s", group="g", block=3)


# -- the dispatcher ---------------------------------------------------------------------


META = DispatchMeta(id="i-1.2.0", saga="accounts", key="a", attempt=1, kind="compensate")


@pytest.mark.parametrize(
    ("route", "streams"),
    [
        ("one", ["one", "one"]),
        ({Notify: "notes"}, ["notes", "notes"]),  # Audit by its base class
        ({Notify: "notes", Audit: "audits"}, ["notes", "audits"]),
        (lambda c: f"cmd:{type(c).__name__}", ["cmd:Notify", "cmd:Audit"]),
    ],
)
def test_the_stream_is_chosen_per_command(route: Any, streams: list[str]) -> None:
    dispatch = RedisStreamDispatcher(None, make_registry(), stream=route)  # type: ignore[arg-type]
    assert [dispatch.stream_for(Notify("a", 1)), dispatch.stream_for(Audit("a", 1))] == streams


def test_a_command_with_no_stream_is_an_error_naming_its_class() -> None:
    dispatch = RedisStreamDispatcher(None, make_registry(), stream={Audit: "audits"})  # type: ignore[arg-type]
    with pytest.raises(LookupError, match="no stream for Notify: add its class"):
        dispatch.stream_for(Notify("a", 1))
    bad = RedisStreamDispatcher(None, make_registry(), stream=lambda c: None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="returned None for Notify"):
        bad.stream_for(Notify("a", 1))


@pytest.mark.parametrize("route", [{"Notify": "notes"}, {Notify: 3}, 42])
def test_a_wrong_route_is_refused_at_once(route: Any) -> None:
    with pytest.raises(TypeError, match=r"RedisStreamDispatcher\(stream="):
        RedisStreamDispatcher(None, make_registry(), stream=route)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("trace", "expected"),
    [
        (None, {}),
        (
            {"traceparent": "00-a-b-01", "tracestate": "k=v", "baggage": "x"},
            {"traceparent": "00-a-b-01", "tracestate": "k=v"},
        ),
    ],
)
def test_entry_fields_carry_id_type_json_origin_and_trace_context(
    trace: Any, expected: dict[str, str]
) -> None:
    registry = make_registry()
    dispatch = RedisStreamDispatcher(None, registry, stream="s")  # type: ignore[arg-type]
    assert dispatch.fields(Audit("a", 3), attrs.evolve(META, trace=trace)) == {
        "id": "i-1.2.0",
        "type": registry.serializer.name_of(Audit),
        "data": JsonText('{"account": "a", "total": 3}'),
        "saga": "accounts",
        "key": "a",
        "kind": "compensate",
        **expected,
    }


async def test_the_dispatcher_appends_to_the_stream_and_trims_it(
    redis_client: Any,  # noqa: F811
    stream_name: str,  # noqa: F811
) -> None:
    registry = make_registry()
    dispatch = RedisStreamDispatcher(redis_client, registry, stream=stream_name, maxlen=1)
    for n in range(300):
        await dispatch(Notify("a", n), attrs.evolve(META, id=f"c{n}"))

    entries = [fields_of(e) for e in redis_client.xrange(stream_name)]
    assert 1 <= len(entries) < 300  # approximately trimmed
    assert entries[-1]["id"] == "c299"
    assert redis_client.xlen(stream_name) == len(entries)


async def test_concurrent_dispatches_are_written_together_and_each_one_once(
    redis_client: Any,  # noqa: F811
    stream_name: str,  # noqa: F811
) -> None:
    """Commands dispatched at once share a pipeline; every caller returns once its own
    entry is written."""
    registry = make_registry()
    dispatch = RedisStreamDispatcher(redis_client, registry, stream=stream_name)

    async def one(n: int) -> None:
        await dispatch(Notify("a", n), attrs.evolve(META, id=f"c{n}"))
        assert f"c{n}" in {f["id"] for f in map(fields_of, redis_client.xrange(stream_name))}

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for n in range(50):
                tg.start_soon(one, n)

    ids = [fields_of(e)["id"] for e in redis_client.xrange(stream_name)]
    assert sorted(ids) == sorted(f"c{n}" for n in range(50))


async def test_a_dispatch_that_cannot_reach_redis_fails_every_caller(redis_url: str) -> None:  # noqa: F811
    import redis

    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    dispatch = RedisStreamDispatcher(unreachable, make_registry(), stream="s")
    failures: list[str] = []

    async def one(n: int) -> None:
        try:
            await dispatch(Notify("a", n), attrs.evolve(META, id=f"c{n}"))
        except redis.ConnectionError as exc:
            failures.append(type(exc).__name__)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for n in range(5):
                tg.start_soon(one, n)

    assert failures == ["ConnectionError"] * 5
