"""The command line of ``python -m underway.admin`` (also the ``underway`` command):
operating queues and tasks from a shell, on :mod:`underway.admin`'s functions.

Every command prints a table, or with ``--json`` one JSON document whose keys are the
fields of the records in :mod:`underway.records` (times in ISO 8601). Names, inputs and
errors are printed with control characters escaped, so nothing stored in a task can drive
the terminal. An error is one line on standard error and exit status 1; a usage error is
exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Callable
from zoneinfo import ZoneInfo

import psycopg2

from . import admin
from .db import configure, redact_dsn
from .display import (
    ago,
    as_json,
    compact,
    duration,
    exact,
    first_line,
    table,
    terminal_safe,
)
from .errors import UnderwayError
from .records import TaskDetail, TaskState

#: Task ids are PostgreSQL bigints.
BIGINT_MAX = 2**63 - 1
#: Tasks retried per statement by ``retry --job``, so progress can be shown.
RETRY_CHUNK = 1000

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT_SECONDS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


# -- argument types -------------------------------------------------------------------------


def task_id(text: str) -> int:
    """A task id from the command line: a whole number from 1 to 2**63 - 1."""
    if not text.strip().isdigit() or not 1 <= int(text) <= BIGINT_MAX:
        raise argparse.ArgumentTypeError(f"a task id is a whole number from 1, not {text!r}")
    return int(text)


def span(text: str) -> float:
    """A duration such as ``90``, ``90s``, ``15m``, ``2h`` or ``7d``, in seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"a duration is a number of seconds, or one with s, m, h or d (15m), not {text!r}"
        )
    return float(match[1]) * _UNIT_SECONDS[match[2]]


def json_value(text: str) -> Any:
    """A task's input, as JSON text."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"the input must be JSON ({exc}), not {text!r}") from None


# -- the parser -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line of ``python -m underway.admin``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dsn", default=argparse.SUPPRESS, help="database ($DATABASE_URL)")
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON, not a table"
    )
    parser = argparse.ArgumentParser(
        prog="python -m underway.admin",
        description="See and steer underway's queues, tasks, schedules and supervisors.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=text, description=text, parents=[common])

    command("queues", "list queues with unfinished work, and paused ones")
    for name, text in [("pause", "pause a queue"), ("resume", "resume a paused queue")]:
        command(name, text).add_argument("queue")
    listing = command("list", "list tasks, newest first, one line each")
    listing.add_argument("--state", choices=[s.value for s in TaskState])
    listing.add_argument("--job")
    listing.add_argument("--queue")
    listing.add_argument("--since", type=span, help="enqueued within this long (15m, 2h, 7d)")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (50)")
    command("show", "show one task whole: input, steps, every try").add_argument(
        "task_id", type=task_id
    )
    command("status", "show one task's row").add_argument("task_id", type=task_id)
    retry = command("retry", "put failed tasks back to work at the step that failed")
    retry.add_argument("task_ids", type=task_id, nargs="*", metavar="TASK_ID")
    retry.add_argument("--job", help="every failed task of this job")
    retry.add_argument("--state", choices=["failed"], default="failed", help="failed (only)")
    retry.add_argument("--since", type=span, help="with --job: enqueued within this long")
    enqueue = command("enqueue", "enqueue a task of a job by name; prints its id")
    enqueue.add_argument("job")
    enqueue.add_argument("input", type=json_value, metavar="JSON")
    enqueue.add_argument("--delay", type=span, help="run after this long (30s, 15m)")
    enqueue.add_argument("--priority", type=int)
    enqueue.add_argument("--key", help="job key: replaces the pending task holding it")
    cancel = command("cancel", "cancel one task")
    cancel.add_argument("task_id", type=task_id)
    cancel.add_argument("--abort", action="store_true", help="end a running step now")
    command("dead-letters", "list a dead-letter queue").add_argument("queue")
    redrive = command("redrive", "put dead-lettered tasks back to work")
    redrive.add_argument("queue")
    redrive.add_argument(
        "--id", dest="ids", type=task_id, action="append", help="only this task (repeatable)"
    )
    command("schedules", "list cron schedules with their last and next fire")
    command("supervisors", "list live supervisors and what each worker runs")
    command("limits", "list rate and concurrency limits with their room now")
    rate = command("rate-limit", "limit a queue to N tasks per second, minute or hour")
    rate.add_argument("queue")
    rate.add_argument("rate", nargs="?", help="N/s, N/m or N/h, e.g. 100/m")
    rate.add_argument("--clear", action="store_true", help="lift the queue's rate limit")
    command("purge", "delete finished tasks past their retention now")
    return parser.parse_args(argv)


# -- running --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m underway.admin``; returns the exit status."""
    args = parse_args(argv)
    if getattr(args, "dsn", None):
        configure(args.dsn)
    try:
        return COMMANDS[args.command](args)
    except (UnderwayError, ValueError, TypeError, LookupError) as exc:
        return fail(str(exc))
    except psycopg2.Error as exc:
        text = (exc.pgerror or str(exc)).strip().splitlines()
        return fail(redact_dsn(text[0] if text else type(exc).__name__))
    except KeyboardInterrupt:
        return fail("interrupted")


