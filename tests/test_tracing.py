"""OpenTelemetry spans (``underway.tracing``): a traced request enqueues tasks, an in-process
:class:`~underway.worker.Worker` runs them, and opentelemetry-sdk's InMemorySpanExporter
shows one trace: request, enqueue span, a span per try of each step.

Each scenario runs in a Python process of its own (``run_python``), the exporter, the
enqueue and the worker all in it: a global tracer provider can be set only once per
process, and one left in the test process would make every later test's enqueues store a
trace context.
"""

from __future__ import annotations

import json
from typing import Any

import jobs_observe
import pytest

from .helpers import query, run_python

pytestmark = pytest.mark.timeout(60)

BASE = """
import json, sys
import underway, jobs_observe
from underway import tracing
from underway.worker import Worker

dsn = sys.argv[1]
underway.configure(dsn=dsn)
JOBS = {j.name: j for j in (jobs_observe.ok, jobs_observe.doomed, jobs_observe.quits)}

def run_all():
    worker = Worker(dsn, JOBS)
    while worker.run_once():
        pass
"""

SETUP = (
    BASE
    + """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

def dump(spans, **more):
    def one(s):
        return {
            "name": s.name,
            "trace": format(s.context.trace_id, "032x"),
            "span": format(s.context.span_id, "016x"),
            "parent": format(s.parent.span_id, "016x") if s.parent else None,
            "kind": s.kind.name,
            "status": s.status.status_code.name,
            "attributes": dict(s.attributes),
            "events": [e.name for e in s.events],
        }
    print(json.dumps({"spans": [one(s) for s in spans], **more}))
"""
)

TRACED = (
    SETUP
    + """
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
with trace.get_tracer("the app").start_as_current_span("request"):
    ok = jobs_observe.ok.enqueue({}).id
    doomed = jobs_observe.doomed.enqueue(None).id
    quits = jobs_observe.quits.enqueue(None).id
run_all()
spans = exporter.get_finished_spans()

# flush(): what a batching processor holds is exported at once (a worker's exit).
held = InMemorySpanExporter()
provider.add_span_processor(BatchSpanProcessor(held, schedule_delay_millis=600_000))
trace.get_tracer("the app").start_span("late").end()
before = len(held.get_finished_spans())
tracing.flush()
with tracing.step_span(None, "job", "step", 1, 1, queue="observe") as span:
    queue = span.attributes["underway.queue"]
dump(spans, ok=ok, doomed=doomed, quits=quits, flushed=[before, len(held.get_finished_spans())],
     queue=queue)
"""
)


@pytest.fixture
def observed(dsn: str) -> str:
    """The test database, with the tables the observe jobs write to."""
    jobs_observe.prepare(dsn)
    return dsn


def run(script: str, dsn: str) -> dict[str, Any]:
    """Run a scenario in a process of its own; what it printed, as JSON."""
    done = run_python(["-c", script, dsn], timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_step_spans_continue_the_trace_of_the_request_that_enqueued_them(
    observed: str,
) -> None:
    """A request span enqueues three tasks: each enqueue span is its child, the task
    stores that span's traceparent, and every try of every step is a span in the same
    trace whose parent is its task's enqueue span, with the job, step, task id and
    attempt (and the queue, when given); tries that raised (an error, sys.exit) have error
    status and the exception recorded, the others not; tracing.flush() exports what a
    batching processor holds."""
    found = run(TRACED, observed)
    spans = {s["span"]: s for s in found["spans"]}
    (request,) = [s for s in spans.values() if s["name"] == "request"]
    assert request["parent"] is None
    enqueue_of = {}  # task id -> its enqueue span, found by the traceparent the task stored
    for task in (found["ok"], found["doomed"], found["quits"]):
        ((stored,),) = query(
            observed, "SELECT trace_context FROM underway.task WHERE id = %s", (task,)
        )
        version, trace_id, span_id, flags = stored.split("-")
        assert (version, trace_id) == ("00", request["trace"]) and int(flags, 16) & 1  # sampled
        enqueue = enqueue_of[task] = spans[span_id]
        assert enqueue["name"].startswith("underway enqueue") and enqueue["kind"] == "PRODUCER"
        assert enqueue["parent"] == request["span"]

    steps = [s for s in spans.values() if s["name"].startswith("underway step")]
    tries = sorted(
        (
            s["attributes"]["underway.job"],
            s["attributes"]["underway.step"],
            s["attributes"]["underway.attempt"],
            s["status"],
        )
        for s in steps
    )
    assert tries == [
        ("observe-doomed", "crash", 1, "ERROR"),
        ("observe-doomed", "crash", 2, "ERROR"),
        ("observe-ok", "fetch", 1, "UNSET"),
        ("observe-ok", "store", 1, "UNSET"),
        ("observe-quits", "leave", 1, "ERROR"),
    ]
    for span in steps:
        assert span["trace"] == request["trace"] and span["kind"] == "CONSUMER"
        assert span["parent"] == enqueue_of[span["attributes"]["underway.task_id"]]["span"]
        assert span["events"] == (["exception"] if span["status"] == "ERROR" else [])
    assert found["flushed"] == [0, 1]
    assert found["queue"] == "observe"


UNTRACED = """
jobs_observe.ok.enqueue({})
jobs_observe.doomed.enqueue(None)
with trace.get_tracer("the app").start_as_current_span("request"):  # a no-op tracer
    jobs_observe.ok.enqueue({})
# A request that arrived with a traceparent (a framework put its remote span in the
# context): with no provider set, the enqueue still passes that context on.
remote = trace.SpanContext(int("ab" * 16, 16), int("cd" * 8, 16), is_remote=True,
                           trace_flags=trace.TraceFlags(1))
with trace.use_span(trace.NonRecordingSpan(remote)):
    jobs_observe.ok.enqueue({})
run_all()
tracing.flush()
print(json.dumps({"enabled": tracing.enabled()}))
"""

ABSENT = """
import sys
sys.modules["opentelemetry"] = None  # as without the [otel] extra
class trace:  # what the scenario calls of it, doing nothing
    def get_tracer(name):
        return trace
    def start_as_current_span(name):
        import contextlib
        return contextlib.nullcontext()
    def SpanContext(*args, **kwargs):
        return None
    TraceFlags = NonRecordingSpan = use_span = start_as_current_span
"""


@pytest.mark.parametrize("installed", [True, False], ids=["no-provider", "not-installed"])
def test_without_a_tracer_provider_or_the_package_nothing_is_stored(
    observed: str, installed: bool
) -> None:
    """With opentelemetry installed but no tracer provider set, and with the package not
    installed at all, tasks store no trace context (NULL) and run as usual, failures
    included; only a context the request brought along (a remote parent) is passed on."""
    script = (SETUP + UNTRACED) if installed else (ABSENT + BASE + UNTRACED)
    found = run(script, observed)
    assert found == {"enabled": installed}
    rows = query(observed, "SELECT job, state::text, trace_context FROM underway.task ORDER BY id")
    passed_on = f"00-{'ab' * 16}-{'cd' * 8}-01" if installed else None
    assert rows == [
        ("observe-ok", "succeeded", None),
        ("observe-doomed", "failed", None),
        ("observe-ok", "succeeded", None),
        ("observe-ok", "succeeded", passed_on),
    ]
