"""Shared memory where each worker posts what it holds, for its supervisor to read.

The supervisor maps one anonymous shared page before forking; worker ``i`` writes its claim
token into slot ``i`` *before* it claims, the task id right after, and the step's deadline
when the step starts. When a worker dies, its supervisor reads the slot and knows, without
asking anyone, which task to release and which server session to end; when a step is stuck
past its deadline where the worker cannot interrupt it (a blocking C call), the supervisor
ends the worker.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

# What a worker holds: claim token, task id (0 = none), deadline (0 = the step has not
# started), and the token of the next task, claimed in the transaction that records this
# one's outcome. Then its server session (backend pid and start, so that the supervisor
# ends that session and no other, on any host), and how many tasks it finished since it
# started (so that the supervisor tells a crash loop from a worker killed after work).
_HOLD = struct.Struct("=qqdq")
_SESSION = struct.Struct("=qd")
_DONE = struct.Struct("=q")
_SLOT_SIZE = _HOLD.size + _SESSION.size + _DONE.size


@dataclass(frozen=True)
class Held:
    """What a worker's slot says, as its supervisor reads it."""

    token: int
    task_id: int
    deadline: float
    next_token: int
    backend_pid: int
    backend_start: float
    done: int


class Slots:
    """A fixed number of slots shared by a supervisor and its workers. Deadlines are on the
    ``time.monotonic()`` clock, which all processes of a host share."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._memory = mmap.mmap(-1, max(_SLOT_SIZE * count, 1))

    def post(
        self, index: int, token: int, task_id: int = 0, deadline: float = 0.0, next_token: int = 0
    ) -> None:
        """Record that worker ``index`` holds (or is about to claim) a task with ``token``,
        when its running step must be over, and the token it claims its next task with."""
        _HOLD.pack_into(self._memory, index * _SLOT_SIZE, token, task_id, deadline, next_token)

    def clear(self, index: int) -> None:
        """Record that worker ``index`` holds nothing."""
        _HOLD.pack_into(self._memory, index * _SLOT_SIZE, 0, 0, 0.0, 0)

    def post_session(self, index: int, backend_pid: int, backend_start: float) -> None:
        """Record worker ``index``'s server session (0 when it has none)."""
        _SESSION.pack_into(
            self._memory, index * _SLOT_SIZE + _HOLD.size, backend_pid, backend_start
        )

    def count_done(self, index: int, done: int) -> None:
        """Record how many tasks worker ``index`` finished since it started."""
        _DONE.pack_into(self._memory, index * _SLOT_SIZE + _HOLD.size + _SESSION.size, done)

    def reset(self, index: int) -> None:
        """Empty slot ``index`` for a new worker process."""
        self._memory[index * _SLOT_SIZE : (index + 1) * _SLOT_SIZE] = bytes(_SLOT_SIZE)

    def read(self, index: int) -> Held:
        """What worker ``index`` last posted; zeros when nothing."""
        offset = index * _SLOT_SIZE
        hold = _HOLD.unpack_from(self._memory, offset)
        session = _SESSION.unpack_from(self._memory, offset + _HOLD.size)
        (done,) = _DONE.unpack_from(self._memory, offset + _HOLD.size + _SESSION.size)
        return Held(*hold, *session, done)

    def tokens(self) -> list[int]:
        """Claim tokens of every task held right now."""
        held = map(self.read, range(self.count))
        return [token for h in held for token in (h.token, h.next_token) if token]
