"""The facade: config validation, predict, save/load round-trip, evaluation, the CLI end to end."""

import csv
import json
import math
import os
import re

import numpy as np
import pytest
import torch

import natpg
from natpg.cli import main as cli


def small(**kw):
    return dict(n_envs=2, n_steps=32, tensorboard=False, **kw)


def test_unknown_setting_is_rejected_before_any_work_naming_valid_ones():
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['max_kll'\].*max_kl"):
        natpg.NPG("CartPole-v1", max_kll=0.1)


def test_a_misspelt_setting_gets_the_nearest_valid_name_and_a_foreign_one_none():
    with pytest.raises(ValueError, match=r"did you mean 'critic_lr' for 'critic_lrr'\?"):
        natpg.NPG("CartPole-v1", critic_lrr=1e-3)
    with pytest.raises(ValueError) as err:
        natpg.NPG("CartPole-v1", zzzz=1)
    assert "did you mean" not in str(err.value)


@pytest.mark.parametrize("setting,pattern", [
    (dict(max_kl=-0.01), "max_kl must be a finite number > 0"),
    (dict(n_envs=0), "n_envs must be an integer ≥ 1"),
    (dict(fisher="bogus"), r"fisher must be one of \['cg'"),
    (dict(gamma=1.0), r"gamma must be in \[0, 1\)"),
    (dict(step="nope"), "step must be one of"),
    (dict(fvp_subsample=0.0), r"fvp_subsample must be in \(0, 1\]"),
    (dict(fvp_subsample_step_length="full"), r"fvp_subsample_step_length must be one of \['subsample', 'batch'\]"),
    (dict(device="tpu"), "device must be"),
    (dict(fisher="kfac", kfac_refresh_every=0), "kfac_refresh_every must be an integer ≥ 1, got 0"),
    (dict(update_threads=-1), "update_threads must be an integer ≥ 1, or 0 for torch_threads, got -1"),
    (dict(update_threads=True), "update_threads must be an integer"),
])
def test_invalid_settings_are_named(setting, pattern):
    with pytest.raises(ValueError, match=pattern):
        natpg.NPG("CartPole-v1", **setting)


def test_update_threads_hold_for_the_actor_phase_only_and_runs_repeat_for_a_given_value():
    """The batch and the actor update run with update_threads torch threads, sampling and the critic fit with
    torch_threads; a run repeats bit for bit at a given value and ends within float32 rounding of the
    one-thread run (only the split of the matrix products differs)."""
    def run(update_threads):
        agent = natpg.NPG("Pendulum-v1", seed=1, torch_threads=1, update_threads=update_threads, **small())
        seen = {"actor": set(), "critic": set(), "sampling": set()}
        actor_update, critic_fit, collect = agent.actor_update.update, agent.critic.fit, agent._make_sampler

        def record(phase, fn):
            def wrapped(*args, **kwargs):
                seen[phase].add(torch.get_num_threads())
                return fn(*args, **kwargs)
            return wrapped

        def make_sampler(seed):
            sampler = collect(seed)
            sampler.collect = record("sampling", sampler.collect)
            return sampler

        agent.actor_update.update = record("actor", actor_update)
        agent.critic.fit = record("critic", critic_fit)
        agent._make_sampler = make_sampler
        agent.learn(3 * 64)
        return seen, torch.nn.utils.parameters_to_vector(agent.policy.parameters()).detach()

    before = torch.get_num_threads()
    try:
        seen, one = run(0)
        assert seen == {"actor": {1}, "critic": {1}, "sampling": {1}}
        seen, two = run(2)
        assert seen == {"actor": {2}, "critic": {1}, "sampling": {1}}
        assert torch.get_num_threads() == 1  # torch_threads again after the phase
        _, again = run(2)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(two, again)
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-5)


def test_unknown_environment_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown environment id 'NoSuchEnv-v0'"):
        natpg.NPG("NoSuchEnv-v0")


def test_step_budget_smaller_than_one_batch_is_rejected():
    agent = natpg.NPG("CartPole-v1", **small())
    with pytest.raises(ValueError, match="total_steps must be an integer ≥ one batch"):
        agent.learn(10)


