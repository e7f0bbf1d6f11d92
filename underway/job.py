"""Jobs: a named sequence of plain step functions, and how a step says what comes next.

A job run moves through its steps in order. Each step is called as ``step(cx, inp)``
and returns :class:`To` (or ``None``, which means done); the value it passes on becomes
the next step's input. Inputs travel through PostgreSQL as JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Union, overload

from . import store
from .cron import ZonedSchedule
from .db import caller_cursor
from .errors import ConfigurationError
from .retry import RetryPolicy
from .task import Task

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
"""The range of PostgreSQL's ``integer``, which priorities are stored as."""

Delay = Union[timedelta, float, int, None]
"""A delay: a :class:`~datetime.timedelta` or a number of seconds; ``None`` means none."""

StepFunction = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class To:
    """What a step returns to say what happens next.

    - ``To.next(value)``: run the next step now, with ``value`` as its input.
    - ``To.delay(timedelta(hours=1), value)``: run the next step later.
    - ``To.done()``: the job run is finished (returning ``None`` means the same).
    """

    kind: str
    value: Any = None
    #: Seconds to wait before the next step runs.
    wait: float = 0.0

    @classmethod
    def next(cls, value: Any = None) -> To:
        """Go on to the next step at once, passing it ``value``."""
        return cls("next", value)

    @classmethod
    def delay(cls, delay: Delay, value: Any = None) -> To:
        """Go on to the next step after ``delay``, passing it ``value``."""
        return cls("next", value, seconds(delay))

    @classmethod
    def done(cls) -> To:
        """Finish the job run: there is no next step."""
        return cls("done")


DEFAULT_TIMEOUT = timedelta(minutes=15)
"""How long a step may run unless its job or the step itself says otherwise."""

DEFAULT_KEEP_FOR = timedelta(days=14)
"""How long a finished task is kept unless its job says otherwise."""

KEY_MODES = ("replace", "preserve_run_at", "keep")
"""What an enqueue with a job key does to a pending task of the job holding the key."""


@dataclass(frozen=True)
class Step:
    """One step of a job: the function, the retry policy that governs its tries, and how
    long one try may run (seconds)."""

    index: int
    name: str
    function: StepFunction
    retry: RetryPolicy
    timeout: float


