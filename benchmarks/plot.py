"""PNG plots from ``results.json``: loss curves per task, the continual-learning accuracy
matrix, and step-time bars."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
            fig, ax = plt.subplots(figsize=(7, 3.5))
            values = [r["best"]["final_mean"] or 0.0 for r in records]
            ax.barh([r["optimizer"] for r in records], values)
            ax.set_xlabel("ms per step")
        elif name == "digits":
            fig, axes = plt.subplots(1, len(records), figsize=(2.2 * len(records), 2.6))
            axes = axes if len(records) > 1 else [axes]
            for ax, r in zip(axes, records):
                matrix = r["best"]["extra"].get("R")
                if matrix:
                    ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
                ax.set_title(f"{r['optimizer']}\nACC {r['best']['extra'].get('ACC', 0):.2f}",
                             fontsize=8)
                ax.set_xlabel("task j", fontsize=7)
                ax.set_ylabel("after task i", fontsize=7)
                ax.tick_params(labelsize=6)
        else:
            fig, ax = plt.subplots(figsize=(7, 4))
            for r in records:
                curve = [v for v in r["best"]["curve"] if v is not None]
                if curve:
                    ax.plot(curve, label=f"{r['optimizer']} (lr {r['best']['lr']:g})")
            ax.set_yscale("log" if name != "lm" else "linear")
            ax.set_xlabel("step (subsampled)")
            ax.set_ylabel("training loss")
            ax.legend(fontsize=7)
            ax.set_title(result["tasks"].get(name, name), fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
