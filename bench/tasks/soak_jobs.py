"""The chaos soak's job (``bench/soak.py``): two steps, each writing one effect row through
the worker's transaction, so that "every effect exactly once" can be counted in SQL."""

from __future__ import annotations

from typing import Any

from underway import Job, To

EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS soak_effect (
    task_id bigint NOT NULL,
    step integer NOT NULL,
    pid integer NOT NULL DEFAULT pg_backend_pid()
)
"""

soak = Job("soak-two-step")


def _effect(cx: Any) -> None:
    with cx.cursor() as cur:
        cur.execute(
            "INSERT INTO soak_effect (task_id, step) VALUES (%s, %s)", (cx.task_id, cx.step)
        )


@soak.step
def first(cx: Any, i: int) -> To:
    """Step one: an effect row; hand the input on."""
    _effect(cx)
    return To.next(i)


@soak.step
def second(cx: Any, i: int) -> None:
    """Step two: an effect row; done."""
    _effect(cx)
