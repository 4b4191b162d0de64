"""The statistics behind the published benchmark tables (benchmarks/aggregate.py): the interquartile mean
against a plain loop, the stratified bootstrap against a loop that resamples each environment's seeds, both
against rliable, and which rows make a run's final result; the harness's refusals of bad settings, and
benchmarks/episode_ends.py's episodes against natpg.evaluate."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
import types
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
                       (["--algos", "natpg-npg", "sb3-trpo", "--set", "max_kl=0.02"], "natpg settings only"),
                       # what the -procs engine fixes, named up front rather than a TypeError in every run
                       (["--algos", "natpg-npg-procs", "--set", "n_envs=8"], "['n_envs'] are fixed by the -procs"),
                       (["--algos", "natpg-npg", "natpg-trpo-procs", "--set", "n_steps=64", "--set", "sampler=local",
                         "--set", "workers=4"], "['n_steps', 'sampler', 'workers'] are fixed by the -procs engine"),
                       # settings are checked together with the engine's
                       (["--algos", "natpg-npg-procs", "--set", "vectorization=async"], "sampler='local' only")]:
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


def _fake_children(returns, monkeypatch) -> list[tuple[str, str, str]]:
    """returns.py's orchestrator with each run's child replaced by one that writes a finished run's row at once."""
    calls = []

    def run(child, stdout, **kwargs):
        def arg(flag):
            return child[child.index(flag) + 1]

        calls.append((arg("--algo"), arg("--env"), arg("--seed")))
        with open(arg("--partial"), "w", newline="") as f:
            writer = csv.DictWriter(f, returns.COLUMNS)
            writer.writeheader()
            writer.writerow({"library": "natpg", "algo": arg("--algo"), "env": arg("--env"), "seed": arg("--seed"),
                             "env_steps": arg("--steps"), "eval_return_mean": "1.0", "eval_return_std": "0.0",
                             "wall_s": "1.0", "hardware": "test", "commit": "test", "command": arg("--command"),
                             "budget": arg("--steps"), "final": 1})
        stdout.write("trained\n")
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(returns, "subprocess", types.SimpleNamespace(run=run, STDOUT=subprocess.STDOUT))
    monkeypatch.setattr(returns, "git_commit", lambda: "test")
    return calls


def test_returns_and_aggregate_name_files_of_ids_with_slashes(tmp_path, monkeypatch, capsys):
    """An id like ALE/Pong-v5 gets ALE-Pong-v5 in log, partial and plot file names (its rows keep the id);
    ids that are already safe keep their names; two ids that would share a file are refused up front."""
    returns = _load("returns")
    assert returns.file_safe("mod:Env-v0") == "mod-Env-v0" and returns.file_safe("max_kl=0.05") == "max_kl=0.05"
    calls = _fake_children(returns, monkeypatch)
    out = tmp_path / "b"
    argv = ["--algos", "natpg-npg", "--envs", "ALE/Pong-v5", "CartPole-v1", "--seeds", "0", "--steps", "4096",
            "--out", str(out)]
    assert returns.main(argv) == 0
    assert sorted(os.listdir(out / "logs")) == ["natpg-npg_ALE-Pong-v5_0_4096.log", "natpg-npg_CartPole-v1_0_4096.log"]
    assert os.listdir(out / "partial") == []
    with open(out / "returns.csv", newline="") as f:
        assert [r["env"] for r in csv.DictReader(f)] == ["ALE/Pong-v5", "CartPole-v1"]
    assert returns.main(argv) == 0 and len(calls) == 2  # finished: skipped on a rerun
    assert "skipping 2 finished" in capsys.readouterr().out
    assert aggregate.main([str(out), "--reps", "20"]) == 0
    assert (out / "learning_curves_ALE-Pong-v5.png").exists() and (out / "learning_curves_CartPole-v1.png").exists()
    with pytest.raises(SystemExit) as exit_:
        returns.main(["--envs", "ALE/Pong-v5", "ALE:Pong-v5", "--seeds", "0", "--out", str(tmp_path / "c")])
    assert exit_.value.code == 2 and "would share the file name" in capsys.readouterr().err
    assert len(calls) == 2 and not (tmp_path / "c").exists()
    assert returns.main([*argv[:-4], "--steps", "8192", "--out", str(out)]) == 0  # another budget: its own logs
    assert sorted(os.listdir(out / "logs"))[1::2] == ["natpg-npg_ALE-Pong-v5_0_8192.log",
                                                      "natpg-npg_CartPole-v1_0_8192.log"]


