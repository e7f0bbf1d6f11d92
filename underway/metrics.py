"""Prometheus metrics (the ``[metrics]`` extra): what workers count per job and step, what
the supervisor counts of its workers, and each queue's depth and lag read from the database
at scrape time.

The workers are separate processes, so their counts go through prometheus-client's
multiprocess mode: :func:`serve`, called by the supervisor before it forks, points
``PROMETHEUS_MULTIPROC_DIR`` at a directory of its own; every process then writes its counts
to its own memory-mapped files there, and a scrape adds them all up.

Until :func:`enable` (or :func:`serve`) runs, the hooks the worker calls on every task,
:func:`task_started` and :func:`task_finished`, return at once after one test of a module
flag. prometheus-client is imported only when metrics are enabled or exposed, so underway
imports and runs without it.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

from .errors import ConfigurationError

log = logging.getLogger("underway.metrics")

_enabled = False
"""Whether this process counts: the hot-path hooks test only this."""

INSTALL_HINT = "Prometheus metrics need prometheus-client: pip install 'underway[metrics]'"

SCRAPE_DB_TIMEOUT = 2.0
"""The longest a scrape waits on the database, to connect and again for its query: a scrape
answers within seconds whatever the database does (with ``underway_database_up 0``)."""

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Seconds: steps run from milliseconds to hours; pickups from milliseconds (LISTEN) to a
#: backlog's hours.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

#: The worker's events that also count in a per-job task counter (every event counts in
#: ``underway_steps_total``).
TASK_COUNTERS = {"succeeded": "succeeded", "failed": "failed", "retrying": "retried"}


class _Metrics:
    """This process's metric objects, and their children by label values (``labels()``
    costs a lock and a validation: a dict lookup is cheaper on the hot path)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return Counter(name, doc, labels, registry=None)

        self.started = counter(
            "underway_tasks_started", "Tries started (every try of every step), per job.", ("job",)
        )
        self.by_event = {
            event: counter(
                f"underway_tasks_{name}",
                {
                    "succeeded": "Tasks whose last step succeeded, per job.",
                    "failed": "Tasks failed for good (no try left, or Fatal), per job.",
                    "retried": "Tries that failed and will be tried again, per job.",
                }[name],
                ("job",),
            )
            for event, name in TASK_COUNTERS.items()
        }
        self.steps = counter(
            "underway_steps",
            "Tries finished, per job, step and outcome: succeeded (the task is done), "
            "advanced (its next step follows), retrying, failed, cancelled, lost.",
            ("job", "step", "outcome"),
        )
        self.duration = Histogram(
            "underway_step_duration_seconds",
            "How long each try of a step ran, whatever its outcome.",
            ("job", "step"),
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.pickup = Histogram(
            "underway_pickup_latency_seconds",
            "Seconds from a task's step being due to a worker claiming it.",
            ("job",),
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.restarts = counter(
            "underway_worker_restarts",
            "Worker (or scheduler) processes that died and were replaced.",
        )
        self._children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def collectors(self) -> list[Any]:
        return [
            self.started,
            *self.by_event.values(),
            self.steps,
            self.duration,
            self.pickup,
            self.restarts,
        ]


_metrics: _Metrics | None = None


def task_started(job: str, waited: float) -> None:
    """A try began, ``waited`` seconds after its task was due (its pickup latency)."""
    if _enabled:
        m = _metrics
        assert m is not None
        m.child(m.started, job).inc()
        m.child(m.pickup, job).observe(max(waited, 0.0))


def task_finished(job: str, step: str, event: str, duration: float) -> None:
    """A try of ``step`` ended in ``event`` (succeeded, advanced, retrying, failed, cancelled,
    lost) after ``duration`` seconds."""
    if _enabled:
        m = _metrics
        assert m is not None
        m.child(m.steps, job, step, event).inc()
        m.child(m.duration, job, step).observe(duration)
        counter = m.by_event.get(event)
        if counter is not None:
            m.child(counter, job).inc()


def worker_restarted() -> None:
    """The supervisor started a worker again after one died."""
    if _enabled:
        assert _metrics is not None
        _metrics.restarts.inc()


def worker_exited(pid: int) -> None:
    """A child process of the supervisor is gone: drop its files of live gauges (those of
    your own job modules, in ``livesum`` or ``liveall`` mode). Its counters stay counted."""
    directory = os.environ.get(MULTIPROC_ENV)
    if _enabled and directory:
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, directory)


def _prometheus() -> Any:
    """The prometheus_client module, or ConfigurationError saying how to install it."""
    try:
        import prometheus_client
    except ImportError:
        raise ConfigurationError(INSTALL_HINT) from None
    return prometheus_client


_pid = os.getpid()


def _remember_pid() -> None:
    global _pid
    _pid = os.getpid()


def _current_pid() -> int:
    """This process's id, as of its last fork (prometheus-client's files are named by it)."""
    return _pid


def enable(multiproc_dir: str | None = None) -> None:
    """Count tasks in this process from now on. With ``multiproc_dir``, in prometheus-client's
    multiprocess mode: the counts go to files there, and processes forked from this one count
    into files of their own in the same directory."""
    global _enabled, _metrics
    _prometheus()
    if multiproc_dir is not None:
        os.environ[MULTIPROC_ENV] = multiproc_dir
        from prometheus_client import values

        # The value class is chosen when prometheus_client is imported: if that was before
        # the variable was set, choose again, before our metrics are created; with our pid,
        # kept up to date at each fork, instead of a getpid() system call per update.
        if not getattr(values.ValueClass, "_multiprocess", False):
            os.register_at_fork(after_in_child=_remember_pid)
            values.ValueClass = values.MultiProcessValue(process_identifier=_current_pid)
    if _metrics is None:
        _metrics = _Metrics()
    _enabled = True


# -- the supervisor's HTTP endpoint ------------------------------------------------------

_server: Any = None
_hooks_registered = False
_fork_lock = threading.Lock()
"""Held by a scrape while it talks to the database (libpq has locks of its own), and by
the supervisor while it forks: a worker is never forked in the middle of a scrape's
connect, whose locks it could inherit held."""
_fork_locked = False


def _fork_before() -> None:
    global _fork_locked
    # Bounded: a scrape stuck past its own bounds (a DNS lookup?) must not stop the forks.
    _fork_locked = _fork_lock.acquire(timeout=3 * SCRAPE_DB_TIMEOUT)


def _fork_after_in_parent() -> None:
    global _fork_locked
    if _fork_locked:
        _fork_locked = False
        _fork_lock.release()


def _fork_after_in_child() -> None:
    """A forked worker has no scrape thread: it takes a fresh lock, and closes its copy of
    the listening socket, so that the port is free as soon as the supervisor is gone."""
    global _fork_lock, _fork_locked, _server
    _fork_lock, _fork_locked = threading.Lock(), False
    if _server is not None:
        with contextlib.suppress(OSError):
            _server.socket.close()
        _server = None


def serve(port: int, dsn: str, addr: str = "0.0.0.0") -> None:
    """Serve the metrics of this supervisor and its workers over HTTP on ``port``, from a
    daemon thread of this process; call it before the workers are forked.

    The counts go to a fresh private directory (removed when this process exits), unless
    ``PROMETHEUS_MULTIPROC_DIR`` is set already: then to that one, which is left in place,
    for a dashboard (or your own job modules' metrics) to share.

    :raises ConfigurationError: without prometheus-client, or when the port is taken.
    """
    global _server, _hooks_registered
    _prometheus()
    if _server is not None:
        raise ConfigurationError("metrics are served already in this process")
    shared = os.environ.get(MULTIPROC_ENV)
    if shared:
        os.makedirs(shared, exist_ok=True)
        directory = shared
    else:
        directory = tempfile.mkdtemp(prefix="underway-metrics-")
        atexit.register(_remove_directory, directory, os.getpid())
    enable(directory)
    try:
        _server = _http_server(addr, port, _registry(dsn))
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on port {port}: {exc.strerror or exc}"
        ) from None
    if not _hooks_registered:
        os.register_at_fork(
            before=_fork_before,
            after_in_parent=_fork_after_in_parent,
            after_in_child=_fork_after_in_child,
        )
        _hooks_registered = True
    threading.Thread(target=_server.serve_forever, name="underway-metrics", daemon=True).start()
    log.info(
        "serving Prometheus metrics on port %d (multiprocess directory %s)",
        port,
        directory,
        extra={"event": "metrics_serving", "port": port, "directory": directory},
    )


