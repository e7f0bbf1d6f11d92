"""Where a drain's time goes (issue #16): ``python bench/profile.py [--tasks 20000]
[--workers 2] [--async-commit] [--py-spy DIR] [--tree NAME=PATH ...] [--rounds N]
[--pgbench CLIENTS]``.

Drains no-op tasks with underway's workers, as ``bench/run.py`` does, and meanwhile measures:

- CPU time per task of the worker processes, of their server sessions, and of the rest of
  PostgreSQL (WAL writer, checkpointer...), and how busy the machine's cores were;
- what the workers' server sessions were doing, sampled every few milliseconds from
  ``pg_stat_activity``: running a statement, waiting for the WAL flush, waiting for a lock,
  or idle, waiting for the worker's next statement (that is, for Python);
- WAL bytes, commits and statements per task, and the WAL flushes per commit: with
  synchronous commit, a drain that gets one flush per commit is bound by the disk's flush
  time, however many workers run (group commit shares a flush only between commits that
  arrive together);
- with ``--pgbench CLIENTS``, the same counters for pgbench's claim-and-complete loop
  (``bench/run.py``'s ceiling), side by side;
- with ``--py-spy DIR``, a py-spy flame graph of one worker (``pip install py-spy``).

With ``--tree`` given twice or more (as for ``bench/compare.py``), each source tree is
profiled in turn, round after round, and the medians are printed side by side: a change's
before and after. CPU time per task is steadier than throughput on a shared machine.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import psycopg2

from bench.compare import TreePeer
from bench.harness import REPO, Probe, Server, Workers, poll
from bench.peers.pgbench_ import measure_pgbench

SESSIONS_SQL = """
SELECT state, coalesce(wait_event_type || ':' || wait_event, 'CPU') FROM pg_stat_activity
WHERE application_name LIKE 'underway worker %'
"""

COUNTERS_SQL = """
SELECT pg_current_wal_lsn(), xact_commit, xact_rollback, (SELECT wal_sync FROM pg_stat_wal)
FROM pg_stat_database
WHERE datname = current_database()
"""


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User plus system CPU seconds the processes have used so far (gone ones count 0)."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


class Sampler(threading.Thread):
    """Samples the worker sessions' states every ``interval`` seconds until stopped."""

    def __init__(self, dsn: str, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg2.connect(dsn)
        self.conn.autocommit = True
        self.interval = interval
        self.counts: collections.Counter[str] = collections.Counter()
        #: Statements the sampler ran: each is a transaction the commit count leaves out.
        self.queries = 0
        self.done = threading.Event()

    def run(self) -> None:
        with self.conn.cursor() as cur:
            while not self.done.wait(self.interval):
                cur.execute(SESSIONS_SQL)
                self.queries += 1
                for state, wait in cur.fetchall():
                    self.counts["idle: waiting for the worker" if state == "idle" else wait] += 1
        self.conn.close()


def profile(
    server: Server, tree: str, tasks: int, workers: int, async_commit: bool, py_spy: str | None
) -> dict[str, Any]:
    """Drain ``tasks`` no-op tasks with ``workers`` workers running underway from ``tree``;
    returns the figures."""
    peer = TreePeer(async_commit=async_commit)
    peer.tree = tree
    with server.database("profile") as dsn:
        peer.prepare(dsn)
        peer.prefill(dsn, list(range(tasks)))
        server.checkpoint()
        postgres = _postgres_processes(server)
        probe = Probe(tasks)
        # WAL, commits and flushes are counted from before the workers start until their
        # sessions have ended: a session reports its statistics only now and then (at most
        # once a second while busy, and as it exits).
        start = _counters(dsn)
        # Not in burst mode: the processes must still be there to be measured at the end.
        procs = Workers(
            peer.worker_commands(dsn, workers, burst=False),
            {**peer.worker_env(dsn), **probe.env},
        )
        try:
            children = poll(lambda: _workers_of(procs, workers), 60, "worker processes")
            # The first mark starts the clock: connecting and importing are left out.
            poll(lambda: probe.marks(0, tasks).count(0.0) < tasks, 60, "the first task")
            spy = _start_py_spy(children[0].pid, py_spy) if py_spy else None
            sampler = Sampler(dsn)
            before = _snapshot(dsn, children, postgres)
            sampler.start()
            probe.wait(procs, 900, last=tasks)
            sampler.done.set()
            after = _snapshot(dsn, children, postgres)
            sampler.join()
            if spy is not None:
                spy.wait(timeout=60)
        finally:
            procs.stop()
            marks = probe.marks()
            probe.close()
        poll(lambda: not _sessions(dsn, "underway %"), 30, "the workers' sessions to end")
        end = _counters(dsn)
    end["commits"] -= sampler.queries
    done = sum(1 for m in marks if m >= before["wall"])
    return {**_figures(before, after, done, sampler.counts, workers), **_counted(start, end, tasks)}


def _counters(dsn: str) -> dict[str, int]:
    """The database's WAL position (bytes), its commits and rollbacks, and the server's WAL
    flushes, as reported so far."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(COUNTERS_SQL)
            lsn, commits, rollbacks, flushes = cur.fetchone()
            cur.execute("SELECT %s::pg_lsn - '0/0'::pg_lsn", (lsn,))
            wal = int(cur.fetchone()[0])
    finally:
        conn.close()
    return {"wal": wal, "commits": commits + rollbacks, "flushes": flushes}


def _sessions(dsn: str, application_name: str) -> set[int]:
    """The pids of the server sessions whose application name is like ``application_name``."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s",
                (application_name,),
            )
            return {row[0] for row in cur.fetchall()}
    finally:
        conn.close()


