"""The latency plot: TTFT p50/p99 against concurrency, Sluice and direct (and the common
design's point), plus delivered tokens/s against offered; saved as bench/latency.png.
With the start scenarios' figures (bench/starts.py, bench/storm.py), a third panel: one
stream alone, the burst of starts and the reconnect storm, each beside its baseline and
target.

    python -m bench.plot [bench/out/load.json]    # redraw from a load run's raw figures
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["plot"]

PNG = Path(__file__).with_name("latency.png")
STYLE = {
    "direct": ("direct to the simulator (baseline)", "tab:gray", "o"),
    "sluice": ("Sluice (2 gevent workers)", "tab:blue", "s"),
    "sluice0": ("Sluice, RELAY_INTERVAL_MS=0", "tab:cyan", "x"),
    "sluice50": ("Sluice, RELAY_INTERVAL_MS=50", "tab:green", "+"),
    "common": ("common design (2 gevent workers)", "tab:red", "^"),
}


def plot(
    results: list[dict], path: Path = PNG, title: str = "", starts: dict | None = None
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if starts and results:
        fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 6))
    elif starts:
        fig, ax3 = plt.subplots(1, 1, figsize=(7, 6))
    else:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 6))
    if starts:
        starts_panel(ax3, starts)
    if not results:
        fig.suptitle(title or "Stream starts and the reconnect storm, 2-core box", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
    for kind, (label, color, marker) in STYLE.items():
        rows = sorted((r for r in results if r["kind"] == kind), key=lambda r: r["streams"])
        if not rows:
            continue
        n = [r["streams"] for r in rows]
        ax1.plot(
            n, [r["ttft_p50_ms"] for r in rows], marker=marker, color=color, label=f"{label}: p50"
        )
        ax1.plot(
            n,
            [r["ttft_p99_ms"] for r in rows],
            marker=marker,
            color=color,
            linestyle="--",
            label=f"{label}: p99",
        )
        ax2.plot(n, [r["delivered_tps"] for r in rows], marker=marker, color=color, label=label)
    base = next((r for r in results if r["kind"] == "direct" and r["streams"] == 200), None)
    if base is not None:  # the targets at 200 streams x 50 tokens/s
        ax1.plot(
            [200],
            [base["ttft_p50_ms"] + 20],
            marker="_",
            markersize=22,
            color="green",
            linestyle="none",
            label="target at 200: TTFT p50 ≤ direct + 20 ms",
        )
        ax2.plot(
            [200],
            [0.9 * base["delivered_tps"]],
            marker="_",
            markersize=22,
            color="green",
            linestyle="none",
            label="target at 200: ≥ 0.9 × direct",
        )
    offered = sorted({(r["streams"], r["offered_tps"]) for r in results})
    ax2.plot(
        [o[0] for o in offered],
        [o[1] for o in offered],
        color="black",
        linestyle=":",
        label="offered (streams × 50 tok/s)",
    )
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("concurrent streams")
    ax1.set_ylabel("time to first token, ms (log)")
    ax1.set_title("TTFT p50 (solid) and p99 (dashed)")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("concurrent streams")
    ax2.set_ylabel("delivered tokens/s (log)")
    ax2.set_title("throughput")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
        ticks = sorted({r["streams"] for r in results})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
    fig.suptitle(title or "Sluice vs direct, 50 tokens/s per stream, 2-core box", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def starts_panel(ax, starts: dict) -> None:
    """Bars: baseline and Sluice for each start scenario, with the target as a tick."""
    groups = []  # (label, baseline label, baseline ms, Sluice ms, target ms)
    if "single" in starts:
        d = starts["single"]
        groups.append(
            (
                "one stream alone:\nTTFT (median)",
                "direct",
                d["direct_ms"],
                d["sluice_ms"],
                d["direct_ms"] + 2.0,
            )
        )
    if "burst" in starts:
        m = starts["burst"]["median"]
        groups.append(
            (
                "burst of 200 starts:\nTTFT p50",
                "direct",
                m["direct"]["ttft_p50_ms"],
                m["sluice"]["ttft_p50_ms"],
                m["direct"]["ttft_p50_ms"] + 60.0,
            )
        )
    if "storm" in starts:
        d = starts["storm"]
        groups.append(
            (
                f"storm, {d.get('streams', 300)} resumes:\nfirst replayed event p50",
                "one resume alone",
                d["alone_ms"],
                d["first_event_p50_ms"],
                250.0,
            )
        )
    x = list(range(len(groups)))
    ax.bar(
        [i - 0.2 for i in x],
        [g[2] for g in groups],
        width=0.4,
        color="tab:gray",
        label="baseline, same run (direct; one resume alone)",
    )
    ax.bar(
        [i + 0.2 for i in x], [g[3] for g in groups], width=0.4, color="tab:blue", label="Sluice"
    )
    ax.plot(
        [i + 0.2 for i in x],
        [g[4] for g in groups],
        marker="_",
        markersize=30,
        color="green",
        linestyle="none",
        label="target",
    )
    for i, g in enumerate(groups):
        ax.annotate(f"{g[3]:.1f}", (i + 0.2, g[3]), ha="center", va="bottom", fontsize=8)
        ax.annotate(f"{g[2]:.1f}", (i - 0.2, g[2]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([g[0] for g in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title("stream starts and the reconnect storm")
    ax.grid(True, which="both", axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)


def main() -> int:
    source = (
        Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("out") / "load.json"
    )
    print(plot(json.loads(source.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
