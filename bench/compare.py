"""Compare underway's drain throughput between source trees, side by side in one run:
``python bench/compare.py --tree before=/tmp/before --tree after=. [--together]``

Each round drains the same number of pre-enqueued no-op tasks once per tree, in turn, on
one PostgreSQL (fresh database each time), with the workers importing underway from that
tree; it prints every run, each tree's median and its ratio to the first tree's. For a
change's before and after: check out the old commit into a directory (``git worktree``
or ``git archive``) and give both. The schema is migrated by this process's underway, so
compare trees with the same migrations.

On a shared machine, whose speed can drift by a third from one minute to the next, use
``--together``: each round then drains every tree *at the same time*, each in its own
database, and counts the tasks each finished in the same ``--window`` seconds, so that
whatever slows the machine slows every tree alike. It shows a difference in the workers'
own speed, not in the server's: when the drain waits on the WAL flush, group commit makes
the trees' commits share each flush and keeps them in lockstep, however much CPU a task
costs either. For a change to the SQL, ``bench/profile.py --tree ...`` measures CPU per task.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import harness
from bench.peers.underway_ import UnderwayPeer


class TreePeer(UnderwayPeer):
    """underway's default mode, its workers importing underway from ``tree``.

    ``python -m`` puts the working directory (the repository, where the bench runs its
    workers) first on ``sys.path``, ahead of ``PYTHONPATH``: ``PYTHONSAFEPATH`` (Python
    3.11) leaves it out, so that the tree's ``underway`` is the one imported."""

    tree: str = ""

    def worker_env(self, dsn: str) -> dict[str, str]:
        if sys.version_info < (3, 11):
            raise SystemExit("comparing source trees needs Python 3.11 (PYTHONSAFEPATH)")
        env = super().worker_env(dsn)
        path = os.pathsep.join([self.tree, str(harness.REPO), *harness._pythonpath()])
        return {**env, "PYTHONPATH": path, "PYTHONSAFEPATH": "1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: trees to compare, tasks, workers, rounds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH (repeat)")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dsn", help="reuse this server (default: an embedded one)")
    parser.add_argument("--together", action="store_true", help="drain the trees at once")
    parser.add_argument("--window", type=float, default=10.0, help="seconds (--together)")
    return parser.parse_args(argv)


def tree_peer(path: str) -> TreePeer:
    """A peer running underway from the tree at ``path``."""
    peer = TreePeer()
    peer.tree = str(Path(path).resolve())
    return peer


def drain_together(
    server: harness.Server, trees: list[tuple[str, str]], workers: int, tasks: int, window: float
) -> dict[str, float]:
    """Start every tree's workers at once on databases of their own; tasks per second each
    finished in the same ``window`` seconds, once all had started."""
    peers = {name: tree_peer(path) for name, path in trees}
    with contextlib.ExitStack() as stack:
        dsns = {
            name: stack.enter_context(server.database(f"compare_{i}"))
            for i, (name, _) in enumerate(trees)
        }
        probes = {}
        for name, peer in peers.items():
            peer.prepare(dsns[name])
            peer.prefill(dsns[name], list(range(tasks)))
            probes[name] = stack.enter_context(contextlib.closing(harness.Probe(tasks)))
        server.checkpoint()
        procs = {
            name: harness.Workers(
                peer.worker_commands(dsns[name], workers, burst=False),
                {**peer.worker_env(dsns[name]), **probes[name].env},
            )
            for name, peer in peers.items()
        }
        try:
            for name in peers:
                harness.poll(
                    lambda name=name: probes[name].unmarked() < tasks, 60, f"{name} to start"
                )
            start = time.time() + 1.0  # past every tree's first second
            time.sleep(window + 1.0)  # the measured window (a span, not a synchronisation)
        finally:
            for group in procs.values():
                group.stop()
        rates = {}
        for name in peers:
            marks = probes[name].marks()
            if marks.count(0.0) == 0 and max(marks) < start + window:
                raise SystemExit(
                    f"{name} drained all {tasks:,} tasks inside the window: give more --tasks"
                )
            rates[name] = sum(1 for m in marks if start <= m < start + window) / window
    return rates


def main(argv: list[str] | None = None) -> int:
    """Run the rounds; print each run, the medians and the ratios."""
    args = parse_args(argv)
    trees = [tuple(spec.split("=", 1)) for spec in args.tree]
    server = harness.Server.start(args.dsn)
    print(f"load before: {Path('/proc/loadavg').read_text().strip()}")
    results: dict[str, list[float]] = {name: [] for name, _ in trees}
    try:
        for round_ in range(args.rounds):
            if args.together:
                rates = drain_together(server, trees, args.workers, args.tasks, args.window)
            else:
                rates = {
                    name: harness.measure_drain(server, tree_peer(path), args.workers, args.tasks)[
                        "value"
                    ]
                    for name, path in trees
                }
            for name, rate in rates.items():
                results[name].append(rate)
                print(f"round {round_ + 1} {name}: {rate:,.0f} tasks/s", flush=True)
    finally:
        server.close()
    print(f"load after: {Path('/proc/loadavg').read_text().strip()}")
    first = statistics.median(results[trees[0][0]])
    for name, _ in trees:
        median = statistics.median(results[name])
        print(f"{name}: median {median:,.0f} tasks/s, {median / first:.2f}x {trees[0][0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
