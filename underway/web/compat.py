"""Stand-ins for admin functions that do not work yet, until :mod:`underway.store` is fixed.

``admin.task_detail`` raises ``RuntimeError: query result lacks ['history'] for
TaskDetail``: ``store.task_detail`` maps the ``task_detail`` row with ``_one(TaskDetail,
cur)``, which asks the row for every field, the defaulted ``history`` included (the fix:
``_one(TaskDetail, cur, history=())``). Until then :func:`task_detail` runs the same two
named queries from ``queries.sql`` with that fix. Delete this module once admin's works.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .. import admin
from ..records import Attempt, TaskDetail, TaskState
from ..store import base


def task_detail(task_id: int, conn: Any) -> TaskDetail | None:
    """:func:`underway.admin.task_detail`, working around its missing ``history``."""
    try:
        return admin.task_detail(task_id, conn=conn)
    except RuntimeError as exc:
        if "history" not in str(exc):
            raise
    with conn.cursor() as cur:
        base._run(cur, "task_detail", {"id": task_id})
        detail = base._one(TaskDetail, cur, history=())
        if detail is None:
            return None
        base._run(cur, "task_attempts", {"id": task_id})
        return replace(
            detail,
            state=TaskState(detail.state),
            input=base._shown(detail.input),
            output=base._shown(detail.output),
            history=tuple(base._all(Attempt, cur)),
        )
