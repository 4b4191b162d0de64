"""Learning-curve plots from progress.csv files (needs matplotlib: natpg's [plot] extra)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any

import numpy as np

from .checkpoint import CONFIG_JSON, PROGRESS_CSV, read
from .errors import install_hint, warn


class NothingToPlot(ValueError):
    """A run whose progress.csv has no row with finite x and y (yet)."""


def _progress_path(run_dir: str) -> str:
    return run_dir if run_dir.endswith(".csv") else os.path.join(run_dir, PROGRESS_CSV)


def _run_config(run_dir: str) -> dict[str, Any] | None:
    """The run's config.json (beside its progress.csv), or None when it has none."""
    path = os.path.join(os.path.dirname(run_dir) if run_dir.endswith(".csv") else run_dir, CONFIG_JSON)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as exc:
        raise ValueError(f"{path!r} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path!r} holds {type(config).__name__}, not a run's settings by name")
    return config


def read_progress(run_dir: str) -> dict[str, list[float]]:
    path = _progress_path(run_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no progress.csv in {run_dir!r}")
    with open(path, newline="") as f:
        text = f.read()
    if not text.endswith("\n"):  # a row being written, or cut off by a kill: not a row yet (the logger drops it too)
        text = text[:text.rfind("\n") + 1]
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    if not rows:
        raise NothingToPlot(f"{path!r} has no rows yet")
    columns: dict[str, list[float]] = {k: [] for k in rows[0] if k is not None}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if None in row:  # csv puts the fields beyond the header's under None
            raise ValueError(f"{path!r}, line {line}: {len(row) - 1 + len(row[None])} fields, but the header names "
                             f"{len(row) - 1}")
        for k, values in columns.items():
            try:
                values.append(float(row[k]) if row[k] not in ("", None) else float("nan"))
            except ValueError:
                raise ValueError(f"{path!r}, line {line}, column {k!r}: {row[k]!r} is not a number") from None
    return columns


def run_settings(config: dict[str, Any] | None) -> dict[str, str] | None:
    """A run's settings from its config.json (``_run_config``) as flat 'section.key' entries, each value
    JSON-encoded (algorithm and env_id included), or None when the run has none (a bare progress.csv). The seed and
    the ``run`` section (logging, checkpoints, evaluation, device, threads) and the Ray sampler's address and
    timeouts are left out: they do not change what is learned."""
    if config is None:
        return None
    flat: dict[str, str] = {}
    for key, value in config.items():
        if key == "seed" or key == "run":
            continue
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": json.dumps(v) for k, v in value.items() if f"{key}.{k}" not in NOT_LEARNING})
        else:
            flat[key] = json.dumps(value)
    return flat


def _schedule_end(run_dir: str) -> Any:
    """Where the run's schedules decayed towards (its checkpoint's schedule_end; before natpg recorded it, where
    its last learn call was to end), or the directory when that cannot be read, so that it counts as different."""
    try:
        meta = read(run_dir)[0]
    except Exception:  # no checkpoint, or not one natpg reads: unknown
        return run_dir
    end = meta.get("schedule_end", meta.get("target_steps"))
    return run_dir if end is None else end


def _logged_rows(run_dir: str) -> int:
    try:
        with open(_progress_path(run_dir), "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


NOT_LEARNING = {"distributed.ray_address", "distributed.worker_timeout", "distributed.worker_start_timeout"}


def _label(run: str) -> str:
    return os.path.basename(os.path.normpath(run))


def run_labels(runs: list[str]) -> list[str]:
    """Each run's directory name, lengthened to as many trailing path parts as it takes to tell it from the
    others ('exp1/s0' and 'exp2/s0' rather than 's0' twice)."""
    parts = [os.path.normpath(os.path.abspath(run)).split(os.sep) for run in runs]
    depth = [1] * len(runs)
    while True:
        labels = [os.sep.join(p[-d:]) for p, d in zip(parts, depth)]
        clash = [i for i, label in enumerate(labels) if labels.count(label) > 1 and depth[i] < len(parts[i])]
        if not clash:
            return [_label(run) if d == 1 else label for run, label, d in zip(runs, labels, depth)]
        for i in clash:
            depth[i] += 1


def _distinct(runs: list[str]) -> list[str]:
    """The runs with a directory given twice (by any path) kept once: one run is one seed."""
    seen: set[str] = set()
    return [run for run in runs if not (os.path.realpath(run) in seen or seen.add(os.path.realpath(run)))]


def group_by_settings(run_dirs: list[str]) -> list[tuple[str, list[str]]]:
    """Runs that differ only in their seed, grouped; each group labelled 'algorithm env_id' plus the settings in
    which the groups differ (e.g. 'npg Hopper-v5 max_kl=0.02'). Runs without a config.json stay alone."""
    groups: dict[str, list[str]] = {}
    keyed: dict[str, dict[str, str]] = {}
    seeds: dict[tuple[str, Any], list[str]] = {}  # (settings, seed) -> its runs
    for run in _distinct(run_dirs):
        config = _run_config(run)
        flat = run_settings(config)
        key = run if flat is None else json.dumps(flat, sort_keys=True)
        seeds.setdefault((key, None if config is None else config.get("seed")), []).append(run)
        if flat is not None:
            keyed[key] = flat
    for (key, seed), runs in seeds.items():
        kept = max(runs, key=_logged_rows)  # of a run and its --resume copy, the longer
        if len(runs) > 1:
            warn(f"{', '.join(repr(r) for r in runs if r != kept)} and {kept!r} have the same settings "
                 f"and seed (copies of one run, or the same run again): counted once, as {kept!r}, which "
                 f"logged the most rows", UserWarning)
        groups.setdefault(key, []).append(kept)
    for key, runs in groups.items():
        scheduled = [k.split(".", 1)[1] for k in ("step.kl_schedule", "step.lr_schedule")
                     if keyed.get(key, {}).get(k, '"constant"') != '"constant"']
        if len(runs) > 1 and scheduled and len({_schedule_end(run) for run in runs}) > 1:
            warn(f"{', '.join(repr(r) for r in runs)} decay by {' and '.join(scheduled)} towards where each "
                 f"was told to end (--steps, schedule_end), which config.json does not record and their "
                 f"checkpoints give differently (or not at all): seeds of one setting only if that end is "
                 f"the same", UserWarning)
    varying = sorted({k for flat in keyed.values() for k in flat
                      if len({f.get(k) for f in keyed.values()}) > 1} - {"algorithm", "env_id"})
    labelled = []
    for key, runs in groups.items():
        flat = keyed.get(key)
        if flat is None:
            labelled.append((_label(key), runs))
            continue
        words = [json.loads(flat["algorithm"]), json.loads(flat["env_id"])]
        words += [f"{k.split('.', 1)[-1]}={json.loads(flat[k]) if k in flat else None}" for k in varying]
        labelled.append((" ".join(str(w) for w in words), runs))
    return labelled


def _points(run: str, x: str, y: str) -> tuple[list[float], list[float]]:
    data = read_progress(run)
    for col in (x, y):
        if col not in data:
            raise ValueError(f"column {col!r} not in {run!r}; columns: {sorted(data)}")
    points = [(a, b) for a, b in zip(data[x], data[y]) if math.isfinite(a) and math.isfinite(b)]
    if not points:
        raise NothingToPlot(f"column {y!r} of {run!r} has no finite values to plot")
    xs, ys = (list(v) for v in zip(*points))
    return xs, ys


def seed_band(curves: list[tuple[list[float], list[float]]]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Mean, min and max across runs on the x values of all of them, each run linearly interpolated between its
    own points, over the x range every run covers (so a run that stopped early does not pull the mean)."""
    if any(b <= a for xs, _ in curves for a, b in zip(xs, xs[1:])):
        raise ValueError("averaging over seeds needs an x column that increases along each run (e.g. env_steps)")
    lo = max(xs[0] for xs, _ in curves)
    hi = min(xs[-1] for xs, _ in curves)
    if lo > hi:
        raise ValueError(f"the runs share no range of x to average over (one starts at {lo}, another ends at {hi})")
    grid = sorted({v for xs, _ in curves for v in xs if lo <= v <= hi})
    table = np.array([np.interp(grid, xs, ys) for xs, ys in curves])
    return grid, table.mean(0).tolist(), table.min(0).tolist(), table.max(0).tolist()


def plot_runs(run_dirs: list[str], output: str, x: str = "env_steps", y: str = "ep_return_mean",
              seeds: bool = False) -> dict[str, tuple[list[float], list[float]]]:
    """One line per run; rows where x or y is not a number (e.g. eval/* between evaluations) are left out.
    With ``seeds=True``, runs that differ only in their seed are drawn as one line, the mean across them, over a
    band from their min to their max (``group_by_settings``, ``seed_band``). Returns the plotted line per label."""
    if isinstance(run_dirs, (str, os.PathLike)) or not run_dirs:
        raise ValueError(f"run_dirs must be a non-empty list of run directories (or progress.csv files), got "
                         f"{run_dirs!r}")
    run_dirs = [os.fspath(run) for run in run_dirs]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(f"natpg plot needs matplotlib: {install_hint('plot')}") from None
    groups = group_by_settings(run_dirs) if seeds else list(zip(run_labels(run_dirs), ([run] for run in run_dirs)))
    curves, empty = [], []
    for label, runs in groups:  # all read before drawing
        points = []
        for run in runs:
            try:
                points.append(_points(run, x, y))
            except NothingToPlot as exc:  # a run too young to have a value yet, beside others that have
                empty.append(exc)
        if points:
            curves.append((label, points))
    if not curves:
        raise empty[0]
    for exc in empty:
        warn(f"{exc}: left out", UserWarning)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted: dict[str, tuple[list[float], list[float]]] = {}
    for label, runs in curves:
        if seeds:
            try:
                xs, ys, low, high = seed_band(runs)
            except ValueError as exc:
                raise ValueError(f"{label}: {exc}") from None
            if cut := sum(r[0][0] < xs[0] or r[0][-1] > xs[-1] for r in runs):
                warn(f"{label}: the mean over seeds is drawn where all {len(runs)} runs have points, {x} "
                     f"{xs[0]:g} to {xs[-1]:g}; {cut} of them logged outside it, left out", UserWarning)
            label = f"{label} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        else:
            xs, ys = runs[0]
        (line,) = ax.plot(xs, ys, label=label, marker="." if len(xs) <= 50 else None)
        if seeds and len(runs) > 1:
            ax.fill_between(xs, low, high, alpha=0.2, color=line.get_color())
        plotted[label] = (xs, ys)
    ax.set_xlabel(x)
    ax.set_ylabel(y + (" (mean, min–max over seeds)" if seeds else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return plotted
