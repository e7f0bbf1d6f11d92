"""OpenTelemetry spans, when ``opentelemetry-api`` is installed (the ``[otel]`` extra).

Each enqueue gets a span, and its W3C trace context (``traceparent``) is stored with the
task; each try of a step gets a span whose parent is that enqueue span, so a trace shows a
web request, the task it enqueued, and every try of every step of that task. Without the
package, or without a tracer provider configured, all of this costs nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

try:  # the optional [otel] extra
    from opentelemetry import propagate, trace
except ImportError:  # pragma: no cover - exercised by installs without the extra
    trace = None  # type: ignore[assignment]

_TRACER_NAME = "underway"


def enabled() -> bool:
    """Whether OpenTelemetry is installed."""
    return trace is not None


def current_context() -> str | None:
    """The ``traceparent`` of an enqueue span started now under the caller's span, to
    store with the task; ``None`` when OpenTelemetry is absent or nothing is traced."""
    if trace is None:
        return None
    tracer = trace.get_tracer(_TRACER_NAME)
    with tracer.start_as_current_span("underway enqueue", kind=trace.SpanKind.PRODUCER):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
    return carrier.get("traceparent")


@contextlib.contextmanager
def step_span(
    traceparent: str | None, job: str, step: str, task_id: int, attempt: int
) -> Iterator[Any]:
    """A span around one try of a step, child of the enqueue span whose context the task
    carries; it records the step's exception, if any."""
    if trace is None:
        yield None
        return
    parent = propagate.extract({"traceparent": traceparent}) if traceparent else None
    tracer = trace.get_tracer(_TRACER_NAME)
    with tracer.start_as_current_span(
        f"underway step {job}.{step}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "underway.job": job,
            "underway.step": step,
            "underway.task_id": task_id,
            "underway.attempt": attempt,
        },
    ) as span:
        yield span
