"""Ratios to underway, the targets of issues #6 and #16, and the table a run prints."""

from __future__ import annotations

import math
from typing import Any

METRIC_ORDER = [
    "drain",
    "enqueue_single",
    "enqueue_batched",
    "latency_p50",
    "latency_p95",
    "latency_p99",
    "latency_max",
    "latency_stalls",
    "rss_growth",
]


def baseline_id(figure: dict[str, Any]) -> str | None:
    """The id of the underway figure this one is compared with (same metric and workers;
    pgbench with synchronous_commit=off against underway's async-commit mode)."""
    metric, peer = figure["metric"], figure["peer"]
    if metric == "rss_growth":
        return None
    workers = f"/w{figure['workers']}" if "workers" in figure else ""
    base = "underway_async" if peer == "pgbench_async" else "underway"
    return f"{metric}/{base}{workers}"


def add_ratios(results: dict[str, Any]) -> None:
    """Set each figure's ``ratio_to_underway`` (its value / underway's) and ``baseline``."""
    by_id = {f["id"]: f for f in results["figures"]}
    for figure in results["figures"]:
        base = by_id.get(baseline_id(figure) or "")
        figure["baseline"] = base["id"] if base else None
        ok = base is not None and base["value"] and not math.isnan(base["value"])
        figure["ratio_to_underway"] = figure["value"] / base["value"] if ok else None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #6's and #16's targets, each with the measured value and whether it is met (None: not
    measured in this run)."""
    value = {f["id"]: f["value"] for f in results["figures"]}

    def ratio(a: str, b: str) -> float | None:
        if a in value and b in value and value[b]:
            return value[a] / value[b]
        return None

    single = value.get("enqueue_single/underway")
    peers_single = [
        v
        for k, v in value.items()
        if k.startswith("enqueue_single/")
        and not k.startswith(("enqueue_single/underway", "enqueue_single/psycopg2"))
    ]
    rss = results.get("rss", {})
    checks: list[tuple[str, float | None, str, float]] = [
        (
            "default drain, 2 workers / pgbench, 2 clients",
            ratio("drain/underway/w2", "drain/pgbench/w2"),
            ">=",
            1.25,
        ),
        (
            "default drain, 2 workers / huey (PostgreSQL storage)",
            ratio("drain/underway/w2", "drain/huey/w2"),
            ">=",
            1.0,
        ),
        (
            "default drain, 2 workers / procrastinate",
            ratio("drain/underway/w2", "drain/procrastinate/w2"),
            ">=",
            2.5,
        ),
        (
            "async-commit drain / pgqueuer (psycopg, default batch), 2 workers",
            ratio("drain/underway_async/w2", "drain/pgqueuer_psycopg/w2"),
            ">=",
            1.0,
        ),
        (
            "async-commit drain / RQ forking Worker, 2 workers",
            ratio("drain/underway_async/w2", "drain/rq_fork/w2"),
            ">=",
            1.0,
        ),
        (
            "async-commit drain / RQ SimpleWorker, 2 workers",
            ratio("drain/underway_async/w2", "drain/rq_simple/w2"),
            ">=",
            1.0,
        ),
        ("pickup p50 (ms)", value.get("latency_p50/underway/w2"), "<=", 0.5),
        ("pickup p99 (ms)", value.get("latency_p99/underway/w2"), "<=", 1.0),
        ("pickups > 50 ms", value.get("latency_stalls/underway/w2"), "<=", 0),
        ("enqueue_many (tasks/s)", value.get("enqueue_batched/underway"), ">=", 150_000),
        (
            "single enqueue / bare psycopg2 INSERT + commit()",
            ratio("enqueue_single/underway", "enqueue_single/psycopg2_commit"),
            ">=",
            0.9,
        ),
        (
            "single enqueue / bare psycopg2 autocommit INSERT",
            ratio("enqueue_single/underway", "enqueue_single/psycopg2_autocommit"),
            ">=",
            0.9,
        ),
        (
            "single enqueue / fastest peer",
            single / max(peers_single) if single and peers_single else None,
            ">",
            1.0,
        ),
        (
            "1M finished rows / empty table, 2 workers",
            ratio("drain/underway_finished/w2", "drain/underway/w2"),
            ">=",
            0.9,
        ),
        (
            f"worker RSS growth over {rss.get('tasks', '?')} tasks, since start (MB)",
            value.get("rss_growth/underway/w2"),
            "<=",
            5.0,
        ),
    ]
    found = []
    for name, measured, op, threshold in checks:
        met = None
        if measured is not None:
            met = (
                measured >= threshold
                if op == ">="
                else (measured <= threshold if op == "<=" else measured > threshold)
            )
        found.append({"target": name, "value": measured, "want": f"{op} {threshold:g}", "met": met})
    return found


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}" if abs(x) < 1000 else f"{x:,.0f}"


def table(results: dict[str, Any]) -> str:
    """Every figure with its ratio to underway's, then the targets, as plain text."""
    figures = sorted(
        results["figures"],
        key=lambda f: (METRIC_ORDER.index(f["metric"]), f.get("workers", 0)),
    )
    rows = [("figure", "peer", "workers", "value", "unit", "x underway")]
    for f in figures:
        rows.append(
            (
                f["metric"],
                f["label"],
                str(f.get("workers", "")),
                _fmt(f["value"]),
                f["unit"],
                _fmt(f.get("ratio_to_underway")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 3 else c.rjust(w) if i != 4 else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines += ["", "targets (issues #6 and #16):"]
    for t in results.get("targets", []):
        mark = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"  {mark:>12}  {t['target']}: {_fmt(t['value'])} (want {t['want']})")
    rt = results.get("round_trips")
    if rt:
        lines.append(
            f"\nround trips per no-op task: underway {rt['underway_per_task']['per_task']:g} "
            f"({', '.join(rt['underway_per_task']['statements_per_task'])}), "
            f"pgbench {rt['pgbench_per_transaction']}"
        )
    for s in results.get("skipped", []):
        lines.append(f"skipped {s['what']}: {s['reason']}")
    for e in results.get("errors", []):
        lines.append(f"FAILED {e['what']}: {e['error'][:300]}")
    return "\n".join(lines)
