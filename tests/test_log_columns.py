"""docs/logs.md documents every column of progress.csv and episodes.csv, and only columns natpg writes.

Each algorithm, and each setting that adds columns, is trained for two tiny updates into its own run
directory; the headers of its progress.csv and episodes.csv are compared with the column names in the
first cell of the tables of docs/logs.md (the tables under "## progress.csv" for progress.csv, those under
"## episodes.csv" for episodes.csv). The info-key columns are documented as patterns: ``ep_KEY_mean`` in
progress.csv and ``KEY`` in episodes.csv.
"""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path

import pytest

import natpg

DOC = Path(__file__).resolve().parents[1] / "docs" / "logs.md"
TINY = dict(n_envs=2, n_steps=16, hidden=(8,), critic_hidden=(8,), critic_epochs=1, tensorboard=False)
INFO_KEY = "is_success"  # CartPole's info has no such key: its columns are NaN, but written

# (run name, algorithm class, environment, settings): every algorithm on a discrete and a continuous task,
# then each setting that adds (or could add) columns.
RUNS = [
    *[(f"{algo.lower()}_{env.split('-')[0].lower()}", algo, env, {})
      for algo in ("NPG", "TRPO", "ACKTR", "NAC", "PPO", "VPG") for env in ("CartPole-v1", "Pendulum-v1")],
    ("eval", "NPG", "CartPole-v1", dict(eval_every=32, eval_episodes=1)),
    ("info_keys", "NPG", "CartPole-v1", dict(info_keys=(INFO_KEY,))),
    ("fisher_kfac", "NPG", "Pendulum-v1", dict(fisher="kfac")),
    ("fisher_diagonal", "NPG", "Pendulum-v1", dict(fisher="diagonal")),
    ("fisher_empirical", "NPG", "Pendulum-v1", dict(fisher="empirical")),  # N = 32 < P: Woodbury
    ("fisher_empirical_cg", "NPG", "Pendulum-v1", dict(fisher="empirical", hidden=())),  # N ≥ P: CG
    ("fisher_dense", "NPG", "Pendulum-v1", dict(fisher="dense")),
    ("precondition_kfac", "NPG", "Pendulum-v1", dict(cg_preconditioner="kfac")),
    ("precondition_diagonal", "NPG", "Pendulum-v1", dict(cg_preconditioner="diagonal")),
    ("fvp_subsample", "NPG", "Pendulum-v1", dict(fvp_subsample=0.5)),
    ("step_adam", "NPG", "Pendulum-v1", dict(step="adam")),
    ("step_fixed", "NPG", "Pendulum-v1", dict(step="fixed")),
    ("step_linesearch", "NPG", "Pendulum-v1", dict(step="linesearch")),
    ("step_kfac_clip", "NPG", "Pendulum-v1", dict(step="kfac_clip")),
    ("nac_fixed", "NAC", "Pendulum-v1", dict(step="fixed")),
    ("kl_schedule", "NPG", "Pendulum-v1", dict(kl_schedule="linear")),
    ("lr_schedule", "PPO", "CartPole-v1", dict(lr_schedule="linear")),
    ("critic_kfac", "NPG", "Pendulum-v1", dict(critic_optimizer="kfac")),
    ("value_clip", "PPO", "Pendulum-v1", dict(value_clip=0.2)),
    ("target_kl", "PPO", "Pendulum-v1", dict(target_kl=0.01)),
    ("sampler_workers", "NPG", "CartPole-v1", dict(sampler="workers")),
    ("nonfinite_drop", "NPG", "CartPole-v1", dict(nonfinite_env="drop")),
]


def _header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, dict[str, set[str]]]:
    """{"progress": {column: runs that wrote it}, "episodes": {...}} over every run of RUNS."""
    out: dict[str, dict[str, set[str]]] = {"progress": {}, "episodes": {}}
    root = tmp_path_factory.mktemp("log_columns")
    for name, algo, env, settings in RUNS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # settings a tiny run leaves unread are warned of, not our concern
            agent = getattr(natpg, algo)(env, seed=0, **{**TINY, **settings})
            agent.learn(2 * agent.config.batch_size, out_dir=root / name)
            agent.close()
        for kind in ("progress", "episodes"):
            for column in _header(root / name / f"{kind}.csv"):
                out[kind].setdefault(_pattern(kind, column), set()).add(name)
    return out


def _pattern(kind: str, column: str) -> str:
    """The name docs/logs.md documents ``column`` under: the info-key columns as their pattern."""
    if kind == "progress" and column == f"ep_{INFO_KEY}_mean":
        return "ep_KEY_mean"
    if kind == "episodes" and column == INFO_KEY:
        return "KEY"
    return column


def documented() -> dict[str, list[str]]:
    """The column names of docs/logs.md's tables: the backticked names in the first cell of each row, by file."""
    out: dict[str, list[str]] = {"progress": [], "episodes": []}
    section = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            section = "progress" if title == "progress.csv" else "episodes" if title == "episodes.csv" else None
        elif section and (m := re.match(r"\|\s*((?:`[^`]+`\s*)+)\|", line)):
            out[section] += re.findall(r"`([^`]+)`", m.group(1))
    return out


def test_the_doc_has_tables_for_both_files():
    docs = documented()
    assert "ep_return_mean" in docs["progress"] and "return" in docs["episodes"], \
        "docs/logs.md must keep its '## progress.csv' and '## episodes.csv' sections of tables"
    for kind, names in docs.items():
        assert len(names) == len(set(names)), f"{kind}: columns documented twice: " \
            f"{sorted({n for n in names if names.count(n) > 1})}"


@pytest.mark.parametrize("kind", ["progress", "episodes"])
def test_every_written_column_is_documented(written, kind):
    missing = {c: sorted(runs) for c, runs in written[kind].items() if c not in documented()[kind]}
    assert not missing, f"{kind}.csv columns missing from docs/logs.md (column: runs that write it): {missing}"


@pytest.mark.parametrize("kind", ["progress", "episodes"])
def test_every_documented_column_is_written(written, kind):
    stale = [c for c in documented()[kind] if c not in written[kind]]
    assert not stale, (f"docs/logs.md lists {kind}.csv columns no run of this test writes: {stale} (stale, or add "
                       f"the setting that writes them to RUNS)")
