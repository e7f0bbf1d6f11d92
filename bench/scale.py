"""Scale runs (issue #16): does a task cost the same as the tables grow?
``python bench/scale.py [--quick | --smoke] [--only pending,finished,steady] [--dsn DSN]``.

- **pending**: 2 workers drain the first 10,000 tasks of a queue 10,000 deep, and of one
  1,000,000 deep; rounds alternate, medians of 3.
- **finished**: 2 workers drain 20,000 tasks from an empty table, and from one holding
  10,000,000 finished tasks with their attempts, kept for retention; rounds alternate.
- **steady**: 2 workers drain for 30 minutes while tasks are enqueued at half their measured
  drain rate; every 30 s it samples the pickup latency, the size of each table and index,
  dead tuples and autovacuum's passes. Finished tasks are kept for a minute, so retention
  and autovacuum must keep pace for the sizes to stay flat: the largest sizes in the
  second half of the run (after retention's first passes) are compared with the first's.

``--quick`` shrinks each (200,000 pending, 1,000,000 finished, 5 minutes of steady load
with tasks kept for 10 s) and
``--smoke`` is a tiny run for CI. Writes ``scale.json`` to ``--out`` and prints each figure.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import statistics
import sys
import time
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2

from bench import harness
from bench.harness import Probe, Server, Workers, percentile, poll
from bench.peers.underway_ import UnderwayPeer

WORKERS = 2
"""Worker processes in every scale run."""


@dataclass(frozen=True)
class Sizes:
    """How big each scale run is in one mode."""

    pending_small: int
    pending_large: int
    #: Tasks timed from the head of each queue.
    window: int
    finished_rows: int
    finished_drain: int
    runs: int
    steady_s: float
    sample_s: float
    #: Seconds the steady load's finished tasks are kept before retention deletes them.
    keep_for: float


SIZES = {
    "full": Sizes(10_000, 1_000_000, 10_000, 10_000_000, 20_000, 3, 1800, 30, 60),
    "quick": Sizes(10_000, 200_000, 10_000, 1_000_000, 10_000, 1, 300, 10, 10),
    "smoke": Sizes(500, 5_000, 500, 20_000, 500, 1, 6, 2, 60),
}

PURGE_INTERVAL = 60.0
"""Seconds between the supervisor's retention passes (``underway.upkeep``) when it is not
behind: the table holds up to ``keep_for`` plus this of finished tasks."""

SIZES_SQL = """
SELECT s.relname, pg_relation_size(s.relid), pg_indexes_size(s.relid), s.n_live_tup,
       s.n_dead_tup, s.autovacuum_count, s.autoanalyze_count
