"""The statistics behind the published benchmark tables (benchmarks/aggregate.py): the interquartile mean
against a plain loop, the stratified bootstrap against a loop that resamples each environment's seeds, both
against rliable, and which rows make a run's final result; the harness's refusals of bad settings, and
benchmarks/episode_ends.py's episodes against natpg.evaluate."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest


def _load(name: str):
    """A script of benchmarks/ as a module."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


aggregate = _load("aggregate")


def loop_iqm(values) -> float:
    """Mean of what is left after dropping ⌊n/4⌋ runs from each end of the sorted values."""
    xs = sorted(float(v) for v in values)
    k = len(xs) // 4
    kept = xs[k : len(xs) - k]
    return sum(kept) / len(kept)


@pytest.mark.parametrize("n", range(1, 13))
def test_iqm_equals_the_trimmed_mean_of_a_loop(n):
    x = np.random.default_rng(n).normal(size=n) * 100
    assert aggregate.iqm(x) == pytest.approx(loop_iqm(x), rel=1e-12, abs=1e-12)


def test_iqm_by_hand_and_along_an_axis():
    assert aggregate.iqm([4.0, 1.0, 3.0, 2.0]) == 2.5  # drops 1 and 4
    assert aggregate.iqm([0.0, 0.0, 0.0, 100.0]) == 0.0  # one outlier in four is dropped
    assert aggregate.iqm([1.0, 2.0, 3.0, 4.0, 50.0]) == 3.0  # five seeds: the middle three
    rows = np.random.default_rng(0).normal(size=(6, 7))
    np.testing.assert_allclose(aggregate.iqm(rows, axis=1), [loop_iqm(r) for r in rows], rtol=1e-12)


def test_bootstrap_resamples_within_each_environment():
    """Two environments, one all zeros and one all ones: every stratified resample holds five of each, so the
    mean of every resample is exactly 0.5. Resampling the ten runs as one pool would not keep that."""
    groups = [np.zeros(5), np.ones(5)]
    assert aggregate.bootstrap_ci(groups, stat=lambda x, axis: x.mean(axis=axis), reps=2000) == (0.5, 0.5)
    assert aggregate.bootstrap_ci([np.full(5, 3.0)], reps=500) == (3.0, 3.0)


def test_bootstrap_ci_matches_a_loop_over_resamples():
    """The percentile interval of the IQM over stratified resamples, against the same built with a loop
    (its own random draws): equal up to the Monte-Carlo error of 20,000 resamples."""
    rng = np.random.default_rng(1)
    groups = [rng.normal(0.0, 1.0, size=5), rng.normal(3.0, 2.0, size=5), rng.normal(-1.0, 0.5, size=4)]
    lo, hi = aggregate.bootstrap_ci(groups, reps=20_000, seed=0)
    loop_rng = np.random.default_rng(12345)
    stats = []
    for _ in range(20_000):
        pooled = [g[loop_rng.integers(len(g))] for g in groups for _ in range(len(g))]
        stats.append(loop_iqm(pooled))
    ref_lo, ref_hi = np.percentile(stats, [2.5, 97.5])
    assert lo == pytest.approx(ref_lo, abs=0.05) and hi == pytest.approx(ref_hi, abs=0.05)
    assert lo < aggregate.iqm(np.concatenate(groups)) < hi


@pytest.mark.filterwarnings("ignore::FutureWarning")  # arch's note on numpy's RandomState, inside rliable
def test_iqm_and_stratified_ci_agree_with_rliable():
    """rliable (Agarwal et al. 2021), the field's tool, on the same scores (runs × environments): the IQM is
    the same number; the stratified percentile CI agrees up to the Monte-Carlo error of 20,000 resamples
    (different random draws); and it too keeps each environment's runs apart (the all-zeros/all-ones case)."""
    rly = pytest.importorskip("rliable.library")
    metrics = pytest.importorskip("rliable.metrics")

    def rliable_iqm(scores: np.ndarray) -> tuple[float, float, float]:
        point, interval = rly.get_interval_estimates(
            {"a": scores}, lambda s: np.array([metrics.aggregate_iqm(s)]), reps=20_000,
            random_state=np.random.RandomState(0))
        return float(point["a"][0]), float(interval["a"][0, 0]), float(interval["a"][1, 0])

    rng = np.random.default_rng(1)
    scores = np.stack([rng.normal(0.0, 1.0, 5), rng.normal(3.0, 2.0, 5), rng.normal(-1.0, 0.5, 5)], axis=1)
    for cols in ([0], [0, 1, 2]):  # one environment (a plain bootstrap over seeds), then three
        point, lo, hi = rliable_iqm(scores[:, cols])
        assert aggregate.iqm(scores[:, cols].T.reshape(-1)) == pytest.approx(point, rel=1e-12)
        ours = aggregate.bootstrap_ci([scores[:, c] for c in cols], reps=20_000)
        assert ours == pytest.approx((lo, hi), abs=0.05)
    assert rliable_iqm(np.stack([np.zeros(5), np.ones(5)], axis=1))[1:] == (0.5, 0.5)


