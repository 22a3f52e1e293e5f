"""The replay's plots (PNG, matplotlib's Agg backend: no display needed).

- ``tpot_cdf.png``: the distribution of inter-token gaps per mode, the objective marked;
- ``timeline.png``: per mode, one panel over the replay: decode batch size, the share of wall
  time finetune ran, and every client gap against the objective (over it: orange when another
  request's prefill ran inside the gap, which no co-run mode causes; red otherwise);
- ``finetune_progress.png``: finetune tokens trained since the replay began, per mode;
- ``lent_memory.png``: KV slots lent to the job over time, per mode (only when any were lent).

Rates come from differencing the status counters between two reads (``POLL_S`` apart), so a
timeline point is the mean over that interval, not an instant.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sglang_harli.bench.report import first_token_times, spans_a_prefill  # noqa: E402

COLORS = {
    "off": "#555555",
    "idle-only": "#1f77b4",
    "time-sliced": "#ff7f0e",
    "harli": "#2ca02c",
    "naive": "#9467bd",
    "static": "#8c564b",
}


def write_all(report: dict, results: dict[str, dict], out: Path) -> list[Path]:
    ran = {m: r for m, r in results.items() if "run" in r}
    objective_ms = report["objective_ms"]
    written = [
        tpot_cdf(ran, objective_ms, out / "tpot_cdf.png"),
        timeline(ran, objective_ms, out / "timeline.png"),
        finetune_progress(ran, out / "finetune_progress.png"),
    ]
    if any(row["kv_lent_slots"] for r in ran.values() for row in r["run"]["timeline"]):
        written.append(lent_memory(ran, out / "lent_memory.png"))
    return written


def _save(fig, ax, path: Path, legend: str) -> Path:
    """The single-panel figures' common ending: grid, legend, written, closed."""
    ax.grid(alpha=0.3)
    ax.legend(loc=legend)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _gaps_ms(result: dict) -> list[float]:
    return [g * 1e3 for r in result["run"]["requests"] if r["error"] is None for g in r["gaps_s"]]