def fail(message: str) -> int:
    """Say what went wrong in one line on standard error; exit status 1."""
    text = terminal_safe(" ".join(message.split()))
    print(f"underway: {text}", file=sys.stderr)
    return 1


def emit(args: argparse.Namespace, value: Any, show: Callable[[], None]) -> int:
    """Print ``value`` as JSON with ``--json``, else as ``show`` draws it."""
    if getattr(args, "json", False):
        print(as_json(value))
    else:
        show()
    return 0


def progress(done: int, total: int) -> None:
    """Show how far a long command got, on a terminal only (never in a pipe or a log)."""
    if sys.stderr.isatty():
        end = "\n" if done >= total else ""
        print(f"\r{done:,} of {total:,}", end=end, file=sys.stderr, flush=True)


def _step(index: int | None, name: str | None) -> str:
    if index is None:
        return ""
    return f"{index}:{name}" if name else str(index)


# -- the commands ---------------------------------------------------------------------------


def cmd_queues(args: argparse.Namespace) -> int:
    found = admin.queues()
    rows = [
        (q.queue, q.pending, q.running, q.failed, "yes" if q.paused else "", _lag(q.lag))
        for q in found
    ]
    return emit(
        args, found, lambda: table(["QUEUE", "PENDING", "RUNNING", "FAILED", "PAUSED", "LAG"], rows)
    )


def _lag(lag: float | None) -> str:
    return "" if lag is None else f"{lag:.1f}s"


def cmd_pause(args: argparse.Namespace) -> int:
    admin.pause(args.queue)
    return emit(
        args, {"queue": args.queue, "paused": True}, lambda: print(f"paused queue {args.queue!r}")
    )


def cmd_resume(args: argparse.Namespace) -> int:
    was = admin.resume(args.queue)
    said = f"resumed queue {args.queue!r}" if was else f"queue {args.queue!r} was not paused"
    return emit(args, {"queue": args.queue, "was_paused": was}, lambda: print(said))


def cmd_list(args: argparse.Namespace) -> int:
    found = admin.list_tasks(
        state=args.state, job=args.job, queue=args.queue, since=args.since, limit=args.limit
    )
    rows = [
        (
            t.id,
            t.job,
            _step(t.step, t.step_name),
            t.state.value,
            f"{t.attempts}/{t.max_attempts}",
            ago(t.created_at),
            first_line(t.error, 100),
        )
        for t in found
    ]
    headers = ["ID", "JOB", "STEP", "STATE", "TRIES", "AGE", "LAST ERROR"]
    return emit(args, found, lambda: table(headers, rows))


def cmd_show(args: argparse.Namespace) -> int:
    detail = admin.task_detail(args.task_id)
    if detail is None:
        return fail(f"no task {args.task_id}: it never was, or retention deleted it")
    return emit(args, detail, lambda: _show(detail))


