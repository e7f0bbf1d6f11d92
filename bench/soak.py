"""The chaos soak (issue #15): a two-step job drained by a supervisor's workers while one of
them is SIGKILLed every 0.5-1 s, beside the same drain without kills, in one run:
``python bench/soak.py [--tasks 20000] [--workers 4] [--dsn DSN]``.

It prints, for each run: tasks, lost (not succeeded), effects written twice or more (each
step writes one row through the worker's transaction), throughput, the average number of
live workers, and the supervisor's restart back-offs; then the ratio of the throughputs.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

import psutil
import psycopg2

from bench import harness

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Soak:
    """What one drain came to."""

    tasks: int
    kills: int
    lost: int
    duplicated: int
    seconds: float
    live_workers: float
    back_offs: list[float]

    @property
    def rate(self) -> float:
        """Tasks (both steps) per second."""
        return self.tasks / self.seconds

    def line(self, label: str) -> str:
        """One line of figures."""
        return (
            f"{label}: {self.tasks:,} tasks, {self.kills} kills, lost {self.lost}, "
            f"effects twice {self.duplicated}, {self.rate:,.0f} tasks/s, "
            f"live workers {self.live_workers:.2f} on average, "
            f"back-offs {len(self.back_offs)} ({sum(self.back_offs):.1f} s)"
        )


def _fetch(dsn: str, query: str) -> Any:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchone()[0]
    finally:
        conn.close()


def run(dsn: str, tasks: int, workers: int, kill: bool, timeout: float = 900.0) -> Soak:
    """Enqueue ``tasks`` runs of the soak job into ``dsn`` (migrated, empty), drain them
    with a supervisor of ``workers`` workers, SIGKILLing one every 0.5-1 s if ``kill``."""
    import underway
    from bench.tasks import soak_jobs

    underway.run_migrations(dsn)
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(soak_jobs.EFFECTS_DDL)
        for k in range(0, tasks, 5000):
            soak_jobs.soak.enqueue_many(list(range(k, min(tasks, k + 5000))), conn=conn)
            conn.commit()
    finally:
        conn.close()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"underway-soak-{os.getpid()}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *harness._pythonpath()])}
    command = [sys.executable, "-m", "underway.supervisor", "bench.tasks.soak_jobs"]
    command += ["--dsn", dsn, "--workers", str(workers), "--no-scheduler", "--log-level", "WARNING"]
    with log.open("w") as out:
        sup = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    done = threading.Event()
    kills, samples = [0], []

    def chaos() -> None:
        while not done.wait(random.uniform(0.5, 1.0)):
            children = [c for c in _children(sup.pid) if c.status() != psutil.STATUS_ZOMBIE]
            if kill and children:
                os.kill(random.choice(children).pid, signal.SIGKILL)
                kills[0] += 1

    def sample() -> None:
        while not done.wait(0.1):
            samples.append(len([c for c in _children(sup.pid) if _alive(c)]))

    threads = [threading.Thread(target=chaos), threading.Thread(target=sample)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + timeout
        query = "SELECT count(*) FROM underway.task WHERE state NOT IN ('succeeded', 'failed')"
        while _fetch(dsn, query) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        done.set()
        for thread in threads:
            thread.join()
        sup.send_signal(signal.SIGTERM)
        sup.wait(60)
    span = _fetch(
        dsn,
        "SELECT extract(epoch FROM max(a.finished_at) - min(a.started_at))::float8"
        " FROM underway.attempt AS a",
    )
    succeeded = _fetch(dsn, "SELECT count(*) FROM underway.task WHERE state = 'succeeded'")
    duplicated = _fetch(
        dsn,
        "SELECT count(*) FROM (SELECT 1 FROM soak_effect GROUP BY task_id, step"
        " HAVING count(*) > 1) AS twice",
    )
    back_offs = [
        float(d) for d in re.findall(r"restarting worker .*? in ([\d.]+)s", log.read_text())
    ]
    log.unlink()
    return Soak(
        tasks=tasks,
        kills=kills[0],
        lost=tasks - succeeded,
        duplicated=duplicated,
        seconds=span,
        live_workers=sum(samples) / max(len(samples), 1),
        back_offs=back_offs,
    )


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.Error:
        return []


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def main(argv: list[str] | None = None) -> int:
    """Run the soak with and without kills; print both and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--dsn", help="reuse this server (default: an embedded one)")
    args = parser.parse_args(argv)
    server = harness.Server.start(args.dsn)
    print(f"load before: {Path('/proc/loadavg').read_text().strip()}; cores: {os.cpu_count()}")
    try:
        results = {}
        for label, kill in (("without kills", False), ("with kills", True)):
            with server.database(f"soak_{'kill' if kill else 'calm'}") as dsn:
                results[label] = run(dsn, args.tasks, args.workers, kill)
            print(results[label].line(label), flush=True)
    finally:
        server.close()
    print(f"load after: {Path('/proc/loadavg').read_text().strip()}")
    ratio = results["with kills"].rate / results["without kills"].rate
    print(f"throughput with kills / without: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
