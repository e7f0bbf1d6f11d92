"""Jobs: a named sequence of plain step functions, and how a step says what comes next.

A job run moves through its steps in order. Each step is called as ``step(cx, inp)``
and returns :class:`To`, or a plain value: the next step's input, or, from the last step,
the task's result. ``None`` means done. Inputs and results travel through PostgreSQL as
JSON.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, overload

from . import store, tracing
from .cron import ZonedSchedule
from .db import caller_cursor
from .errors import ConfigurationError
from .retry import RetryPolicy
from .task import Task
from .values import (
    INT_MAX,
    INT_MIN,
    MAX_TIMEOUT,
    Delay,
    aware,
    duration,
    name_or_none,
    rate,
    seconds,
    to_json,
    to_json_array,
)

StepFunction = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class To:
    """What a step returns to say what happens next.

    - ``To.next(value)``: run the next step now, with ``value`` as its input.
    - ``To.delay(timedelta(hours=1), value)``: run the next step later.
    - ``To.done(result)``: the job run is finished, with ``result`` as the task's output
      (``task.result()``). Returning ``None`` means ``To.done()``.

    A plain value returned instead means ``To.next(value)`` from any step but the last,
    and ``To.done(value)`` from the last.
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
    def done(cls, result: Any = None) -> To:
        """Finish the job run, with ``result`` (any JSON value) as the task's output."""
        return cls("done", result)


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
    :param keep_for: how long a finished task (and its attempts, and its result) is kept
        before retention deletes it (default: 14 days, at most 100 years). Tasks in a
        dead-letter queue are kept until re-driven.
    :param rate_limit: at most this many of its queue's tasks start per second, minute or
        hour, across all supervisors and hosts: ``"100/m"``, ``"5/s"``, ``"1000/h"``. The
        limit belongs to the queue; a supervisor running the job stores it at start.
    :param max_concurrency: at most this many of its tasks (or of its
        ``concurrency_group``'s) run at once, across all hosts.
    :param concurrency_group: a name tasks of several jobs share, to be counted together
        against ``max_concurrency`` (default: the job's name, when ``max_concurrency`` is
        given).
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
        rate_limit: str | None = None,
        max_concurrency: int | None = None,
        concurrency_group: str | None = None,
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
        self.queue = name_or_none(queue, f"job {name!r}: queue") or name
        self.timeout = duration(timeout, f"job {name!r}: timeout", positive=True, most=MAX_TIMEOUT)
        self.dead_letter_queue = name_or_none(dead_letter_queue, f"job {name!r}: dead_letter_queue")
        self.keep_for = duration(keep_for, f"job {name!r}: keep_for")
        #: (count, seconds) of the queue's rate limit, if the job sets one.
        self.rate_limit = (
            None if rate_limit is None else rate(rate_limit, f"job {name!r}: rate_limit")
        )
        if max_concurrency is not None and (
            isinstance(max_concurrency, bool)
            or not isinstance(max_concurrency, int)
            or not 1 <= max_concurrency <= INT_MAX
        ):
            raise ValueError(
                f"job {name!r}: max_concurrency must be an integer from 1, not {max_concurrency!r}"
            )
        self.max_concurrency = max_concurrency
        self.concurrency_group = name_or_none(
            concurrency_group, f"job {name!r}: concurrency_group"
        ) or (name if max_concurrency is not None else None)
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
            else duration(timeout, f"job {self.name!r}: timeout", positive=True, most=MAX_TIMEOUT)
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
        run_at: datetime | None = None,
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
        :param delay: run no earlier than this long from now (timedelta or seconds, at most
            100 years).
        :param run_at: run no earlier than this aware datetime (instead of ``delay``); a
            naive datetime is refused, as its time zone would be a guess.
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
        params = self._task_params(delay, run_at, priority, serial_queue)
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
        run_at: datetime | None = None,
        priority: int | None = None,
        serial_queue: str | None = None,
    ) -> list[Task]:
        """Enqueue one run per input in a single statement: all of them or, on any error,
        none. Returns the tasks in the order of ``inputs``. Options are as for
        :meth:`enqueue`; an input that cannot be stored is named by its index."""
        if isinstance(inputs, (str, bytes, dict)):
            raise TypeError(
                f"job {self.name!r}: enqueue_many takes a list of inputs, "
                f"not a single {type(inputs).__name__}"
            )
        inputs = list(inputs)
        if not inputs:
            return []
        params = self._task_params(delay, run_at, priority, serial_queue)
        params["inputs"] = to_json_array(
            inputs, lambda i: f"job {self.name!r}: input {i} of the batch"
        )
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

    def task(self, task_id: int) -> Task:
        """A handle on a task of this job enqueued elsewhere (another process, SQL), by id."""
        return Task(int(task_id), self.name)

    def _check_steps(self) -> None:
        if not self.steps:
            raise ConfigurationError(
                f"job {self.name!r} has no steps: add one with @{self.name}.step"
            )

    def _task_params(
        self,
        delay: Delay,
        run_at: datetime | None,
        priority: int | None,
        serial_queue: str | None = None,
    ) -> dict[str, Any]:
        self._check_steps()
        if run_at is not None:
            if delay is not None:
                raise ValueError(f"job {self.name!r}: give delay or run_at, not both")
            run_at = aware(run_at, f"job {self.name!r}: run_at")
        chosen = self.priority if priority is None else priority
        if isinstance(chosen, bool) or not isinstance(chosen, int):
            raise TypeError(f"job {self.name!r}: priority must be an integer, not {chosen!r}")
        if not INT_MIN <= chosen <= INT_MAX:
            raise ValueError(
                f"job {self.name!r}: priority must fit a 32-bit integer, not {chosen!r}"
            )
        params = self.defaults()
        del params["steps"]
        params.update(
            job=params.pop("name"),
            priority=chosen,
            delay=seconds(delay),
            run_at=run_at,
            serial_queue=name_or_none(serial_queue, f"job {self.name!r}: serial_queue"),
            trace_context=tracing.current_context(),
        )
        return params

    def defaults(self) -> dict[str, Any]:
        """What a task of this job takes unless told otherwise: stored by supervisors in
        ``underway.job`` for enqueue from SQL and for the scheduler."""
        return {
            "name": self.name,
            "queue": self.queue,
            "priority": self.priority,
            "max_attempts": (self.steps[0].retry if self.steps else self.retry).max_attempts,
            "dead_letter_queue": self.dead_letter_queue,
            "keep_for": self.keep_for,
            "concurrency_group": self.concurrency_group,
            "steps": [step.name for step in self.steps],
        }

    def _to_json(self, value: Any, what: str = "input") -> str:
        return to_json(value, f"job {self.name!r}: {what}")


_registry: dict[str, Job] = {}


def registered_jobs() -> dict[str, Job]:
    """Every job defined in this process so far, by name."""
    return dict(_registry)


def unregister_job(name: str) -> Job | None:
    """Forget the job called ``name``, so the name may be defined again; returns the job, if
    there was one. For tests that define throwaway jobs; workers already running keep it."""
    return _registry.pop(name, None)