def _postgres_processes(server: Server) -> list[psutil.Process]:
    """Every process of the PostgreSQL server (a local one): the postmaster, named in its
    data directory's ``postmaster.pid``, and its children."""
    data = Path(server.fetch("SHOW data_directory")[0][0])
    postmaster = psutil.Process(int((data / "postmaster.pid").read_text().split()[0]))
    return [postmaster, *postmaster.children()]


def _workers_of(procs: Workers, workers: int) -> list[psutil.Process]:
    children = [c for pid in procs.pids for c in psutil.Process(pid).children()]
    return children if len(children) >= workers else []


def _snapshot(
    dsn: str, workers: list[psutil.Process], postgres: list[psutil.Process]
) -> dict[str, Any]:
    """CPU times now: the workers', their server sessions', the rest of PostgreSQL's and the
    machine's."""
    session_pids = _sessions(dsn, "underway worker %")
    all_postgres = postgres + [
        p for p in psutil.Process(postgres[0].pid).children() if p not in postgres
    ]
    sessions = [p for p in all_postgres if p.pid in session_pids]
    others = [p for p in all_postgres if p.pid not in session_pids]
    busy = psutil.cpu_times()
    return {
        "wall": time.time(),
        "workers_cpu": cpu_seconds(workers),
        "sessions_cpu": cpu_seconds(sessions),
        "postgres_other_cpu": cpu_seconds(others),
        "machine_busy": sum(busy) - busy.idle - getattr(busy, "iowait", 0.0),
    }


def _figures(
    before: dict[str, Any],
    after: dict[str, Any],
    done: int,
    waits: collections.Counter[str],
    workers: int,
) -> dict[str, Any]:
    wall = after["wall"] - before["wall"]

    def per_task(key: str, scale: float = 1e6) -> float:
        return round((after[key] - before[key]) / done * scale, 1)

    samples = sum(waits.values()) or 1
    return {
        "tasks_timed": done,
        "wall_s": round(wall, 2),
        "tasks_per_s": round(done / wall, 1),
        "cpu_us_per_task": {
            "worker processes": per_task("workers_cpu"),
            "their server sessions": per_task("sessions_cpu"),
            "rest of PostgreSQL": per_task("postgres_other_cpu"),
        },
        "machine_busy_fraction": round(
            (after["machine_busy"] - before["machine_busy"]) / wall / (os.cpu_count() or 1), 3
        ),
        "server_sessions": {k: round(v / samples, 3) for k, v in waits.most_common()},
        "workers": workers,
    }


def _counted(start: dict[str, int], end: dict[str, int], tasks: int) -> dict[str, float]:
    """WAL bytes and commits per task, and WAL flushes per commit, between two
    :func:`_counters` readings taken around ``tasks`` tasks."""
    commits = end["commits"] - start["commits"]
    return {
        "wal_bytes_per_task": round((end["wal"] - start["wal"]) / tasks),
        "commits_per_task": round(commits / tasks, 2),
        "flushes_per_commit": round((end["flushes"] - start["flushes"]) / max(commits, 1), 2),
    }