class Job:
    """A named sequence of steps, run in order by workers; each step's output is the next
    step's input.

    Define one at module level, add steps with :meth:`step`, and enqueue runs of it::

        receipts = Job("order-receipt", retry=RetryPolicy(max_attempts=5))

        @receipts.step
        def generate(cx, inp):
            return To.next({"receipt_key": f"receipts/{inp['order_id']}.pdf"})

        receipts.enqueue({"order_id": 42})

    :param name: the job's name, unique across the codebase; stored with every task, so a
        renamed job leaves its queued tasks to workers that still know the old name.
    :param retry: the retry policy of every step that does not set its own.
    :param priority: the default priority of its tasks; higher runs first.
    :param queue: the queue its tasks go to, which can be paused and resumed (default: the
        job's name).
    :param timeout: how long one try of a step may run, unless the step sets its own
        (default: 15 minutes); a try over it is stopped and retried per the policy.
    :param dead_letter_queue: where its tasks go when they fail for good, to be looked at
        and re-driven (:func:`underway.admin.redrive`); by default they just fail.
    :param keep_for: how long a finished task (and its attempts) is kept before retention
        deletes it (default: 14 days). Tasks in a dead-letter queue are kept until
        re-driven.
    """

    def __init__(
        self,
        name: str,
        *,
        retry: RetryPolicy | None = None,
        priority: int = 0,
        queue: str | None = None,
        timeout: Delay = DEFAULT_TIMEOUT,
        dead_letter_queue: str | None = None,
        keep_for: Delay = DEFAULT_KEEP_FOR,
    ):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a job name must be a non-empty string, not {name!r}")
        if name in _registry:
            raise ConfigurationError(
                f"a job named {name!r} is already defined; job names must be unique"
            )
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"job {name!r}: priority must be an integer, not {priority!r}")
        self.name = name
        self.retry = retry or RetryPolicy()
        self.priority = priority
        self.queue = _name_or_none(queue, f"job {name!r}: queue") or name
        self.timeout = _duration(timeout, f"job {name!r}: timeout", positive=True)
        self.dead_letter_queue = _name_or_none(
            dead_letter_queue, f"job {name!r}: dead_letter_queue"
        )
        self.keep_for = _duration(keep_for, f"job {name!r}: keep_for")
        self.steps: list[Step] = []
        _registry[name] = self

    def __repr__(self) -> str:
        return f"<Job {self.name!r} steps={[s.name for s in self.steps]}>"

    @overload
    def step(self, function: StepFunction) -> StepFunction: ...

    @overload
    def step(
        self,
        function: None = None,
        *,
        retry: RetryPolicy | None = None,
        timeout: Delay = None,
    ) -> Callable[[StepFunction], StepFunction]: ...

    def step(
        self,
        function: StepFunction | None = None,
        *,
        retry: RetryPolicy | None = None,
        timeout: Delay = None,
    ) -> Any:
        """Add a step: use as ``@job.step`` or ``@job.step(retry=..., timeout=...)``.

        Steps run in the order they are added. The function is returned unchanged, so it
        can still be called directly in tests. ``retry`` and ``timeout`` default to the
        job's.
        """
        limit = (
            self.timeout
            if timeout is None
            else _duration(timeout, f"job {self.name!r}: timeout", positive=True)
        )

        def add(fn: StepFunction) -> StepFunction:
            if not callable(fn):
                raise TypeError(f"job {self.name!r}: a step must be callable, not {fn!r}")
            name = getattr(fn, "__name__", repr(fn))
            self.steps.append(Step(len(self.steps), name, fn, retry or self.retry, limit))
            return fn

        return add(function) if function is not None else add

    def enqueue(
        self,
        input: Any = None,
        *,
        conn: Any = None,
        delay: Delay = None,
        priority: int | None = None,
        key: str | None = None,
        key_mode: str = "replace",
        serial_queue: str | None = None,
    ) -> Task:
        """Enqueue a run of this job with ``input`` for its first step.

        Without ``conn`` the task is committed at once, in a short transaction of its own.
        With ``conn`` (a psycopg2 connection or cursor, or a SQLAlchemy connection or
        session) it is written in the caller's transaction, and exists only once the
        caller commits.

        :param input: any JSON-serialisable value; a ``TypeError`` or ``ValueError`` naming
            the job is raised, and nothing written, if it is not.
        :param delay: run no earlier than this long from now (timedelta or seconds).
        :param priority: overrides the job's priority; higher runs first.
        :param key: a job key: at most one pending or running task of this job holds it.
            If one is pending and not yet started, ``key_mode`` says what happens:
            ``"replace"`` gives it this input, delay and priority (debounce);
            ``"preserve_run_at"`` gives it this input but keeps its run time (throttle);
            ``"keep"`` leaves it as it is (dedupe). A task under way (running, or between
            steps) holding the key hands it to the new task, except with ``"keep"``, where
            the enqueue does nothing. The task returned is the one that holds the key.
        :param serial_queue: tasks sharing a serial queue, of any job, run one at a time
            in order (priority, then run time, then enqueue order).
        """
        params = self._task_params(delay, priority, serial_queue)
        params["input"] = self._to_json(input)
        insert = store.insert_task
        if key is not None:
            if not isinstance(key, str) or not key:
                raise TypeError(f"job {self.name!r}: key must be a non-empty string, not {key!r}")
            if key_mode not in KEY_MODES:
                raise ValueError(
                    f"job {self.name!r}: key_mode must be one of {', '.join(KEY_MODES)}, "
                    f"not {key_mode!r}"
                )
            params.update(key=key, key_mode=key_mode)
            insert = store.enqueue_keyed
        with caller_cursor(conn) as cur:
            task_id = insert(cur, params)
        return Task(task_id, self.name)

    def enqueue_many(
        self,
        inputs: Iterable[Any],
        *,
        conn: Any = None,
        delay: Delay = None,
        priority: int | None = None,
        serial_queue: str | None = None,
    ) -> list[Task]:
        """Enqueue one run per input in a single statement: all of them or, on any error,
        none. Returns the tasks in the order of ``inputs``. Options are as for
        :meth:`enqueue`."""
        if isinstance(inputs, (str, bytes, dict)):
            raise TypeError(
                f"job {self.name!r}: enqueue_many takes a list of inputs, "
                f"not a single {type(inputs).__name__}"
            )
        inputs = list(inputs)
        if not inputs:
            return []
        params = self._task_params(delay, priority, serial_queue)
        params["inputs"] = self._to_json(inputs, what="an input in the batch")
        with caller_cursor(conn) as cur:
            ids = store.insert_tasks(cur, params)
        return [Task(task_id, self.name) for task_id in ids]

    def schedule(
        self,
        expression: str,
        input: Any = None,
        *,
        name: str = "default",
        catch_up: bool = True,
        conn: Any = None,
    ) -> ZonedSchedule:
        """Run this job on a cron schedule, with ``input`` for every run; stores the schedule
        in the database, or replaces the one of the same ``name``.

        ``expression`` is a 5-field cron expression (or 6 fields with leading seconds, or
        ``@daily`` and friends), optionally followed by an IANA time zone in brackets::

            report.schedule("@daily[America/Los_Angeles]", {"kind": "sales"})
            report.schedule("*/15 8-18 * * MON-FRI[Europe/Berlin]", name="office-hours")

        Scheduler processes (one runs beside each supervisor) pick the change up at once.
        Each tick is enqueued exactly once however many run; the task sees its tick as
        ``cx.scheduled_at``. After an outage, the most recent missed tick is enqueued once
        (``catch_up=True``) or skipped (``catch_up=False``); ticks from before the schedule
        was stored never fire.

        :raises ValueError: for a malformed expression or an unknown time zone; nothing is
            stored then.
        """
        parsed = ZonedSchedule.parse(expression)
        parsed.next_after(datetime.now(timezone.utc))  # ValueError if it never fires again
        self._check_steps()
        params = {
            "job": self.name,
            "name": name,
            "expression": str(parsed),
            "input": self._to_json(input),
            "catch_up": bool(catch_up),
        }
        with caller_cursor(conn) as cur:
            store.store_schedule(cur, params)
        return parsed

    def unschedule(self, name: str = "default", *, conn: Any = None) -> bool:
        """Remove the schedule called ``name``; returns whether there was one. Tasks it
        already enqueued are not touched."""
        with caller_cursor(conn) as cur:
            return store.remove_schedule(cur, self.name, name)

    def _check_steps(self) -> None:
        if not self.steps:
            raise ConfigurationError(
                f"job {self.name!r} has no steps: add one with @{self.name}.step"
            )

    def _task_params(
        self, delay: Delay, priority: int | None, serial_queue: str | None = None
    ) -> dict[str, Any]:
        self._check_steps()
        chosen = self.priority if priority is None else priority
        if isinstance(chosen, bool) or not isinstance(chosen, int):
            raise TypeError(f"job {self.name!r}: priority must be an integer, not {chosen!r}")
        if not INT_MIN <= chosen <= INT_MAX:
            raise ValueError(
                f"job {self.name!r}: priority must fit a 32-bit integer, not {chosen!r}"
            )
        params = self.defaults()
        params.update(
            job=params.pop("name"),
            priority=chosen,
            delay=seconds(delay),
            serial_queue=_name_or_none(serial_queue, f"job {self.name!r}: serial_queue"),
        )
        return params

    def defaults(self) -> dict[str, Any]:
        """What a task of this job takes unless told otherwise: stored by supervisors in
        ``underway.job`` for enqueue from SQL and for the scheduler."""
        return {
            "name": self.name,
            "queue": self.queue,
            "priority": self.priority,
            "max_attempts": self.steps[0].retry.max_attempts if self.steps else 5,
            "dead_letter_queue": self.dead_letter_queue,
            "keep_for": self.keep_for,
        }

    def _to_json(self, value: Any, what: str = "input") -> str:
        return to_json(value, f"job {self.name!r}: {what}")


