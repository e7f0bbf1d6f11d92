"""Step timeouts inside the worker: SIGALRM interrupts a step that runs past its time.

A step stuck where Python cannot interrupt it (a blocking C call) is beyond this module's
reach; the supervisor ends such a worker, reading the step's deadline from its slot (see
:mod:`underway.slots`).
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from .context import Context
from .errors import StepTimeout


class StepClock:
    """Stops a step that runs past its timeout by raising :class:`StepTimeout` in it.

    SIGALRM does the interrupting, so only in the main thread, and only if nobody else uses
    the timer (a test runner's own timeout, say), as seen at the first step: elsewhere a
    step runs unbounded, and only the supervisor's deadline stands. A step that ends late,
    having swallowed the interruption or met an error past its deadline, has timed out all
    the same.
    """

    def __init__(self) -> None:
        self.usable: bool | None = None  # decided at the first step
        self.armed = False
        self.timeout = 0.0

    def run(self, function: Any, cx: Context, inp: Any, timeout: float) -> Any:
        """Call a step, interrupting it at its deadline (``cx.deadline``, else ``timeout``
        seconds from now). A step that ends after its deadline has timed out, whether it
        returned or raised: an error it met late (its statement cancelled at the deadline,
        say) is the timeout's doing, and is kept as the StepTimeout's cause. The loss of
        the worker's connection stays what it is, for the worker to recover from."""
        global _armed_clock
        if self.usable is None:
            self.usable = _take_timer()
        deadline = cx.deadline if cx.deadline is not None else time.monotonic() + timeout
        if self.usable:
            self.armed, self.timeout, _armed_clock = True, timeout, self
            signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 1e-6))
        try:
            result = function(cx, inp)
        except Exception as exc:
            if time.monotonic() < deadline or cx.lost(exc):
                raise
            raise _timed_out(timeout) from exc
        finally:
            if self.usable:
                self.armed = False
                signal.setitimer(signal.ITIMER_REAL, 0)
        if time.monotonic() >= deadline:
            raise _timed_out(timeout)
        return result


def _timed_out(timeout: float) -> StepTimeout:
    """The error a step that ran past its timeout ends with."""
    return StepTimeout(f"the step ran past its timeout of {timeout:g}s")


_armed_clock: StepClock | None = None


def _on_alarm(signum: int, frame: Any) -> None:
    """SIGALRM: the running step is over its time. Outside a step (the alarm raced the
    step's return) there is nothing to stop; StepClock.run sees that the step was late."""
    clock = _armed_clock
    if clock is not None and clock.armed:
        clock.armed = False
        raise _timed_out(clock.timeout)


def _take_timer() -> bool:
    """Whether SIGALRM is free for underway (or already ours); if so, take it."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, _on_alarm):
        return False
    if signal.getitimer(signal.ITIMER_REAL) != (0.0, 0.0):
        return False
    signal.signal(signal.SIGALRM, _on_alarm)
    return True
