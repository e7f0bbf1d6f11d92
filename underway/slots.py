"""Shared memory where each worker posts the task it holds, for its supervisor to read.

The supervisor maps one anonymous shared page before forking; worker ``i`` writes its claim
token into slot ``i`` *before* it claims, and the task id right after. When a worker dies,
its supervisor reads the slot and knows, without asking anyone, which task to release.
"""

from __future__ import annotations

import mmap
import struct

_SLOT = struct.Struct("=qq")  # claim token, task id (0 = none)


class Slots:
    """A fixed number of (claim token, task id) slots shared by a supervisor and its workers."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._memory = mmap.mmap(-1, max(_SLOT.size * count, 1))

    def post(self, index: int, token: int, task_id: int = 0) -> None:
        """Record that worker ``index`` holds (or is about to claim) a task with ``token``."""
        _SLOT.pack_into(self._memory, index * _SLOT.size, token, task_id)

    def clear(self, index: int) -> None:
        """Record that worker ``index`` holds nothing."""
        _SLOT.pack_into(self._memory, index * _SLOT.size, 0, 0)

    def read(self, index: int) -> tuple[int, int]:
        """The (claim token, task id) worker ``index`` last posted; ``(0, 0)`` when none."""
        return _SLOT.unpack_from(self._memory, index * _SLOT.size)

    def tokens(self) -> list[int]:
        """Claim tokens of every task held right now."""
        return [token for token, _ in map(self.read, range(self.count)) if token]
