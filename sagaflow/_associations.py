"""Routing by association: the tally of one fan-out, and a shard's cache of lookups.

An event that a saga correlates `via=name` goes to every shard, since each instance's
events are handled in its own shard, in order: each shard looks the value up among the
associations of its own instances, and hands the event to each of them as if it had
been published for that key. A `Fanout` counts what the shards found, so that an event
no instance is associated with is reported as unmatched once, by the last shard that
looked. (Cluster mode's `publish` looks the value up in the store instead and puts one
inbox row per instance found.)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs

from .stores._protocol import Association

if TYPE_CHECKING:
    from ._shard import Shard

__all__ = ["AssociationCache", "Fanout", "Lookup", "resolve"]

_Ref = tuple[str, str]
Lookup = tuple[str, str, str]
"""An association lookup: `(saga, name, value)`."""


@attrs.define(eq=False)
class Fanout:
    """One event routed via an association to one saga, as every shard sees it.

    An instance whose earlier events wait behind a handler retry is not decided on
    when its shard looks: it gets the event if it is associated once those are handled
    (they may associate or dissociate it), and tells the tally then.

    Attributes:
        saga: The saga's name.
        name: The association's name (the correlate function's `via`).
        value: What the correlate function returned.
        shards: How many shards have yet to look.
        found: How many instances the event reached so far.
        pending: How many instances waiting behind a retry have yet to be decided on.
    """

    saga: str
    name: str
    value: str
    shards: int
    found: int = 0
    pending: int = 0

    def looked(self, found: int, waiting: int = 0) -> bool:
        """One shard looked: it found `found` instances, and `waiting` that wait behind
        a retry. `True` when the event is known to have reached no instance at all."""
        self.found += found
        self.pending += waiting
        self.shards -= 1
        return self._unmatched()

    def decided(self, found: bool) -> bool:
        """An instance that waited behind a retry was (or was not) associated when its
        turn came. `True` when the event is known to have reached no instance at all."""
        self.found += found
        self.pending -= 1
        return self._unmatched()

    def _unmatched(self) -> bool:
        return self.shards == 0 and self.pending == 0 and self.found == 0

    @property
    def lookup(self) -> Lookup:
        """What is looked up: `(saga, name, value)`."""
        return (self.saga, self.name, self.value)

    def reason(self) -> str:
        """Why the event reached no instance, naming the association."""
        return f"no instance is associated with {self.name}={self.value!r}"


@attrs.define(eq=False)
class AssociationCache:
    """Which of one shard's instances each looked-up value is associated with.

    Exact in single-process mode: only the shard's own batches change its instances'
    associations, and it updates the cache after each of their commits (`put`,
    `delete`, `forget`). With `size` 0 (cluster mode, where other processes change
    them too) it keeps nothing, so every lookup reads the store. `size` bounds the keys
    held plus one per lookup; the least recently used lookups go first.
    """

    size: int
    _lookups: OrderedDict[Lookup, set[str]] = attrs.field(factory=OrderedDict, init=False)
    _of: dict[_Ref, set[Lookup]] = attrs.field(factory=dict, init=False)
    """For each instance, the cached lookups it is in (to forget it when it ends)."""
    _weight: int = attrs.field(default=0, init=False)

    def get(self, saga: str, name: str, value: str) -> set[str] | None:
        """The keys associated with `value`, or `None` if it is not cached."""
        lookup = (saga, name, value)
        keys = self._lookups.get(lookup)
        if keys is not None:
            self._lookups.move_to_end(lookup)
        return keys

    def fill(self, saga: str, name: str, value: str, keys: Iterable[str]) -> None:
        """Remember what the store answered for `value` (this shard's keys only)."""
        if self.size <= 0:
            return
        lookup = (saga, name, value)
        self._drop(lookup)
        found = set(keys)
        self._lookups[lookup] = found
        self._weight += 1 + len(found)
        for key in found:
            self._of.setdefault((saga, key), set()).add(lookup)
        while self._weight > self.size and self._lookups:
            self._drop(next(iter(self._lookups)))

    def put(self, a: Association) -> None:
        """A committed association: add it where its value is cached."""
        lookup = (a.saga, a.name, a.value)
        keys = self._lookups.get(lookup)
        if keys is not None and a.key not in keys:
            keys.add(a.key)
            self._weight += 1
            self._of.setdefault((a.saga, a.key), set()).add(lookup)

    def delete(self, a: Association) -> None:
        """A committed dissociation: remove it where its value is cached."""
        lookup = (a.saga, a.name, a.value)
        keys = self._lookups.get(lookup)
        if keys is not None and a.key in keys:
            keys.discard(a.key)
            self._weight -= 1
            self._unlink((a.saga, a.key), lookup)

    def forget(self, ref: _Ref) -> None:
        """Instance `ref` is gone, and its associations with it."""
        for lookup in self._of.pop(ref, ()):
            keys = self._lookups.get(lookup)
            if keys is not None and ref[1] in keys:
                keys.discard(ref[1])
                self._weight -= 1

    def evict(self, ref: _Ref) -> None:
        """Forget the lookups that name instance `ref` (they are read again when next
        needed): a commit about it conflicted, so the store may have moved on."""
        for lookup in self._of.pop(ref, set()).copy():
            self._drop(lookup)

    def clear(self) -> None:
        """Forget everything (the store was changed behind the runtime's back)."""
        self._lookups.clear()
        self._of.clear()
        self._weight = 0

    def _drop(self, lookup: Lookup) -> None:
        keys = self._lookups.pop(lookup, None)
        if keys is None:
            return
        self._weight -= 1 + len(keys)
        for key in keys:
            self._unlink((lookup[0], key), lookup)

    def _unlink(self, ref: _Ref, lookup: Lookup) -> None:
        lookups = self._of.get(ref)
        if lookups is not None:
            lookups.discard(lookup)
            if not lookups:
                del self._of[ref]


async def resolve(shard: Shard, lookups: Iterable[Lookup]) -> dict[Lookup, list[str]]:
    """The keys of `shard`'s own instances associated with each looked-up value.

    From the shard's cache, else one store read per saga and association name.
    """
    cache = shard.associations
    found: dict[Lookup, list[str]] = {}
    wanted: dict[tuple[str, str], set[str]] = {}
    for lookup in lookups:
        if lookup in found:
            continue
        cached = cache.get(*lookup)
        if cached is None:
            wanted.setdefault(lookup[:2], set()).add(lookup[2])
        else:
            found[lookup] = sorted(cached)
    for (saga, name), values in wanted.items():
        stored = await shard.store.find_associated(saga, name, sorted(values))
        for value in values:
            keys = [key for key in stored.get(value, ()) if shard.owns(saga, key)]
            cache.fill(saga, name, value, keys)
            found[(saga, name, value)] = keys
    return found