def _http_server(addr: str, port: int, registry: Any) -> Any:
    """A threading WSGI server of prometheus-client's app for ``registry``, which logs no
    request (the supervisor's log is for tasks)."""
    import socket
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import make_wsgi_app

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True
        allow_reuse_address = True
        address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    return make_server(addr, port, make_wsgi_app(registry), Server, QuietHandler)


def _remove_directory(directory: str, owner: int) -> None:
    """At the supervisor's exit (never a forked child's), remove its private directory."""
    if os.getpid() == owner:
        shutil.rmtree(directory, ignore_errors=True)


def _registry(dsn: str | None) -> Any:
    """The collectors of a scrape: every process's counts, when this process has them (its
    own, or the multiprocess directory's), and the database's gauges."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    directory = os.environ.get(MULTIPROC_ENV)
    if directory and os.path.isdir(directory):
        registry.register(_ProcessesCollector(directory))
    elif _enabled and _metrics is not None:
        for collector in _metrics.collectors():
            registry.register(collector)
    registry.register(_DatabaseCollector(dsn))
    return registry


class _ProcessesCollector:
    """prometheus-client's MultiProcessCollector, minus its race with a process creating its
    file: one scraped between its creation and its sizing (empty, so holding nothing yet)
    would fail the whole scrape."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Any:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = []
        for path in glob.glob(os.path.join(self.directory, "*.db")):
            with contextlib.suppress(OSError):  # a dead process's live gauges, just removed
                if os.path.getsize(path) > 0:
                    files.append(path)
        return MultiProcessCollector.merge(files, accumulate=True)


