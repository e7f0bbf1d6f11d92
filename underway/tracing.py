"""OpenTelemetry spans, when ``opentelemetry-api`` is installed (the ``[otel]`` extra).

Each enqueue gets a span, child of whatever span is current (a web request, say), and its
W3C trace context (``traceparent``) is stored with the task; each try of a step gets a span
whose parent is that enqueue span, so one trace shows the request, the task it enqueued,
and every try of every step of that task, failed tries with error status and their
exception. Without the package, or without a tracer provider configured (then no span is
recorded and nothing is stored), all of this costs next to nothing.

The context is always written and read as W3C ``traceparent``, whatever propagator the
application configured for its own HTTP calls: it is a stored value, not a header.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

try:  # the optional [otel] extra
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # pragma: no cover - exercised by installs without the extra
    trace = None  # type: ignore[assignment]

_TRACER_NAME = "underway"
_PROPAGATOR: Any = TraceContextTextMapPropagator() if trace is not None else None
#: The tracer providers in place when the application set none (or the no-op one).
_NO_PROVIDER: Any = (trace.ProxyTracerProvider, trace.NoOpTracerProvider) if trace else ()


def enabled() -> bool:
    """Whether OpenTelemetry is installed."""
    return trace is not None


def _idle(traceparent: str | None = None) -> bool:
    """Whether a span started now would be an empty one: OpenTelemetry is absent, or no
    tracer provider is set, no span is current and no stored context is to be continued.
    Starting a span costs some 15 us even then; every enqueue and every step would pay it."""
    if trace is None:
        return True
    if traceparent or not isinstance(trace.get_tracer_provider(), _NO_PROVIDER):
        return False
    return not trace.get_current_span().get_span_context().is_valid


def current_context(job: str | None = None, queue: str | None = None) -> str | None:
    """The ``traceparent`` of an enqueue span started (and ended) now under the caller's
    span, to store with the task; ``None`` when OpenTelemetry is absent or nothing is
    traced. The span marks the moment of the enqueue: it ends before the task is
    inserted, and stays in the trace even if the enqueue's transaction rolls back."""
    if _idle():
        return None
    attributes: dict[str, Any] = {}
    if job is not None:
        attributes["underway.job"] = job
    if queue is not None:
        attributes["underway.queue"] = queue
    tracer = trace.get_tracer(_TRACER_NAME)
    name = f"underway enqueue {job}" if job else "underway enqueue"
    with tracer.start_as_current_span(
        name, kind=trace.SpanKind.PRODUCER, attributes=attributes
    ) as span:
        if not span.get_span_context().is_valid:
            return None  # no tracer provider, and no trace to continue
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


@contextlib.contextmanager
def step_span(
    traceparent: str | None,
    job: str,
    step: str,
    task_id: int,
    attempt: int,
    *,
    queue: str | None = None,
) -> Iterator[Any]:
    """A span around one try of a step, child of the enqueue span whose context the task
    carries (a root span when it carries none, or one that cannot be read). Whatever the
    step raises (``SystemExit`` and timeouts included) is recorded on it, with error
    status, and raised on."""
    if _idle(traceparent):
        yield None
        return
    parent = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
    attributes: dict[str, Any] = {
        "underway.job": job,
        "underway.step": step,
        "underway.task_id": task_id,
        "underway.attempt": attempt,
    }
    if queue is not None:
        attributes["underway.queue"] = queue
    tracer = trace.get_tracer(_TRACER_NAME)
    with tracer.start_as_current_span(
        f"underway step {job}.{step}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        # Ours to do: OpenTelemetry's own leaves out BaseExceptions, as StepTimeout is.
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except GeneratorExit:
            raise
        except BaseException as exc:
            step_failed(span, exc)
            raise


def step_failed(span: Any, exc: BaseException) -> None:
    """Mark a step's span (from :func:`step_span`, still open) as failed by ``exc``: for
    failures the worker decides itself, after the step returned."""
    if trace is None or span is None or not span.is_recording():
        return
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def flush(timeout: float = 5.0) -> None:
    """Export the spans a batching span processor still holds, waiting at most
    ``timeout`` seconds: for a worker process about to exit without running ``atexit``
    handlers (the supervisor's children end with ``os._exit``)."""
    if trace is None:
        return
    force_flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if force_flush is not None:
        with contextlib.suppress(Exception):
            force_flush(int(timeout * 1000))
