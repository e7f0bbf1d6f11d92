"""Operating underway: pause and resume queues, look into and re-drive dead-letter queues,
look up or cancel one task, and apply retention now.

Every function takes an optional ``conn`` (as :meth:`Job.enqueue <underway.Job.enqueue>`
does); without it, the process's own connection is used. The same operations from a shell::

    python -m underway.admin queues
    python -m underway.admin pause emails
    python -m underway.admin resume emails
    python -m underway.admin dead-letters emails-dlq
    python -m underway.admin redrive emails-dlq [--id 42 --id 43]
    python -m underway.admin status 42
    python -m underway.admin cancel 42
    python -m underway.admin purge
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import psycopg2

from . import store
from .db import caller_cursor, configure
from .errors import UnderwayError
from .records import DeadLetter, QueueSummary, TaskInfo
from .task import cancel_task, task_info

__all__ = [
    "DeadLetter",
    "QueueSummary",
    "cancel_task",
    "dead_letters",
    "pause",
    "purge_expired",
    "queues",
    "redrive",
    "resume",
    "task_info",
]


def pause(queue: str, *, conn: Any = None) -> None:
    """Pause a queue: workers start none of its tasks until :func:`resume`. Steps already
    running finish; enqueueing goes on as usual. Takes effect at every supervisor at once."""
    with caller_cursor(conn) as cur:
        store.pause_queue(cur, _queue_name(queue))


def resume(queue: str, *, conn: Any = None) -> bool:
    """Resume a paused queue and wake idle workers; returns whether it was paused."""
    with caller_cursor(conn) as cur:
        return store.resume_queue(cur, _queue_name(queue))


def queues(*, conn: Any = None) -> list[QueueSummary]:
    """Every queue that has unfinished or failed tasks, or is paused."""
    with caller_cursor(conn) as cur:
        return store.queue_summary(cur)


def dead_letters(queue: str, *, conn: Any = None) -> list[DeadLetter]:
    """The tasks in dead-letter queue ``queue``, oldest first. Each keeps its history in
    ``underway.attempt``."""
    with caller_cursor(conn) as cur:
        return store.dead_letters(cur, _queue_name(queue))


def redrive(queue: str, ids: Sequence[int] | None = None, *, conn: Any = None) -> list[int]:
    """Put tasks from dead-letter queue ``queue`` back to work: all of them, or those with
    the given ids. Each resumes at the step that failed, with that step's tries renewed;
    its earlier attempts stay in its history. Returns the ids re-driven."""
    chosen = None if ids is None else [int(i) for i in ids]
    with caller_cursor(conn) as cur:
        return store.redrive(cur, _queue_name(queue), chosen)


def purge_expired(*, conn: Any = None, batch: int = 500, max_batches: int | None = None) -> int:
    """Retention now: delete finished tasks whose ``keep_for`` ran out, with their attempts,
    ``batch`` at a time, each batch its own short transaction when ``conn`` autocommits.
    Supervisors do this every minute. Returns how many were deleted."""
    deleted = 0
    batches = 0
    with caller_cursor(conn) as cur:
        while max_batches is None or batches < max_batches:
            count = store.purge_expired(cur, batch)
            deleted += count
            batches += 1
            if count < batch:
                break
    return deleted


def _queue_name(queue: Any) -> str:
    if not isinstance(queue, str) or not queue.strip():
        raise TypeError(f"a queue name is a non-empty string, not {queue!r}")
    return queue


# -- the command line ------------------------------------------------------------------


def _print_rows(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a plain, aligned table."""
    cells = [list(headers)] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())


def _show_task(info: TaskInfo) -> None:
    for field in fields(info):
        value = getattr(info, field.name)
        print(f"{field.name:>18}: {getattr(value, 'value', value)}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line of ``python -m underway.admin``."""
    parser = argparse.ArgumentParser(
        prog="python -m underway.admin", description="Operate underway's queues and tasks."
    )
    parser.add_argument("--dsn", help="database (default: $DATABASE_URL)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("queues", help="list queues with unfinished work, and paused ones")
    for name, text in [("pause", "pause a queue"), ("resume", "resume a paused queue")]:
        commands.add_parser(name, help=text).add_argument("queue")
    commands.add_parser("dead-letters", help="list a dead-letter queue").add_argument("queue")
    redrive_cmd = commands.add_parser("redrive", help="put dead-lettered tasks back to work")
    redrive_cmd.add_argument("queue")
    redrive_cmd.add_argument(
        "--id", dest="ids", type=int, action="append", help="only this task (repeatable)"
    )
    commands.add_parser("status", help="show one task").add_argument("task_id", type=int)
    commands.add_parser("cancel", help="cancel one task").add_argument("task_id", type=int)
    commands.add_parser("purge", help="delete finished tasks past their retention now")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m underway.admin``; returns the exit status."""
    args = parse_args(argv)
    if args.dsn:
        configure(args.dsn)
    try:
        return _run(args)
    except (UnderwayError, psycopg2.OperationalError, TypeError) as exc:
        print(f"underway: {exc}".strip(), file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    """Carry out one parsed command."""
    if args.command == "queues":
        rows = [
            (
                q.queue,
                q.pending,
                q.running,
                q.failed,
                "yes" if q.paused else "",
                "" if q.lag is None else f"{q.lag:.1f}s",
            )
            for q in queues()
        ]
        _print_rows(["QUEUE", "PENDING", "RUNNING", "FAILED", "PAUSED", "LAG"], rows)
    elif args.command == "pause":
        pause(args.queue)
        print(f"paused queue {args.queue!r}")
    elif args.command == "resume":
        was = resume(args.queue)
        print(f"resumed queue {args.queue!r}" if was else f"queue {args.queue!r} was not paused")
    elif args.command == "dead-letters":
        letters = dead_letters(args.queue)
        _print_rows(
            ["ID", "JOB", "STEP", "TRIES", "FAILED AT", "ERROR"],
            [(d.id, d.job, d.step, d.attempts, d.finished_at, d.error) for d in letters],
        )
    elif args.command == "redrive":
        ids = redrive(args.queue, args.ids)
        print(f"re-drove {len(ids)} task(s) from {args.queue!r}: {', '.join(map(str, ids))}")
    elif args.command == "status":
        info = task_info(args.task_id)
        if info is None:
            print(f"underway: no task {args.task_id}", file=sys.stderr)
            return 1
        _show_task(info)
    elif args.command == "cancel":
        if not cancel_task(args.task_id):
            print(f"underway: task {args.task_id} is not pending or running", file=sys.stderr)
            return 1
        print(f"cancelled task {args.task_id} (a running step finishes first)")
    elif args.command == "purge":
        print(f"deleted {purge_expired()} finished task(s) past their retention")
    return 0


if __name__ == "__main__":
    sys.exit(main())
