"""CI smoke run of the benchmark suite (``bench/run.py --smoke``): underway only, a few
hundred tasks, on the test server; it must write valid JSON with every expected key, and
skip peers whose library is missing with a reason instead of failing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_smoke(
    script: str, dsn: str, out: Path, *extra: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``bench/SCRIPT --smoke`` as CI would; it must succeed."""
    command = [sys.executable, str(REPO / "bench" / script), "--smoke", "--dsn", dsn]
    proc = subprocess.run(
        [*command, "--out", str(out), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def run_bench(dsn: str, out: Path, *extra: str, env: dict | None = None) -> dict:
    """Run the bench suite's smoke mode and return its results.json."""
    run_smoke("run.py", dsn, out, *extra, env=env)
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_run_writes_every_figure(dsn: str, tmp_path: Path) -> None:
    results = run_bench(dsn, tmp_path)

    assert set(results) >= {"meta", "figures", "skipped", "errors", "targets", "round_trips"}
    assert results["errors"] == []
    meta = results["meta"]
    assert meta["mode"] == "smoke"
    assert meta["machine"]["cpu_count"] >= 1
    assert meta["postgresql"]["server_version"]
    assert "underway" in meta["versions"]

    ids = {f["id"] for f in results["figures"]}
    expected = {
        "drain/underway/w1",
        "drain/underway/w2",
        "drain/underway_async/w2",
        "drain/underway_twostep/w2",
        "drain/underway_finished/w2",
        "enqueue_single/underway",
        "enqueue_batched/underway",
        "enqueue_single/psycopg2_commit",
        "latency_p50/underway/w2",
        "latency_p99/underway/w2",
        "latency_stalls/underway/w2",
        "rss_growth/underway/w2",
    }
    assert expected <= ids, expected - ids
    for figure in results["figures"]:
        assert {"metric", "peer", "label", "value", "unit", "conditions"} <= set(figure)
        assert isinstance(figure["value"], (int, float)) and not math.isnan(figure["value"])
        if figure["metric"] != "latency_stalls":
            assert figure["value"] >= 0 if figure["metric"] == "rss_growth" else figure["value"] > 0
    underway = next(f for f in results["figures"] if f["id"] == "drain/underway/w2")
    assert underway["ratio_to_underway"] == 1.0
    assert underway["conditions"]["tasks"] == 300

    # The worker's no-op task costs two statements: the claim and the completion.
    assert results["round_trips"]["underway_per_task"]["per_task"] == 1
    assert {t["target"] for t in results["targets"]}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_missing_peers_are_skipped_with_a_reason(dsn: str, tmp_path: Path) -> None:
    # RQ needs its library and redis-server, looked up on PATH: with PATH emptied, RQ is
    # skipped here as it is in CI (where the bench extras are not installed), with a reason,
    # and the run still succeeds.
    results = run_bench(dsn, tmp_path, "--only", "rq", env={**os.environ, "PATH": ""})
    skipped = {s["what"]: s["reason"] for s in results["skipped"]}
    assert set(skipped) == {"RQ (forking Worker)", "RQ (SimpleWorker)"}
    assert all("redis-server" in r or "not installed" in r for r in skipped.values()), skipped
    assert results["figures"] == [] and results["errors"] == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scale_smoke_run_reports_every_figure(dsn: str, tmp_path: Path) -> None:
    """``bench/scale.py --smoke``: the deep-queue drain, the drain beside finished rows and
    the steady load all run and report their figures; the steady load's samples saw every
    task picked up and the tables' sizes, dead tuples and pickups measured."""
    proc = run_smoke("scale.py", dsn, tmp_path)
    results = json.loads((tmp_path / "scale.json").read_text())
    assert results["meta"]["mode"] == "smoke"
    pending, finished, steady = results["pending"], results["finished"], results["steady"]
    assert pending["large_pending"] == 10 * pending["small_pending"]
    assert pending["small_per_s"] > 0 and pending["large_per_s"] > 0
    assert finished["finished_rows"] == 20_000 and finished["finished_per_s"] > 0
    assert steady["enqueued"] > 0 and steady["enqueue_per_s"] > 0
    samples = steady["samples"]
    assert len(samples) >= 3
    assert samples[-1]["pending"] == 0 and samples[-1]["finished"] == steady["enqueued"]
    assert samples[-1]["task_mb"] > 0 and "task_ready_idx" in samples[-1]["indexes_mb"]
    assert all(not math.isnan(s["pickup_p50_ms"]) for s in samples[1:-1])
    assert set(steady["growth"]) >= {"task_mb", "task_indexes_mb", "attempt_mb", "finished"}
    assert "task_ready_idx" in steady["index_growth"]
    assert steady["growth"]["finished"]["second_half_max"] > 0
    assert "steady:" in proc.stdout and "pending:" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_profile_reports_the_drain_and_pgbench_side_by_side(dsn: str) -> None:
    """``bench/profile.py --pgbench``: a drain's CPU, WAL, commits and WAL flushes per task
    and the same counters for pgbench's loop, each measured (every commit flushed once or
    less: a flush may carry several commits; none with fsync off, as on the test server)."""
    command = [sys.executable, str(REPO / "bench" / "profile.py"), "--dsn", dsn]
    proc = subprocess.run(
        [*command, "--workers", "1", "--tasks", "2000", "--pgbench", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    drain, pgbench = proc.stdout.split("\nthis tree: ")[1].split("\npgbench, 1 clients")
    for figures in (drain, pgbench):
        commits = float(figures.split("commits per task: ")[1].split(";")[0])
        flushes = float(figures.split("WAL flushes per commit: ")[1].split()[0])
        assert 0.9 <= commits <= 1.1 and 0 <= flushes <= 1.05, figures
    assert "CPU per task, their server sessions" in drain