def to_json(value: Any, context: str) -> str:
    """Serialise ``value`` for a task, or raise TypeError/ValueError that says what is wrong
    and where (``context``)."""
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except TypeError as exc:
        raise TypeError(f"{context} is not JSON-serialisable: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{context} is not valid JSON: {exc}") from None
    # jsonb cannot hold NUL or a lone surrogate; both show up escaped in the text, so
    # only inputs that contain such an escape are looked at more closely.
    if "\\u0000" in text or "\\ud" in text:
        bad = _unstorable_string(value)
        if bad is not None:
            raise ValueError(f"{context} holds a string PostgreSQL cannot store: {bad!r}")
    return text


def _unstorable_string(value: Any) -> str | None:
    """The first string in ``value`` (keys included) with a NUL or a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value
        return value if "\x00" in value else None
    items: Iterable[Any] = ()
    if isinstance(value, dict):
        items = (item for pair in value.items() for item in pair)
    elif isinstance(value, (list, tuple)):
        items = value
    for item in items:
        bad = _unstorable_string(item)
        if bad is not None:
            return bad
    return None


def _name_or_none(value: Any, what: str) -> str | None:
    """A queue name as given, or None; anything but a non-empty string is refused."""
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise TypeError(f"{what} must be a non-empty string, not {value!r}")
    return value


def _duration(value: Delay, what: str, *, positive: bool = False) -> float:
    """A duration option in seconds; an error names the option (``what``) when it is not a
    finite duration, or, with ``positive``, is not more than zero."""
    try:
        result = seconds(value)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{what}: {exc}") from None
    if positive and result <= 0:
        raise ValueError(f"{what} must be more than zero, not {value!r}")
    return result


def seconds(delay: Delay) -> float:
    """A delay as seconds; a negative delay is refused rather than silently run at once."""
    if delay is None:
        return 0.0
    if isinstance(delay, timedelta):
        value = delay.total_seconds()
    elif isinstance(delay, (int, float)) and not isinstance(delay, bool):
        value = float(delay)
    else:
        raise TypeError(f"a delay is a timedelta or a number of seconds, not {delay!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"a delay must be finite and not negative: {delay!r}")
    return value


_registry: dict[str, Job] = {}


def registered_jobs() -> dict[str, Job]:
    """Every job defined in this process so far, by name."""
    return dict(_registry)


def unregister_job(name: str) -> Job | None:
    """Forget the job called ``name``, so the name may be defined again; returns the job, if
    there was one. For tests that define throwaway jobs; workers already running keep it."""
    return _registry.pop(name, None)