def _show(task: TaskDetail) -> None:
    """One task, whole, for reading in a terminal."""
    safe = terminal_safe
    of = f" of {task.step_count}" if task.step_count else ""
    lines = [
        ("task", f"{task.id}, job {safe(task.job)}"),
        ("state", task.state.value + (" (cancel requested)" if task.cancel_requested_at else "")),
        ("step", f"{_step(task.step, task.step_name)} (step {task.step}{of}, counting from 0)"),
        ("tries", f"{task.attempts} of {task.max_attempts}"),
        ("queue", safe(task.queue)),
        ("enqueued", f"{exact(task.created_at)} ({ago(task.created_at)})"),
        ("runs at", exact(task.run_at)),
        ("started", exact(task.started_at)),
        ("finished", exact(task.finished_at)),
        ("expires", exact(task.expires_at)),
    ]
    optional = [
        ("serial queue", task.serial_queue),
        ("group", task.concurrency_group),
        ("key", task.key),
        ("dead letters", task.dead_letter_queue),
        ("error", task.error),
    ]
    lines += [(name, safe(value)) for name, value in optional if value]
    for name, value in lines:
        if value:
            print(f"{name:>12}: {value}")
    print(f"{'input':>12}: {safe(compact(task.input, 2000))}")
    if task.state is TaskState.SUCCEEDED:
        print(f"{'output':>12}: {safe(compact(task.output, 2000))}")
    print(f"\ntries ({len(task.history)}):")
    for a in task.history:
        took = duration((a.finished_at - a.started_at).total_seconds()) if a.started_at else ""
        print(
            f"  step {_step(a.step, a.step_name)}, try {a.attempt}: {a.outcome}, {took}".rstrip(
                ", "
            )
        )
        if a.error:
            print(f"    {safe(first_line(a.error, 2000))}")
        if a.traceback:
            for line in safe(a.traceback.rstrip(), keep_newlines=True).splitlines():
                print(f"    | {line}")


def cmd_status(args: argparse.Namespace) -> int:
    info = admin.task_info(args.task_id)
    if info is None:
        return fail(f"no task {args.task_id}")

    def show() -> None:
        for field in dataclasses.fields(info):
            value = getattr(info, field.name)
            print(f"{field.name:>18}: {terminal_safe(str(getattr(value, 'value', value)))}")

    return emit(args, info, show)


def cmd_retry(args: argparse.Namespace) -> int:
    if bool(args.task_ids) == bool(args.job):
        return fail("retry takes task ids, or --job (with --since), not both or neither")
    if args.since is not None and not args.job:
        return fail("--since goes with --job")
    if args.task_ids:
        done = admin.retry(args.task_ids)
    else:
        wanted: list[int] = []
        ids = _failed_ids(args.job, args.since)
        for start in range(0, len(ids), RETRY_CHUNK):
            wanted += admin.retry(ids[start : start + RETRY_CHUNK])
            progress(len(wanted), len(ids))
        done = wanted
    shown = ", ".join(map(str, done))
    return emit(args, {"retried": done}, lambda: print(f"retried {len(done)} task(s): {shown}"))


def _failed_ids(job: str, since: float | None) -> list[int]:
    """The failed tasks of a job (enqueued within ``since`` seconds), oldest first."""
    found: list[int] = []
    before = None
    while True:
        page = admin.list_tasks(state="failed", job=job, since=since, before=before, limit=10_000)
        found += [t.id for t in page]
        if len(page) < 10_000:
            return sorted(found)
        before = page[-1].id


def cmd_enqueue(args: argparse.Namespace) -> int:
    new = admin.enqueue(
        args.job, args.input, delay=args.delay, priority=args.priority, key=args.key
    )
    return emit(args, {"id": new}, lambda: print(new))


def cmd_cancel(args: argparse.Namespace) -> int:
    said = admin.cancel_task(args.task_id, abort=args.abort)
    if said == "finished":
        return fail(f"task {args.task_id} had finished: finished")
    return emit(
        args,
        {"id": args.task_id, "result": said},
        lambda: print(f"{said.value}: task {args.task_id}"),
    )


def cmd_dead_letters(args: argparse.Namespace) -> int:
    letters = admin.dead_letters(args.queue)
    rows = [(d.id, d.job, d.step, d.attempts, d.finished_at, first_line(d.error)) for d in letters]
    headers = ["ID", "JOB", "STEP", "TRIES", "FAILED AT", "ERROR"]
    return emit(args, letters, lambda: table(headers, rows))


def cmd_redrive(args: argparse.Namespace) -> int:
    ids = admin.redrive(args.queue, args.ids)
    missed = sorted(set(args.ids or ()) - set(ids))
    if missed:
        return fail(
            "; ".join(_not_redriven(args.queue, task) for task in missed)
            + (f" (re-drove {', '.join(map(str, ids))})" if ids else "")
        )
    said = f"re-drove {len(ids)} task(s) from {args.queue!r}: {', '.join(map(str, ids))}"
    return emit(args, {"redriven": ids}, lambda: print(said))


