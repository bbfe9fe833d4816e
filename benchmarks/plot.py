"""PNG plots from ``results.json``: loss curves per task, the continual-learning accuracy
matrix, and step-time bars.

Curves are seed 0's training loss at each optimizer's best lr against the step number; a curve
that coincides with an earlier one (torch's SGD and ``associative`` are the same rule: "=") or
lies within 0.5% of it everywhere ("≈") is drawn dashed with markers and says so in the
legend, which sits outside the axes. Digits panels show
the accuracy matrix R averaged over the seeds (the table's mean), with a colorbar.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_CLOSE = 5e-3  # curves within 0.5% of an earlier one everywhere would hide it: "≈", dashed
_STYLES = [("--", "o"), (":", "s"), ("-.", "^"), ((0, (5, 1, 1, 1)), "D")]


def _steps(best: dict, curve: list) -> tuple[list, bool]:
    """x values of a curve: its step numbers; files written before they were recorded give
    only the sample index (second value False)."""
    steps = best.get("curve_steps")
    if steps is not None and len(steps) == len(curve):
        return list(steps), True
    return list(range(len(curve))), False


def curve_figure(name: str, title: str, records: list):
    fig, ax = plt.subplots(figsize=(7.5, 4))
    drawn: list[tuple[str, np.ndarray, np.ndarray]] = []
    have_steps = True
    for r in records:
        best = r["best"]
        raw = best.get("curve") or []
        x, known = _steps(best, raw)
        points = [(s, v) for s, v in zip(x, raw) if v is not None]
        if not points:
            continue
        have_steps &= known
        xs, ys = (np.array(c, dtype=float) for c in zip(*points))
        label = f"{r['optimizer']} (lr {best['lr']:g})"
        if best.get("diverged"):  # every lr of its grid diverged: drawn thin, grey, said so
            ax.plot(xs, ys, label=f"{label} — diverged", color="0.6", linewidth=0.8,
                    linestyle=":")
            continue
        same = next((f"{'=' if np.allclose(oy, ys, rtol=1e-6, atol=1e-12) else '≈'} {other}"
                     for other, ox, oy in drawn if len(ox) == len(xs) and
                     np.array_equal(ox, xs) and np.allclose(oy, ys, rtol=_CLOSE, atol=0)),
                    None)
        if same is None:
            ax.plot(xs, ys, label=label, linewidth=1.2)
        else:  # would hide the earlier curve: dashed, with markers, on top
            twins = sum(1 for line in ax.get_lines() if line.get_label().endswith("dashed)"))
            style, marker = _STYLES[twins % len(_STYLES)]
            ax.plot(xs, ys, linestyle=style, marker=marker, markersize=3.5,
                    markevery=max(1, len(xs) // 12), markerfacecolor="none",
                    label=f"{label} ({same}, dashed)", linewidth=1.4, zorder=3)
        drawn.append((r["optimizer"], xs, ys))
    ax.set_yscale("log" if name != "lm" else "linear")
    ax.set_xlabel("step" if have_steps else "curve sample (this file has no step numbers)")
    ax.set_ylabel("training loss (seed 0)")
    if drawn:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title(title, fontsize=9)
    return fig


def digits_figure(records: list):
    n = len(records)
    cols = min(n, 5)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols + 0.9, 2.6 * rows),
                             layout="constrained", squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    image = None
    for ax, r in zip(axes.flat, records):
        best = r["best"]
        mean = best.get("extra_mean", {})
        matrix, what = mean.get("R"), f"mean of {r.get('seeds', '?')} seed(s)"
        if not matrix:  # files written before the mean was recorded: seed 0's
            matrix, what = best.get("extra", {}).get("R"), "seed 0"
        acc = mean.get("ACC", best.get("extra", {}).get("ACC"))
        if matrix:
            image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
            for i, row in enumerate(matrix):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5,
                            color="white" if v < 0.6 else "black")
            ax.set_xticks(range(len(matrix)))
            ax.set_yticks(range(len(matrix)))
        acc_text = f"ACC {acc:.3f}" if acc is not None else "ACC —"
        ax.set_title(f"{r['optimizer']} (lr {best['lr']:g})\n{acc_text}; R: {what}",
                     fontsize=7)
        ax.set_xlabel("accuracy on task j", fontsize=7)
        ax.set_ylabel("after training task i", fontsize=7)
        ax.tick_params(labelsize=6)
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes.flat), shrink=0.85, pad=0.02)
        bar.set_label("test accuracy", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    return fig


def throughput_figure(records: list):
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(records) + 1.2))
    values = [r["best"]["final_mean"] or 0.0 for r in records]
    errors = [r["best"].get("final_std") or 0.0 for r in records]
    ax.barh([r["optimizer"] for r in records], values, xerr=errors)
    ax.invert_yaxis()
    ax.set_xlabel("ms per optimizer step (median of the timed steps; mean ± std over seeds)")
    return fig


def plot(directory: str) -> list[str]:
    with open(os.path.join(directory, "results.json")) as f:
        result = json.load(f)
    written = []
    by_task: dict[str, list] = {}
    for record in result["records"]:
        by_task.setdefault(record["task"], []).append(record)
    for name, records in by_task.items():
        path = os.path.join(directory, f"{name}.png")
        if name == "throughput":
            fig = throughput_figure(records)
        elif name == "digits":
            fig = digits_figure(records)
        else:
            fig = curve_figure(name, result.get("tasks", {}).get(name, name), records)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
