"""The step-start probe every peer's no-op task calls: ``mark(slot)`` stores ``time.time()``.

The harness creates a file of zeroed float64 slots and names it in ``$BENCH_PROBE``; each task
run marks its own slot (task index, plus ``step * total`` for later steps). Marks go to a shared
memory map, with no system call and no database work, so measuring stays out of the peer's path
as far as it can, and costs every peer the same (about a microsecond). This module is imported
by worker processes and must stay free of heavy imports.
"""

from __future__ import annotations

import mmap
import os
import time

_view: memoryview | None = None


def _open() -> memoryview:
    """Map the file named by ``$BENCH_PROBE`` (once per process) as an array of doubles."""
    global _view
    path = os.environ["BENCH_PROBE"]
    fd = os.open(path, os.O_RDWR)
    try:
        memory = mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    _view = memoryview(memory).cast("d")
    return _view


def mark(slot: int) -> None:
    """Record that the task run owning ``slot`` has started, now, on the wall clock."""
    view = _view if _view is not None else _open()
    view[slot] = time.time()