def test_returns_runs_a_repeated_seed_algo_or_env_once(tmp_path, monkeypatch, capsys):
    """--seeds 0 0 --jobs 2 used to start two children on one partial file; each run now runs once."""
    returns = _load("returns")
    calls = _fake_children(returns, monkeypatch)
    out = tmp_path / "b"
    assert returns.main(["--algos", "natpg-npg", "natpg-npg", "--envs", "CartPole-v1", "CartPole-v1", "--seeds", "1",
                         "0", "1", "--jobs", "2", "--steps", "4096", "--out", str(out)]) == 0
    # each run once; two threads start them, so either may record its call first
    assert sorted(calls) == [("natpg-npg", "CartPole-v1", "0"), ("natpg-npg", "CartPole-v1", "1")]
    printed = capsys.readouterr().out
    assert "note: --seeds: dropped the repeated 1; running 1 0" in printed
    assert "--algos: dropped the repeated natpg-npg" in printed
    assert "--envs: dropped the repeated CartPole-v1" in printed
    with open(out / "returns.csv", newline="") as f:
        assert sorted(r["seed"] for r in csv.DictReader(f)) == ["0", "1"]  # once each, in the order they finished


def test_returns_names_a_missing_peer_library_even_without_torch(tmp_path, monkeypatch, capsys):
    """A peer's interpreter that has neither the peer nor torch: the run names the peer and its flag."""
    returns = _load("returns")
    for module in ("torch", "tianshou", "sb3_contrib"):
        monkeypatch.setitem(sys.modules, module, None)  # not importable
    for algo, module, flag in [("tianshou-npg", "tianshou", "--tianshou-python"),
                               ("sb3-trpo", "sb3_contrib", "--sb3-python")]:
        assert returns.main(["--worker", "--algo", algo, "--env", "Pendulum-v1", "--seed", "0", "--steps", "4096",
                             "--partial", str(tmp_path / "p.csv")]) == 3
        err = capsys.readouterr().err
        assert f"{algo} needs the Python package '{module}'" in err and f"({flag})" in err
    assert not (tmp_path / "p.csv").exists()


def test_throughput_refuses_uneven_batches_and_bad_counts_before_measuring(capsys, monkeypatch):
    """--batch must split evenly over every natpg row's copies (as `natpg bench`); counts are integers ≥ 1."""
    import json

    throughput = _load("throughput")
    measured = []
    monkeypatch.setattr(throughput, "raw_env_rate", lambda env_id: measured.append(env_id) or 1000.0)
    for argv, says in [(["--batch", "1000"], "--batch 1000 must be a multiple of each natpg row's env copies, and is "
                                             "not for natpg_16 (16 copies), natpg_processes (16 copies)"),
                       (["--batch", "24", "--n-envs", "16", "--engines", "natpg"], "not for natpg (16 copies)"),
                       (["--batch", "8", "--engines", "natpg_16"], "not for natpg_16 (16 copies)"),
                       (["--repeats", "0"], "argument --repeats: must be an integer ≥ 1, got '0'"),
                       (["--updates", "0"], "argument --updates: must be an integer ≥ 1, got '0'"),
                       (["--batch", "-8"], "argument --batch: must be an integer ≥ 1, got '-8'"),
                       (["--n-envs", "2.5"], "argument --n-envs: must be an integer ≥ 1, got '2.5'")]:
        with pytest.raises(SystemExit) as exit_:
            throughput.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and says in err and "Traceback" not in err
    assert measured == []
    with pytest.raises(ValueError, match="batch 100 must be a multiple of n_envs 16"):
        throughput.natpg_rate("CartPole-v1", 100, 5, 16, {})
    monkeypatch.setattr(throughput, "natpg_rate", lambda env_id, batch, updates, n_envs, settings, **engine: 500.0)
    throughput.main(["--env", "CartPole-v1", "--batch", "32", "--n-envs", "4", "--engines", "natpg", "natpg_16",
                     "--repeats", "1"])
    assert json.loads(capsys.readouterr().out)["natpg_16_over_raw"] == 0.5