def row(env="Hopper-v5", algo="natpg-npg", seed=0, steps=1000, ret=1.0, budget=1000, final=False):
    return {"env": env, "algo": algo, "seed": seed, "env_steps": steps, "eval_return_mean": ret,
            "budget": budget, "final": final}


def test_select_keeps_finished_runs_of_the_largest_budget():
    rows = [row(seed=0, steps=500, ret=1.0), row(seed=0, steps=1000, ret=2.0, final=True),
            row(seed=1, steps=500, ret=5.0),  # seed 1 never finished: left out
            row(seed=0, steps=100, ret=9.0, budget=200), row(seed=0, steps=200, ret=9.5, budget=200, final=True),
            row(seed=2, steps=1000, ret=3.0, final=True), row(seed=2, steps=1000, ret=4.0, final=True)]
    chosen = aggregate.select(rows)
    assert list(chosen) == [("Hopper-v5", "natpg-npg")]
    seeds = chosen[("Hopper-v5", "natpg-npg")]
    assert sorted(seeds) == [0, 2]
    assert [r["eval_return_mean"] for r in seeds[0]] == [1.0, 2.0]  # budget 1000, in env-step order
    assert [r["eval_return_mean"] for r in seeds[2]] == [4.0]  # a later duplicate row wins


def test_throughput_settings_reach_the_natpg_rows_and_bad_ones_are_refused_first(capsys, monkeypatch):
    """``throughput.py --set``: a bad setting stops the run before any measurement; a good one reaches natpg."""
    import json

    throughput = _load("throughput")
    measured = []
    monkeypatch.setattr(throughput, "raw_env_rate", lambda env_id: measured.append(env_id) or 1000.0)
    for bad, says in [("bogus=1", "unknown setting"), ("fvp_subsample=2", "fvp_subsample must be in (0, 1]"),
                      ("fvp_subsample", "expects key=value"), ("n_envs=4", "fixed by the rows"),
                      ("sampler=local", "fixed by the rows")]:
        with pytest.raises(SystemExit):
            throughput.main(["--set", bad])
        assert says in capsys.readouterr().err
    assert measured == []
    seen = {}

    def natpg_rate(env_id, batch, updates, n_envs, settings, **engine):
        seen.update(settings)
        return 500.0

    monkeypatch.setattr(throughput, "natpg_rate", natpg_rate)
    throughput.main(["--env", "Pendulum-v1", "--engines", "natpg", "--repeats", "1", "--set", "fvp_subsample=0.2"])
    out = json.loads(capsys.readouterr().out)
    assert seen == {"fvp_subsample": 0.2} and out["natpg_over_raw"] == 0.5


def test_returns_refuses_bad_settings_before_any_run(tmp_path, capsys):
    """``returns.py --set``: a bad value is refused against each run's presets, before the output folder exists."""
    returns = _load("returns")
    out = tmp_path / "runs"
    for argv, says in [(["--algos", "natpg-trpo", "--set", "max_kl=-1"], "max_kl must be a finite number > 0"),
                       (["--algos", "natpg-npg-procs", "--set", "cg_iters=0"], "cg_iters"),
                       (["--algos", "natpg-npg", "--set", "nonsense=3"], "unknown setting"),
                       (["--algos", "natpg-npg", "sb3-trpo", "--set", "max_kl=0.02"], "natpg settings only")]:
        with pytest.raises(SystemExit) as exit_:
            returns.main([*argv, "--envs", "Hopper-v5", "--seeds", "0", "--out", str(out)])
        assert exit_.value.code == 2 and says in capsys.readouterr().err
    assert not out.exists()


def test_episode_ends_reports_each_evaluation_episode_as_natpg_eval_runs_them(tmp_path, capsys):
    import natpg

    episode_ends = _load("episode_ends")
    agent = natpg.NPG("CartPole-v1", n_envs=2, n_steps=64, seed=0, tensorboard=False)
    agent.learn(256)
    agent.save(str(tmp_path / "run"))
    mean, _ = natpg.evaluate(agent, episodes=4, seed=7)
    agent.close()
    rows = episode_ends.episode_ends(str(tmp_path / "run"), episodes=4, seed=7)
    assert [r["episode"] for r in rows] == [0, 1, 2, 3]
    assert np.mean([r["return"] for r in rows]) == pytest.approx(mean, rel=1e-12)
    for r in rows:  # CartPole pays 1 per step; a barely trained policy drops the pole before the 500-step limit
        assert r["return"] == r["length"] and r["length"] < 500 and r["ended_by"] == "terminated"
    agent = natpg.NPG("Pendulum-v1", n_envs=2, n_steps=64, seed=0, tensorboard=False)  # never terminates
    agent.learn(128)
    agent.save(str(tmp_path / "pendulum"))
    agent.close()
    rows = episode_ends.episode_ends(str(tmp_path / "pendulum"), episodes=2, seed=7)
    assert [(r["length"], r["ended_by"]) for r in rows] == [(200, "time limit")] * 2
    assert episode_ends.main([str(tmp_path / "missing")]) == 2
    assert "no natpg checkpoint" in capsys.readouterr().err
