"""The supervisor's options, in one table: name, default, bounds and help of each.

The command line (``python -m underway.supervisor``), :func:`underway.run_workers` and the
checks both make are all built from :class:`SupervisorOptions`, so an option is written
down once and its default cannot drift between them.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigurationError

MIN_LEASE, MAX_LEASE = 1.0, 86_400.0
"""The range of ``--lease``: renewals (every third of it, at most every 0.2 s) must keep up,
and a lapsed lease must come back within a day."""


def _option(
    default: Any,
    help: str,
    *,
    at_least: float | None = None,
    at_most: float | None = None,
    above: float | None = None,
    seconds: bool = False,
    flag: str | None = None,
    metavar: str | None = None,
) -> Any:
    """One row of the table: a dataclass field whose metadata the parser and checks read."""
    rule = {"at_least": at_least, "at_most": at_most, "above": above, "seconds": seconds}
    return field(default=default, metadata={"help": help, "flag": flag, "metavar": metavar, **rule})


@dataclass(frozen=True)
class SupervisorOptions:
    """How a supervisor runs. Each field is an option of ``python -m underway.supervisor``
    (``poll_interval`` is ``--poll-interval``) and a keyword of :func:`underway.run_workers`.
    """

    workers: int = _option(os.cpu_count() or 1, "worker processes (default: CPUs)", at_least=1)
    grace: float = _option(
        30.0,
        "seconds running steps get to finish on a graceful stop (default: 30)",
        at_least=0,
        seconds=True,
    )
    burst: bool = _option(False, "exit once no task of these jobs is ready to run")
    poll_interval: float = _option(
        1.0,
        "longest idle wait between looks at the queue, in seconds (default: 1)",
        above=0,
        seconds=True,
    )
    lease: float = _option(
        30.0,
        "seconds before a task whose supervisor stopped renewing it is reclaimed (default: 30)",
        at_least=MIN_LEASE,
        at_most=MAX_LEASE,
        seconds=True,
    )
    scheduler: bool = _option(
        True,
        "do not run the scheduler process that enqueues cron schedules' ticks",
        flag="--no-scheduler",
    )
    async_commit: bool = _option(
        False,
        "commit steps with synchronous_commit=off: faster; a database crash may make the "
        "last steps run again (see the README)",
    )
    db_timeout: float = _option(
        10.0,
        "longest the supervisor and scheduler wait on the database for one statement or "
        "connection, in seconds; a frozen server then counts as gone (default: 10)",
        at_least=1,
        at_most=300,
        seconds=True,
    )
    metrics_port: int | None = _option(
        None,
        "serve Prometheus metrics on this port (needs the [metrics] extra; default: off)",
        at_least=1,
        at_most=65535,
        metavar="PORT",
    )
    max_tasks: int | None = _option(
        None,
        "replace each worker process after it ran N tasks (default: never)",
        at_least=1,
        metavar="N",
    )

    def problem(self) -> str | None:
        """What is wrong with these options, named as the command line names them; or
        None."""
        for option in fields(self):
            problem = _problem(option.metadata, getattr(self, option.name))
            if problem:
                return f"{_flag(option.name)[2:]} {problem}"
        return None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _problem(rule: Mapping[str, Any], value: Any) -> str | None:
    """Why ``value`` breaks an option's bounds, or None."""
    if value is None or isinstance(value, bool):
        return None
    low, high, above = rule["at_least"], rule["at_most"], rule["above"]
    if not rule["seconds"]:
        if low is not None and value < low:
            return f"must be at least {low:g}"
        return None if high is None or value <= high else f"must be at most {high:g}"
    if low is not None and high is not None:
        if not low <= value <= high:
            return f"must be between {low:g} and {high:g} seconds, not {value}"
    elif above is not None:
        if not above < value < math.inf:
            return f"must be a number of seconds more than {above:g}, not {value}"
    elif not low <= value < math.inf:
        return f"must be a number of seconds, {low:g} or more, not {value}"
    return None


DEFAULTS = SupervisorOptions()
"""Every option at its default."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one command-line option per field of :class:`SupervisorOptions`."""
    for option in fields(SupervisorOptions):
        meta = option.metadata
        flag = meta["flag"] or _flag(option.name)
        if isinstance(option.default, bool):
            action = "store_false" if option.default else "store_true"
            parser.add_argument(flag, dest=option.name, action=action, help=meta["help"])
            continue
        kind = float if meta["seconds"] else int
        parser.add_argument(
            flag,
            dest=option.name,
            type=kind,
            default=option.default,
            metavar=meta["metavar"],
            help=meta["help"],
        )


def from_arguments(args: argparse.Namespace) -> SupervisorOptions:
    """The options a parsed command line gives."""
    names = [option.name for option in fields(SupervisorOptions)]
    return SupervisorOptions(**{name: getattr(args, name) for name in names})


def from_keywords(caller: str, keywords: Mapping[str, Any]) -> SupervisorOptions:
    """The options given as keywords (``run_workers(workers=2)``), checked: raises
    :class:`ConfigurationError` naming the option, before anything starts."""
    known = {option.name for option in fields(SupervisorOptions)}
    unknown = sorted(set(keywords) - known)
    if unknown:
        raise TypeError(
            f"{caller}() got unknown option(s) {', '.join(unknown)}; "
            f"the options are {', '.join(sorted(known))}"
        )
    options = SupervisorOptions(**keywords)
    problem = options.problem()
    if problem:
        option, _, what = problem.partition(" ")
        raise ConfigurationError(f"{caller}: {option.replace('-', '_')} {what}")
    return options