def tpot_cdf(results: dict[str, dict], objective_ms: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = objective_ms
    for mode, result in results.items():
        gaps = sorted(_gaps_ms(result))
        if not gaps:
            continue
        top = max(top, gaps[min(int(0.999 * len(gaps)), len(gaps) - 1)])
        ys = [(i + 1) / len(gaps) for i in range(len(gaps))]
        ax.plot(gaps, ys, label=mode, color=COLORS.get(mode))
    ax.axvline(
        objective_ms, color="red", linestyle="--", label=f"objective S = {objective_ms:.1f} ms"
    )
    ax.set_xlim(0, top * 1.1)  # the P99.9 of the slowest mode: a few outliers would hide the rest
    ax.set_xlabel(
        "inter-token gap seen by the client (ms): every gap, those another request's prefill\n"
        "lengthened included (the timeline tells them apart; no co-run mode causes them)",
        fontsize=8,
    )
    ax.set_ylabel("share of gaps at or below")
    ax.set_title("TPOT distribution per mode")
    return _save(fig, ax, path, legend="lower right")


def _rates(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per status interval: its end time, mean decode batch, finetune share of wall time."""
    out: dict[str, list[float]] = {"t": [], "batch": [], "finetune_share": []}
    for a, b in zip(rows, rows[1:], strict=False):
        dt = b["t"] - a["t"]
        iterations = b["decode_iterations"] - a["decode_iterations"]
        out["t"].append(b["t"])
        # no decode iteration in the interval (idle, or a long prefill): a break in the line,
        # not a batch of 0 a reader would take for an idle server
        out["batch"].append(
            (b["decode_tokens"] - a["decode_tokens"]) / iterations if iterations else math.nan
        )
        out["finetune_share"].append(
            min((b["finetune_s"] - a["finetune_s"]) / dt, 1.0) if dt else 0.0
        )
    return out


def timeline(results: dict[str, dict], objective_ms: float, path: Path) -> Path:
    rows = len(results)
    fig, axes = plt.subplots(
        2 * rows,
        1,
        figsize=(10, 3.6 * rows),
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1] * rows},
    )
    for i, (mode, result) in enumerate(results.items()):
        ax, share_ax = axes[2 * i, 0], axes[2 * i + 1, 0]
        requests_ = result["run"]["requests"]
        prefills = first_token_times(requests_)
        points: dict[str, list[tuple[float, float]]] = {"hit": [], "prefill": [], "miss": []}
        gaps = []
        for r in requests_:
            for t, g in zip(r["gap_times_s"], r["gaps_s"], strict=True):
                kind = (
                    "hit"
                    if g * 1e3 <= objective_ms
                    else "prefill"
                    if spans_a_prefill(t, g, prefills)
                    else "miss"
                )
                points[kind].append((t, g * 1e3))
                gaps.append(g * 1e3)
        for kind, size, color, label in (
            ("hit", 2, "#999999", "gap within S"),
            ("prefill", 4, "#ff9f40", "over S: another request's prefill ran in it"),
            ("miss", 5, "red", "over S: decode (and finetune) only"),
        ):
            points_ = points[kind]
            if points_:
                ax.scatter(
                    [t for t, _ in points_], [g for _, g in points_], s=size, c=color, label=label
                )
        ax.axhline(objective_ms, color="red", linestyle="--", linewidth=1, label="objective S")
        ax.set_ylabel("client gap (ms)")
        if gaps:
            ax.set_ylim(0, max(objective_ms * 2, sorted(gaps)[int(0.99 * (len(gaps) - 1))] * 1.2))
        ax.set_title(f"{mode}", loc="left", fontweight="bold")
        rates = _rates(result["run"]["timeline"])
        handles, labels = ax.get_legend_handles_labels()
        if rates["t"]:
            batch_ax = ax.twinx()
            batch_ax.step(rates["t"], rates["batch"], where="pre", color="#1f77b4")
            batch_ax.set_ylabel("decode batch", color="#1f77b4")
            batch_ax.set_ylim(bottom=0)
            handles.append(batch_ax.get_lines()[0])
            labels.append("decode batch (mean per 0.5 s; none: no decode)")
            share_ax.fill_between(
                rates["t"],
                [100 * s for s in rates["finetune_share"]],
                step="pre",
                color="#2ca02c",
                alpha=0.6,
            )
        else:
            share_ax.text(
                0.5,
                0.5,
                "no Harli scheduler: no finetune",
                ha="center",
                va="center",
                transform=share_ax.transAxes,
                fontsize=8,
            )
        share_ax.set_ylim(0, 100)
        share_ax.set_ylabel("finetune\n% of time", fontsize=8)
        ax.legend(handles, labels, loc="upper left", fontsize=7, ncol=3)
    axes[-1, 0].set_xlabel("time since the replay began (s)")
    fig.suptitle(f"Decode and finetune over the replay (objective S = {objective_ms:.1f} ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finetune_progress(results: dict[str, dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, result in results.items():
        rows = result["run"]["timeline"]
        if not rows:
            continue
        base = rows[0]["finetune_tokens"]
        ax.plot(
            [r["t"] for r in rows],
            [r["finetune_tokens"] - base for r in rows],
            label=mode,
            color=COLORS.get(mode),
        )
    ax.set_xlabel("time since the replay began (s)")
    ax.set_ylabel("finetune tokens trained (finished steps)")
    ax.set_title("Finetune progress per mode (same job, same trace)")
    return _save(fig, ax, path, legend="upper left")


def lent_memory(results: dict[str, dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # the modes often lend the same (everything the limit allows while decode needs little):
    # a dash pattern each, so a line drawn over another still shows
    dashes = iter([(None, None), (6, 3), (2, 2), (8, 2, 2, 2), (1, 3), (4, 4)])
    for mode, result in results.items():
        rows = result["run"]["timeline"]
        if rows:
            (line,) = ax.plot(
                [r["t"] for r in rows],
                [r["kv_lent_slots"] for r in rows],
                label=mode,
                color=COLORS.get(mode),
                linewidth=2,
            )
            pattern = next(dashes, (None, None))
            if pattern[0] is not None:
                line.set_dashes(pattern)
            cached = [r.get("kv_cached_slots") for r in rows]
            if any(c is not None for c in cached):  # what lending competes with
                ax.plot(
                    [r["t"] for r in rows],
                    [c or 0 for c in cached],
                    label=f"{mode}: radix cache",
                    color=COLORS.get(mode),
                    linewidth=1,
                    linestyle=":",
                )
    ax.set_xlabel("time since the replay began (s)")
    ax.set_ylabel("KV slots")
    ax.set_title("Unified memory: slots lent to the job (thick), cached prefixes (dotted)")
    ax.set_ylim(bottom=0)
    return _save(fig, ax, path, legend="lower right")
