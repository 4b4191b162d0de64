"""Progress logging: CSV (progress.csv), TensorBoard events and a live progress bar."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import numbers
import os
import re
from typing import Any

import numpy as np

from .checkpoint import EPISODES_CSV, EVENTS_LOG, PROGRESS_CSV, TENSORBOARD_DIR, atomic_write
from .errors import warn


EPISODE_COLUMNS = ["env_steps", "return", "length"]


class Logger:
    """Writes one row per logged update to progress.csv, and one per finished training episode to episodes.csv.
    A numeric key not seen before (a callback's own metric, a column a newer natpg adds to a continued run)
    becomes a new column of progress.csv: the file is rewritten with it, NaN in the earlier rows. Non-numeric
    values go to ``events.log``.

    ``resume=True`` appends to an existing progress.csv (keeping its columns) and episodes.csv. With
    ``resume_step`` (the env_steps of the checkpoint being resumed) it first drops from both the rows written
    after that checkpoint (by a run killed between a log row and its next checkpoint) and a partly written last
    line, so that the resumed files equal those an uninterrupted run writes; so too events.log's lines.
    """

    def __init__(self, out_dir: str | None, tensorboard: bool = True, progress_bar: bool = False,
                 total_steps: int = 0, resume: bool = False, resume_step: int | None = None,
                 info_keys: tuple[str, ...] = ()):
        self.out_dir = out_dir
        self._csv_file = None
        self._episodes_file = None
        self._writer = None
        self._columns: list[str] | None = None
        self.last_step: int | None = None  # env_steps of the last row written to progress.csv
        self._bar = None
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, PROGRESS_CSV)
            if resume and os.path.exists(path):
                self._columns = _truncate_log(path, resume_step)
                self._csv_file = open(path, "a", newline="")
            else:
                self._csv_file = open(path, "w", newline="")
            path = os.path.join(out_dir, EVENTS_LOG)
            if resume and resume_step is not None and os.path.exists(path):
                _truncate_events(path, resume_step)
            path = os.path.join(out_dir, EPISODES_CSV)
            self._episode_columns = EPISODE_COLUMNS + list(info_keys)
            self._info_index = {key: j for j, key in enumerate(info_keys)}
            header = _truncate_log(path, resume_step) if resume and os.path.exists(path) else None
            if header is not None and header[:len(EPISODE_COLUMNS)] == EPISODE_COLUMNS:
                if new := [k for k in self._episode_columns if k not in header]:  # info_keys added on load
                    _append_columns(path, new)
                self._episode_columns = header + new  # keys no longer recorded stay, NaN from here
                self._episodes_file = open(path, "a", newline="")
            else:
                self._episodes_file = open(path, "w", newline="")
                csv.writer(self._episodes_file).writerow(self._episode_columns)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:  # tensorboard is a dependency, but a stripped install should still train
                    SummaryWriter = None
                if SummaryWriter is not None:
                    # On resume, TensorBoard drops what an earlier session logged after the checkpoint (a run killed
                    # between a row and its next checkpoint), as progress.csv does.
                    purge = resume_step + 1 if resume and resume_step is not None else None
                    self._writer = SummaryWriter(os.path.join(out_dir, TENSORBOARD_DIR), purge_step=purge)
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step or 0,  # a resumed run's bar starts where it is
                             unit="step", unit_scale=True, dynamic_ncols=True)

    def record(self, row: dict[str, Any]) -> None:
        numeric = {k: x for k, v in row.items() if (x := _number(v)) is not None}
        text = {k: v for k, v in row.items() if k not in numeric}
        step = int(numeric.get("env_steps", 0))
        if self._csv_file is not None:
            if self._columns is None:
                self._columns = list(numeric)
                csv.writer(self._csv_file).writerow(self._columns)
            elif new := [k for k in numeric if k not in self._columns]:
                self._add_columns(new)
            csv.writer(self._csv_file).writerow([_fmt(numeric.get(c, float("nan"))) for c in self._columns])
            self._csv_file.flush()
            self.last_step = step
            if text:
                with open(os.path.join(self.out_dir, EVENTS_LOG), "a") as f:
                    f.write(f"env_steps={step} {text}\n")
                    f.flush()
                    os.fsync(f.fileno())  # rare (text values: faults), and on disk before the next checkpoint
        if self._writer is not None:
            for k, v in numeric.items():
                if k != "env_steps" and math.isfinite(v):
                    self._writer.add_scalar(k, v, step)
        if self._bar is not None:
            self._bar.n = step
            ret = numeric.get("ep_return_mean", float("nan"))
            self._bar.set_postfix_str(f"return {ret:.1f}", refresh=False)  # tqdm itself shows steps/s
            self._bar.refresh()

    def record_episodes(self, env_steps: int, episodes: list[tuple[float, int, tuple[float, ...]]]) -> None:
        """One episodes.csv row per finished training episode, (return, length, info_keys' values) as Monitor
        files have them, in the order they ended; ``env_steps``: the count at the end of the rollout it ended in."""
        if self._episodes_file is not None and episodes:
            at = self._info_index
            csv.writer(self._episodes_file).writerows(
                [env_steps, _fmt(ret), length, *(_fmt(values[at[c]]) if c in at else "nan"
                                                   for c in self._episode_columns[len(EPISODE_COLUMNS):])]
                for ret, length, values in episodes)
            self._episodes_file.flush()

    def _add_columns(self, new: list[str]) -> None:
        """progress.csv with ``new`` columns after the others, NaN in the rows written."""
        path = self._csv_file.name
        self._csv_file.close()
        _append_columns(path, new)
        self._columns += new
        self._csv_file = open(path, "a", newline="")

    def sync(self) -> None:
        """progress.csv and episodes.csv on disk, before a checkpoint is: after a power cut the checkpoint is
        not ahead of the rows it continues from. A log that cannot be written does not stop the checkpoint."""
        for file in (self._csv_file, self._episodes_file):
            if file is not None and not file.closed:
                with contextlib.suppress(OSError):
                    file.flush()
                    os.fsync(file.fileno())

    def close(self) -> None:
        self.sync()
        if self._csv_file is not None:
            self._csv_file.close()
        if self._episodes_file is not None:
            self._episodes_file.close()
        if self._writer is not None:
            self._writer.close()
        if self._bar is not None:
            self._bar.close()


def _number(v: Any) -> float | None:
    """``v`` as a float where it is one number: Python's, NumPy's (np.float32, np.int64, a 0-d array) or a
    one-element torch tensor; None otherwise (text and bools go to events.log)."""
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, numbers.Real):
        return float(v)
    if getattr(v, "ndim", None) == 0 or (hasattr(v, "numel") and callable(v.numel) and v.numel() == 1):
        try:
            item = v.item()
        except (TypeError, ValueError, RuntimeError):
            return None
        return float(item) if isinstance(item, numbers.Real) and not isinstance(item, bool) else None
    return None


def _append_columns(path: str, new: list[str]) -> None:
    """Rewrite the CSV log at ``path`` (atomically) with ``new`` columns after the others, NaN in its rows."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows = [rows[0] + new] + [row + ["nan"] * len(new) for row in rows[1:]]

    def write(f) -> None:
        text = io.StringIO()
        csv.writer(text).writerows(rows)
        f.write(text.getvalue().encode())

    atomic_write(path, write)


def _fmt(v: float) -> str:
    return repr(v) if not float(v).is_integer() else str(int(v)) if abs(v) < 1e15 else repr(v)


def _truncate_events(path: str, resume_step: int) -> None:
    """Keep events.log's lines (``env_steps=N {...}``) with N ≤ resume_step, as ``_truncate_log`` keeps rows."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]  # a line cut short by a kill
    step = re.compile(r"env_steps=(\d+) ")
    new = "".join(line for line in lines if not (found := step.match(line)) or int(found[1]) <= resume_step)
    if new != text:
        atomic_write(path, lambda f: f.write(new.encode("utf-8", errors="surrogateescape")))


def _truncate_log(path: str, resume_step: int | None) -> list[str] | None:
    """Keep a log's (progress.csv's, episodes.csv's) header and its complete rows with env_steps ≤ resume_step
    (all complete rows when None); rewrite the file atomically when anything is dropped. Returns the header
    (None if empty)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not a log natpg can continue (not UTF-8 text: {exc.reason} at byte "
                         f"{exc.start}); move it away to continue the run without it") from None
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]  # a row cut short by a kill
    if not lines:
        header = None
    else:
        header = next(csv.reader([lines[0]]))
        if "env_steps" in header and resume_step is not None:
            col = header.index("env_steps")
            kept, unreadable = [lines[0]], []
            for number, line in enumerate(lines[1:], start=2):
                row = next(csv.reader([line]), [])
                try:
                    step = float(row[col])
                except (IndexError, ValueError):
                    unreadable.append(number)
                    continue
                if step > resume_step:
                    break
                kept.append(line)
            lines = kept
            if unreadable:
                warn(f"{path}: line(s) {unreadable} hold no row natpg can read (no env_steps) and are dropped as the "
                     f"run goes on; the rows around them are kept", UserWarning)
    new = "".join(lines)
    if new != text:
        atomic_write(path, lambda f: f.write(new.encode()))
    return header
