"""The dashboard's actions: retry, cancel (or abort), pause, resume and re-drive.

Each is a POST carrying the session's CSRF token; a read-only dashboard refuses them all
(403). Each answers with a redirect back to the page it came from (POST/redirect/GET) and
a flash message saying what happened.
"""

from __future__ import annotations

from flask import Blueprint, Response, abort, flash, redirect, request, url_for

from .. import admin
from ..errors import UnderwayError
from ..records import CancelResult
from .security import check_csrf, safe_next
from .state import db, settings
from .views import parse_id

bp = Blueprint("act", __name__, url_prefix="/actions")


@bp.before_request
def guard() -> None:
    """Refuse every action of a read-only dashboard, and every POST without its token."""
    if settings().read_only:
        abort(403, "This dashboard is read-only: its actions are turned off.")
    check_csrf()


def _task_id() -> int:
    task_id = parse_id(request.form.get("id"))
    if task_id is None:
        abort(400, "The form names no task id.")
    return task_id


def _queue() -> str:
    queue = request.form.get("queue", "").strip()
    if not queue:
        abort(400, "The form names no queue.")
    return queue


def _back(fallback: str) -> Response:
    """Back to the page the form was on (303: the browser GETs it)."""
    return redirect(safe_next(request.form.get("next"), fallback), 303)


@bp.post("/retry")
def retry() -> Response:
    """Put a failed task back to work at the step that failed, its tries renewed."""
    task_id = _task_id()
    try:
        retried = admin.retry([task_id], conn=db())
    except UnderwayError as exc:
        flash(f"Task {task_id}: {exc}", "error")
    else:
        if retried:
            flash(f"Task {task_id}: retried — back to pending at the step that failed.")
        else:
            flash(f"Task {task_id}: not retried.", "error")
    return _back(url_for("web.task", task_id=task_id))


_CANCELLED = {
    CancelResult.CANCELLED: "cancelled — it will not run.",
    CancelResult.REQUESTED: "requested — it stops at its next step boundary.",
    CancelResult.FINISHED: "finished — it had already finished; nothing changed.",
}


@bp.post("/cancel")
def cancel() -> Response:
    """Cancel a task; with ``abort``, end its running step now."""
    task_id = _task_id()
    abort_now = request.form.get("abort") == "1"
    try:
        result = admin.cancel_task(task_id, abort=abort_now, conn=db())
    except LookupError:
        flash(f"No task {task_id}.", "error")
    else:
        said = _CANCELLED[result]
        if abort_now and result is CancelResult.REQUESTED:
            said = "requested — its supervisor ends the running step now (abort)."
        flash(f"Task {task_id}: {said}", "error" if result is CancelResult.FINISHED else "ok")
    return _back(url_for("web.task", task_id=task_id))


@bp.post("/pause")
def pause() -> Response:
    """Pause a queue: workers start none of its tasks until it is resumed."""
    queue = _queue()
    admin.pause(queue, conn=db())
    flash(f"Queue {queue!r} paused: no new task of it starts until it is resumed.")
    return _back(url_for("web.overview"))


@bp.post("/resume")
def resume() -> Response:
    """Resume a paused queue."""
    queue = _queue()
    if admin.resume(queue, conn=db()):
        flash(f"Queue {queue!r} resumed.")
    else:
        flash(f"Queue {queue!r} was not paused.", "error")
    return _back(url_for("web.overview"))


@bp.post("/redrive")
def redrive() -> Response:
    """Put a dead-letter queue's tasks back to work: all of them, or the one given."""
    queue = _queue()
    one = request.form.get("id")
    ids = None if one is None else [_task_id()]
    done = admin.redrive(queue, ids, conn=db())
    if done:
        listed = ", ".join(str(i) for i in done[:10]) + (" …" if len(done) > 10 else "")
        flash(f"Re-drove {len(done)} task(s) from dead-letter queue {queue!r}: {listed}.")
    else:
        flash(f"Nothing re-driven: no such dead letter in {queue!r}.", "error")
    return _back(url_for("web.dead_letters", queue=queue))
