"""Starting a supervisor: the command line of ``python -m underway.supervisor`` and
:func:`run_workers` for scripts. Both build their options from one table
(:class:`~underway.options.SupervisorOptions`) and hand them to
:class:`~underway.supervisor.Supervisor`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg2

from . import logs
from . import options as supervisor_options
from .db import hidden_dsn, hide_dsn_argument, resolve_dsn
from .errors import UnderwayError
from .job import Job, registered_jobs
from .supervisor import Supervisor


def import_jobs(modules: Sequence[str]) -> dict[str, Job]:
    """Import the modules that define jobs and return every job defined."""
    for name in modules:
        importlib.import_module(name)
    return registered_jobs()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line of ``python -m underway.supervisor``."""
    parser = argparse.ArgumentParser(
        prog="python -m underway.supervisor",
        description="Run underway workers for the jobs defined in MODULEs.",
    )
    parser.add_argument("modules", nargs="+", metavar="MODULE", help="module defining jobs")
    parser.add_argument("--dsn", help="database (default: $DATABASE_URL)")
    supervisor_options.add_arguments(parser)
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get("UNDERWAY_LOG_FORMAT", "text"),
        help="text lines, or one JSON object per line (default: $UNDERWAY_LOG_FORMAT, else text)",
    )
    args = parser.parse_args(argv)
    problem = supervisor_options.from_arguments(args).problem()
    if problem:
        parser.error(f"--{problem}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m underway.supervisor``; returns the exit status."""
    if argv is None:
        hide_dsn_argument("underway.supervisor", sys.argv[1:])
    args = parse_args(argv)
    args.dsn = args.dsn or hidden_dsn()
    logs.configure(args.log_format, args.log_level.upper())
    sys.path.insert(0, os.getcwd())
    try:
        jobs = import_jobs(args.modules)
    except ModuleNotFoundError as exc:
        wanted = [m for m in args.modules if exc.name and (m + ".").startswith(exc.name + ".")]
        if wanted:
            missing = "no such module" if exc.name == wanted[0] else f"no module {exc.name!r}"
            print(f"underway: cannot import module {wanted[0]!r}: {missing}", file=sys.stderr)
            return 2
        raise
    if not jobs:
        print(
            f"underway: no jobs defined in {', '.join(args.modules)}: define one with Job(...)",
            file=sys.stderr,
        )
        return 2
    options = supervisor_options.from_arguments(args)
    try:
        return Supervisor(resolve_dsn(args.dsn), jobs, options).run()
    except (UnderwayError, psycopg2.OperationalError) as exc:
        print(f"underway: {exc}".strip(), file=sys.stderr)
        return 1


def run_workers(
    jobs: Mapping[str, Job] | None = None, *, dsn: str | None = None, **options: Any
) -> int:
    """Supervise worker processes from this process, as ``python -m underway.supervisor``
    does; blocks until stopped and returns the exit status.

    Handy in scripts that define their jobs in ``__main__``::

        underway.run_workers(workers=2, burst=True)   # work until nothing is ready

    :param jobs: the jobs to run, by name (default: every job defined so far).
    :param dsn: the database (default: :func:`underway.configure`'s, else ``$DATABASE_URL``).
    :param options: any field of :class:`~underway.options.SupervisorOptions`, with the
        same defaults as the command line: ``workers`` (the CPU count), ``grace``,
        ``burst``, ``poll_interval``, ``lease``, ``scheduler`` (never in burst mode),
        ``async_commit`` and ``max_tasks``.
    :raises ConfigurationError: for options out of range (a lease under a second, say),
        before anything starts.
    """
    chosen = supervisor_options.from_keywords("run_workers", options)
    jobs = registered_jobs() if jobs is None else dict(jobs)
    return Supervisor(resolve_dsn(dsn), jobs, chosen).run()