def exposition(dsn: str | None = None) -> tuple[bytes, str]:
    """The Prometheus text exposition, as the dashboard's ``/metrics`` serves it: the
    workers' counters when this process has them (it runs the supervisor that serves them,
    or shares its ``PROMETHEUS_MULTIPROC_DIR``), and each queue's depth and lag, read from
    the database now (``dsn``, default: the configured one). Returns the body and its
    content type.

    :raises ConfigurationError: without prometheus-client, or without a DSN.
    """
    _prometheus()
    from prometheus_client.exposition import choose_encoder

    from .db import resolve_dsn

    encode, content_type = choose_encoder("")  # the classic text format, version 0.0.4
    return encode(_registry(resolve_dsn(dsn))), content_type


# -- the database's gauges ------------------------------------------------------------

_database_was_up = True


class _DatabaseCollector:
    """Each queue's depth by state, its lag and whether it is paused (``admin.queues()``),
    read when scraped, on a connection of its own bounded by :data:`SCRAPE_DB_TIMEOUT`; and
    ``underway_database_up``, 0 when that failed (the scrape still answers)."""

    def __init__(self, dsn: str | None) -> None:
        self.dsn = dsn

    def collect(self) -> Iterator[Any]:
        global _database_was_up
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(
            "underway_database_up", "1 when this scrape could read the queues, else 0."
        )
        depth = GaugeMetricFamily(
            "underway_queue_depth",
            "Unfinished and failed tasks of a queue, by state.",
            labels=["queue", "state"],
        )
        lag = GaugeMetricFamily(
            "underway_queue_lag_seconds",
            "How long the oldest ready task of a queue has waited (0: none waits).",
            labels=["queue"],
        )
        paused = GaugeMetricFamily(
            "underway_queue_paused", "1 for a paused queue, else 0.", labels=["queue"]
        )
        try:
            summaries = self._read()
        except Exception as exc:  # a scrape must answer whatever went wrong
            if _database_was_up:
                log.warning(
                    "metrics: cannot read the queues: %s",
                    " ".join(str(exc).split()) or type(exc).__name__,
                    extra={"event": "metrics_database_down"},
                )
            _database_was_up = False
            up.add_metric([], 0)
            yield up
            return
        if not _database_was_up:
            log.info(
                "metrics: the queues can be read again", extra={"event": "metrics_database_up"}
            )
        _database_was_up = True
        up.add_metric([], 1)
        for q in summaries:
            for state in ("pending", "running", "failed"):
                depth.add_metric([q.queue, state], getattr(q, state))
            lag.add_metric([q.queue], q.lag or 0.0)
            paused.add_metric([q.queue], 1 if q.paused else 0)
        yield from (up, depth, lag, paused)

    def _read(self) -> list[Any]:
        """``admin.queues()`` on a bounded connection of its own, closed at once."""
        from . import admin
        from .db import close_quietly, connect_bounded, resolve_dsn

        dsn = resolve_dsn(self.dsn)
        with _fork_lock:
            conn = connect_bounded(
                dsn, application_name="underway metrics", timeout=SCRAPE_DB_TIMEOUT
            )
            try:
                return admin.queues(conn=conn)
            finally:
                close_quietly(conn)