def test_predict_single_and_batch_and_shape_errors():
    agent = natpg.NPG("Pendulum-v1", **small())
    single = agent.predict(np.zeros(3))
    batch = agent.predict(np.zeros((5, 3)))
    assert single.shape == (1,) and batch.shape == (5, 1)
    assert np.all(batch <= 2.0) and np.all(batch >= -2.0)
    with pytest.raises(ValueError, match=r"observation of shape \(4,\) does not match"):
        agent.predict(np.zeros(4))
    cart = natpg.NPG("CartPole-v1", **small())
    assert cart.predict(np.zeros(4)).shape == () and cart.predict(np.zeros((3, 4))).shape == (3,)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_save_load_round_trip_gives_identical_actions(tmp_path, env_id):
    agent = natpg.NPG(env_id, seed=3, **small())
    agent.learn(128)
    agent.save(str(tmp_path / "model"))
    loaded = natpg.load(str(tmp_path / "model"))
    assert type(loaded) is natpg.NPG and loaded.env_steps == 128
    obs = np.random.default_rng(0).normal(size=(20, agent.observation_space.shape[0]))
    np.testing.assert_array_equal(agent.predict(obs), loaded.predict(obs))
    np.testing.assert_array_equal(agent.obs_normalizer.rms.mean, loaded.obs_normalizer.rms.mean)
    for a, b in zip(agent.policy.state_dict().values(), loaded.policy.state_dict().values()):
        assert torch.equal(a, b)
    assert natpg.evaluate(agent, episodes=3, seed=7) == natpg.evaluate(loaded, episodes=3, seed=7)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no natpg checkpoint"):
        natpg.load(str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable natpg checkpoint"):
        natpg.load(str(bad))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a natpg checkpoint"):
        natpg.load(str(foreign))


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    agent = natpg.NPG("CartPole-v1", **small())
    file = agent.save(str(tmp_path / "m"))
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        natpg.load(str(tmp_path / "m"))


def test_observation_normaliser_is_frozen_at_evaluation():
    agent = natpg.NPG("CartPole-v1", **small())
    agent.learn(64)
    mean = agent.obs_normalizer.rms.mean.copy()
    count = agent.obs_normalizer.rms.count
    natpg.evaluate(agent, episodes=2, seed=0)
    agent.predict(np.ones((4, 4)))
    assert agent.obs_normalizer.rms.count == count
    np.testing.assert_array_equal(agent.obs_normalizer.rms.mean, mean)


def test_cli_train_eval_plot(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli(["train", "npg", "CartPole-v1", "--steps", "256", "--seed", "1", "--out", str(out), "--no-progress",
              "--n-envs", "2", "--set", "n_steps=64", "--set", "checkpoint_every=1"])
    assert rc == 0
    cfg = json.load(open(out / "config.json"))
    assert cfg["algorithm"] == "npg" and cfg["env"]["n_envs"] == 2 and cfg["rollout"]["n_steps"] == 64
    rows = list(csv.DictReader(open(out / "progress.csv")))
    assert [int(r["env_steps"]) for r in rows] == [128, 256]
    assert {"env_steps", "ep_return_mean", "wall_s", "step/kl", "fisher/cg_residual"} <= set(rows[0])
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tb"))
    capsys.readouterr()
    assert cli(["eval", str(out), "--episodes", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["episodes"] == 2 and result["env_steps_trained"] == 256 and result["return_mean"] > 0
    pytest.importorskip("matplotlib")
    assert cli(["plot", str(out), "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_cli_config_prints_what_a_run_gets_and_where_each_value_came_from(capsys):
    pytest.importorskip("mujoco")
    assert cli(["config", "NPG", "Hopper-v5", "--set", "gamma=0.995", "--set", "hidden=[32,32]", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    agent = natpg.NPG("Hopper-v5", gamma=0.995, hidden=(32, 32), n_envs=1, tensorboard=False)
    built = {k: v for section in agent.config.to_dict().values() if isinstance(section, dict) for k, v in section.items()}
    agent.close()
    built |= {"n_envs": 8, "tensorboard": True}  # the agent above was built smaller than the run shown
    assert {k: v["value"] for k, v in shown.items()} == json.loads(json.dumps(built))
    sources = {k: v["source"] for k, v in shown.items()}
    assert (sources["gamma"], sources["hidden"]) == ("user", "user")
    assert sources["max_kl"] == "npg Hopper-v5 preset" and shown["max_kl"]["value"] == 0.01
    assert (sources["n_steps"], sources["damping"]) == ("npg mujoco preset", "npg mujoco preset")
    assert sources["fisher"] == "npg preset" and sources["cg_tol"] == "default"
    assert cli(["config", "ppo", "CartPole-v1"]) == 0  # the table form
    text = capsys.readouterr().out
    assert text.startswith("ppo on CartPole-v1 (environment family: classic)")
    assert re.search(r"step\.step = 'ppo_clip' +\[ppo preset\]", text)
    assert re.search(r"advantage\.gamma = 0\.98 +\[ppo classic preset\]", text)


@pytest.mark.parametrize("argv,pattern", [
    (["config", "npgg", "CartPole-v1"], "unknown algorithm 'npgg'"),
    (["config", "npg", "CartPole-v1", "--set", "max_kl=-1"], "max_kl must be"),
    (["config", "npg", "NoSuchEnv-v0"], "unknown environment id"),
    (["train", "npgg", "CartPole-v1"], "unknown algorithm 'npgg'"),
    (["train", "npg", "CartPole-v1", "--eval-every", "-5"], "eval_every must be an integer ≥ 0"),
    (["train", "npg", "CartPole-v1", "--set", "eval_episodes=0"], "eval_episodes"),
    (["train", "npg", "CartPole-v1", "--set", "max_kl=-1"], "max_kl must be"),
    (["train", "npg", "CartPole-v1", "--set", "oops"], "--set expects key=value"),
    (["eval", "/nonexistent/run"], "no natpg checkpoint"),
])
def test_cli_errors_are_messages_without_traceback(argv, pattern, capsys):
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(f"natpg {argv[0]}: error: ")
    assert re.search(pattern, err)


def test_periodic_evaluation_is_logged_keeps_the_best_and_leaves_training_unchanged(tmp_path):
    seen = {}

    def check(agent, row):  # a logged evaluation is natpg.evaluate of the policy of that moment
        if math.isfinite(row["eval/return_mean"]):
            seen[agent.env_steps] = row["eval/return_mean"]
            assert (row["eval/return_mean"], row["eval/return_std"]) == natpg.evaluate(agent, episodes=3, seed=10_007)

    run = tmp_path / "run"
    a = natpg.NPG("CartPole-v1", seed=7, **small(eval_every=96, eval_episodes=3))
    a.learn(384, out_dir=str(run), callback=check)  # batches of 64: 96, 192, 288 and 384 are passed after
    assert sorted(seen) == [128, 192, 320, 384]      # the updates that end at 128, 192, 320 and 384 steps
    rows = list(csv.DictReader(open(run / "progress.csv")))
    logged = {int(r["env_steps"]): float(r["eval/return_mean"]) for r in rows}
    assert {k: v for k, v in logged.items() if math.isfinite(v)} == seen and len(logged) == 6
    best_steps = min(k for k, v in seen.items() if v == max(seen.values()))  # the first of equal bests
    best = natpg.load(str(run / "best"))
    assert best.env_steps == best_steps and a.best_eval_return == max(seen.values())
    assert natpg.evaluate(best, episodes=3, seed=10_007)[0] == max(seen.values())
    assert natpg.load(str(run)).best_eval_return == a.best_eval_return  # kept for a resumed run
    pytest.importorskip("matplotlib")
    from natpg.plotting import plot_runs  # the plot skips the rows between evaluations instead of breaking the line

    plotted = plot_runs([str(run)], str(tmp_path / "eval.png"), y="eval/return_mean")
    assert plotted == {"run": ([float(k) for k in sorted(seen)], [seen[k] for k in sorted(seen)])}
    b = natpg.NPG("CartPole-v1", seed=7, **small())
    b.learn(384)
    assert all(torch.equal(p, q) for p, q in zip(a.policy.parameters(), b.policy.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(a.critic.parameters(), b.critic.parameters()))


@pytest.mark.parametrize("algo", ["NPG", "TRPO", "ACKTR"])
def test_linear_kl_schedule_sets_the_budget_each_update_uses(algo, tmp_path):
    rows = []
    agent = getattr(natpg, algo)("CartPole-v1", seed=2, **small(kl_schedule="linear", max_kl=0.02))
    agent.learn(256, callback=lambda a, row: rows.append(row))  # 4 batches of 64: δ_k = 0.02·(1 − 64k/256)
    assert [r["step/max_kl"] for r in rows] == pytest.approx([0.02, 0.015, 0.01, 0.005], rel=0, abs=1e-15)
    checked = 0
    for r in rows:  # the rule used δ_k: the quadratic KL ½ α² dᵀFd of the step it took
        quadratic_kl = 0.5 * r["step/size"] ** 2 * r["step/dFd"]
        if algo == "NPG" or (algo == "ACKTR" and r["step/kl_bound_active"]):  # ACKTR: when η < η_max
            assert quadratic_kl == pytest.approx(r["step/max_kl"], rel=1e-9)
            checked += 1
        elif algo == "TRPO" and r["step/accepted"]:  # the full step shrunk k times, and within δ_k
            shrink = 0.8 ** r["step/backtracks"]
            assert quadratic_kl == pytest.approx(shrink**2 * r["step/max_kl"], rel=1e-9) and r["step/kl"] <= r["step/max_kl"]
            checked += 1
    assert checked >= 3
    assert agent.actor_update.step_rule.max_kl == 0.02  # restored after learn
    if algo == "NPG":  # one run in two calls, decaying towards the end of both: the same run as above
        chunked = natpg.NPG("CartPole-v1", seed=2, **small(kl_schedule="linear", max_kl=0.02))
        chunked.learn(128, schedule_end=256).learn(128, reset=False, schedule_end=256, out_dir=str(tmp_path))
        assert all(torch.equal(p, q) for p, q in zip(agent.policy.parameters(), chunked.policy.parameters()))
        progress = (tmp_path / "progress.csv").read_text()
        with pytest.raises(ValueError, match="schedule_end must be an env-step count ≥ 384"):
            chunked.learn(128, schedule_end=300, out_dir=str(tmp_path))  # reset=True would rewrite it
        assert (tmp_path / "progress.csv").read_text() == progress  # refused before any file was opened
    with pytest.raises(ValueError, match="kl_schedule='linear' decays the KL budget"):
        natpg.PPO("CartPole-v1", kl_schedule="linear")


@pytest.mark.parametrize("algo,step", [("VPG", "adam"), ("VPG", "fixed"), ("PPO", "ppo_clip")])
def test_linear_lr_schedule_sets_the_learning_rate_each_update_uses(algo, step, tmp_path):
    rows, used = [], []
    kw = small(lr_schedule="linear", alpha=0.004, step=step)
    agent = getattr(natpg, algo)("CartPole-v1", seed=2, **kw)

    def record(a, row):
        rows.append(row)
        if step == "ppo_clip":  # the rate torch's Adam stepped with
            used.append(a.actor_update.optimizer.param_groups[0]["lr"])
    agent.learn(256, callback=record)  # 4 batches of 64: α_k = 0.004·(1 − 64k/256)
    expected = [0.004, 0.003, 0.002, 0.001]
    assert [r["step/lr"] for r in rows] == pytest.approx(expected, rel=0, abs=1e-15)
    if step == "ppo_clip":
        assert used == pytest.approx(expected, rel=0, abs=1e-15)
        assert agent.actor_update.alpha == 0.004  # restored after learn
    else:  # the step rule's own record of the α it applied
        assert [r["step/size"] for r in rows] == pytest.approx(expected, rel=0, abs=1e-15)
        assert agent.actor_update.step_rule.alpha == 0.004
    chunked = getattr(natpg, algo)("CartPole-v1", seed=2, **kw)  # one run in two calls: the same run
    chunked.learn(128, schedule_end=256).learn(128, reset=False, schedule_end=256)
    assert all(torch.equal(p, q) for p, q in zip(agent.policy.parameters(), chunked.policy.parameters()))
    with pytest.raises(ValueError, match="lr_schedule='linear' decays the learning rate of the step rules"):
        natpg.NPG("CartPole-v1", lr_schedule="linear")


def test_training_is_reproducible_with_a_seed():
    runs = []
    for _ in range(2):
        agent = natpg.NPG("CartPole-v1", seed=11, **small())
        agent.learn(128)
        runs.append(torch.cat([p.detach().reshape(-1) for p in agent.policy.parameters()]))
    assert torch.equal(*runs)


def test_log_rows_carry_the_gaussian_policys_noise():
    """policy/std is the mean σ of the policy that just stepped (Gaussian heads only)."""
    seen = []
    agent = natpg.NPG("Pendulum-v1", seed=0, n_envs=2, n_steps=64, log_std_init=-1.0, tensorboard=False)
    agent.learn(256, callback=lambda a, row: seen.append((row["policy/std"], a.policy.log_std.exp().mean().item())))
    assert len(seen) == 2 and all(abs(logged - now) < 1e-6 for logged, now in seen)
    assert abs(seen[0][0] - np.exp(-1.0)) < 0.1 and seen[0][0] != seen[1][0]
    rows = []
    cartpole = natpg.NPG("CartPole-v1", seed=0, n_envs=2, n_steps=64, tensorboard=False)
    cartpole.learn(128, callback=lambda a, row: rows.append(row))
    assert "policy/std" not in rows[0]


def test_plot_seeds_averages_runs_that_differ_only_in_their_seed(tmp_path, capsys):
    """natpg plot --seeds: one line per setting, the mean of its seeds interpolated on the union of their x, over
    the range all of them cover; the label names the setting in which the groups differ."""
    pytest.importorskip("matplotlib")
    from natpg.plotting import plot_runs

    def run(name, seed, max_kl, rows, run_section=None):
        d = tmp_path / name
        d.mkdir()
        config = natpg.Config().to_dict()
        config["step"]["max_kl"] = max_kl
        config["run"]["checkpoint_every"] = run_section or 50  # not a setting that changes learning
        (d / "config.json").write_text(json.dumps({"algorithm": "npg", "env_id": "Hopper-v5", "seed": seed, **config}))
        with open(d / "progress.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["env_steps", "ep_return_mean"])
            w.writerows(rows)
        return str(d)

    runs = [run("a0", 0, 0.01, [(100, 1.0), (200, 3.0), (300, 5.0)]),
            run("a1", 1, 0.01, [(150, 2.0), (250, 4.0), (350, 9.0)], run_section=7),
            run("b0", 0, 0.02, [(100, 20.0), (200, 10.0)])]
    plotted = plot_runs(runs, str(tmp_path / "seeds.png"), seeds=True)
    # a0 at 150, 250: 2 and 4 (interpolated); a1 at 200, 300: 3 and 6.5; common range 150…300.
    assert plotted == {"npg Hopper-v5 max_kl=0.01 (2 seeds)": ([150.0, 200.0, 250.0, 300.0], [2.0, 3.0, 4.0, 5.75]),
                       "npg Hopper-v5 max_kl=0.02 (1 seed)": ([100.0, 200.0], [20.0, 10.0])}
    assert cli(["plot", *runs, "--seeds", "-o", str(tmp_path / "cli.png")]) == 0 and (tmp_path / "cli.png").exists()
    capsys.readouterr()
    late = run("a2", 2, 0.01, [(400, 1.0), (500, 2.0)])
    assert cli(["plot", runs[0], late, "--seeds", "-o", str(tmp_path / "x.png")]) == 2
    assert "share no range of x" in capsys.readouterr().err
    assert cli(["plot", *runs, "--seeds", "--x", "ep_return_mean", "--y", "env_steps", "-o", str(tmp_path / "y.png")]) == 2
    assert "x column that increases" in capsys.readouterr().err  # b0's return falls



def test_plot_draws_every_run_even_when_two_share_a_name(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from natpg.plotting import plot_runs

    runs = []
    for parent, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / parent / "s0").mkdir(parents=True)
        (tmp_path / parent / "s0" / "progress.csv").write_text(f"env_steps,ep_return_mean\n100,{value}\n")
        runs.append(str(tmp_path / parent / "s0"))
    drawn = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, xs, ys, **kw: drawn.append(list(ys)) or plot(ax, xs, ys, **kw))
    plot_runs(runs, str(tmp_path / "same.png"))
    assert drawn == [[1.0], [2.0]]
