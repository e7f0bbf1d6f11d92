"""The dashboard's pages: every one a GET, rendered on the server from :mod:`underway.admin`,
which reads only through indexes; none scans the task table."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg2
from flask import Blueprint, Response, abort, redirect, render_template, request, url_for

from .. import admin, metrics
from ..db import check_schema, redact_dsn
from ..errors import UnderwayError
from ..records import TaskDetail, TaskState
from .charts import throughput_chart
from .state import db, settings

bp = Blueprint("web", __name__)

#: Tasks per page of a list.
PAGE = 50
#: Dead letters shown at once, oldest first.
DEAD_LETTERS_SHOWN = 200
#: Task ids are PostgreSQL bigints.
BIGINT_MAX = 2**63 - 1
STATES = tuple(state.value for state in TaskState)
_ID = re.compile(r"#?\s*([0-9]{1,19})")


def parse_id(text: str | None) -> int | None:
    """A task id typed or passed along (``42``, ``#42``), or None when it is not one."""
    match = _ID.fullmatch((text or "").strip())
    if not match:
        return None
    value = int(match[1])
    return value if 0 < value <= BIGINT_MAX else None


@bp.get("/")
def overview() -> str:
    """Queues with their counts, lag and pause; throughput of the last hour; supervisors;
    the latest failures; warnings about jobs nobody runs."""
    conn = db()
    queues = admin.queues(conn=conn)
    supervisors = admin.supervisors(conn=conn)
    totals = {state: sum(getattr(q, state) for q in queues) for state in _COUNTED}
    workers = [w for s in supervisors for w in s.workers]
    return render_template(
        "overview.html",
        page="overview",
        queues=queues,
        totals=totals,
        max_lag=max((q.lag for q in queues if q.lag is not None), default=None),
        paused=sum(1 for q in queues if q.paused),
        chart=throughput_chart(admin.throughput(minutes=60, conn=conn)),
        supervisors=supervisors,
        workers=len(workers),
        busy=sum(1 for w in workers if w.task_id is not None),
        failures=admin.list_tasks(state="failed", limit=5, conn=conn),
        unhandled=admin.unhandled_jobs(conn=conn),
        limits=admin.limits(conn=conn),
    )


_COUNTED = ("pending", "running", "failed")


@bp.get("/tasks")
def tasks() -> str:
    """Tasks newest first, filtered by state, job and queue, 50 a page, paged by id."""
    return _task_list("tasks", request.args.get("state") or None)


@bp.get("/failures")
def failures() -> str:
    """Failed tasks newest first, with their errors, and a retry button each."""
    return _task_list("failures", "failed")


def _task_list(page: str, state: str | None) -> str:
    if state is not None and state not in STATES:
        abort(400, f"There is no task state {state!r}: choose one of {', '.join(STATES)}.")
    job = request.args.get("job", "").strip() or None
    queue = request.args.get("queue", "").strip() or None
    before = parse_id(request.args.get("before"))
    found = admin.list_tasks(
        state=state, job=job, queue=queue, before=before, limit=PAGE + 1, conn=db()
    )
    rows = found[:PAGE]
    filters = {"state": state if page == "tasks" else None, "job": job, "queue": queue}
    filters = {k: v for k, v in filters.items() if v}
    older = url_for(f"web.{page}", **filters, before=rows[-1].id) if len(found) > PAGE else None
    return render_template(
        f"{page}.html",
        page=page,
        rows=rows,
        state=state,
        job=job or "",
        queue=queue or "",
        states=STATES,
        paged=before is not None,
        newest=url_for(f"web.{page}", **filters),
        older=older,
    )


@dataclass(frozen=True)
class StepView:
    """A step of a task's job, as the task page lists it."""

    index: int
    name: str | None
    status: str
    tries: int


def steps_of(task: TaskDetail) -> list[StepView]:
    """Each step of the task's job, named where known, with how far the task got."""
    names = dict(enumerate(task.step_names))
    tries: dict[int, int] = {}
    for attempt in task.history:
        tries[attempt.step] = tries.get(attempt.step, 0) + 1
    found = []
    for i in range(max(task.step_count, task.step + 1)):
        if i < task.step:
            status = "done"
        elif i > task.step:
            status = "skipped" if task.state is TaskState.SUCCEEDED else "todo"
        else:
            status = {
                TaskState.SUCCEEDED: "done",
                TaskState.FAILED: "failed",
                TaskState.CANCELLED: "cancelled",
                TaskState.RUNNING: "running",
            }.get(task.state, "current")
        found.append(StepView(i, names.get(i), status, tries.get(i, 0)))
    return found


@bp.get("/tasks/<int:task_id>")
def task(task_id: int) -> Any:
    """One task, whole: input, output, its steps, and every try with its traceback."""
    detail = admin.task_detail(task_id, conn=db()) if task_id <= BIGINT_MAX else None
    if detail is None:
        return render_template("missing.html", page="task", task_id=task_id), 404
    return render_template("task.html", page="task", task=detail, steps=steps_of(detail))


@bp.get("/search")
def search() -> Any:
    """The top bar's box: jump to the task with the id typed."""
    text = request.args.get("id", "")
    task_id = parse_id(text)
    if task_id is None:
        return render_template("missing.html", page="task", task_id=None, text=text), 400
    return redirect(url_for("web.task", task_id=task_id))


@bp.get("/dead-letters")
def dead_letters() -> str:
    """A dead-letter queue's tasks, with re-drive buttons for all or one."""
    queue = request.args.get("queue", "").strip()
    letters = admin.dead_letters(queue, limit=DEAD_LETTERS_SHOWN, conn=db()) if queue else []
    known = admin.dead_letter_queues(conn=db())
    return render_template(
        "dead_letters.html",
        page="dead_letters",
        queue=queue,
        letters=letters,
        total=next((q.tasks for q in known if q.queue == queue), len(letters)),
        known=known,
    )


@bp.get("/schedules")
def schedules() -> str:
    """Every cron schedule, with its last fire and its next."""
    return render_template("schedules.html", page="schedules", schedules=admin.schedules(conn=db()))


@bp.get("/supervisors")
def supervisors() -> str:
    """Live supervisors, and what each of their workers runs now."""
    return render_template(
        "supervisors.html", page="supervisors", supervisors=admin.supervisors(conn=db())
    )


@bp.get("/metrics")
def metrics_page() -> Response:
    """The Prometheus text exposition (underway.metrics.exposition)."""
    try:
        body, content_type = metrics.exposition(settings().dsn)
    except (psycopg2.Error, UnderwayError) as exc:
        return _plain(f"metrics unavailable: {_one_line(exc)}\n", 503)
    return Response(body, content_type=content_type)


@bp.get("/healthz")
def healthz() -> Response:
    """200 when the database answers with the schema this version needs, else 503."""
    try:
        check_schema(db())
    except (psycopg2.Error, UnderwayError) as exc:
        return _plain(f"unavailable: {_one_line(exc)}\n", 503)
    return _plain("ok\n", 200)


def _plain(text: str, status: int) -> Response:
    return Response(text, status, mimetype="text/plain", headers={"Cache-Control": "no-store"})


def _one_line(exc: BaseException) -> str:
    return redact_dsn(" ".join(str(exc).split()))
