"""Compare underway's drain throughput between source trees, side by side in one run:
``python bench/compare.py --tree before=/tmp/before --tree after=.``

Each round drains the same number of pre-enqueued no-op tasks once per tree, in turn, on
one PostgreSQL (fresh database each time), with the workers importing underway from that
tree; it prints every run, each tree's median and its ratio to the first tree's. For a
change's before and after: check out the old commit into a directory (``git worktree``
or ``git archive``) and give both. The schema is migrated by this process's underway, so
compare trees with the same migrations.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the rounds; print each run, the medians and the ratios."""
    args = parse_args(argv)
    trees = [tuple(spec.split("=", 1)) for spec in args.tree]
    server = harness.Server.start(args.dsn)
    print(f"load before: {Path('/proc/loadavg').read_text().strip()}")
    results: dict[str, list[float]] = {name: [] for name, _ in trees}
    try:
        for round_ in range(args.rounds):
            for name, path in trees:
                peer = TreePeer()
                peer.tree = str(Path(path).resolve())
                run = harness.measure_drain(server, peer, args.workers, args.tasks)
                results[name].append(run["value"])
                print(f"round {round_ + 1} {name}: {run['value']:,.0f} tasks/s", flush=True)
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
