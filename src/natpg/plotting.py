"""Learning-curve plots from progress.csv files (needs matplotlib: pip install 'natpg[plot]')."""

from __future__ import annotations

import csv
import math
import os


def read_progress(run_dir: str) -> dict[str, list[float]]:
    path = run_dir if run_dir.endswith(".csv") else os.path.join(run_dir, "progress.csv")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no progress.csv in {run_dir!r}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path!r} has no rows yet")
    return {k: [float(r[k]) if r[k] not in ("", None) else float("nan") for r in rows] for k in rows[0]}


def plot_runs(run_dirs: list[str], output: str, x: str = "env_steps",
              y: str = "ep_return_mean") -> dict[str, tuple[list[float], list[float]]]:
    """One line per run; rows where x or y is not a number (e.g. eval/* between evaluations) are left out.
    Returns the plotted points per run label."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("natpg plot needs matplotlib: pip install 'natpg[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted: dict[str, tuple[list[float], list[float]]] = {}
    for run in run_dirs:
        data = read_progress(run)
        for col in (x, y):
            if col not in data:
                raise ValueError(f"column {col!r} not in {run!r}; columns: {sorted(data)}")
        points = [(a, b) for a, b in zip(data[x], data[y]) if math.isfinite(a) and math.isfinite(b)]
        if not points:
            raise ValueError(f"column {y!r} of {run!r} has no finite values to plot")
        label = os.path.basename(os.path.normpath(run))
        xs, ys = (list(v) for v in zip(*points))
        ax.plot(xs, ys, label=label, marker="." if len(points) <= 50 else None)
        plotted[label] = (xs, ys)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return plotted
