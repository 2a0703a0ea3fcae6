"""`MemoryStore`: the store protocol in process memory, for tests and ephemeral runs."""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, MutableMapping, Sequence
from operator import attrgetter
from typing import Any, Generic, TypeVar

import anyio.lowlevel
import attrs

from ..exceptions import ConflictError
from ._protocol import (
    COMPLETING,
    Association,
    Changes,
    DeadLetter,
    InstanceRecord,
    Loaded,
    LoadRequest,
    OutboxRecord,
    PendingCommand,
    RowCounts,
    ScheduleRecord,
    Tombstone,
    row_counts,
)

__all__ = ["MemoryStore"]

_R = TypeVar("_R")
_PURGE = 256  # expired tombstones a commit removes, plus twice those it writes
_Ref = tuple[str, str]
_ScheduleKey = tuple[str, str, str]


class _Packed(MutableMapping[Any, _R], Generic[_R]):
    """A dict of records kept as tuples of their fields, built again when read.

    A tuple of strings and numbers is untracked by the cyclic garbage collector once it
    has survived a collection, while an attrs object stays tracked for good: with a
    hundred thousand live instances, full collections that walk every stored record
    took half the run's time.
    """

    __slots__ = ("_cls", "_rows", "pack")

    def __init__(self, cls: type[_R]) -> None:
        self._cls = cls
        self.pack: Callable[[_R], tuple[Any, ...]]
        self.pack = attrgetter(*(f.name for f in attrs.fields(cls)))  # type: ignore[arg-type]
        self._rows: dict[Any, tuple[Any, ...]] = {}

    def __getitem__(self, key: Any) -> _R:
        return self._cls(*self._rows[key])

    def get(self, key: Any, default: Any = None) -> Any:
        row = self._rows.get(key)
        return default if row is None else self._cls(*row)

    def __setitem__(self, key: Any, record: _R) -> None:
        self._rows[key] = self.pack(record)

    def __delitem__(self, key: Any) -> None:
        del self._rows[key]

    def pop(self, key: Any, *default: Any) -> Any:
        row = self._rows.pop(key, _MISSING)
        if row is _MISSING:
            if default:
                return default[0]
            raise KeyError(key)
        return self._cls(*row)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    @property
    def rows(self) -> dict[Any, tuple[Any, ...]]:
        """The tuples themselves, for reads of a field or two (see the `_field` indexes)."""
        return self._rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


_MISSING: Any = object()
# Where a field sits in a packed record's tuple.
_I_SAGA, _I_STATUS, _VERSION = (
    [f.name for f in attrs.fields(InstanceRecord)].index(n) for n in ("saga", "status", "version")
)
_S_ID, _S_SAGA, _S_KEY, _S_NAME = (
    [f.name for f in attrs.fields(ScheduleRecord)].index(n) for n in ("id", "saga", "key", "name")
)


