"""RQ's adapter: a local Redis (Debian's ``redis-server``, started on a free port for the run
and stopped after) and N ``rq worker --burst`` processes, with the forking ``Worker`` (a work
horse forked per job, RQ's default) or ``SimpleWorker`` (jobs run in the worker process)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..harness import Enqueuer, Peer, poll, python
from .common import module_missing

QUEUE = "bench"


class RedisServer:
    """One throwaway ``redis-server`` on 127.0.0.1 without persistence (RQ's usual setup;
    PostgreSQL meanwhile fsyncs every commit)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.version = ""

    def start(self) -> None:
        """Start it, once, and wait until it answers."""
        if self.proc is not None:
            return
        binary = shutil.which("redis-server")
        assert binary is not None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"redis://127.0.0.1:{port}/0"
        import redis

        client = redis.Redis.from_url(self.url)

        def answers() -> bool:
            with contextlib.suppress(redis.ConnectionError):
                return bool(client.ping())
            return False

        poll(answers, 20, "redis-server to answer")
        self.version = str(client.info("server")["redis_version"])
        client.close()

    def stop(self) -> None:
        """Stop it if it was started."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            self.log.close()


_redis = RedisServer()


@dataclass
class RqPeer(Peer):
    """RQ on a local Redis, with ``rq.worker.Worker`` or ``rq.worker.SimpleWorker``."""

    simple: bool = False

    def __post_init__(self) -> None:
        self.worker_class = "rq.worker.SimpleWorker" if self.simple else "rq.worker.Worker"
        self.key = "rq_simple" if self.simple else "rq_fork"
        # A work horse forked per job makes ~60 jobs/s here: 20,000 would take 6 minutes.
        self.max_drain_tasks = None if self.simple else 2_000
        self.label = "RQ (SimpleWorker)" if self.simple else "RQ (forking Worker)"
        # Enqueueing does not depend on the worker class: measured once.
        self.measures = frozenset(
            {"drain", "latency", "enqueue"} if self.simple else {"drain", "latency"}
        )

    def missing(self) -> str | None:
        absent = module_missing("rq", "redis")
        if absent:
            return absent
        if shutil.which("redis-server") is None:
            return "no redis-server on PATH (apt-get install -y redis-server)"
        return None

    def versions(self) -> dict[str, str]:
        found = {m: importlib.metadata.version(m) for m in ("rq", "redis")}
        if _redis.version:
            found["redis-server"] = _redis.version
        return found

    def settings(self, workers: int) -> dict[str, Any]:
        return {
            "processes": workers,
            "command": f"rq worker --burst -w {self.worker_class} {QUEUE}",
            "redis": "local redis-server, --save '' --appendonly no (no persistence)",
        }

    def start(self) -> None:
        _redis.start()

    def shutdown(self) -> None:
        _redis.stop()

    def _queue(self) -> Any:
        from redis import Redis
        from rq import Queue

        return Queue(QUEUE, connection=Redis.from_url(_redis.url))

    def prepare(self, dsn: str) -> None:
        self._queue().connection.flushdb()

    def prefill(self, dsn: str, indices: list[int]) -> None:
        queue = self._queue()
        for k in range(0, len(indices), 1000):
            _enqueue_many(queue, indices[k : k + 1000])

    def worker_commands(self, dsn: str, workers: int, burst: bool) -> list[list[str]]:
        rq = str(Path(python()[0]).with_name("rq"))
        command = [rq, "worker", "-q", "-u", _redis.url, "-w", self.worker_class, QUEUE]
        return [command + (["--burst"] if burst else []) for _ in range(workers)]

    def remaining(self, dsn: str) -> int:
        from rq.registry import StartedJobRegistry

        queue = self._queue()
        return queue.count + StartedJobRegistry(queue=queue).count

    def enqueuer(self, dsn: str) -> Enqueuer:
        return RqEnqueuer(self._queue())


def _enqueue_many(queue: Any, indices: list[int]) -> None:
    from rq import Queue

    from ..tasks.rq_jobs import noop

    queue.enqueue_many([Queue.prepare_data(noop, (i,)) for i in indices])


class RqEnqueuer(Enqueuer):
    """``queue.enqueue(noop, i)`` and ``queue.enqueue_many(...)`` (one pipeline)."""

    def __init__(self, queue: Any) -> None:
        from ..tasks.rq_jobs import noop

        self.queue, self.noop = queue, noop

    def one(self, i: int) -> None:
        self.queue.enqueue(self.noop, i)

    def many(self, indices: list[int]) -> None:
        _enqueue_many(self.queue, indices)

    def close(self) -> None:
        self.queue.connection.close()
