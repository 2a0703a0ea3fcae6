"""Writes a SQLite store with one JSON codec, or reads it back with another.

    python codec_worker.py write DB [--without-msgspec]
    python codec_worker.py read DB [--without-msgspec]

`write` starts one instance whose state holds values JSON codecs tend to differ on, and
which schedules a message holding the same values. `read` decodes both and prints
`ok CODEC` when they equal what was written (or the difference, and exits 1).
`--without-msgspec` makes `import msgspec` fail, as it does where the `fast` extra is not
installed. Run by `test_serialization.py`.
"""

from __future__ import annotations

import sys

if "--without-msgspec" in sys.argv:
    sys.modules["msgspec"] = None  # type: ignore[assignment]

import argparse
import math
from datetime import timedelta

import anyio
import attrs

from sagaflow import Admin, DispatchMeta, Registry, Runtime, Schedule, correlate, on
from sagaflow.stores import SQLiteStore


@attrs.frozen
class Values:
    text: str
    big: int
    small: int
    ratios: list[float]
    nested: dict[str, list[dict[str, int | None]]]
    infinite: float
    missing: float


@attrs.frozen
class Put:
    key: str
    values: Values


@attrs.frozen
class Later:
    key: str
    values: Values


@attrs.define
class Holder:
    values: Values | None = None


EDGE = Values(
    text='ünïcødé ✓ 😀 \u2028 \x00 "quoted" \\ back',
    big=2**80 + 1,
    small=-(2**70),
    ratios=[0.1, 1e300, -0.0, 5e-324, 1e16, 2.5],
    nested={"a": [{"x": 1, "y": None}], "é": []},
    infinite=-math.inf,
    missing=math.nan,
)
WRITTEN = {"edge": EDGE, "finite": attrs.evolve(EDGE, infinite=1e308, missing=-2.5)}
"""By instance key: one whose non-finite floats only the standard library writes, one that
msgspec writes when it is there."""


class HolderSaga:
    @correlate
    def key(self, event: Put | Later) -> str:
        return event.key

    @on(Put, start=True)
    def put(self, state: Holder, event: Put) -> Schedule[Later]:
        state.values = event.values
        return Schedule(Later(event.key, event.values), after=timedelta(days=1), name="later")

    @on(Later)
    def later(self, state: Holder, event: Later) -> None:
        pass


def registry() -> Registry:
    made = Registry(allow=["__main__"])
    made.register(HolderSaga(), state=Holder, name="holder")
    return made


async def dispatch(command: object, meta: DispatchMeta) -> bool:
    return True


def same(read: Values, written: Values) -> bool:
    """Equal, NaN equal to NaN and `-0.0` told from `0.0` (repr does both)."""
    return repr(read) == repr(written)


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["write", "read"])
    parser.add_argument("db")
    parser.add_argument("--without-msgspec", action="store_true")
    args = parser.parse_args()
    reg = registry()
    store = SQLiteStore(args.db)
    if args.mode == "write":
        async with Runtime(reg, store=store, dispatch=dispatch) as runtime:
            for key, values in WRITTEN.items():
                await runtime.publish(Put(key, values))
            await runtime.drain()
        print("wrote", reg.serializer.codec)
        return 0
    await store.open()
    differ = []
    try:
        admin = Admin(store, registry=reg)
        for key, written in WRITTEN.items():
            state = (await admin.state("holder", key, Holder)).state
            (timer,) = (await admin.show("holder", key)).schedules
            later = reg.serializer.decode(timer.type_name, timer.payload)
            assert isinstance(later, Later)
            assert state.values is not None
            differ += [v for v in (state.values, later.values) if not same(v, written)]
    finally:
        await store.close()
    print(f"differ {differ}" if differ else f"ok {reg.serializer.codec}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))
