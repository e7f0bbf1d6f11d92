"""The shared harness: one PostgreSQL, fresh databases, worker processes, the probe, and the
measurements every peer goes through the same way.

A :class:`Peer` adapter knows only its library: how to set up a fresh database, enqueue, start
its workers and tell how many tasks are left. Everything that is measured is measured here, by
the same code for every peer, so that no peer gets a different clock or a different loop:

- :func:`measure_drain`: pre-enqueue N no-op tasks, start the workers, and time the span from
  the first step start to the last, as the probe saw them (worker start-up is left out);
- :func:`measure_latency`: enqueue one task at a time at a steady rate into idle workers and
  take each task's step start minus the enqueue call's return (its commit);
- :func:`measure_enqueue`: enqueue one task per call (one transaction each), then in batches;
- :func:`measure_rss`: worker RSS idle at start, after a first thousand tasks, and at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

REPO = Path(__file__).resolve().parent.parent
"""The repository root: worker processes run there, with it on ``PYTHONPATH``."""

POLL = 0.02
"""Seconds between looks at the probe or the database while waiting (polling, never sleeping
blindly, with a deadline)."""

STALL = 0.050
"""A pickup slower than this (seconds) counts as a stall."""


def poll(predicate: Callable[[], Any], timeout: float, what: str, interval: float = POLL) -> Any:
    """Call ``predicate`` until it returns something truthy; ``TimeoutError`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- the server -------------------------------------------------------------------------------


class Server:
    """The one PostgreSQL server of a run: started with pgserver, or the one a DSN names.

    Each measurement gets a database of its own (:meth:`database`), so peers never see each
    other's tables, dead rows or statistics.
    """

    def __init__(self, admin_dsn: str, *, pgserver: Any = None, root: Path | None = None) -> None:
        self.admin_dsn = admin_dsn
        self._pgserver = pgserver
        self._root = root

    @classmethod
    def start(cls, dsn: str | None) -> Server:
        """Reuse the server ``dsn`` names, or start a private one (PostgreSQL defaults: fsync
        on, synchronous commit) in a temporary directory."""
        if dsn:
            return cls(dsn)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns without XDG_RUNTIME_DIR
            import pgserver

        root = Path(tempfile.mkdtemp(prefix="underway-bench-"))
        pg = pgserver.get_server(root / "pgdata", cleanup_mode="delete")
        return cls(pg.get_uri("postgres"), pgserver=pg, root=root)

    @property
    def owned(self) -> bool:
        """Whether this run started the server (and so knows where its binaries are)."""
        return self._pgserver is not None

    def dsn(self, dbname: str) -> str:
        """A key=value DSN for database ``dbname`` on this server (libpq, psycopg and pgbench
        all read it; adapters split it for drivers that want keywords)."""
        return psycopg2.extensions.make_dsn(self.admin_dsn, dbname=dbname)

    def fetch(self, query: str | sql.Composable, dsn: str | None = None) -> list[tuple[Any, ...]]:
        """Run one statement in autocommit mode and return its rows."""
        conn = psycopg2.connect(dsn or self.admin_dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(query)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    @contextlib.contextmanager
    def database(self, label: str) -> Iterator[str]:
        """A fresh, empty database for one measurement; dropped afterwards."""
        name = f"bench_{label}_{uuid.uuid4().hex[:8]}".lower().replace("-", "_")
        self.fetch(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield self.dsn(name)
        finally:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            self.fetch(drop.format(sql.Identifier(name)))

    def checkpoint(self) -> None:
        """Write dirty pages out now (when allowed), so that a measurement does not pay for
        the previous one's writes or its own set-up's."""
        with contextlib.suppress(psycopg2.Error):
            self.fetch("CHECKPOINT")

    def describe(self) -> dict[str, Any]:
        """The server's version and the settings that matter for these numbers."""
        names = (
            "server_version",
            "fsync",
            "synchronous_commit",
            "wal_sync_method",
            "shared_buffers",
            "max_connections",
        )
        settings = {name: self.fetch(f"SHOW {name}")[0][0] for name in names}
        return {"started_by_bench": self.owned, **settings}

    def pgbench(self) -> Path | None:
        """The pgbench binary: pgserver's (the same PostgreSQL build), else one on PATH."""
        with contextlib.suppress(ImportError):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from pgserver._commands import POSTGRES_BIN_PATH
            candidate = Path(POSTGRES_BIN_PATH) / "pgbench"
            if candidate.exists():
                return candidate
        found = shutil.which("pgbench")
        return Path(found) if found else None

    def close(self) -> None:
        """Stop and delete our own server; leave a server given by DSN alone."""
        if self._pgserver is not None:
            self._pgserver.cleanup()
            self._pgserver = None
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)


# -- the probe --------------------------------------------------------------------------------


class Probe:
    """Zeroed float64 slots in shared memory that tasks mark with their step start time
    (see :mod:`bench.probe`); the harness reads them without disturbing the workers."""

    def __init__(self, slots: int) -> None:
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, self.path = tempfile.mkstemp(prefix="underway-bench-probe-", dir=shm)
        os.ftruncate(fd, max(slots, 1) * 8)
        os.close(fd)
        self.slots = slots

    @property
    def env(self) -> dict[str, str]:
        """What a worker process needs to find the probe."""
        return {"BENCH_PROBE": self.path}

    def marks(self, first: int = 0, end: int | None = None) -> array:
        """A copy of slots ``first``..``end`` (all by default; 0.0: not marked yet)."""
        end = self.slots if end is None else end
        values = array("d")
        with open(self.path, "rb") as f:
            f.seek(first * 8)
            values.frombytes(f.read((end - first) * 8))
        return values

    def unmarked(self) -> int:
        """How many slots are still unmarked."""
        return self.marks().count(0.0)

    def wait(
        self, workers: Workers, timeout: float, first: int = 0, last: int | None = None
    ) -> None:
        """Wait until slots ``first``..``last`` are all marked; fail early if every worker
        process died, with the end of its log."""
        end = self.slots if last is None else last

        def done() -> bool:
            if self.marks(first, end).count(0.0) == 0:
                return True
            workers.check_alive()
            return False

        poll(done, timeout, f"{end - first} tasks to start (probe {self.path})")

    def close(self) -> None:
        """Remove the shared-memory file."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# -- worker processes -------------------------------------------------------------------------


class Workers:
    """The worker processes of one measurement, each in a session of its own, logging to a
    temporary file that is shown when something goes wrong."""

    def __init__(self, commands: Sequence[Sequence[str]], env: dict[str, str]) -> None:
        self.logs: list[Any] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        path = env.get("PYTHONPATH") or os.pathsep.join([str(REPO), *_pythonpath()])
        full_env = {**os.environ, **env, "PYTHONPATH": path}
        for command in commands:
            log = tempfile.TemporaryFile()  # noqa: SIM115 (kept open until stop())
            self.logs.append(log)
            self.procs.append(
                subprocess.Popen(
                    list(command),
                    cwd=REPO,
                    env=full_env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    @property
    def pids(self) -> list[int]:
        """The process ids of the processes started (supervisors, consumers, workers)."""
        return [p.pid for p in self.procs]

    def log_tail(self, chars: int = 3000) -> str:
        """The end of every process's output."""
        tails = []
        for proc, log in zip(self.procs, self.logs):
            log.seek(0)
            text = log.read().decode("utf-8", "replace")
            tails.append(f"--- {' '.join(proc.args[:4])} (exit {proc.poll()}):\n{text[-chars:]}")
        return "\n".join(tails)

    def check_alive(self) -> None:
        """Raise if a process failed, or if all of them exited."""
        codes = [p.poll() for p in self.procs]
        if any(code not in (None, 0) for code in codes) or all(c is not None for c in codes):
            raise RuntimeError(f"worker processes exited early:\n{self.log_tail()}")

    def wait_exit(self, timeout: float) -> bool:
        """Wait until every process exited by itself (burst mode); False at the deadline."""
        try:
            poll(lambda: all(p.poll() is not None for p in self.procs), timeout, "workers to exit")
        except TimeoutError:
            return False
        return True

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Send ``signum`` to the processes started; kill their process groups at the deadline."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)
        if not self.wait_exit(timeout):
            for proc in self.procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            # Workers of a supervisor or consumer killed above may linger in its group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for log in self.logs:
            log.close()


def _pythonpath() -> list[str]:
    existing = os.environ.get("PYTHONPATH")
    return existing.split(os.pathsep) if existing else []


def python(*args: str) -> list[str]:
    """A command line running this interpreter (the venv's) with ``args``."""
    return [sys.executable, *args]


# -- peers ------------------------------------------------------------------------------------


class Enqueuer:
    """Enqueues no-op tasks for one peer into one database.

    ``one(i)`` enqueues task ``i`` in a transaction of its own and returns once it is
    committed; ``many(indices)`` enqueues a batch. Async libraries set :attr:`loop` and define
    both as coroutines; the harness then drives its loops inside that event loop, as an async
    application would.
    """

    loop: asyncio.AbstractEventLoop | None = None
    batched = True

    def one(self, i: int) -> Any:
        """Enqueue task ``i``, committed on return (a coroutine for async peers)."""
        raise NotImplementedError

    def many(self, indices: list[int]) -> Any:
        """Enqueue the tasks ``indices`` in one batch (a coroutine for async peers)."""
        raise NotImplementedError

    def close(self) -> None:
        """Close connections (and the event loop) the enqueuer opened."""
        if self.loop is not None:
            self.loop.close()


@dataclass
class Peer(ABC):
    """One measured configuration of one queue library (the harness measures; this adapts)."""

    #: Short unique key (JSON ids, ``--only`` matches its prefix before any ``_``).
    key: str = ""
    #: How tables and charts call it.
    label: str = ""
    #: The measurements this configuration takes part in.
    measures: frozenset[str] = frozenset({"drain", "latency", "enqueue"})
    #: Steps per task run; the probe has this many slots per task.
    steps: int = 1
    #: Signal that stops its workers (after the measurement).
    stop_signal: int = signal.SIGTERM
    #: Whether its worker commands exit by themselves once the queue is empty.
    bursts: bool = True
    #: Whether this is underway itself (highlighted; the baseline of ratios).
    is_underway: bool = False
    #: At most this many tasks per drain run, for a peer too slow for the full count.
    max_drain_tasks: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @abstractmethod
    def missing(self) -> str | None:
        """Why this peer cannot run here (a library or a server missing), or None."""

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Versions of the libraries this peer uses."""

    @abstractmethod
    def settings(self, workers: int) -> dict[str, Any]:
        """The settings used with ``workers`` worker processes, for the record."""

    @abstractmethod
    def prepare(self, dsn: str) -> None:
        """Create the peer's schema in a fresh database."""

    @abstractmethod
    def prefill(self, dsn: str, indices: list[int]) -> None:
        """Enqueue tasks ``indices`` as fast as the library allows (not timed)."""

    @abstractmethod
    def worker_commands(self, dsn: str, workers: int, burst: bool) -> list[list[str]]:
        """Command lines that run ``workers`` worker processes for the no-op task."""

    @abstractmethod
    def remaining(self, dsn: str) -> int:
        """How many enqueued tasks are not finished, from the peer's own storage."""

    @abstractmethod
    def enqueuer(self, dsn: str) -> Enqueuer:
        """An :class:`Enqueuer` for ``dsn``."""

    def worker_env(self, dsn: str) -> dict[str, str]:
        """Environment for worker processes (the task modules read the DSN from it)."""
        return {"BENCH_DSN": dsn, **self.extra_env}

    def ready(self, dsn: str, workers: int) -> bool:
        """Whether ``workers`` started workers are connected and idle (for RSS at start)."""
        return True

    def start(self) -> None:  # noqa: B027 (an optional hook)
        """Start what the peer needs besides PostgreSQL (RQ: Redis) for the whole run."""

    def shutdown(self) -> None:  # noqa: B027 (an optional hook)
        """Stop what :meth:`start` started."""


# -- statistics -------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by the nearest-rank method."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def median_of(runs: list[dict[str, Any]], key: str = "value") -> float:
    """The median of the runs' ``key`` values."""
    return statistics.median(run[key] for run in runs)


# -- measurements -----------------------------------------------------------------------------


def measure_drain(
    server: Server, peer: Peer, workers: int, n: int, timeout: float = 900.0
) -> dict[str, Any]:
    """Pre-enqueue ``n`` no-op tasks in a fresh database and drain them (:func:`drain`)."""
    with server.database(peer.key) as dsn:
        peer.prepare(dsn)
        return drain(server, dsn, peer, workers, n, timeout)


def drain(
    server: Server, dsn: str, peer: Peer, workers: int, n: int, timeout: float = 900.0
) -> dict[str, Any]:
    """Enqueue ``n`` no-op tasks into the prepared database ``dsn``, run the peer's workers
    until the queue is drained, and return tasks per second over the span from the first
    step start to the last."""
    peer.prefill(dsn, list(range(n)))
    server.checkpoint()
    probe = Probe(n * peer.steps)
    started = time.perf_counter()
    procs = Workers(
        peer.worker_commands(dsn, workers, burst=True),
        {**peer.worker_env(dsn), **probe.env, "BENCH_TOTAL": str(n)},
    )
    try:
        probe.wait(procs, timeout)
        poll(lambda: peer.remaining(dsn) == 0, 60, f"{peer.label} to record every task done")
        if peer.bursts:
            procs.wait_exit(60)
        wall = time.perf_counter() - started
    finally:
        procs.stop(peer.stop_signal)
        marks = probe.marks()
        probe.close()
    span = max(marks) - min(marks)
    return {
        "value": (n - 1) / span if span > 0 else math.nan,
        "span_s": span,
        "wall_s_with_startup": wall,
        "verified_done": n,
    }


def _drive(
    enq: Enqueuer,
    calls: list[list[int]],
    single: bool,
    rate: float | None = None,
    committed: list[float] | None = None,
) -> float:
    """Run enqueue calls (``one`` per single item, or ``many`` per batch), optionally paced at
    ``rate`` calls per second, recording each call's return time in ``committed``; returns
    the elapsed seconds. Sync and async enqueuers run the same loop, each in its own idiom."""

    def due(k: int, t0: float) -> float:
        return t0 + k / rate - time.perf_counter() if rate else 0.0

    if enq.loop is None:
        t0 = time.perf_counter()
        for k, batch in enumerate(calls):
            wait = due(k, t0)
            if wait > 0:
                time.sleep(wait)
            enq.one(batch[0]) if single else enq.many(batch)
            if committed is not None:
                committed.append(time.time())
        return time.perf_counter() - t0

    async def run() -> float:
        t0 = time.perf_counter()
        for k, batch in enumerate(calls):
            wait = due(k, t0)
            if wait > 0:
                await asyncio.sleep(wait)
            await (enq.one(batch[0]) if single else enq.many(batch))
            if committed is not None:
                committed.append(time.time())
        return time.perf_counter() - t0

    return enq.loop.run_until_complete(run())


def measure_latency(
    server: Server, peer: Peer, workers: int, n: int, rate: float, warmup: int = 50
) -> dict[str, Any]:
    """Enqueue ``n`` tasks one at a time at ``rate`` per second into idle workers; pickup
    latency is each task's step start minus the return of its enqueue call (its commit)."""
    with server.database(peer.key) as dsn:
        peer.prepare(dsn)
        probe = Probe(warmup + n)
        procs = Workers(
            peer.worker_commands(dsn, workers, burst=False),
            {**peer.worker_env(dsn), **probe.env},
        )
        enq = peer.enqueuer(dsn)
        try:
            # Warm-up tasks also tell when the workers are up and idle.
            _drive(enq, [[i] for i in range(warmup)], single=True, rate=rate)
            probe.wait(procs, 120, last=warmup)
            committed: list[float] = []
            elapsed = _drive(
                enq, [[warmup + i] for i in range(n)], single=True, rate=rate, committed=committed
            )
            probe.wait(procs, 120)
        finally:
            enq.close()
            procs.stop(peer.stop_signal)
            marks = probe.marks()
            probe.close()
    latencies = sorted(marks[warmup + i] - committed[i] for i in range(n))
    return {
        "p50_ms": percentile(latencies, 50) * 1000,
        "p95_ms": percentile(latencies, 95) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": latencies[-1] * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000,
        "stalls_over_50ms": sum(1 for x in latencies if x > STALL),
        "negative": sum(1 for x in latencies if x < 0),
        "pickups": n,
        "achieved_rate_per_s": n / elapsed,
    }


def measure_enqueue(
    server: Server, peer: Peer, n_single: int, n_batched: int, batch: int
) -> dict[str, Any]:
    """Enqueue ``n_single`` tasks one per transaction, then ``n_batched`` in batches of
    ``batch`` (when the library has a batch call); tasks per second for each."""
    with server.database(peer.key) as dsn:
        peer.prepare(dsn)
        enq = peer.enqueuer(dsn)
        try:
            _drive(enq, [[i] for i in range(20)], single=True)  # connect, warm caches
            single = _drive(enq, [[i] for i in range(n_single)], single=True)
            result: dict[str, Any] = {"single_per_s": n_single / single}
            if enq.batched:
                calls = [
                    list(range(k, min(k + batch, n_batched))) for k in range(0, n_batched, batch)
                ]
                result["batched_per_s"] = n_batched / _drive(enq, calls, single=False)
        finally:
            enq.close()
    return result


def measure_rss(
    server: Server, peer: Peer, workers: int, n: int, warm: int = 1000, chunk: int = 10_000
) -> dict[str, Any]:
    """RSS of each worker process (psutil): idle at start, after ``warm`` tasks, and after
    ``n`` tasks in all, enqueued in chunks while the workers run."""
    import psutil

    warm = min(warm, n // 5)
    with server.database(peer.key) as dsn:
        peer.prepare(dsn)
        probe = Probe(n)
        procs = Workers(
            peer.worker_commands(dsn, workers, burst=False),
            {**peer.worker_env(dsn), **probe.env},
        )

        def worker_procs() -> list[Any]:
            children = [c for pid in procs.pids for c in psutil.Process(pid).children()]
            return children if len(children) >= workers else []

        def rss_mb(ps: list[Any]) -> list[float]:
            return [round(p.memory_info().rss / 2**20, 2) for p in ps]

        try:
            ps = poll(worker_procs, 60, "worker processes")
            poll(lambda: peer.ready(dsn, workers), 60, "workers to connect and idle")
            at_start = rss_mb(ps)
            peer.prefill(dsn, list(range(warm)))
            probe.wait(procs, 120, last=warm)
            after_warm = rss_mb(ps)
            for k in range(warm, n, chunk):
                peer.prefill(dsn, list(range(k, min(k + chunk, n))))
            probe.wait(procs, 900)
            poll(lambda: peer.remaining(dsn) == 0, 60, "every task done")
            at_end = rss_mb(ps)
        finally:
            procs.stop(peer.stop_signal)
            probe.close()
    return {
        "rss_start_mb": at_start,
        f"rss_after_{warm}_mb": after_warm,
        f"rss_after_{n}_mb": at_end,
        "growth_since_start_mb": [round(e - s, 2) for s, e in zip(at_start, at_end)],
        f"growth_since_{warm}_mb": [round(e - w, 2) for w, e in zip(after_warm, at_end)],
        "tasks": n,
    }
