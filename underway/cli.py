"""The command line of ``python -m underway.admin`` (also the ``underway`` command):
operating queues and tasks from a shell, on :mod:`underway.admin`'s functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import psycopg2

from .admin import (
    cancel_task,
    dead_letters,
    pause,
    purge_expired,
    queues,
    redrive,
    resume,
    task_info,
)
from .db import configure
from .errors import UnderwayError
from .records import TaskInfo


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
        try:
            said = cancel_task(args.task_id)
        except LookupError as exc:
            print(f"underway: {exc}", file=sys.stderr)
            return 1
        if said == "finished":
            print(f"underway: task {args.task_id} had finished: finished", file=sys.stderr)
            return 1
        print(f"{said}: task {args.task_id}")
    elif args.command == "purge":
        print(f"deleted {purge_expired()} finished task(s) past their retention")
    return 0


if __name__ == "__main__":
    sys.exit(main())
