"""The pre-deploy check: decode every stored row with the current code, changing nothing.

`Admin.check` and `sagaflow check` page through every table of a store (instances,
outbox, schedules, dead letters, tombstones and, in cluster mode, the inbox) with the
stores' `scan_*` methods and decode each row exactly as a runtime would: states through
their saga's upcasters (the final states tombstones keep too, for the sagas whose
`late=True` handlers would read them), messages through the serializer's allow-list and
upcasters. Each row
is ok, would be upcast, or would fail; the report counts them by kind of row, saga,
type and version, and lists the rows that would fail.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import attrs

from ._registry import Registry, SagaSpec
from ._serialization import split_type_name
from .exceptions import DecodeError, UnknownTypeError
from .stores._claims import ClusterStore
from .stores._protocol import InstanceRecord, Store, Tombstone

__all__ = [
    "DEAD_LETTER",
    "FAIL",
    "INBOX",
    "OK",
    "OUTBOX",
    "SCHEDULE",
    "STATE",
    "TOMBSTONE",
    "UPCAST",
    "CheckFailure",
    "CheckGroup",
    "CheckReport",
    "check",
]

STATE, OUTBOX, SCHEDULE, DEAD_LETTER, INBOX = "state", "outbox", "schedule", "dead_letter", "inbox"
TOMBSTONE = "tombstone"
OK, UPCAST, FAIL = "ok", "upcast", "fail"
_WHAT_ORDER = {w: i for i, w in enumerate((STATE, OUTBOX, SCHEDULE, DEAD_LETTER, TOMBSTONE, INBOX))}
_OUTCOME_ORDER = {OK: 0, UPCAST: 1, FAIL: 2}
_LABELS = {
    STATE: "state",
    OUTBOX: "command",
    SCHEDULE: "schedule",
    DEAD_LETTER: "dead letter",
    TOMBSTONE: "tombstone state",
    INBOX: "inbox event",
}

R = TypeVar("R")


@attrs.frozen
class CheckFailure:
    """A stored row that the current code could not read.

    Attributes:
        saga: The saga's name as stored in the row (an older name, for a row under an
            alias).
        key: The instance key.
        id: The row's id: the instance id of a state, the command id of an outbox row,
            the schedule's id, the dead letter's id, the inbox position.
        error: Why it cannot be read, naming the saga, key, version and field.
    """

    saga: str
    key: str
    id: str
    error: str


@attrs.frozen
class CheckGroup:
    """The rows of one kind, saga, type and version that had the same outcome.

    Attributes:
        what: The kind of row: `"state"`, `"outbox"`, `"schedule"`, `"dead_letter"`,
            `"tombstone"` (the final state a finished instance keeps for late handlers)
            or `"inbox"`.
        saga: The registered saga the rows belong to (rows stored under one of its
            aliases count as its own); for rows of a saga that is not registered, the
            name they are stored under.
        type_name: The stored type name without its version (for a state: its state
            class's name; empty for a saga that is not registered).
        version: The version the rows were written at.
        outcome: `"ok"` (read as they are), `"upcast"` (read through upcasters) or
            `"fail"` (cannot be read).
        count: How many rows.
        failures: For `"fail"`: the first failing rows (all of them, or as many as
            the check was told to list; `count` is the total).
    """

    what: str
    saga: str
    type_name: str
    version: int
    outcome: str
    count: int
    failures: tuple[CheckFailure, ...] = ()


@attrs.frozen
class CheckReport:
    """What `Admin.check` found: every stored row, counted by group, and the failures.

    Attributes:
        groups: The groups, ordered by kind of row, saga, type, version and outcome.
    """

    groups: tuple[CheckGroup, ...] = ()

    @property
    def ok(self) -> bool:
        """`True` when no row would fail: the code may be deployed on this store."""
        return self.failed == 0

    @property
    def rows(self) -> int:
        """How many rows were checked."""
        return sum(g.count for g in self.groups)

    @property
    def upcast(self) -> int:
        """How many rows would be read through upcasters."""
        return sum(g.count for g in self.groups if g.outcome == UPCAST)

    @property
    def failed(self) -> int:
        """How many rows could not be read."""
        return sum(g.count for g in self.groups if g.outcome == FAIL)

    @property
    def failures(self) -> tuple[CheckFailure, ...]:
        """The failing rows listed in the groups, in group order."""
        return tuple(f for g in self.groups for f in g.failures)


_GroupKey = tuple[str, str, str, int, str]


@attrs.define(eq=False)
class _Tally:
    """Counts rows by group, keeping the first failures of each."""

    listed: int | None
    counts: dict[_GroupKey, int] = attrs.field(factory=dict)
    failures: dict[_GroupKey, list[CheckFailure]] = attrs.field(factory=dict)

    def add(self, group: _GroupKey, failure: CheckFailure | None = None) -> None:
        self.counts[group] = self.counts.get(group, 0) + 1
        if failure is not None:
            kept = self.failures.setdefault(group, [])
            if self.listed is None or len(kept) < self.listed:
                kept.append(failure)

    def report(self) -> CheckReport:
        def order(group: _GroupKey) -> tuple[Any, ...]:
            what, saga, type_name, version, outcome = group
            return (_WHAT_ORDER[what], saga, type_name, version, _OUTCOME_ORDER[outcome])

        return CheckReport(
            tuple(
                CheckGroup(*group, count, tuple(self.failures.get(group, ())))
                for group, count in sorted(self.counts.items(), key=lambda item: order(item[0]))
            )
        )


@attrs.define(eq=False)
class _Checker:
    """Decodes rows as a runtime would and tallies the outcomes."""

    registry: Registry
    tally: _Tally
    sagas: dict[str, SagaSpec] = attrs.field(init=False)
    aliases: dict[str, str] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.sagas = self.registry.sagas
        self.aliases = self.registry.aliases

    def spec(self, stored: str) -> SagaSpec | None:
        return self.sagas.get(self.aliases.get(stored, stored))

    def orphan(self, what: str, saga: str, key: str, id: str, type_name: str, version: int) -> None:
        error = (
            f"saga {saga!r} is neither registered nor an alias of a registered saga: no "
            f"runtime would read this {_LABELS[what]} of key {key!r}; register the saga "
            "again, name it in aliases=(...) of the saga that replaced it, or abort its "
            "instances and discard its dead letters"
        )
        self.tally.add((what, saga, type_name, version, FAIL), CheckFailure(saga, key, id, error))

    def state(self, record: InstanceRecord) -> None:
        saga, key, id, version = record.saga, record.key, record.instance_id, record.state_version
        spec = self.spec(saga)
        if spec is None:
            self.orphan(STATE, saga, key, id, "", version)
            return
        group = (STATE, spec.name, spec.state_name, version)
        try:
            spec.load_record(self.registry.serializer, record)
        except DecodeError as exc:
            self.tally.add((*group, FAIL), CheckFailure(saga, key, id, str(exc)))
        else:
            self.tally.add((*group, OK if version == spec.version else UPCAST))

    def tombstone(self, t: Tombstone) -> None:
        """A final state kept for late handlers; others are never decoded, so skipped
        (so are those of sagas that are gone: no event can reach them)."""
        spec = self.spec(t.saga)
        if t.state is None or spec is None or not spec.late_handlers:
            return
        group = (TOMBSTONE, spec.name, spec.state_name, t.state_version)
        try:
            spec.load_state(self.registry.serializer, t.key, t.state, t.state_version)
        except DecodeError as exc:
            failure = CheckFailure(t.saga, t.key, t.instance_id, str(exc))
            self.tally.add((*group, FAIL), failure)
        else:
            self.tally.add((*group, OK if t.state_version == spec.version else UPCAST))

    def message(
        self, what: str, saga: str, key: str, id: str, type_name: str, payload: str
    ) -> None:
        base, version = split_type_name(type_name)
        spec = self.spec(saga)
        if spec is None:
            self.orphan(what, saga, key, id, base, version)
            return
        group = (what, spec.name, base, version)
        serializer = self.registry.serializer
        try:
            current = serializer.version_of(serializer.resolve(type_name))
            serializer.decode(type_name, payload, saga=saga, key=key)
        except (DecodeError, UnknownTypeError) as exc:
            self.tally.add((*group, FAIL), CheckFailure(saga, key, id, str(exc)))
        else:
            self.tally.add((*group, OK if version == current else UPCAST))


async def _pages(
    scan: Callable[..., Awaitable[list[R]]], last: Callable[[R], Any], page: int
) -> AsyncIterator[list[R]]:
    """The pages of a `scan_*` method, each read after the previous page's last key."""
    after = None
    while True:
        rows = await scan(after=after, limit=page)
        if rows:
            yield rows
        if len(rows) < page:
            return
        after = last(rows[-1])


async def check(store: Store, registry: Registry, *, page: int, listed: int | None) -> CheckReport:
    """Decode every row of `store` with `registry`; see `Admin.check`."""
    if type(page) is not int or page < 1:
        raise ValueError(f"the check reads pages of at least 1 row, not page={page!r}")
    if listed is not None and (type(listed) is not int or listed < 0):
        raise ValueError(f"failures_per_group must be None or an int >= 0, not {listed!r}")
    checker = _Checker(registry, _Tally(listed))
    async for instances in _pages(store.scan_instances, lambda r: (r.saga, r.key), page):
        for r in instances:
            checker.state(r)
    async for outbox in _pages(store.scan_outbox, lambda o: o.id, page):
        for o in outbox:
            checker.message(OUTBOX, o.saga, o.key, o.id, o.type_name, o.payload)
    async for schedules in _pages(store.scan_schedules, lambda s: (s.saga, s.key, s.name), page):
        for s in schedules:
            checker.message(SCHEDULE, s.saga, s.key, s.id, s.type_name, s.payload)
    async for letters in _pages(store.scan_dead_letters, lambda d: d.id, page):
        for d in letters:
            checker.message(DEAD_LETTER, d.saga, d.key, d.id, d.type_name, d.payload)
    async for tombstones in _pages(store.scan_tombstones, lambda t: (t.saga, t.key), page):
        for t in tombstones:
            checker.tombstone(t)
    if isinstance(store, ClusterStore):
        async for inbox in _pages(store.scan_inbox, lambda i: i.pos, page):
            for i in inbox:
                checker.message(INBOX, i.saga, i.key, str(i.pos), i.type_name, i.payload)
    return checker.tally.report()
