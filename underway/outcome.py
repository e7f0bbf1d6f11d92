"""What a try of a step came to, in the terms the worker records: a step's return value
read as a :class:`~underway.job.To`, and a failure as the error and traceback texts kept
with the try. Nothing a step returns or raises may stop the worker, so nothing here
raises: a mistake in a return value becomes :class:`~underway.errors.Fatal`, and an
exception that cannot even be printed is described by its type."""

from __future__ import annotations

import traceback
from typing import Any

from .errors import Fatal
from .job import Job, Step, To
from .values import MAX_ERROR_CHARS, MAX_TRACEBACK_CHARS, clean_text, to_json

SELF_COMMITTED = (
    "the step ended the worker's transaction itself (COMMIT or ROLLBACK through cx): its "
    "writes are no longer atomic with the step, and a retry would repeat them. Let the "
    "worker commit; write through cx.cursor() without committing"
)

DEALLOCATED = (
    "the step deallocated the worker's prepared statements (DEALLOCATE ALL), which lost "
    "its transaction: its writes were rolled back. Leave the worker's statements alone"
)

ABORTED = (
    "the step's transaction was aborted by an SQL error the step caught and went on from; "
    "nothing it wrote can commit. Let the error propagate, or roll back to a savepoint"
)


def interpret(job: Job, step: Step, result: Any) -> To | BaseException:
    """What the step returned, as a :class:`To` whose value is JSON text: ``None`` is
    done; a plain value goes on to the next step, or from the last step is the result.
    A mistake here is Fatal: retrying the same code would make the same mistake."""
    last = step.index + 1 >= len(job.steps)
    if not isinstance(result, To):
        result = To.done() if result is None else To.done(result) if last else To.next(result)
    elif result.kind != "done" and last:
        return Fatal(
            f"step {step.name!r} is the last step of job {job.name!r}, "
            "so it cannot go on to a next one: return To.done(result)"
        )
    what = "result" if result.kind == "done" else "output"
    if result.kind == "done" and result.value is None:
        return result
    try:
        text = to_json(result.value, f"{what} of step {step.name!r} of {job.name!r}")
    except (TypeError, ValueError) as exc:
        return Fatal(str(exc))
    return To(result.kind, text, result.wait)


def describe(exc: BaseException) -> tuple[str, str]:
    """The error text (``Type: message``) and traceback to record for a failed try, cut
    to their bounds; an exception whose ``__str__`` itself raises is named by its type."""
    try:
        message = str(exc)
    except Exception as broken:  # the step's exception class is broken, not the step
        message = f"<its message could not be read: {type(broken).__name__}>"
    error = clean_text(f"{type(exc).__name__}: {message}", MAX_ERROR_CHARS)
    try:
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:
        trace = "".join(traceback.format_tb(exc.__traceback__)) + error + "\n"
    return error, clean_text(trace, MAX_TRACEBACK_CHARS)
