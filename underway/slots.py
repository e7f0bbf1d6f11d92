"""Shared memory where each worker posts the task it holds, for its supervisor to read.

The supervisor maps one anonymous shared page before forking; worker ``i`` writes its claim
token into slot ``i`` *before* it claims, the task id right after, and the step's deadline
when the step starts. When a worker dies, its supervisor reads the slot and knows, without
asking anyone, which task to release; when a step is stuck past its deadline where the
worker cannot interrupt it (a blocking C call), the supervisor ends the worker.
"""

from __future__ import annotations

import mmap
import struct

# claim token, task id (0 = none), deadline (0 = none: the step has not started), and the
# token of the next task, claimed in the transaction that records this one's outcome.
_SLOT = struct.Struct("=qqdq")


class Slots:
    """A fixed number of (claim token, task id, deadline, next token) slots shared by a
    supervisor and its workers. Deadlines are on the ``time.monotonic()`` clock, which all
    processes of a host share."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._memory = mmap.mmap(-1, max(_SLOT.size * count, 1))

    def post(
        self, index: int, token: int, task_id: int = 0, deadline: float = 0.0, next_token: int = 0
    ) -> None:
        """Record that worker ``index`` holds (or is about to claim) a task with ``token``,
        when its running step must be over, and the token it claims its next task with."""
        _SLOT.pack_into(self._memory, index * _SLOT.size, token, task_id, deadline, next_token)

    def clear(self, index: int) -> None:
        """Record that worker ``index`` holds nothing."""
        _SLOT.pack_into(self._memory, index * _SLOT.size, 0, 0, 0.0, 0)

    def read(self, index: int) -> tuple[int, int, float, int]:
        """The (claim token, task id, deadline, next token) worker ``index`` last posted;
        zeros when none."""
        return _SLOT.unpack_from(self._memory, index * _SLOT.size)

    def tokens(self) -> list[int]:
        """Claim tokens of every task held right now."""
        slots = map(self.read, range(self.count))
        return [token for token, _, _, after in slots for token in (token, after) if token]