def _not_redriven(queue: str, task: int) -> str:
    """Why a task asked for by id was not re-driven from ``queue``."""
    info = admin.task_info(task)
    if info is None:
        return f"no task {task}"
    if info.state is TaskState.FAILED and info.dead_letter_queue is None:
        return f"task {task} failed without a dead-letter queue: use `retry {task}`"
    if info.state is TaskState.FAILED:
        return f"task {task} is in dead-letter queue {info.dead_letter_queue!r}, not {queue!r}"
    return f"task {task} is {info.state.value}, not a dead letter"


def cmd_schedules(args: argparse.Namespace) -> int:
    found = admin.schedules()

    def zoned(when: datetime | None, zone: str) -> str:
        if when is None:
            return "never"
        try:
            local = when.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M %Z")
        except (KeyError, ValueError):
            local = ""
        return f"{local} ({exact(when)})" if local and zone != "UTC" else exact(when)

    rows = [
        (
            s.job,
            s.name,
            s.expression,
            s.zone,
            compact(s.input, 40),
            zoned(s.last_fire, s.zone),
            zoned(s.next_fire, s.zone),
        )
        for s in found
    ]
    headers = ["JOB", "NAME", "SCHEDULE", "ZONE", "INPUT", "LAST FIRE", "NEXT FIRE"]
    return emit(args, found, lambda: table(headers, rows))


def cmd_supervisors(args: argparse.Namespace) -> int:
    found = admin.supervisors()

    def show() -> None:
        if not found:
            print("no live supervisor")
        for s in found:
            print(
                f"{terminal_safe(s.host)} pid {s.pid}: {len(s.workers)} worker(s), "
                f"up {ago(s.started_at).removesuffix(' ago')}, heartbeat {ago(s.heartbeat_at)}"
            )
            print(f"  jobs: {terminal_safe(', '.join(s.jobs))}")
            for w in s.workers:
                doing = "idle"
                if w.task_id is not None:
                    since = ago(w.started_at).removesuffix(" ago") if w.started_at else "?"
                    doing = (
                        f"task {w.task_id} ({terminal_safe(w.job)}, step "
                        f"{terminal_safe(_step(w.step, w.step_name))}) for {since}"
                    )
                print(f"  worker {w.slot} pid {w.pid}: {doing}")

    return emit(args, found, show)


def cmd_limits(args: argparse.Namespace) -> int:
    found = admin.limits()
    rows = [
        (
            limit.kind,
            limit.name,
            limit.limit_count
            if limit.per_seconds is None
            else f"{limit.limit_count} per {duration(limit.per_seconds)}",
            limit.available,
        )
        for limit in found
    ]
    return emit(args, found, lambda: table(["KIND", "NAME", "LIMIT", "AVAILABLE"], rows))


def cmd_rate_limit(args: argparse.Namespace) -> int:
    if args.clear == (args.rate is not None):
        return fail("give a rate such as 100/m, or --clear, not both or neither")
    if args.clear:
        had = admin.clear_rate_limit(args.queue)
        said = f"lifted the rate limit of {args.queue!r}" if had else f"{args.queue!r} had none"
        return emit(args, {"queue": args.queue, "cleared": had}, lambda: print(said))
    count, _, per = args.rate.partition("/")
    if not count.strip().isdigit() or per not in ("s", "m", "h"):
        return fail(f"a rate is N/s, N/m or N/h, such as 100/m, not {args.rate!r}")
    admin.set_rate_limit(args.queue, int(count), per)
    said = f"limited {args.queue!r} to {args.rate}"
    return emit(args, {"queue": args.queue, "rate": args.rate}, lambda: print(said))


def cmd_purge(args: argparse.Namespace) -> int:
    deleted = admin.purge_expired()
    said = f"deleted {deleted} finished task(s) past their retention"
    return emit(args, {"deleted": deleted}, lambda: print(said))


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "queues": cmd_queues,
    "pause": cmd_pause,
    "resume": cmd_resume,
    "list": cmd_list,
    "show": cmd_show,
    "status": cmd_status,
    "retry": cmd_retry,
    "enqueue": cmd_enqueue,
    "cancel": cmd_cancel,
    "dead-letters": cmd_dead_letters,
    "redrive": cmd_redrive,
    "schedules": cmd_schedules,
    "supervisors": cmd_supervisors,
    "limits": cmd_limits,
    "rate-limit": cmd_rate_limit,
    "purge": cmd_purge,
}


if __name__ == "__main__":
    sys.exit(main())
