"""The PNG chart of a run: drain throughput, pickup latency, enqueue rates and worker RSS,
with underway's bars highlighted. Needs matplotlib (a bench-only extra); without it the run
says so and writes the JSON alone."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

UNDERWAY = "#d95f02"
OTHERS = "#7570b3"


def render(results: dict[str, Any], path: Path) -> Path | None:
    """Draw the chart to ``path``; None (and a note) when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        print("no chart: matplotlib is not installed (pip install -e '.[bench]')")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = results["figures"]
    fig, axes = plt.subplots(2, 2, figsize=(15, 11))
    _grouped(
        axes[0][0],
        figures,
        "drain",
        ["w1", "w2"],
        "drain throughput (tasks/s; higher is better)",
        {"w1": "1 worker / client", "w2": "2 workers / clients"},
    )
    _grouped(
        axes[0][1],
        figures,
        ("latency_p50", "latency_p99"),
        ["w2"],
        "pickup latency, 2 workers (ms, log; lower is better)",
        {"latency_p50": "p50", "latency_p99": "p99"},
        log=True,
    )
    _grouped(
        axes[1][0],
        figures,
        ("enqueue_single", "enqueue_batched"),
        [""],
        "enqueue rate (tasks/s, log; higher is better)",
        {"enqueue_single": "one per transaction", "enqueue_batched": "batched"},
        log=True,
    )
    _rss(axes[1][1], results.get("rss"))
    meta = results.get("meta", {})
    machine = meta.get("machine", {})
    fig.suptitle(
        f"underway benchmarks ({meta.get('mode', '?')} run): {machine.get('cpu_count')} cores, "
        f"PostgreSQL {meta.get('postgresql', {}).get('server_version', '?')}, "
        f"fsync {meta.get('postgresql', {}).get('fsync', '?')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _grouped(
    ax: Any,
    figures: list[dict[str, Any]],
    metrics: str | tuple[str, ...],
    worker_keys: list[str],
    title: str,
    legend: dict[str, str],
    log: bool = False,
) -> None:
    """Bars per peer, one per (metric, workers) series; underway's in its own colour."""
    metrics = (metrics,) if isinstance(metrics, str) else metrics
    series = [(m, w) for m in metrics for w in worker_keys]
    value = {
        (f["metric"], f"w{f['workers']}" if "workers" in f else "", f["label"]): f["value"]
        for f in figures
    }
    labels: list[str] = []
    underway: set[str] = set()
    for f in figures:
        if f["metric"] in metrics and f["label"] not in labels:
            labels.append(f["label"])
            if f["peer"].startswith("underway"):
                underway.add(f["label"])
    if not labels:
        ax.set_title(title + ": not measured")
        ax.axis("off")
        return
    width = 0.8 / len(series)
    for k, (metric, workers) in enumerate(series):
        xs, heights, colours = [], [], []
        for i, label in enumerate(labels):
            v = value.get((metric, workers, label))
            if v is not None and v > 0:
                xs.append(i + (k - (len(series) - 1) / 2) * width)
                heights.append(v)
                colours.append(UNDERWAY if label in underway else OTHERS)
        alpha = 0.55 + 0.45 * k / max(len(series) - 1, 1)
        bars = ax.bar(
            xs,
            heights,
            width,
            color=colours,
            alpha=alpha,
            label=legend.get(metric if len(metrics) > 1 else workers, metric),
        )
        ax.bar_label(bars, fmt=_short, fontsize=7, rotation=90, padding=2)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    for tick in ax.get_xticklabels():
        if tick.get_text() in underway:
            tick.set_color(UNDERWAY)
            tick.set_fontweight("bold")
    if log:
        ax.set_yscale("log")
    ax.margins(y=0.15)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def _short(v: float) -> str:
    """A bar's label: whole numbers with thousands separators, small ones with decimals."""
    return f"{v:,.0f}" if v >= 10 else f"{v:.2f}"


def _rss(ax: Any, rss: dict[str, Any] | None) -> None:
    """Each underway worker's RSS at start, after the warm-up tasks and at the end."""
    if not rss:
        ax.set_title("worker RSS: not measured")
        ax.axis("off")
        return
    keys = [k for k in rss if k.startswith("rss_")]
    for w in range(len(rss[keys[0]])):
        ax.plot(
            [k[4:-3].replace("_", " ") for k in keys],
            [rss[k][w] for k in keys],
            marker="o",
            color=UNDERWAY,
            alpha=0.6 + 0.4 * w,
            label=f"worker {w + 1}",
        )
    values = [v for k in keys for v in rss[k]]
    ax.set_ylim(min(values) - 5, max(values) + 5)  # the +-5 MB band of the target
    ax.set_ylabel("RSS (MB)")
    ax.set_title(f"underway worker RSS over {rss['tasks']:,} tasks", fontsize=10)
    ax.legend(fontsize=8)