FROM pg_stat_user_tables AS s WHERE s.schemaname = 'underway' AND s.relname IN ('task', 'attempt')
"""

INDEX_SIZES_SQL = """
SELECT indexrelname, pg_relation_size(indexrelid) FROM pg_stat_user_indexes
WHERE schemaname = 'underway' AND relname IN ('task', 'attempt') ORDER BY 1
"""

MB = 2**20


def vacuum_analyze(dsn: str) -> None:
    """What autovacuum does soon after a bulk insert: tables and statistics current."""
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("VACUUM ANALYZE underway.task")
            cur.execute("VACUUM ANALYZE underway.attempt")
    finally:
        conn.close()


# -- pending ----------------------------------------------------------------------------------


def head_drain(server: Server, pending: int, window: int) -> dict[str, Any]:
    """Tasks per second over the first ``window`` tasks of a queue ``pending`` deep."""
    peer = UnderwayPeer()
    with server.database("scale_pending") as dsn:
        peer.prepare(dsn)
        peer.prefill(dsn, list(range(pending)))
        vacuum_analyze(dsn)
        server.checkpoint()
        probe = Probe(pending)
        procs = Workers(
            peer.worker_commands(dsn, WORKERS, burst=False), {**peer.worker_env(dsn), **probe.env}
        )
        try:
            # Tasks are claimed oldest first, so the window is the first tasks enqueued.
            probe.wait(procs, 900, last=window)
        finally:
            procs.stop()
            marks = probe.marks(0, window)
            probe.close()
    span = max(marks) - min(marks)
    return {"value": (window - 1) / span, "span_s": span, "pending": pending, "window": window}


def measure_pending(server: Server, sizes: Sizes) -> dict[str, Any]:
    """The head-of-queue drain rate beside a short and a deep queue, in alternating rounds."""
    runs: dict[int, list[dict[str, Any]]] = {sizes.pending_small: [], sizes.pending_large: []}
    for round_ in range(sizes.runs):
        for pending in runs:
            run = head_drain(server, pending, sizes.window)
            runs[pending].append(run)
            print(f"   round {round_ + 1}, {pending:,} pending: {run['value']:,.0f} tasks/s")
    small, large = (statistics.median(r["value"] for r in runs[n]) for n in runs)
    return {
        "small_pending": sizes.pending_small,
        "large_pending": sizes.pending_large,
        "window": sizes.window,
        "small_per_s": small,
        "large_per_s": large,
        "ratio": large / small,
        "runs": {str(n): r for n, r in runs.items()},
    }


# -- finished ---------------------------------------------------------------------------------


def measure_finished(server: Server, sizes: Sizes) -> dict[str, Any]:
    """Drain rate in an empty table and in one holding ``finished_rows`` finished tasks; both
    databases are filled once, then drained in alternating rounds."""
    peers = {
        0: UnderwayPeer(),
        sizes.finished_rows: UnderwayPeer(finished_rows=sizes.finished_rows),
    }
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in peers}
    fill_s: dict[int, float] = {}
    with contextlib.ExitStack() as stack:
        dsns = {n: stack.enter_context(server.database(f"scale_finished_{n}")) for n in peers}
        for n, peer in peers.items():
            started = time.perf_counter()
            peer.prepare(dsns[n])
            fill_s[n] = time.perf_counter() - started
            print(f"   {n:,} finished rows written in {fill_s[n]:.0f} s")
        for round_ in range(sizes.runs):
            for n, peer in peers.items():
                run = harness.drain(server, dsns[n], peer, WORKERS, sizes.finished_drain)
                runs[n].append(run)
                print(f"   round {round_ + 1}, {n:,} finished: {run['value']:,.0f} tasks/s")
        table_mb = {n: _table_mb(server, dsns[n]) for n in peers}
    empty, full = (statistics.median(r["value"] for r in runs[n]) for n in peers)
    return {
        "finished_rows": sizes.finished_rows,
        "drained": sizes.finished_drain,
        "empty_per_s": empty,
        "finished_per_s": full,
        "ratio": full / empty,
        "fill_s": {str(n): round(s, 1) for n, s in fill_s.items()},
        "task_and_attempt_mb": {str(n): mb for n, mb in table_mb.items()},
        "runs": {str(n): r for n, r in runs.items()},
    }


def _table_mb(server: Server, dsn: str) -> float:
    """The task and attempt tables' size with their indexes, in MB."""
    rows = server.fetch(
        "SELECT pg_total_relation_size('underway.task')"
        " + pg_total_relation_size('underway.attempt')",
        dsn,
    )
    return round(rows[0][0] / MB, 1)


# -- steady load ------------------------------------------------------------------------------


@dataclass
class Sample:
    """The tables at one moment of the steady-load run."""

    at_s: float
    pending: int
    finished: int
    task_mb: float
    task_indexes_mb: float
    attempt_mb: float
    attempt_indexes_mb: float
    task_dead: int
    attempt_dead: int
    autovacuums: int
    autoanalyzes: int
    indexes_mb: dict[str, float]
    #: Shares of the machine's CPU time since the sample before: used, and stolen by the
    #: hypervisor (on a shared host, a stall with a high steal is the host's, not ours).
    cpu_busy: float = float("nan")
    cpu_steal: float = float("nan")
    pickup_p50_ms: float = float("nan")
    pickup_p99_ms: float = float("nan")
    pickup_max_ms: float = float("nan")


