"""Run the benchmark suite (GitHub issue #6): ``python bench/run.py [--quick | --smoke]``.

Starts one PostgreSQL with pgserver (or reuses ``--dsn`` / ``$DATABASE_URL``) and measures on
it, in one run, underway and its peers: drain throughput with 1 and 2 worker processes, the
pgbench ceiling on underway's own transaction shape, pickup latency, enqueue rates, underway's
two-step job, a table with many finished tasks, worker RSS, and round trips per task. Writes
``results.json`` and ``chart.png`` to ``--out`` and prints a table with each figure's ratio to
underway's. Peers whose library (or, for RQ, ``redis-server``) is missing are skipped, and
the output says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import chart, harness, report
from bench.harness import Peer, Server
from bench.peers import all_peers
from bench.peers.pgbench_ import ROUND_TRIPS, measure_pgbench, script
from bench.peers.reference_ import BarePsycopg2
from bench.peers.underway_ import UnderwayPeer, count_round_trips


@dataclass(frozen=True)
class Sizes:
    """How much each measurement does in one mode of the run."""

    drain_tasks: int
    runs: int
    latency_pickups: int
    latency_pickups_peers: int
    latency_rate: float
    enqueue_single: int
    enqueue_batched: int
    enqueue_batch: int
    finished_rows: int
    rss_tasks: int
    #: A peer whose first drain run spans longer than this (seconds) is measured once.
    slow_run_s: float


SIZES = {
    "full": Sizes(20_000, 3, 10_000, 2_000, 200.0, 2_000, 50_000, 1_000, 1_000_000, 100_000, 30),
    "quick": Sizes(20_000, 1, 2_000, 1_000, 200.0, 1_000, 20_000, 1_000, 1_000_000, 20_000, 30),
    "smoke": Sizes(300, 1, 100, 100, 200.0, 100, 2_000, 500, 10_000, 500, 30),
}

SMOKE_PEERS = "underway,psycopg2,pgbench"


@dataclass
class Series:
    """One measurement taken over several runs: ``once`` takes a run, ``record`` turns the
    runs into figures."""

    what: str
    once: Callable[[], dict[str, Any]]
    record: Callable[[list[dict[str, Any]]], None]
    #: False for measurements taken once (latency, RSS).
    repeat: bool = True
    runs: list[dict[str, Any]] = field(default_factory=list)
    failed: bool = False

    def take(self) -> None:
        """Take one run, noting the machine's load average with it."""
        try:
            run = self.once()
        except BaseException:
            self.failed = True
            raise
        run["load_avg_1m"] = round(os.getloadavg()[0], 2)
        self.runs.append(run)
        for key in ("value", "single_per_s", "batched_per_s", "p50_ms"):
            if key in run:
                print(f"   {key}: {run[key]:,.2f}", flush=True)

    def wants_more(self, slow_s: float) -> bool:
        """Whether to take another run: not after a failure, nor for a one-run measurement,
        nor for a peer whose first run spanned over ``slow_s`` seconds."""
        if self.failed or not self.repeat or not self.runs:
            return False
        return self.runs[0].get("span_s", 0) <= slow_s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__)
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"), help="reuse this server")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one run each, fewer tasks")
    mode.add_argument("--smoke", action="store_true", help=f"tiny CI run ({SMOKE_PEERS})")
    parser.add_argument(
        "--only",
        help="comma-separated peers: underway, procrastinate, pgqueuer, huey, rq, psycopg2, "
        f"pgbench (default: all; with --smoke: {SMOKE_PEERS})",
    )
    return parser.parse_args(argv)