def test_aggregate_reports_bad_input_in_one_line(tmp_path, capsys):
    """--reps below 1, a missing folder or returns.csv, a missing column, a bad number: one line, exit 2."""
    for reps in ("0", "-1", "2.5"):
        with pytest.raises(SystemExit) as exit_:
            aggregate.main([str(tmp_path), "--reps", reps])
        assert exit_.value.code == 2 and f"--reps: must be an integer ≥ 1, got '{reps}'" in capsys.readouterr().err
    (tmp_path / "nocol").mkdir()
    (tmp_path / "nocol" / "returns.csv").write_text("algo,env,seed\nnatpg-npg,Hopper-v5,0\n")
    (tmp_path / "badnum").mkdir()
    (tmp_path / "badnum" / "returns.csv").write_text(
        "library,algo,env,seed,env_steps,eval_return_mean,budget,final\nnatpg,natpg-npg,Hopper-v5,0,10,abc,10,1\n")
    for folder, says in [("missing", "cannot read"), (".", "cannot read"),
                         ("nocol", "lacks the column(s) ['library', 'env_steps', 'eval_return_mean', 'budget', "
                                   "'final']"),
                         ("badnum", "returns.csv, line 2: could not convert string to float: 'abc'")]:
        assert aggregate.main([str(tmp_path / folder)]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err


def test_distributed_bench_names_a_ray_address_nobody_answers(monkeypatch, capsys):
    """The bench joins Ray as the agent does (natpg.distributed.ray_pool.init_ray): an address nobody listens on is
    one line within seconds, not Ray's minutes of retries."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray instance already runs in this process")
    from natpg.distributed import bench

    monkeypatch.setattr(bench, "measure", lambda *args: pytest.fail("measured"))
    with pytest.raises(SystemExit) as exit_:
        bench.main(["CartPole-v1", "--samplers", "ray", "--workers", "1", "--no-local", "--ray-address",
                    "127.0.0.1:9"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "no Ray cluster answers there" in err and "Traceback" not in err


def test_distributed_bench_refuses_bad_combinations_before_measuring(monkeypatch, capsys):
    """More workers than copies, or --ray-address without a Ray sampler: one line, exit 2, nothing measured."""
    from natpg.distributed import bench

    measured = []
    monkeypatch.setattr(bench, "measure", lambda env_id, sampler, workers, *rest: measured.append((sampler, workers))
                        or {})
    for argv, says in [(["--samplers", "processes", "--workers", "1", "3", "--n-envs", "2"],
                        "--workers 3 is more than --n-envs 2"),
                       (["--samplers", "processes", "--ray-address", "auto"],
                        "--ray-address 'auto' joins a Ray cluster for --samplers ray, which is not among --samplers "
                        "processes")]:
        with pytest.raises(SystemExit) as exit_:
            bench.main(["CartPole-v1", *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and says in err and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed: find_spec → None
    with pytest.raises(SystemExit) as exit_:
        bench.main(["CartPole-v1", "--workers", "1"])  # the default sampler is Ray's
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after argparse's usage lines
    assert exit_.value.code == 2 and "Traceback" not in err and last.startswith("python -m natpg.distributed.bench: error:")
    assert "needs Ray" in last and last.endswith("or measure --samplers processes, which needs no Ray")
    assert measured == []
    bench.main(["CartPole-v1", "--samplers", "processes", "--workers", "1", "2", "--n-envs", "2"])
    assert measured == [("local", 1), ("processes", 1), ("processes", 2)]


def test_fvp_throughput_counts_the_products_flops_and_compares_them_with_a_matmul(capsys):
    """fvp_throughput.py: the FVP's matmul FLOPs grow exactly with the batch (B·P work), a 2n³ matmul sets the
    reference, and bad arguments are a usage error before anything is measured."""
    fvp = _load("fvp_throughput")
    assert fvp.main(["--params", "2e4", "--batches", "100", "200", "--matmul-n", "64", "--repeats", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["batch"] for r in rows] == [100, 200] and rows[0]["params"] == rows[1]["params"]
    assert rows[1]["fvp_flops"] == 2 * rows[0]["fvp_flops"] > 0
    assert rows[0]["fvp_flops"] > 4 * 100 * rows[0]["params"]  # at least a forward and a backward through the torso
    assert all(r["of_matmul"] > 0 and math.isfinite(r["of_matmul"]) for r in rows)
    with pytest.raises(SystemExit):
        fvp.main(["--repeats", "0"])
    assert "must be positive" in capsys.readouterr().err


def test_the_gpu_jobs_tests_hold_with_the_cpu_standing_in_for_the_gpu():
    """tests/test_cuda.py runs only on a GPU, which CI never has: with NATPG_TEST_CUDA_DEVICE=cpu its comparisons
    run here with the CPU in the GPU's place, so that their references and tolerances stay right between GPU runs."""
    env = {**os.environ, "NATPG_TEST_CUDA_DEVICE": "cpu"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           str(Path(__file__).with_name("test_cuda.py"))], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