def profile_pgbench(server: Server, clients: int, tasks: int) -> dict[str, Any]:
    """pgbench's claim-and-complete loop (``bench/run.py``'s ceiling) on ``tasks`` tasks, with
    the counters of a drain's profile that need no worker processes."""
    taken: list[dict[str, int]] = []

    def snapshot(dsn: str) -> dict[str, int]:
        """Counters now; after the run, once pgbench's sessions have reported their commits
        (a session reports them as it exits)."""

        def settled() -> dict[str, int] | None:
            now = _counters(dsn)
            return now if now["commits"] - taken[0]["commits"] >= tasks else None

        taken.append(poll(settled, 10, "pgbench's statistics") if taken else _counters(dsn))
        return taken[-1]

    result = measure_pgbench(server, clients, tasks, snapshot=snapshot)
    return {"tasks_per_s": result["value"], **_counted(*result["snapshots"], tasks)}


def _start_py_spy(pid: int, out_dir: str) -> subprocess.Popen[bytes]:
    """py-spy recording one worker for 10 s into ``out_dir``."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    out = Path(out_dir) / f"worker-{pid}.svg"
    return subprocess.Popen(
        [
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--duration",
            "10",
            "--rate",
            "500",
            "--nonblocking",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main(argv: list[str] | None = None) -> int:
    """Profile the drains and print their figures."""
    parser = argparse.ArgumentParser(prog="python bench/profile.py", description=__doc__)
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"), help="reuse this server")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--async-commit", action="store_true")
    parser.add_argument("--py-spy", metavar="DIR", help="record a worker's flame graph here")
    parser.add_argument("--tree", action="append", help="NAME=PATH (repeat; default: this one)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--pgbench", type=int, metavar="CLIENTS", help="also profile pgbench's loop, each round"
    )
    args = parser.parse_args(argv)
    trees = [tuple(spec.split("=", 1)) for spec in args.tree or [f"this tree={REPO}"]]
    print(f"load before: {Path('/proc/loadavg').read_text().strip()}; cores: {os.cpu_count()}")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trees}
    bench_runs: list[dict[str, Any]] = []
    server = Server.start(args.dsn)
    try:
        for _ in range(args.rounds):
            for name, path in trees:
                tree = str(Path(path).resolve())
                runs[name].append(
                    profile(server, tree, args.tasks, args.workers, args.async_commit, args.py_spy)
                )
            if args.pgbench:
                bench_runs.append(profile_pgbench(server, args.pgbench, args.tasks))
    finally:
        server.close()
    print(f"load after: {Path('/proc/loadavg').read_text().strip()}")
    mode = "--async-commit" if args.async_commit else "default mode"
    print(f"{mode}, {args.workers} workers, {args.tasks:,} tasks, medians of {args.rounds}")
    for name, _ in trees:
        print_figures(name, runs[name])
    if bench_runs:
        print_figures(f"pgbench, {args.pgbench} clients, synchronous commit", bench_runs)
    return 0


def print_figures(name: str, runs: list[dict[str, Any]]) -> None:
    """One tree's medians (or pgbench's: what it has of them)."""

    def median(get: Any) -> float:
        return statistics.median(get(run) for run in runs)

    busy = ""
    if "machine_busy_fraction" in runs[0]:
        busy = f", machine busy {median(lambda r: r['machine_busy_fraction']):.0%}"
    print(f"\n{name}: {median(lambda r: r['tasks_per_s']):,.0f} tasks/s{busy}")
    for what in runs[0].get("cpu_us_per_task", {}):
        us = median(lambda r, what=what: r["cpu_us_per_task"][what])
        print(f"  CPU per task, {what}: {us:,.0f} us")
    print(
        f"  WAL per task: {median(lambda r: r['wal_bytes_per_task']):,.0f} bytes; "
        f"commits per task: {median(lambda r: r['commits_per_task'])}; "
        f"WAL flushes per commit: {median(lambda r: r['flushes_per_commit'])}"
    )
    if "server_sessions" not in runs[0]:
        return
    print("  worker server sessions, share of samples:")
    for what in runs[0]["server_sessions"]:
        share = median(lambda r, what=what: r["server_sessions"].get(what, 0.0))
        if share >= 0.005:
            print(f"    {share:6.1%}  {what}")


if __name__ == "__main__":
    sys.exit(main())