class Run:
    """One benchmark run: the server, the peers, and the figures gathered so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
        self.sizes = SIZES[self.mode]
        only = args.only or (SMOKE_PEERS if args.smoke else None)
        self.only = {name.strip() for name in only.split(",")} if only else None
        self.figures: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.errors: list[dict[str, str]] = []
        self.extra: dict[str, Any] = {}
        self.load_at_start = [round(x, 2) for x in os.getloadavg()]
        self.server = Server.start(args.dsn)
        self.peers = self._available_peers()

    def wanted(self, key: str) -> bool:
        """Whether ``--only`` selects the peer with this key (or family, e.g. ``rq``)."""
        return self.only is None or key in self.only or key.split("_")[0] in self.only

    def _available_peers(self) -> list[Peer]:
        """The selected peers that can run here, started; the others recorded as skipped."""
        s = self.sizes
        candidates: list[Peer] = [
            *all_peers(),
            UnderwayPeer(two_step=True),
            UnderwayPeer(finished_rows=s.finished_rows),
            BarePsycopg2(autocommit=False),
            BarePsycopg2(autocommit=True),
        ]
        peers = []
        for peer in candidates:
            if not self.wanted(peer.key):
                continue
            reason = peer.missing()
            if reason is None:
                try:
                    peer.start()
                except Exception as exc:
                    reason = f"could not start: {exc}"
            if reason:
                self.skip(peer.label, reason)
            else:
                peers.append(peer)
        if self.wanted("pgbench") and self.server.pgbench() is None:
            self.skip("pgbench", "no pgbench binary (pgserver ships one; or put it on PATH)")
        return peers

    def skip(self, what: str, reason: str) -> None:
        """Record and announce a peer or figure left out."""
        self.skipped.append({"what": what, "reason": reason})
        print(f"skipping {what}: {reason}", flush=True)

    def attempt(self, what: str, measure: Callable[[], None]) -> None:
        """Run one measurement; a failure is recorded and the run goes on with the rest."""
        print(f"-- {what}", flush=True)
        began = time.perf_counter()
        try:
            measure()
            print(f"   ({time.perf_counter() - began:.1f} s)", flush=True)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            self.errors.append({"what": what, "error": message[-4000:]})
            print(f"   FAILED: {message[-2000:]}", flush=True)
            traceback.print_exc(limit=3)

    def add(
        self, metric: str, peer_key: str, label: str, value: float, unit: str, **more: Any
    ) -> None:
        """Record one figure and print it."""
        figure = {"metric": metric, "peer": peer_key, "label": label, "value": value, "unit": unit}
        figure.update(more)
        figure["id"] = "/".join(
            str(x) for x in (metric, peer_key, f"w{more['workers']}" if "workers" in more else "")
        ).rstrip("/")
        self.figures.append(figure)
        print(f"   {figure['id']}: {value:,.2f} {unit}", flush=True)

    # -- the measurements ---------------------------------------------------------------
    #
    # Each measurement is a Series: a function taking one run, and one recording the
    # figures from all of its runs. Runs go in rounds (run 1 of everything, then run 2 of
    # everything, ...), so that a disturbance on the machine falls on every peer alike
    # rather than on one peer's three runs.

    def round_trips(self) -> None:
        """Round trips per no-op task: underway's worker vs the pgbench script."""
        counted = count_round_trips(self.server)
        self.extra["round_trips"] = {
            "underway_per_task": counted,
            "pgbench_per_transaction": ROUND_TRIPS,
            "pgbench_script": script(),
        }
        print(f"   underway: {counted['per_task']:g} per task; pgbench: {ROUND_TRIPS}", flush=True)

    def enqueue_series(self, peer: Peer) -> Series:
        """Enqueue rates, one per transaction and batched."""
        s = self.sizes

        def record(runs: list[dict[str, Any]]) -> None:
            conditions = {**peer.settings(1), "tasks": s.enqueue_single, "runs": len(runs)}
            self.add(
                "enqueue_single",
                peer.key,
                peer.label,
                harness.median_of(runs, "single_per_s"),
                "tasks/s",
                runs=runs,
                conditions=conditions,
            )
            if "batched_per_s" in runs[0]:
                conditions = {**conditions, "tasks": s.enqueue_batched, "batch": s.enqueue_batch}
                self.add(
                    "enqueue_batched",
                    peer.key,
                    peer.label,
                    harness.median_of(runs, "batched_per_s"),
                    "tasks/s",
                    runs=runs,
                    conditions=conditions,
                )

        return Series(
            f"enqueue: {peer.label}",
            lambda: harness.measure_enqueue(
                self.server, peer, s.enqueue_single, s.enqueue_batched, s.enqueue_batch
            ),
            record,
        )

    def drain_series(self, peer: Peer, workers: int) -> Series:
        """Drain throughput of pre-enqueued no-op tasks."""
        n = min(self.sizes.drain_tasks, peer.max_drain_tasks or self.sizes.drain_tasks)

        def record(runs: list[dict[str, Any]]) -> None:
            self.add(
                "drain",
                peer.key,
                peer.label,
                harness.median_of(runs),
                "jobs/s" if peer.steps > 1 else "tasks/s",
                workers=workers,
                runs=runs,
                conditions={**peer.settings(workers), "tasks": n, "runs": len(runs)},
            )

        return Series(
            f"drain: {peer.label}, {workers} worker(s)",
            lambda: harness.measure_drain(self.server, peer, workers, n),
            record,
        )

    def pgbench_series(self, clients: int, async_commit: bool) -> Series:
        """The pgbench ceiling on underway's transaction shape."""
        n = self.sizes.drain_tasks
        key = "pgbench_async" if async_commit else "pgbench"
        label = "pgbench, synchronous_commit=off" if async_commit else "pgbench"

        def record(runs: list[dict[str, Any]]) -> None:
            self.add(
                "drain",
                key,
                label,
                harness.median_of(runs),
                "tasks/s",
                workers=clients,
                runs=runs,
                conditions={
                    "clients": clients,
                    "threads": clients,
                    "tasks": n,
                    "runs": len(runs),
                    "round_trips_per_task": ROUND_TRIPS,
                    "protocol": "simple",
                    "synchronous_commit": "off" if async_commit else "server default",
                },
            )

        return Series(
            f"pgbench: {clients} client(s), {label}",
            lambda: measure_pgbench(self.server, clients, n, async_commit),
            record,
        )

    def latency_series(self, peer: Peer, workers: int = 2) -> Series:
        """Pickup latency at a steady enqueue rate into idle workers (one run)."""
        s = self.sizes
        n = s.latency_pickups if peer.is_underway else s.latency_pickups_peers

        def record(runs: list[dict[str, Any]]) -> None:
            result = runs[0]
            conditions = {
                **peer.settings(workers),
                "pickups": n,
                "rate_per_s": s.latency_rate,
                "achieved_rate_per_s": round(result["achieved_rate_per_s"], 1),
                "negative_latencies": result["negative"],
                "load_avg_1m": result["load_avg_1m"],
            }
            for stat in ("p50_ms", "p95_ms", "p99_ms", "max_ms"):
                self.add(
                    f"latency_{stat[:-3]}",
                    peer.key,
                    peer.label,
                    result[stat],
                    "ms",
                    workers=workers,
                    conditions=conditions,
                )
            self.add(
                "latency_stalls",
                peer.key,
                peer.label,
                result["stalls_over_50ms"],
                f"pickups > 50 ms of {n}",
                workers=workers,
                conditions=conditions,
            )

        return Series(
            f"latency: {peer.label}",
            lambda: harness.measure_latency(self.server, peer, workers, n, s.latency_rate),
            record,
            repeat=False,
        )

    def rss_series(self, peer: Peer, workers: int = 2) -> Series:
        """Worker RSS at start and after many tasks (one run)."""
        n = self.sizes.rss_tasks

        def record(runs: list[dict[str, Any]]) -> None:
            result = runs[0]
            self.extra["rss"] = {**result, "workers": workers, "peer": peer.key}
            self.add(
                "rss_growth",
                peer.key,
                peer.label,
                max(map(abs, result["growth_since_start_mb"])),
                "MB",
                workers=workers,
                detail=result,
                conditions={"tasks": n},
            )

        return Series(
            f"RSS: {peer.label}",
            lambda: harness.measure_rss(self.server, peer, workers, n),
            record,
            repeat=False,
        )

    def plan(self) -> list[Series]:
        """Every measurement of this run, in order (the heavy fill of finished rows last)."""
        having = {
            m: [p for p in self.peers if m in p.measures]
            for m in ("drain", "latency", "enqueue", "rss")
        }
        series = [self.enqueue_series(p) for p in having["enqueue"]]
        if self.wanted("pgbench") and self.server.pgbench() is not None:
            series += [self.pgbench_series(c, a) for c in (1, 2) for a in (False, True)]
        for peer in sorted(having["drain"], key=lambda p: p.key == "underway_finished"):
            for workers in (1, 2):
                if not (peer.key == "underway_finished" and workers == 1):
                    series.append(self.drain_series(peer, workers))
        series += [self.latency_series(p) for p in having["latency"]]
        series += [self.rss_series(p) for p in having["rss"]]
        return series

    def execute(self) -> None:
        """Take the runs of every series in rounds, then record their figures."""
        if any(p.is_underway for p in self.peers):
            self.attempt("round trips per task", self.round_trips)
        plan = self.plan()
        for round_ in range(self.sizes.runs):
            for series in plan:
                if round_ and not series.wants_more(self.sizes.slow_run_s):
                    continue
                self.attempt(f"{series.what} (run {round_ + 1})", series.take)
        for series in plan:
            if series.runs:
                self.attempt(f"record {series.what}", lambda s=series: s.record(s.runs))

    def meta(self, started: float, argv: list[str]) -> dict[str, Any]:
        """The conditions every figure shares."""
        import psutil

        versions: dict[str, str] = {}
        for peer in self.peers:
            versions.update(peer.versions())
        return {
            "command": " ".join(["python", "bench/run.py", *argv]),
            "mode": self.mode,
            "sizes": asdict(self.sizes),
            "load_average_at_start": self.load_at_start,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "started_at": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "duration_s": round(time.time() - started, 1),
            "machine": {
                "cpu_count": os.cpu_count(),
                "cpu_count_physical": psutil.cpu_count(logical=False),
                "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                "platform": platform.platform(),
                "processor": _cpu_model(),
                "python": platform.python_version(),
            },
            "postgresql": self.server.describe(),
            "underway_source": _source(),
            "versions": versions,
            "peer_settings": {p.key: {"label": p.label, **p.settings(2)} for p in self.peers},
            "measuring": {
                "step_start": "time.time() written by the task into a shared-memory slot "
                "(bench/probe.py), the same for every peer",
                "drain": "(tasks - 1) / (last step start - first step start); worker start-up "
                "excluded; every task checked done in the peer's storage afterwards",
                "latency": "step start minus the return of the enqueue call (commit), one "
                "task per call at a steady rate into idle workers, 50 warm-up tasks first",
                "median_of": f"up to {self.sizes.runs} runs (1 for a peer whose first drain "
                f"run spans over {self.sizes.slow_run_s:g} s)",
                "fresh_database": "CREATE DATABASE per measurement run",
            },
        }


def _source() -> dict[str, Any]:
    """Which underway was measured: its path, and the git commit of the tree it is in."""
    import subprocess

    import underway

    found: dict[str, Any] = {"path": str(Path(underway.__file__).parent)}
    git = ["git", "-C", str(harness.REPO)]
    try:
        found["git_commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            [*git, "status", "--porcelain", "underway"], capture_output=True, text=True, check=True
        ).stdout
        found["uncommitted_changes_in_underway"] = bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        found["git_commit"] = None
    return found


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns 0 when every attempted measurement succeeded."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # A stop request unwinds like Ctrl-C, so workers, Redis and the server are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    run = Run(args)
    try:
        run.execute()
        results = {
            "meta": run.meta(started, argv),
            "figures": run.figures,
            "skipped": run.skipped,
            "errors": run.errors,
            **run.extra,
        }
    finally:
        for peer in run.peers:
            peer.shutdown()
        run.server.close()
    report.add_ratios(results)
    results["targets"] = report.targets(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    print(report.table(results))
    drawn = chart.render(results, out / "chart.png")
    print(f"\nwrote {out / 'results.json'}" + (f" and {drawn}" if drawn else ""))
    return 1 if run.errors else 0


if __name__ == "__main__":
    sys.exit(main())