def cpu_times() -> list[int]:
    """The machine's CPU time counters (``/proc/stat``): user, nice, system, idle, iowait,
    irq, softirq, steal; empty where there is no ``/proc``."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            return [int(x) for x in stat.readline().split()[1:9]]
    except OSError:
        return []


def _add_cpu(samples: list[Sample], times: list[list[int]]) -> None:
    """Give each sample the CPU shares since the one before."""
    for sample, before, after in zip(samples[1:], times, times[1:]):
        delta = [b - a for a, b in zip(before, after)]
        total = sum(delta)
        if total > 0:
            idle, iowait, steal = delta[3], delta[4], delta[7]
            sample.cpu_busy = round((total - idle - iowait - steal) / total, 3)
            sample.cpu_steal = round(steal / total, 3)


def take_sample(server: Server, dsn: str, at_s: float) -> Sample:
    """Sizes, dead tuples and autovacuum counts of the task and attempt tables now."""
    tables = {row[0]: row[1:] for row in server.fetch(SIZES_SQL, dsn)}
    states = dict(
        server.fetch(
            "SELECT state = 'pending', count(*) FROM underway.task "
            "WHERE state IN ('pending', 'succeeded') GROUP BY 1",
            dsn,
        )
    )
    task, attempt = tables["task"], tables["attempt"]
    return Sample(
        at_s=round(at_s, 1),
        pending=states.get(True, 0),
        finished=states.get(False, 0),
        task_mb=round(task[0] / MB, 2),
        task_indexes_mb=round(task[1] / MB, 2),
        attempt_mb=round(attempt[0] / MB, 2),
        attempt_indexes_mb=round(attempt[1] / MB, 2),
        task_dead=task[3],
        attempt_dead=attempt[3],
        autovacuums=task[4] + attempt[4],
        autoanalyzes=task[5] + attempt[5],
        indexes_mb={name: round(size / MB, 2) for name, size in server.fetch(INDEX_SIZES_SQL, dsn)},
    )


def measure_steady(server: Server, sizes: Sizes) -> dict[str, Any]:
    """Enqueue at half the measured drain rate for ``steady_s`` seconds while 2 workers
    drain, sampling the tables every ``sample_s`` seconds; pickup latency (step start minus
    the enqueue's commit) is reported per sample for the tasks enqueued since the last."""
    from bench.tasks import underway_jobs

    drain_rate = harness.measure_drain(server, UnderwayPeer(), WORKERS, 10 * sizes.window)["value"]
    rate = drain_rate / 2
    print(f"   measured drain {drain_rate:,.0f} tasks/s; enqueueing {rate:,.0f} tasks/s")
    total = int(sizes.steady_s * rate * 1.1) + 100
    committed = array("d", bytes(8 * total))
    samples: list[Sample] = []
    peer = UnderwayPeer()
    with server.database("scale_steady") as dsn:
        peer.prepare(dsn)
        probe = Probe(total)
        procs = Workers(
            peer.worker_commands(dsn, WORKERS, burst=False), {**peer.worker_env(dsn), **probe.env}
        )
        conn = psycopg2.connect(dsn)
        try:
            poll(lambda: peer.ready(dsn, WORKERS), 60, "workers to connect and idle")
            samples.append(take_sample(server, dsn, 0.0))
            times = [cpu_times()]
            enqueued, started, started_wall = 0, time.perf_counter(), time.time()
            next_sample = sizes.sample_s
            while (elapsed := time.perf_counter() - started) < sizes.steady_s:
                due = min(int(elapsed * rate), total)
                if due > enqueued:
                    underway_jobs.steady.enqueue_many(list(range(enqueued, due)), conn=conn)
                    conn.commit()
                    now = time.time()
                    for i in range(enqueued, due):
                        committed[i] = now
                    enqueued = due
                if elapsed >= next_sample:
                    samples.append(take_sample(server, dsn, elapsed))
                    times.append(cpu_times())
                    next_sample += sizes.sample_s
                time.sleep(0.01)  # pacing the enqueuer, not waiting for a result
            probe.wait(procs, 300, last=enqueued)
            samples.append(take_sample(server, dsn, time.perf_counter() - started))
            times.append(cpu_times())
        finally:
            conn.close()
            procs.stop()
            marks = probe.marks(0, total)
            probe.close()
    _add_pickups(samples, committed, marks, enqueued, started_wall)
    _add_cpu(samples, times)
    return _steady_summary(samples, drain_rate, rate, enqueued, sizes)


def _add_pickups(
    samples: list[Sample], committed: array, marks: array, enqueued: int, started_wall: float
) -> None:
    """Give each sample the pickup latencies of the tasks enqueued since the one before
    (``started_wall``: the wall-clock time of the samples' zero)."""
    buckets: list[list[float]] = [[] for _ in samples]
    bounds = [s.at_s for s in samples]
    for i in range(enqueued):
        k = bisect.bisect_left(bounds, committed[i] - started_wall)
        buckets[min(k, len(bounds) - 1)].append(marks[i] - committed[i])
    for sample, latencies in zip(samples, buckets):
        if latencies:
            latencies.sort()
            sample.pickup_p50_ms = round(percentile(latencies, 50) * 1000, 2)
            sample.pickup_p99_ms = round(percentile(latencies, 99) * 1000, 2)
            sample.pickup_max_ms = round(latencies[-1] * 1000, 2)


def _steady_summary(
    samples: list[Sample], drain_rate: float, rate: float, enqueued: int, sizes: Sizes
) -> dict[str, Any]:
    """Once retention had time to reach its steady state (``keep_for`` and two of its
    passes), the largest sizes in the first and in the second half of the rest of the
    run: flat when the second is no larger than the first."""
    settle = min(sizes.keep_for + 2 * PURGE_INTERVAL, sizes.steady_s / 2)
    middle = (settle + samples[-1].at_s) / 2
    first = [s for s in samples if settle <= s.at_s < middle]
    second = [s for s in samples if s.at_s >= middle]
    first = first or second[:1]  # a run too short for two halves compares its end

    def growth(get: Any) -> dict[str, float]:
        before, after = max(get(s) for s in first), max(get(s) for s in second)
        return {
            "first_half_max": before,
            "second_half_max": after,
            "ratio": round(after / before, 3) if before else float("nan"),
        }

    fields = ("task_mb", "task_indexes_mb", "attempt_mb", "attempt_indexes_mb", "finished")
    indexes = samples[-1].indexes_mb
    settled = first + second
    return {
        "seconds": sizes.steady_s,
        "keep_for_s": sizes.keep_for,
        "drain_per_s": drain_rate,
        "enqueue_per_s": rate,
        "enqueued": enqueued,
        "settled_at_s": settle,
        "growth": {f: growth(lambda s, f=f: getattr(s, f)) for f in fields},
        "index_growth": {name: growth(lambda s, name=name: s.indexes_mb[name]) for name in indexes},
        "max_pending": max(s.pending for s in settled),
        "max_dead": {
            "task": max(s.task_dead for s in settled),
            "attempt": max(s.attempt_dead for s in settled),
        },
        "autovacuums": samples[-1].autovacuums - samples[0].autovacuums,
        "pickup_p50_ms_worst_sample": max(s.pickup_p50_ms for s in settled),
        "pickup_p99_ms_worst_sample": max(s.pickup_p99_ms for s in settled),
        "cpu_steal_worst_sample": max(s.cpu_steal for s in settled),
        "samples": [asdict(s) for s in samples],
    }


def print_samples(result: dict[str, Any]) -> None:
    """The steady-load samples as a table."""
    print(
        f"{'t (s)':>7} {'pending':>8} {'finished':>9} {'task MB':>8} {'idx MB':>7} "
        f"{'att MB':>7} {'idx MB':>7} {'dead t':>7} {'dead a':>7} {'avac':>5} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'busy':>5} {'steal':>5}"
    )
    for s in result["samples"]:
        print(
            f"{s['at_s']:>7.0f} {s['pending']:>8,} {s['finished']:>9,} {s['task_mb']:>8.1f} "
            f"{s['task_indexes_mb']:>7.1f} {s['attempt_mb']:>7.1f} "
            f"{s['attempt_indexes_mb']:>7.1f} {s['task_dead']:>7,} {s['attempt_dead']:>7,} "
            f"{s['autovacuums']:>5} {s['pickup_p50_ms']:>7.2f} {s['pickup_p99_ms']:>7.2f} "
            f"{s['pickup_max_ms']:>7.1f} {s['cpu_busy']:>5.0%} {s['cpu_steal']:>5.0%}"
        )


# -- the run ----------------------------------------------------------------------------------

MEASURES = {"pending": measure_pending, "finished": measure_finished, "steady": measure_steady}


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scale runs; print their figures and write ``scale.json``."""
    parser = argparse.ArgumentParser(prog="python bench/scale.py", description=__doc__)
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"), help="reuse this server")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller tables, 2 minutes of load")
    mode.add_argument("--smoke", action="store_true", help="a tiny CI run")
    parser.add_argument("--only", default=",".join(MEASURES), help="comma-separated runs")
    args = parser.parse_args(argv)
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = SIZES[mode_name]
    # Read by the steady job's module, here and in the worker processes, when imported.
    os.environ["BENCH_KEEP_FOR"] = str(sizes.keep_for)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(MEASURES)
    if unknown:
        parser.error(
            f"unknown run(s): {', '.join(sorted(unknown))}; choose from {', '.join(MEASURES)}"
        )
    server = Server.start(args.dsn)
    results: dict[str, Any] = {
        "meta": {
            "mode": mode_name,
            "sizes": asdict(sizes),
            "workers": WORKERS,
            "cpu_count": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "postgresql": server.describe(),
            "autovacuum": dict(
                server.fetch(
                    "SELECT name, setting FROM pg_settings WHERE name LIKE 'autovacuum%' ORDER BY 1"
                )
            ),
        }
    }
    try:
        for name in chosen:
            print(f"== {name}", flush=True)
            started = time.perf_counter()
            results[name] = MEASURES[name](server, sizes)
            results[name]["wall_s"] = round(time.perf_counter() - started, 1)
    finally:
        server.close()
    results["meta"]["load_average_at_end"] = os.getloadavg()
    report(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out / 'scale.json'}")
    return 0


def report(results: dict[str, Any]) -> None:
    """Print each run's verdict against issue #16's goals."""
    meta = results["meta"]
    print(
        f"\nmode {meta['mode']}, {meta['workers']} workers, {meta['cpu_count']} cores, load "
        f"{meta['load_average_at_start'][0]:.2f} at start, "
        f"{meta['load_average_at_end'][0]:.2f} at end"
    )
    if "pending" in results:
        p = results["pending"]
        print(
            f"pending: {p['small_pending']:,} deep {p['small_per_s']:,.0f}/s, "
            f"{p['large_pending']:,} deep {p['large_per_s']:,.0f}/s: "
            f"{p['ratio']:.2f}x (want >= 0.90)"
        )
    if "finished" in results:
        f = results["finished"]
        print(
            f"finished: empty {f['empty_per_s']:,.0f}/s, beside {f['finished_rows']:,} finished "
            f"{f['finished_per_s']:,.0f}/s: {f['ratio']:.2f}x (want >= 0.90)"
        )
    if "steady" in results:
        s = results["steady"]
        print(
            f"steady: {s['seconds']:.0f} s at {s['enqueue_per_s']:,.0f} tasks/s "
            f"(half of {s['drain_per_s']:,.0f}/s), settled at {s['settled_at_s']:.0f} s"
        )
        print("   largest in the first half of the settled run, in the second (want <= 1.10x):")
        for name, g in {**s["growth"], **s["index_growth"]}.items():
            print(
                f"   {name}: {g['first_half_max']:,} then {g['second_half_max']:,} ({g['ratio']}x)"
            )
        print(
            f"   pending at most {s['max_pending']:,}; dead tuples at most: task "
            f"{s['max_dead']['task']:,}, attempt {s['max_dead']['attempt']:,}; "
            f"autovacuum passes: {s['autovacuums']}"
        )
        print(
            f"   worst sample's pickup p50 {s['pickup_p50_ms_worst_sample']} ms, "
            f"p99 {s['pickup_p99_ms_worst_sample']} ms; CPU stolen by the host at most "
            f"{s['cpu_steal_worst_sample']:.0%} of a sample"
        )
        print_samples(s)


if __name__ == "__main__":
    sys.exit(main())