@attrs.define(eq=False)
class MemoryStore:
    """Keeps everything in dictionaries; nothing survives the process.

    It implements the whole store protocol, dedup marks included (kept until they
    expire), so code tested on it behaves as on a durable store. Several runtimes may
    share one `MemoryStore` object; optimistic versions keep them apart.
    """

    _instances: _Packed[InstanceRecord] = attrs.field(
        factory=lambda: _Packed(InstanceRecord), init=False
    )
    _outbox: dict[str, OutboxRecord] = attrs.field(factory=dict, init=False)
    _outbox_of: dict[_Ref, set[str]] = attrs.field(factory=dict, init=False)
    _schedules: _Packed[ScheduleRecord] = attrs.field(
        factory=lambda: _Packed(ScheduleRecord), init=False
    )
    _schedule_ids: dict[str, _ScheduleKey] = attrs.field(factory=dict, init=False)
    _schedule_names: dict[_Ref, tuple[str, ...]] = attrs.field(factory=dict, init=False)
    # A heap of (due, seq, id, token, key); an entry counts only while `_tokens[key]` is
    # still its token, so replaced and deleted schedules leave stale entries behind.
    _due: list[tuple[float, int, str, int, _ScheduleKey]] = attrs.field(factory=list, init=False)
    _tokens: dict[_ScheduleKey, int] = attrs.field(factory=dict, init=False)
    _next_token: int = attrs.field(default=0, init=False)
    _dead: dict[str, DeadLetter] = attrs.field(factory=dict, init=False)
    _marks: dict[tuple[str, str, str], float] = attrs.field(factory=dict, init=False)
    # (saga, name, value) -> keys, and (saga, key) -> (name, value) pairs: both ways.
    _associated: dict[tuple[str, str, str], set[str]] = attrs.field(factory=dict, init=False)
    _associations_of: dict[_Ref, set[tuple[str, str]]] = attrs.field(factory=dict, init=False)
    _tombstones: _Packed[Tombstone] = attrs.field(factory=lambda: _Packed(Tombstone), init=False)
    # (expires_at, ref): purged in expiry order by commits that write tombstones; an
    # entry whose tombstone was replaced or deleted meanwhile is skipped.
    _expiry: list[tuple[float, _Ref]] = attrs.field(factory=list, init=False)
    _now: float | None = attrs.field(default=None, init=False)
    _loads: int = attrs.field(default=0, init=False)

    async def open(self) -> None:
        """Nothing to open."""
        await anyio.lowlevel.checkpoint()

    async def close(self) -> None:
        """Nothing to close; the data stays for the next runtime using this object."""
        await anyio.lowlevel.checkpoint()

    async def load(self, request: LoadRequest) -> Loaded:
        """Read instances (or their unexpired tombstones), unexpired dedup marks and
        pending schedule ids."""
        await anyio.lowlevel.checkpoint()
        now = request.now
        self._now = now if self._now is None else max(self._now, now)
        instances: dict[_Ref, InstanceRecord] = {}
        tombstones: dict[_Ref, Tombstone] = {}
        for ref in request.instances:
            record = self._instances.get(ref)
            if record is not None:
                instances[ref] = record
            elif (t := self._tombstones.get(ref)) is not None and t.expires_at >= now:
                tombstones[ref] = t
        marks = {m for m in request.marks if self._marks.get(m, float("-inf")) >= now}
        ids = {i for i in request.schedule_ids if i in self._schedule_ids}
        self._loads += 1
        if self._loads % 4096 == 0:
            self._marks = {m: t for m, t in self._marks.items() if t >= now}
        return Loaded(instances=instances, marks=marks, schedule_ids=ids, tombstones=tombstones)

    async def commit(self, changes: Changes) -> None:
        """Apply `changes` atomically; raise `ConflictError` on a version mismatch."""
        await anyio.lowlevel.checkpoint()
        conflicts = self._conflicts(changes)
        if conflicts:
            raise ConflictError(conflicts)

        for d in changes.deletes:
            ref = (d.saga, d.key)
            self._instances.rows.pop(ref, None)
            self._clear_schedules(ref)
            for oid in self._outbox_of.pop(ref, ()):
                self._outbox.pop(oid, None)
            for name, value in self._associations_of.get(ref, set()).copy():
                self._dissociate(Association(d.saga, name, value, d.key))
        rows, pack = self._instances.rows, self._instances.pack
        for w in changes.writes:
            rows[(w.record.saga, w.record.key)] = pack(w.record)
        for a in changes.association_deletes:
            self._dissociate(a)
        for a in changes.association_puts:
            self._associated.setdefault((a.saga, a.name, a.value), set()).add(a.key)
            self._associations_of.setdefault((a.saga, a.key), set()).add((a.name, a.value))
        for ref in changes.tombstone_deletes:
            self._tombstones.pop(ref, None)
        for t in changes.tombstones:
            ref = (t.tombstone.saga, t.tombstone.key)
            self._tombstones[ref] = t.tombstone
            heapq.heappush(self._expiry, (t.tombstone.expires_at, ref))
        if changes.tombstones:
            self._purge(_PURGE + 2 * len(changes.tombstones))
        for ref in changes.schedule_clears:
            self._clear_schedules(ref)
        for sd in changes.schedule_deletes:
            self._drop_schedule((sd.saga, sd.key, sd.name))
        for s in changes.schedule_puts:
            self._put_schedule(s)
        if len(self._due) > 2 * len(self._schedules) + 64:
            self._rebuild_due()
        for oid in changes.outbox_deletes:
            self._drop_outbox(oid)
        outbox, outbox_of = self._outbox, self._outbox_of
        for o in changes.outbox_adds:
            if o.id in outbox:
                self._drop_outbox(o.id)
            outbox[o.id] = o
            ref = (o.saga, o.key)
            ids = outbox_of.get(ref)
            if ids is None:
                outbox_of[ref] = {o.id}
            else:
                ids.add(o.id)
        for u in changes.outbox_updates:
            row = self._outbox.get(u.id)
            if row is not None:
                self._outbox[u.id] = attrs.evolve(
                    row, attempts=u.attempts, due=u.due, error=u.error
                )
        for did in changes.dead_letter_deletes:
            self._dead.pop(did, None)
        for dl in changes.dead_letters:
            self._dead[dl.id] = dl
        for m in changes.marks:
            self._marks[(m.saga, m.key, m.event_id)] = m.expires_at

    def _conflicts(self, changes: Changes) -> list[_Ref]:
        """The instances whose expected version does not match, in the order applied.

        Deletes apply before writes, so a write after a delete of the same instance
        expects version 0 (a new incarnation).
        """
        instances = self._instances.rows
        versions: dict[_Ref, int] = {}
        conflicts: dict[_Ref, None] = {}
        checks = [((d.saga, d.key), d.expected_version, 0) for d in changes.deletes]
        checks += [
            ((w.record.saga, w.record.key), w.expected_version, w.record.version)
            for w in changes.writes
        ]
        for ref, expected, after in checks:
            if ref in versions:
                current = versions[ref]
            else:
                row = instances.get(ref)
                current = 0 if row is None else row[_VERSION]
            if current != expected:
                conflicts[ref] = None
            versions[ref] = after
        tombstones = self._tombstones
        gone = set(changes.tombstone_deletes)
        for t in changes.tombstones:
            ref = (t.tombstone.saga, t.tombstone.key)
            if t.expected_version:
                stored = None if ref in gone else tombstones.get(ref)
                if stored is None or stored.version != t.expected_version:
                    conflicts[ref] = None
        return list(conflicts)

    def _dissociate(self, a: Association) -> None:
        keys = self._associated.get((a.saga, a.name, a.value))
        if keys is not None:
            keys.discard(a.key)
            if not keys:
                del self._associated[(a.saga, a.name, a.value)]
        pairs = self._associations_of.get((a.saga, a.key))
        if pairs is not None:
            pairs.discard((a.name, a.value))
            if not pairs:
                del self._associations_of[(a.saga, a.key)]

    def _purge(self, limit: int) -> None:
        """Drop up to `limit` tombstones that expired before the latest load's time."""
        expiry, now = self._expiry, self._now
        while expiry and limit and now is not None and expiry[0][0] < now:
            expires_at, ref = heapq.heappop(expiry)
            tombstone = self._tombstones.get(ref)
            if tombstone is not None and tombstone.expires_at == expires_at:
                del self._tombstones[ref]
                limit -= 1

    def _put_schedule(self, s: ScheduleRecord) -> None:
        skey = (s.saga, s.key, s.name)
        self._drop_schedule(skey)
        other = self._schedule_ids.get(s.id)
        if other is not None:
            self._drop_schedule(other)
        self._schedules[skey] = s
        self._schedule_ids[s.id] = skey
        names = self._schedule_names.get((s.saga, s.key), ())
        if s.name not in names:  # (tuples: untracked by the garbage collector)
            self._schedule_names[(s.saga, s.key)] = (*names, s.name)
        self._next_token += 1
        self._tokens[skey] = self._next_token
        heapq.heappush(self._due, (s.due, s.seq, s.id, self._next_token, skey))

    def _rebuild_due(self) -> None:
        self._due = [
            (s.due, s.seq, s.id, self._tokens[skey], skey) for skey, s in self._schedules.items()
        ]
        heapq.heapify(self._due)

    def _drop_schedule(self, skey: _ScheduleKey) -> None:
        old = self._schedules.rows.pop(skey, None)
        if old is not None:
            del self._tokens[skey]
            self._schedule_ids.pop(old[_S_ID], None)
            ref = (old[_S_SAGA], old[_S_KEY])
            names = self._schedule_names.get(ref)
            if names is not None:
                name = old[_S_NAME]
                rest = () if names == (name,) else tuple(n for n in names if n != name)
                if rest:
                    self._schedule_names[ref] = rest
                else:
                    del self._schedule_names[ref]

    def _clear_schedules(self, ref: _Ref) -> None:
        for name in list(self._schedule_names.get(ref, ())):
            self._drop_schedule((*ref, name))

    def _drop_outbox(self, oid: str) -> None:
        row = self._outbox.pop(oid, None)
        if row is not None:
            ids = self._outbox_of.get((row.saga, row.key))
            if ids is not None:
                ids.discard(oid)
                if not ids:
                    del self._outbox_of[(row.saga, row.key)]

    def _prune_due(self) -> None:
        due = self._due
        while due and self._tokens.get(due[0][4]) != due[0][3]:
            heapq.heappop(due)

    async def next_due(self, *, sagas: Collection[str] | None = None) -> float | None:
        """The earliest due time of any pending schedule (of `sagas`, if given), or `None`."""
        await anyio.lowlevel.checkpoint()
        self._prune_due()
        if not self._due:
            return None
        if sagas is None or self._due[0][4][0] in sagas:
            return self._due[0][0]  # the common case: the earliest is of a wanted saga
        wanted = set(sagas)
        window = 64
        while True:
            entries = heapq.nsmallest(window, self._due)
            for when, _, _, token, skey in entries:
                if skey[0] in wanted and self._tokens.get(skey) == token:
                    return when
            if len(entries) < window:
                return None
            window *= 4

    async def due_schedules(
        self, now: float, limit: int, *, sagas: Collection[str] | None = None
    ) -> list[ScheduleRecord]:
        """Up to `limit` schedules (of `sagas`, if given) due at or before `now`,
        earliest first."""
        await anyio.lowlevel.checkpoint()
        self._prune_due()
        wanted = None if sagas is None else set(sagas)
        # The heap holds stale entries (at most about half of it, see `commit`): look a
        # little further than `limit`, and further still if that was not enough.
        window = limit * 2 + 16
        while True:
            found: list[ScheduleRecord] = []
            entries = heapq.nsmallest(window, self._due)
            for when, _, _, token, skey in entries:
                if when > now or len(found) >= limit:
                    return found
                if self._tokens.get(skey) == token and (wanted is None or skey[0] in wanted):
                    found.append(self._schedules[skey])
            if len(entries) < window:
                return found
            window *= 2

    async def pending_commands(
        self,
        *,
        after: tuple[str, str] | None = None,
        limit: int,
        sagas: Collection[str] | None = None,
    ) -> list[PendingCommand]:
        """Up to `limit` outbox rows of the instances after `after`, by instance and seq,
        with their instances' statuses."""
        await anyio.lowlevel.checkpoint()
        wanted = None if sagas is None else set(sagas)
        refs = heapq.nsmallest(
            limit,
            (
                ref
                for ref in self._outbox_of
                if (after is None or ref > after) and (wanted is None or ref[0] in wanted)
            ),
        )
        found: list[PendingCommand] = []
        for ref in refs:
            record = self._instances.get(ref)
            status = None if record is None else record.status
            rows = sorted((self._outbox[i] for i in self._outbox_of[ref]), key=_in_order)
            found.extend(PendingCommand(row, status) for row in rows[: limit - len(found)])
            if len(found) >= limit:
                break
        return found

    async def drained_instances(
        self,
        *,
        after: tuple[str, str] | None = None,
        limit: int,
        sagas: Collection[str] | None = None,
    ) -> list[tuple[str, str]]:
        """Up to `limit` completing instances without outbox rows, by saga and key."""
        await anyio.lowlevel.checkpoint()
        wanted = None if sagas is None else set(sagas)
        return heapq.nsmallest(
            limit,
            (
                ref
                for ref, record in self._instances.items()
                if record.status == COMPLETING
                and ref not in self._outbox_of
                and (after is None or ref > after)
                and (wanted is None or ref[0] in wanted)
            ),
        )

    async def saga_names(self) -> set[str]:
        """The names of the sagas that have instances, schedules or outbox rows."""
        await anyio.lowlevel.checkpoint()
        names = {saga for saga, _ in self._instances}
        names.update(saga for saga, _, _ in self._schedules)
        names.update(row.saga for row in self._outbox.values())
        return names

    async def rename_saga(self, old: str, new: str) -> int:
        """Move the rows of saga `old` to `new`, except keys `new` already has."""
        await anyio.lowlevel.checkpoint()
        taken = {k for s, k in self._instances if s == new}
        for s, key, name in [k for k in self._schedules if k[0] == old and k[1] not in taken]:
            if (new, key, name) not in self._schedules:
                schedule = self._schedules[(s, key, name)]
                self._drop_schedule((s, key, name))
                self._put_schedule(attrs.evolve(schedule, saga=new))
        for row in [r for r in self._outbox.values() if r.saga == old and r.key not in taken]:
            self._drop_outbox(row.id)
            self._outbox[row.id] = attrs.evolve(row, saga=new)
            self._outbox_of.setdefault((new, row.key), set()).add(row.id)
        for did, letter in self._dead.items():
            if letter.saga == old and letter.key not in taken:
                self._dead[did] = attrs.evolve(letter, saga=new)
        for mark in [m for m in self._marks if m[0] == old and m[1] not in taken]:
            if (new, *mark[1:]) not in self._marks:
                self._marks[(new, *mark[1:])] = self._marks.pop(mark)
        for (saga, key), pairs in list(self._associations_of.items()):
            if saga == old and key not in taken:
                for name, value in pairs.copy():
                    self._dissociate(Association(old, name, value, key))
                    self._associated.setdefault((new, name, value), set()).add(key)
                    self._associations_of.setdefault((new, key), set()).add((name, value))
        for ref in [r for r in self._tombstones if r[0] == old and r[1] not in taken]:
            if (new, ref[1]) not in self._tombstones:
                tombstone = self._tombstones.pop(ref)
                self._tombstones[(new, ref[1])] = attrs.evolve(tombstone, saga=new)
                heapq.heappush(self._expiry, (tombstone.expires_at, (new, ref[1])))
        moved = [ref for ref in self._instances if ref[0] == old and ref[1] not in taken]
        for ref in moved:
            self._instances[(new, ref[1])] = attrs.evolve(self._instances.pop(ref), saga=new)
        return len(moved)

    async def list_instances(
        self, *, saga: str | None = None, status: str | None = None, limit: int | None = None
    ) -> list[InstanceRecord]:
        """Instances, optionally of one saga or status, ordered by saga and key."""
        await anyio.lowlevel.checkpoint()
        # Filtered on the packed tuples: the runtime's sweep asks for the few instances
        # of one status, and building every record to look at it cost a full pass.
        make = InstanceRecord
        rows = sorted(
            (
                make(*row)
                for row in self._instances.rows.values()
                if (saga is None or row[_I_SAGA] == saga)
                and (status is None or row[_I_STATUS] == status)
            ),
            key=lambda r: (r.saga, r.key),
        )
        return rows if limit is None else rows[:limit]

    async def list_outbox(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[OutboxRecord]:
        """Pending outbox rows, ordered by saga, key and seq."""
        await anyio.lowlevel.checkpoint()
        return sorted(
            (
                o
                for o in self._outbox.values()
                if (saga is None or o.saga == saga) and (key is None or o.key == key)
            ),
            key=lambda o: (o.saga, o.key, o.seq, o.id),
        )

    async def scan_instances(
        self, *, after: tuple[str, str] | None = None, limit: int
    ) -> list[InstanceRecord]:
        """Up to `limit` instances ordered by `(saga, key)`, those after `after` only."""
        await anyio.lowlevel.checkpoint()
        return _page(self._instances, after, limit)

    async def scan_outbox(self, *, after: str | None = None, limit: int) -> list[OutboxRecord]:
        """Up to `limit` outbox rows ordered by id, those after `after` only."""
        await anyio.lowlevel.checkpoint()
        return _page(self._outbox, after, limit)

    async def scan_schedules(
        self, *, after: tuple[str, str, str] | None = None, limit: int
    ) -> list[ScheduleRecord]:
        """Up to `limit` schedules ordered by `(saga, key, name)`, those after `after` only."""
        await anyio.lowlevel.checkpoint()
        return _page(self._schedules, after, limit)

    async def scan_dead_letters(self, *, after: str | None = None, limit: int) -> list[DeadLetter]:
        """Up to `limit` dead letters ordered by id, those after `after` only."""
        await anyio.lowlevel.checkpoint()
        return _page(self._dead, after, limit)

    async def scan_tombstones(
        self, *, after: tuple[str, str] | None = None, limit: int
    ) -> list[Tombstone]:
        """Up to `limit` tombstones ordered by `(saga, key)`, those after `after` only."""
        await anyio.lowlevel.checkpoint()
        return _page(self._tombstones, after, limit)

    async def list_schedules(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[ScheduleRecord]:
        """Pending schedules, ordered by due time, then seq."""
        await anyio.lowlevel.checkpoint()
        return sorted(
            (
                s
                for s in self._schedules.values()
                if (saga is None or s.saga == saga) and (key is None or s.key == key)
            ),
            key=lambda s: (s.due, s.seq, s.id),
        )

    async def find_associated(
        self, saga: str, name: str, values: Sequence[str]
    ) -> dict[str, list[str]]:
        """The keys of the instances of `saga` associated with each of `values`."""
        await anyio.lowlevel.checkpoint()
        found = {}
        for value in values:
            keys = self._associated.get((saga, name, value))
            if keys:
                found[value] = sorted(keys)
        return found

    async def list_associations(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[Association]:
        """Associations, optionally of one saga or instance, ordered by saga, key, name
        and value."""
        await anyio.lowlevel.checkpoint()
        return sorted(
            (
                Association(s, name, value, k)
                for (s, k), pairs in self._associations_of.items()
                if (saga is None or s == saga) and (key is None or k == key)
                for name, value in pairs
            ),
            key=lambda a: (a.saga, a.key, a.name, a.value),
        )

    async def list_dead_letters(self, *, saga: str | None = None) -> list[DeadLetter]:
        """Dead letters, oldest first."""
        await anyio.lowlevel.checkpoint()
        return sorted(
            (d for d in self._dead.values() if saga is None or d.saga == saga),
            key=lambda d: (d.failed_at, d.id),
        )

    async def list_tombstones(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[Tombstone]:
        """Tombstones, optionally of one saga or key, ordered by saga and key."""
        await anyio.lowlevel.checkpoint()
        return sorted(
            (
                t
                for t in self._tombstones.values()
                if (saga is None or t.saga == saga) and (key is None or t.key == key)
            ),
            key=lambda t: (t.saga, t.key),
        )

    async def count_rows(self, *, now: float) -> RowCounts:
        """How many rows of each kind the store holds (see `Store.count_rows`)."""
        await anyio.lowlevel.checkpoint()
        statuses = Counter(r.status for r in self._instances.values())
        due = sum(1 for s in self._schedules.values() if s.due <= now)
        return row_counts(statuses, len(self._outbox), len(self._schedules), due, len(self._dead))


def _page(rows: Mapping[Any, _R], after: Any, limit: int) -> list[_R]:
    """The `limit` rows with the smallest keys above `after` (one pass, no full sort)."""
    keys = rows if after is None else (k for k in rows if k > after)
    return [rows[k] for k in heapq.nsmallest(limit, keys)]


def _in_order(row: OutboxRecord) -> tuple[int, str]:
    return row.seq, row.id
