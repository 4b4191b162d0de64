"""Learning-curve plots from progress.csv files (needs matplotlib: pip install 'natpg[plot]')."""

from __future__ import annotations

import csv
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


def plot_runs(run_dirs: list[str], output: str, x: str = "env_steps", y: str = "ep_return_mean") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("natpg plot needs matplotlib: pip install 'natpg[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in run_dirs:
        data = read_progress(run)
        for col in (x, y):
            if col not in data:
                raise ValueError(f"column {col!r} not in {run!r}; columns: {sorted(data)}")
        ax.plot(data[x], data[y], label=os.path.basename(os.path.normpath(run)))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
