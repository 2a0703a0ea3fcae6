"""Test sagas without a store, a dispatcher or real time.

`Scenario` (async) and `SyncScenario` (plain tests) run one saga on the real runtime,
a memory store, a recording dispatcher and a `VirtualClock`: given past events, when an
event arrives or time advances, check the commands sent, compensations, schedules,
state, completion, associations and the instances an event reached (fan-out).
`Recorder`, `VirtualClock` and `advance` let an integration test drive a full `Runtime`
on any store the same way, without sleeping. `load_state` and `load_message` decode rows
of older versions with today's code, to test upcasters.
"""

from .._clock import VirtualClock
from ._checks import Scheduled
from ._evolution import load_message, load_state
from ._recorder import Dispatched, Recorder
from ._scenario import Scenario
from ._sync import SyncScenario
from ._time import advance

__all__ = [
    "Dispatched",
    "Recorder",
    "Scenario",
    "Scheduled",
    "SyncScenario",
    "VirtualClock",
    "advance",
    "load_message",
    "load_state",
]
