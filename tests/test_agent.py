"""The facade: config validation, predict, save/load round-trip, evaluation, the CLI end to end."""

import csv
import json
import math
import os
import re
import shutil
import warnings
from functools import partial

import gymnasium as gym
import numpy as np
import pytest
import torch

import natpg
from natpg.evaluation import evaluation_episodes
from natpg.cli import main as cli


def small(**kw):
    return dict(n_envs=2, n_steps=32, tensorboard=False, **kw)


def test_unknown_setting_is_rejected_before_any_work_naming_valid_ones():
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['max_kll'\].*max_kl"):
        natpg.NPG("CartPole-v1", max_kll=0.1)


def test_a_misspelt_setting_gets_the_nearest_valid_name_and_a_foreign_one_none(tmp_path):
    with pytest.raises(ValueError, match=r"did you mean 'critic_lr' for 'critic_lrr'\?"):
        natpg.NPG("CartPole-v1", critic_lrr=1e-3)
    with pytest.raises(ValueError) as err:
        natpg.NPG("CartPole-v1", zzzz=1)
    assert "did you mean" not in str(err.value)
    with pytest.raises(ValueError, match=r"'learning_rate' is Stable-Baselines3's name: natpg's is alpha"):
        natpg.PPO("CartPole-v1", learning_rate=3e-4)
    with pytest.raises(ValueError, match=r"'cg_max_steps' is Stable-Baselines3's name: natpg's is cg_iters"):
        natpg.TRPO("CartPole-v1", cg_max_steps=15)
    with pytest.raises(ValueError, match=r"target_kl=0.01 would not be read: read by step ppo_clip.* is max_kl"):
        natpg.TRPO("CartPole-v1", target_kl=0.01)  # sb3-contrib TRPO's name for the KL budget
    assert natpg.PPO("CartPole-v1", target_kl=0.01).config.step.target_kl == 0.01
    with pytest.raises(ValueError, match=r"^unknown setting\(s\) \['ortho_init'\] \('ortho_init' is Stable-Baselines3's, "
                                         r"with no natpg setting: natpg's layers are always initialised orthogonally "
                                         r"\(SB3's ortho_init=True\)\)$"):  # not "did you mean 'log_std_init'"
        natpg.PPO("CartPole-v1", ortho_init=False)
    agent = natpg.NPG("CartPole-v1", n_envs=2, n_steps=32, tensorboard=False)
    agent.save(os.path.join(tmp_path, "m"))
    with pytest.raises(ValueError, match=r"'env' is Stable-Baselines3's, with no natpg setting: an agent is built for"):
        natpg.load(os.path.join(tmp_path, "m"), env="CartPole-v0")  # SB3's load(path, env=...), not n_envs
    for named in (dict(learning_rate=1e-3), dict(critic_lrr=1e-3)):  # each name explained: no list of all 70
        with pytest.raises(ValueError) as err:
            natpg.NPG("CartPole-v1", **named)
        assert "valid settings" not in str(err.value)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['zzzz'\]; valid settings: \['action_mask', "):
        natpg.NPG("CartPole-v1", zzzz=1)  # nothing near: the list


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
    (dict(update_threads=-1), "update_threads must be an integer from 1 to 1024, or 0 for torch_threads, got -1"),
    (dict(update_threads=True), "update_threads must be an integer"),
    # torch.set_num_threads(10**5) is a segmentation fault: no message, the interpreter gone
    (dict(torch_threads=10**6), "torch_threads must be an integer from 1 to 1024, or 0 .*, got 1000000"),
    (dict(update_threads=1025), "update_threads must be an integer from 1 to 1024"),
])
def test_invalid_settings_are_named(setting, pattern):
    with pytest.raises(ValueError, match=pattern):
        natpg.NPG("CartPole-v1", **setting)


def test_every_setting_is_checked_and_every_default_passes_its_check():
    """SETTING_RULES covers every field (env_kwargs has its own check): a value no setting takes is named for all
    of them at once, and each default passes its rule."""
    from natpg.config import SETTING_RULES

    names = set(natpg.Config.field_index())
    assert set(SETTING_RULES) == names - {"env_kwargs"}
    default = natpg.Config()
    for name, (ok, _) in SETTING_RULES.items():
        assert ok(default.get(name)), name
    with pytest.raises(ValueError) as err:
        default.override(**{name: object() for name in names}).validate()
    named = {line.split()[0] for line in str(err.value).splitlines()[1:]}
    assert names <= named


@pytest.mark.parametrize("settings,named", [
    (dict(sampler="processes", workers=2, vectorization="bad"), ["vectorization"]),
    (dict(sampler="bad", ray_address="auto"), ["sampler"]),
    (dict(workers=0, n_envs=0), ["n_envs", "workers"]),
    (dict(fisher=np.array(["cg", "kfac"]), step=np.array([1, 2])), ["fisher", "step"]),
])
def test_a_value_invalid_alone_is_named_once_and_not_related_to_other_settings(settings, named):
    """Each problem line names its setting; a value that fails its own rule (a NumPy array included) is not also
    measured against the settings it relates to."""
    with pytest.raises(ValueError) as err:
        natpg.Config().override(**settings).validate()
    assert [line.split()[0] for line in str(err.value).splitlines()[1:]] == named


def test_a_gpu_runs_sampling_generator_goes_on_when_the_run_is_loaded_on_a_cpu(tmp_path):
    """A GPU run's checkpoint holds its CUDA generator's state (16 bytes) and, apart, the CPU generator its rollouts
    drew their actions from: loaded on a CPU, that one goes on (the CUDA state has no generator to go to here), so
    the continued run does not start its action noise again from the seed."""
    from natpg import checkpoint

    agent = natpg.NPG("CartPole-v1", seed=0, n_envs=2, n_steps=32, tensorboard=False)
    agent.learn(64)
    path = str(tmp_path / "m.pt")
    agent.save(path)
    meta, tensors = checkpoint.read(path)
    drawn = torch.Generator().manual_seed(123)
    torch.rand(5, generator=drawn)
    tensors["rng"] = {"generator": torch.zeros(16, dtype=torch.uint8), "cpu_generator": tensors["rng"]["cpu_generator"],
                      "sampling_generator": drawn.get_state()}
    checkpoint.write(path, meta, tensors)
    loaded = natpg.load(path)
    assert loaded.sampling_generator is loaded.generator
    assert torch.equal(loaded.sampling_generator.get_state(), drawn.get_state())
    assert torch.equal(loaded.update_generator.get_state(), agent.update_generator.get_state())


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


def test_the_progress_bar_of_a_continued_run_starts_where_the_run_is(capsys):
    agent = natpg.NPG("CartPole-v1", **small())
    agent.learn(128)
    capsys.readouterr()
    agent.learn(128, progress_bar=True)
    shown = [line.strip() for line in capsys.readouterr().err.split("\r") if "/256" in line]
    assert shown[0].startswith("50%") and "128/256" in shown[0] and "256/256" in shown[-1]


def test_a_later_learn_call_that_restarts_episodes_none_of_which_end_is_named():
    """Pendulum's 200-step episodes in calls of 64 steps per copy: with reset=True none ever ends."""
    agent = natpg.NPG("Pendulum-v1", **small())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agent.learn(128)  # a first call: nothing to say
    with pytest.warns(UserWarning, match=r"no training episode ended in this learn call \(64 steps per environment "
                                         r"copy\), which started from freshly reset environments .* reset=False"):
        agent.learn(128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            agent.learn(128, reset=False)
    assert agent._sampler.episodes > 0


def test_a_network_assigned_by_hand_is_refused_at_save_instead_of_written_unloadable(tmp_path):
    from natpg.policies import GaussianMLP

    agent = natpg.NPG("Pendulum-v1", **small())
    agent.policy = GaussianMLP(3, 1, hidden=(8,))  # not what hidden=(64, 64) builds: its checkpoint would not load
    with pytest.raises(ValueError, match=r"agent.policy is not the network its config builds \(GaussianMLP with 7 "
                                         r"tensors\), but a GaussianMLP with another layout: .*change those settings"):
        agent.save(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="agent.policy is not the network its config builds"):
        agent.learn(64, out_dir=str(tmp_path / "run"))  # refused at the first checkpoint, before any update
    assert agent.env_steps == 0 and not (tmp_path / "m" / "model.pt").exists()


def test_unknown_environment_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown environment id 'NoSuchEnv-v0'.* For an environment of your own, give "
                                         "the module that registers it: 'my_module:MyEnv-v0'"):
        natpg.NPG("NoSuchEnv-v0")
    with pytest.raises(ValueError, match=r"unknown environment id 'my_pkg/MyEnv-v0': Namespace my_pkg not found.*"
                                         r"'my_module:MyEnv-v0'"):  # Gymnasium's own advice is to install a package
        natpg.NPG("my_pkg/MyEnv-v0")
    with pytest.raises(ValueError, match=r"unknown environment id 'NoSuchEnv-v0': .*doesn't exist\.$"):
        natpg.NPG("gymnasium:NoSuchEnv-v0")  # the module is given: no advice to give one
    with pytest.raises(ValueError, match=r"unknown environment id 'Taxi-v3': .*deprecated.*Taxi-v4.*\.$"):
        natpg.NPG("Taxi-v3")  # a deprecated version: Gymnasium names the new one, nothing to add


def test_step_budget_smaller_than_one_batch_is_rejected_and_one_written_1e3_is_a_count():
    agent = natpg.NPG("CartPole-v1", **small())
    with pytest.raises(ValueError, match="total_steps must be an integer ≥ one batch"):
        agent.learn(10)
    for not_whole in (128.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="total_steps must be an integer"):
            agent.learn(not_whole)
    assert agent.learn(1.28e2, schedule_end=2.56e2).env_steps == 128 and agent.target_steps == 128
    counted = natpg.NPG("CartPole-v1", eval_every=1e4, **small()).config.run.eval_every
    assert counted == 10_000 and type(counted) is int  # a count setting written 1e4 too
    from natpg.cli import build_parser

    args = build_parser().parse_args(["train", "npg", "CartPole-v1", "--steps", "1e6", "--eval-every", "5_000"])
    assert (args.steps, args.eval_every) == (1_000_000, 5000)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "npg", "CartPole-v1", "--steps", "1.5"])


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
    assert cart.predict(np.zeros((0, 4))).shape == (0,) and agent.predict(np.zeros((0, 3))).shape == (0, 1)  # empty


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
    code = tmp_path / "code.pt"  # a pickle that would run code: refused, without torch's "try weights_only=False"
    torch.save({"make": os.system}, code)
    with pytest.raises(ValueError, match="not a readable natpg checkpoint") as err:
        natpg.load(str(code))
    assert "weights_only" not in str(err.value)
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
    recent = natpg.load(str(out)).recent_return()
    assert capsys.readouterr().out == f"trained npg on CartPole-v1 for 256 steps; recent return {recent:.1f}; saved to {out}\n"
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
    capsys.readouterr()
    assert cli(["train", "npg", "Pendulum-v1", "--steps", "64", "--out", str(tmp_path / "p"), "--no-progress",
                "--n-envs", "2", "--set", "n_steps=32"]) == 0  # its 200-step episodes: none over yet
    assert "for 64 steps; no episode finished yet; saved to" in capsys.readouterr().out


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
    (["train", "npg", "CartPole-v1", "--set", "seed=3"], r"the seed is not a --set setting: use --seed 3"),
    (["train", "npg", "CartPole-v1", "--steps", "2048", "--out", ""], r"out_dir must be a directory path, got ''"),
])
def test_cli_errors_are_messages_without_traceback(argv, pattern, capsys):
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(f"natpg {argv[0]}: error: ")
    assert re.search(pattern, err)


def test_python_dash_m_natpg_is_the_natpg_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "natpg", "config", "npg", "CartPole-v1"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("npg on CartPole-v1 (environment family: classic)")


def test_a_full_disk_while_a_checkpoint_is_written_is_an_oserror_and_keeps_the_last_one(tmp_path, monkeypatch, capsys):
    """torch.save reports a full disk as a RuntimeError ("[enforce fail at inline_container.cc] ... unexpected
    pos"), the OSError only its context: natpg names the file and the OSError, and the CLI prints one line."""
    run = tmp_path / "run"
    agent = natpg.NPG("CartPole-v1", seed=0, **small())
    agent.learn(64, out_dir=str(run))
    saved = (run / "model.pt").read_bytes()

    def full_disk(obj, f):
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 89344 vs 89232")

    def other_failure(obj, f):
        raise RuntimeError("a tensor that cannot be saved")

    monkeypatch.setattr(natpg.checkpoint.torch, "save", other_failure)  # not a disk's: goes on as it is
    with pytest.raises(RuntimeError, match="^a tensor that cannot be saved$"):
        agent.save(str(run))
    monkeypatch.setattr(natpg.checkpoint.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"cannot write checkpoint '.*model.pt': \[Errno 28\] No space left on device"):
        agent.save(str(run))
    assert (run / "model.pt").read_bytes() == saved  # the last checkpoint kept,
    assert not [p for p in run.iterdir() if p.name.startswith(".model.pt.tmp")]  # its half-written successor gone
    capsys.readouterr()
    assert cli(["train", "npg", "CartPole-v1", "--steps", "64", "--out", str(tmp_path / "new"), "--no-progress",
                "--n-envs", "2", "--set", "n_steps=32"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.match(r"natpg train: error: cannot write checkpoint .*No space left", err)


def test_the_cli_prints_a_memory_error_as_one_line(tmp_path, monkeypatch, capsys):
    def out_of_memory(self, *args, **kwargs):
        raise MemoryError("Unable to allocate 29.1 TiB for an array with shape (10, 2, 4) and data type float32")

    monkeypatch.setattr(natpg.agent.Agent, "learn", out_of_memory)
    assert cli(["train", "npg", "CartPole-v1", "--steps", "64", "--out", str(tmp_path / "run"), "--no-progress",
                "--n-envs", "2", "--set", "n_steps=32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("natpg train: error: Unable to allocate 29.1 TiB") and "Traceback" not in err


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
    # a loaded run trained into a new directory keeps its best policy there, however good the earlier best was
    forked = natpg.load(str(run))
    forked.best_eval_return = float("inf")
    forked.learn(128, out_dir=str(tmp_path / "fork"), reset=False)  # evaluated at 512, past 480
    assert natpg.load(str(tmp_path / "fork" / "best")).env_steps == 512 == forked.env_steps
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
    with pytest.raises(ValueError, match="kl_schedule='linear' would not be read: read by step kl / linesearch / kfac_clip"):
        natpg.PPO("CartPole-v1", kl_schedule="linear")


def test_a_learn_call_that_decays_a_schedule_towards_another_end_warns(tmp_path):
    """Chunked calls without schedule_end decay δ towards each call's own end (a sawtooth, as SB3 with
    reset_num_timesteps=False), and a loaded finished run goes on at a fraction of δ: both warn, naming the way to
    one schedule; calls sharing one schedule_end, a first call, and a constant schedule do not."""
    agent = natpg.NPG("CartPole-v1", seed=2, **small(kl_schedule="linear", max_kl=0.02))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agent.learn(128, schedule_end=256)
        agent.learn(128, reset=False, schedule_end=256)
        natpg.NPG("CartPole-v1", seed=2, **small()).learn(64).learn(64)  # constant δ: nothing to restart
    with pytest.warns(RuntimeWarning, match=r"^kl_schedule='linear': this learn call decays the step towards env step "
                                            r"320, where it ends, starting at 0.2 of δ = 0.02; the run so far was to "
                                            r"end at 256. To train one run in several calls, give every call the same "
                                            r"learn\(..., schedule_end=TOTAL\) \(natpg train --resume: the run's own "
                                            r"--steps\); for steps that do not decay, kl_schedule='constant'$") as caught:
        agent.learn(64, reset=False)
    assert caught[0].filename == __file__  # the user's line, not natpg's nor torch's decorator around learn
    agent.save(tmp_path / "m")
    with pytest.warns(RuntimeWarning, match="decays the step towards env step 384, .* the run so far was to end at 320"):
        natpg.load(tmp_path / "m").learn(64)


def test_a_learn_into_its_run_directory_after_one_without_it_names_the_gap(tmp_path):
    """The updates of a learn call without out_dir are in none of DIR's logs: going on into DIR warns of the gap."""
    agent = natpg.NPG("CartPole-v1", seed=0, **small())
    agent.learn(64, out_dir=str(tmp_path)).learn(128)
    with pytest.warns(UserWarning, match=r"holds this run's log up to env step 64 \(update 1\), the agent is at 192 "
                                         r"\(update 3\): the updates between, trained without this directory, are "
                                         r"not in its logs"):
        agent.learn(64, out_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agent.learn(64, out_dir=str(tmp_path))  # no gap now
        natpg.load(str(tmp_path)).learn(64, out_dir=str(tmp_path))
        agent = natpg.load(str(tmp_path))
        agent.save(str(tmp_path))  # the same state again
    agent.learn(64)
    with pytest.warns(UserWarning, match=r"holds this run.s log up to env step 384 \(update 6\), the agent is at 448"):
        agent.save(str(tmp_path))  # its checkpoint now ahead of its log: warned here, not at a later learn


def test_warnings_from_inside_natpg_point_at_the_users_line():
    """learn runs under torch's decorators and warns several calls deep: the warning names the caller's file."""
    agent = natpg.NPG("Pendulum-v1", seed=0, **small())  # 200-step episodes: none ends in 32 steps per copy
    agent.learn(64)
    with pytest.warns(UserWarning, match="no training episode ended in this learn call") as caught:
        agent.learn(64)
    assert caught[0].filename == __file__
    with pytest.warns(RuntimeWarning, match="had not ended after max_episode_steps=5 steps") as caught:
        natpg.evaluate(agent, episodes=1, max_episode_steps=5)
    assert caught[0].filename == __file__


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
    with pytest.raises(ValueError, match="lr_schedule='linear' would not be read: read by step fixed / adam / ppo_clip"):
        natpg.NPG("CartPole-v1", lr_schedule="linear")


def test_a_critic_setting_the_chosen_critic_does_not_read_is_named():
    with pytest.warns(UserWarning, match=r"acktr on Hopper-v5 does not read these settings: critic_lr \(read by "
                                         r"critic_optimizer='adam'; this run's critic_optimizer is 'kfac'\)"):
        natpg.ACKTR("Hopper-v5", critic_lr=1e-2)
    with pytest.warns(UserWarning, match=r"critic_damping \(read by critic_optimizer='kfac'"):
        natpg.NPG("Hopper-v5", critic_damping=0.5)


def test_training_is_reproducible_with_a_seed():
    runs = []
    for _ in range(2):
        agent = natpg.NPG("CartPole-v1", seed=11, **small())
        agent.learn(128)
        runs.append(torch.cat([p.detach().reshape(-1) for p in agent.policy.parameters()]))
    assert torch.equal(*runs)


def test_each_learn_call_resets_its_environments_with_seeds_after_the_updates_done(monkeypatch):
    """learn(reset=True) resets the copies with seed + updates: a second call steps other episodes than the first;
    reset=False resets nothing."""
    made = []
    real = natpg.agent.make_vec_env

    def recording(*args, **kwargs):
        envs = real(*args, **kwargs)
        reset = envs.reset
        envs.reset = lambda seed=None, options=None: made.append(seed) or reset(seed=seed, options=options)
        return envs

    monkeypatch.setattr(natpg.agent, "make_vec_env", recording)
    agent = natpg.NPG("CartPole-v1", seed=4, normalize_obs=False, **small())
    agent.learn(64)
    agent.learn(128)
    agent.learn(64, reset=False)
    assert made == [4, 5]  # the vector env seeds copy i with seed + i (test_vector)


def test_seed_none_draws_a_seed_that_is_recorded_and_repeats_the_run(tmp_path):
    """SB3's seed=None: each agent gets its own seed, kept in agent.seed and config.json; giving it back repeats the run."""
    first, second = natpg.NPG("CartPole-v1", seed=None, **small()), natpg.NPG("CartPole-v1", seed=None, **small())
    assert isinstance(first.seed, int) and first.seed >= 0 and first.seed != second.seed
    first.learn(128, out_dir=str(tmp_path / "r"))
    recorded = json.load(open(tmp_path / "r" / "config.json"))["seed"]
    again = natpg.NPG("CartPole-v1", seed=recorded, **small())
    again.learn(128)
    assert recorded == first.seed and all(torch.equal(p, q) for p, q in zip(first.policy.parameters(),
                                                                             again.policy.parameters()))


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
    with pytest.warns(UserWarning, match=r"npg Hopper-v5 max_kl=0.01: the mean over seeds is drawn where all 2 runs "
                                         r"have points, env_steps 150 to 300; 2 of them logged outside it, left out"):
        plotted = plot_runs(runs, str(tmp_path / "seeds.png"), seeds=True)
    # a0 at 150, 250: 2 and 4 (interpolated); a1 at 200, 300: 3 and 6.5; common range 150…300.
    assert plotted == {"npg Hopper-v5 max_kl=0.01 (2 seeds)": ([150.0, 200.0, 250.0, 300.0], [2.0, 3.0, 4.0, 5.75]),
                       "npg Hopper-v5 max_kl=0.02 (1 seed)": ([100.0, 200.0], [20.0, 10.0])}
    assert cli(["plot", *runs, "--seeds", "-o", str(tmp_path / "cli.png")]) == 0 and (tmp_path / "cli.png").exists()
    capsys.readouterr()
    late = run("a2", 2, 0.01, [(400, 1.0), (500, 2.0)])
    assert cli(["plot", runs[0], late, "--seeds", "-o", str(tmp_path / "x.png")]) == 2
    assert "npg Hopper-v5: the runs share no range of x" in capsys.readouterr().err  # names the group
    assert cli(["plot", *runs, "--seeds", "--x", "ep_return_mean", "--y", "env_steps", "-o", str(tmp_path / "y.png")]) == 2
    assert "x column that increases" in capsys.readouterr().err  # b0's return falls
    young = run("b1", 1, 0.02, [(100, "nan")])  # no episode over yet: left out, with a warning, beside the others
    with pytest.warns(UserWarning, match=r"column 'ep_return_mean' of '.*b1' has no finite values to plot: left out"):
        again = plot_runs([*runs, young], str(tmp_path / "seeds.png"), seeds=True)
    assert again == plotted
    assert cli(["plot", young, "-o", str(tmp_path / "z.png")]) == 2  # alone: nothing to plot
    assert "has no finite values to plot" in capsys.readouterr().err

    decaying = []
    for seed in (0, 1):
        d = tmp_path / f"k{seed}"
        d.mkdir()
        config = natpg.Config().to_dict()
        config["step"]["kl_schedule"] = "linear"
        (d / "config.json").write_text(json.dumps({"algorithm": "npg", "env_id": "Hopper-v5", "seed": seed, **config}))
        (d / "progress.csv").write_text("env_steps,ep_return_mean\n100,1.0\n200,2.0\n")
        decaying.append(str(d))
    with pytest.warns(UserWarning, match=r"'.*k0', '.*k1' decay by kl_schedule towards where each was told to end "
                                         r"\(--steps, schedule_end\), which config.json does not record"):
        plot_runs(decaying, str(tmp_path / "k.png"), seeds=True)
    trained = [str(tmp_path / f"t{seed}") for seed in (0, 1)]  # checkpoints that say the same end: no warning
    for seed, out in enumerate(trained):
        natpg.NPG("CartPole-v1", seed=seed, kl_schedule="linear", **small()).learn(128, out_dir=out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(plot_runs(trained, str(tmp_path / "t.png"), seeds=True)) == ["npg CartPole-v1 (2 seeds)"]
    ended = str(tmp_path / "t2")  # the same steps, its schedule told to end elsewhere
    natpg.NPG("CartPole-v1", seed=2, kl_schedule="linear", **small()).learn(128, out_dir=ended, schedule_end=256)
    with pytest.warns(UserWarning, match="decay by kl_schedule towards where each was told to end"):
        plot_runs([*trained, ended], str(tmp_path / "t.png"), seeds=True)



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
    plotted = plot_runs(runs, str(tmp_path / "same.png"))
    assert drawn == [[1.0], [2.0]]
    assert plotted == {os.path.join("a", "s0"): ([100.0], [1.0]), os.path.join("b", "s0"): ([100.0], [2.0])}
    (tmp_path / "a" / "s0" / "progress.csv").write_text("env_steps,ep_return_mean\n100,1.0\n200,abc\n")
    with pytest.raises(ValueError, match=r"progress.csv', line 3, column 'ep_return_mean': 'abc' is not a number"):
        plot_runs(runs, str(tmp_path / "bad.png"))


def test_plot_names_the_file_and_line_of_what_it_cannot_read(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from natpg.plotting import plot_runs

    cases = {"wide": ("env_steps,ep_return_mean\n100,1\n200,2,3\n", None,
                      r"progress.csv', line 3: 3 fields, but the header names 2"),
             "listed": ("env_steps,ep_return_mean\n100,1\n", "[1, 2]",
                        r"config.json' holds list, not a run's settings"),
             "broken": ("env_steps,ep_return_mean\n100,1\n", "{broken", r"config.json' is not valid JSON: Expecting")}
    for name, (progress, config, message) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "progress.csv").write_text(progress)
        if config is not None:
            (tmp_path / name / "config.json").write_text(config)
        with pytest.raises(ValueError, match=message):
            plot_runs([str(tmp_path / name)], str(tmp_path / "p.png"), seeds=True)
        assert cli(["plot", str(tmp_path / name), "--seeds", "-o", str(tmp_path / "p.png")]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and re.search(message, err)
    for runs in ([], str(tmp_path / "wide")):  # a bare string would be read as one run per character
        with pytest.raises(ValueError, match="run_dirs must be a non-empty list of run directories"):
            plot_runs(runs, str(tmp_path / "p.png"))
    (tmp_path / "wide" / "progress.csv").write_text("env_steps,ep_return_mean\n100,1\n200,2\n")
    assert plot_runs([tmp_path / "wide"], str(tmp_path / "p.png")) == {"wide": ([100.0, 200.0], [1.0, 2.0])}


def test_plot_seeds_counts_a_run_given_twice_once_and_ignores_the_ray_address(tmp_path):
    pytest.importorskip("matplotlib")
    from natpg.plotting import plot_runs

    runs = []
    for seed, address in ((0, None), (1, "10.0.0.1:6379")):
        run = tmp_path / f"s{seed}"
        run.mkdir()
        (run / "progress.csv").write_text(f"env_steps,ep_return_mean\n100,{seed}\n200,{seed + 1}\n")
        (run / "config.json").write_text(json.dumps({"algorithm": "npg", "env_id": "CartPole-v1", "seed": seed,
                                                     "distributed": {"ray_address": address}}))
        runs.append(str(run))
    plotted = plot_runs(runs + [runs[0], str(tmp_path / "." / "s1")], str(tmp_path / "p.png"), seeds=True)
    assert plotted == {"npg CartPole-v1 (2 seeds)": ([100.0, 200.0], [0.5, 1.5])}
    # s1 continued in a copy (natpg train --resume s1 --out copy), with a row being written: the seed counts once,
    # as the run that logged more, with a warning; the half-written row is not a row
    shutil.copytree(tmp_path / "s1", tmp_path / "copy")
    with open(tmp_path / "copy" / "progress.csv", "a") as f:
        f.write("300,3\n400,4")
    with pytest.warns(UserWarning, match=r"s1' and '.*copy' have the same settings and seed .*counted once, as "
                                         r"'.*copy', which logged the most rows"):
        plotted = plot_runs(runs + [str(tmp_path / "copy")], str(tmp_path / "p.png"), seeds=True)
    assert plotted == {"npg CartPole-v1 (2 seeds)": ([100.0, 200.0], [0.5, 1.5])}
    from natpg.plotting import read_progress

    assert read_progress(str(tmp_path / "copy")) == {"env_steps": [100.0, 200.0, 300.0],
                                                     "ep_return_mean": [1.0, 2.0, 3.0]}
    (tmp_path / "young").mkdir()  # started, no row logged yet: left out beside the others, with a warning
    shutil.copy(tmp_path / "s0" / "config.json", tmp_path / "young" / "config.json")
    (tmp_path / "young" / "progress.csv").write_text("")
    with pytest.warns(UserWarning, match=r"young.*has no rows yet: left out"):
        assert plot_runs(runs + [str(tmp_path / "young")], str(tmp_path / "p.png")) == \
            {"s0": ([100.0, 200.0], [0.0, 1.0]), "s1": ([100.0, 200.0], [1.0, 2.0])}


# --- run directories, failures mid-run, acting beside training ---------------------------------------------

class _BreaksAfter(gym.Wrapper):
    """CartPole (or Pendulum) whose copy raises (``fail='raise'``) or returns a NaN observation (``fail='nan'``)
    at its ``at``-th step, counted over its episodes."""

    def __init__(self, env_id="CartPole-v1", at=10**9, fail="raise"):
        super().__init__(gym.make(env_id))
        self.at, self.fail, self.steps = at, fail, 0

    def step(self, action):
        self.steps += 1
        obs, rew, term, trunc, info = self.env.step(action)
        if self.steps == self.at:
            if self.fail == "raise":
                raise RuntimeError("the simulator broke")
            obs = np.full_like(obs, np.nan)
        return obs, rew, term, trunc, info


for _id, _kw in {"natpg_test/CartPoleBreaks-v0": {"at": 125}, "natpg_test/CartPoleSound-v0": {},
                 "natpg_test/CartPoleBreaksAt1-v0": {"at": 1},
                 "natpg_test/PendulumNaNAt5-v0": {"env_id": "Pendulum-v1", "at": 5, "fail": "nan"}}.items():
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_BreaksAfter, kwargs=_kw)


def _rows(run):
    return [int(r["env_steps"]) for r in csv.DictReader(open(run / "progress.csv"))]


def test_learn_continues_its_own_run_directory_and_refuses_another_run(tmp_path):
    run = tmp_path / "run"
    a = natpg.NPG("CartPole-v1", seed=0, **small(eval_every=64, eval_episodes=1))
    a.learn(128, out_dir=str(run))
    a.learn(128, out_dir=str(run))  # the same agent carries on: its log too
    assert _rows(run) == [64, 128, 192, 256] and (run / "best" / "model.pt").exists()
    natpg.load(str(run)).learn(128, out_dir=str(run))  # the run loaded from the directory carries on
    assert _rows(run) == [64, 128, 192, 256, 320, 384]
    (run / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for other in (natpg.NPG("CartPole-v1", seed=0, **small(eval_every=64, eval_episodes=1)),  # the same command again
                  natpg.TRPO("Pendulum-v1", seed=0, **small())):
        with pytest.raises(ValueError, match=r"already holds a natpg run \(npg on CartPole-v1, seed 0, 384 env steps\)"):
            other.learn(128, out_dir=str(run))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing written, nothing lost
    natpg.TRPO("Pendulum-v1", seed=0, **small()).learn(128, out_dir=str(run), overwrite=True)
    assert _rows(run) == [64, 128] and not (run / "best").exists() and natpg.load(str(run)).algorithm == "trpo"
    assert (run / "notes.txt").read_text() == "mine"  # overwrite deletes natpg's outputs only
    with pytest.raises(ValueError, match="must be a directory"):
        natpg.NPG("CartPole-v1", **small()).learn(64, out_dir=str(tmp_path / "model.pt"))
    assert not (tmp_path / "model.pt").exists()


def test_learn_and_save_take_only_true_or_false_for_their_flags(tmp_path):
    """overwrite="False" is a truthy string: read as true it deleted another run's checkpoint and logs."""
    run = tmp_path / "run"
    natpg.NPG("CartPole-v1", seed=0, **small()).learn(64, out_dir=str(run))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other = natpg.PPO("CartPole-v1", **small())
    for call in (lambda: other.learn(64, out_dir=str(run), overwrite="False"),
                 lambda: other.save(str(run), overwrite="no"), lambda: other.save(str(run / "model.pt"), overwrite=1)):
        with pytest.raises(ValueError, match=r"overwrite must be True or False, got ('False'|'no'|1)"):
            call()
    for flag in ("reset", "progress_bar"):
        with pytest.raises(ValueError, match=rf"{flag} must be True or False, got 'no'"):
            other.learn(64, **{flag: "no"})
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before and other.env_steps == 0
    other.learn(64, reset=np.bool_(True), progress_bar=False)  # NumPy's bool is a bool
    assert other.env_steps == 64


def test_overwrite_never_deletes_files_with_natpgs_names_that_natpg_did_not_write(tmp_path, capsys):
    """A folder holding another tool's tb/ and progress.csv (SB3 writes both) and a user's best/, but no natpg
    checkpoint or config.json, is refused even with overwrite, every file kept; a natpg run whose checkpoint is
    unreadable but whose config.json is natpg's is replaced as before."""
    foreign = tmp_path / "exp"
    (foreign / "tb" / "other_tool").mkdir(parents=True)
    (foreign / "tb" / "other_tool" / "events.out").write_text("theirs")
    (foreign / "best").mkdir()
    (foreign / "best" / "weights.h5").write_text("mine")
    (foreign / "progress.csv").write_text("time/fps,rollout/ep_rew_mean\n100,20.0\n")
    before = {p: p.read_bytes() for p in foreign.rglob("*") if p.is_file()}
    agent = natpg.NPG("CartPole-v1", seed=0, **small())
    for call in (lambda: agent.learn(64, out_dir=str(foreign), overwrite=True),
                 lambda: agent.save(str(foreign), overwrite=True), lambda: agent.learn(64, out_dir=str(foreign))):
        with pytest.raises(ValueError, match=r"holds progress.csv, tb, best but neither a readable natpg checkpoint "
                                             r"nor natpg's config.json, so they may not be natpg's"):
            call()
    args = ["train", "npg", "CartPole-v1", "--steps", "64", "--out", str(foreign), "--no-progress", "--n-envs", "2",
            "--set", "n_steps=32", "--overwrite"]
    capsys.readouterr()
    assert cli(args) == 2 and "and overwrite does not delete them" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in foreign.rglob("*") if p.is_file() and p.name != ".natpg.lock"}
    assert after == before  # (the lock natpg took to look there stays, as in any directory it was given)
    run = tmp_path / "run"
    natpg.TRPO("Pendulum-v1", seed=0, **small()).learn(64, out_dir=str(run))
    (run / "model.pt").write_bytes(b"truncated")
    agent.learn(64, out_dir=str(run), overwrite=True)
    assert natpg.load(str(run)).algorithm == "npg" and _rows(run) == [64]


def test_save_to_an_sb3_style_zip_name_is_refused_naming_the_two_forms(tmp_path):
    """SB3's model.save("model.zip") writes one file; natpg would have made a directory named model.zip."""
    agent = natpg.NPG("CartPole-v1", **small())
    with pytest.raises(ValueError, match=r"natpg saves a run directory, or one file whose name ends in .pt, .*give "
                                         r"'.*model.pt' for one file, or '.*model' for a directory"):
        agent.save(str(tmp_path / "model.zip"))
    assert not os.path.exists(tmp_path / "model.zip")
    assert agent.save(str(tmp_path / "model.pt")).endswith("model.pt")


def test_save_refuses_a_directory_or_file_holding_another_run_unless_overwrite(tmp_path):
    """save into a run directory of another run (or over its model.pt) would pair that run's log with a foreign
    checkpoint, and a later resume would drop the log's rows: refused, nothing written; the run's own agent saves
    there as often as it likes."""
    run = tmp_path / "run"
    a = natpg.NPG("CartPole-v1", seed=0, **small(eval_every=64, eval_episodes=1))
    a.learn(128, out_dir=str(run))
    a.save(str(run))  # its own run: the same state again,
    a.learn(64)
    a.save(str(run))  # or a later one
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other = natpg.PPO("Pendulum-v1", **small())
    for path, kind in [(run, "directory"), (run / "model.pt", "file")]:
        with pytest.raises(ValueError, match=rf"{kind} '{path}' already holds a natpg run \(npg on CartPole-v1, seed 0, "
                                             rf"192 env steps\); choose another .*save\(\.\.\., overwrite=True\)"):
            other.save(str(path))
    with pytest.raises(ValueError, match=r"already holds a natpg run \(npg on CartPole-v1, seed 0, 192 env steps\)"):
        natpg.load(str(run / "best")).save(str(run))  # an earlier state of the run over its later one
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing written, nothing lost
    foreign = tmp_path / "weights.pt"
    foreign.write_bytes(b"not natpg's")
    with pytest.raises(ValueError, match=r"file '.*weights.pt' already holds a file that is not this run's"):
        other.save(str(foreign))
    assert other.save(str(foreign), overwrite=True) == str(foreign) and natpg.load(str(foreign)).algorithm == "ppo"
    other.save(str(run), overwrite=True)
    assert natpg.load(str(run)).algorithm == "ppo" and not (run / "progress.csv").exists()
    own = tmp_path / "own"  # overwrite=True replaces another run, never the agent's own: its log stays
    b = natpg.NPG("CartPole-v1", seed=0, **small())
    b.learn(128, out_dir=str(own), overwrite=True)
    b.learn(128, out_dir=str(own), overwrite=True)
    b.save(str(own), overwrite=True)
    assert _rows(own) == [64, 128, 192, 256] and (own / "episodes.csv").exists()


def test_cli_train_refuses_a_run_directory_unless_resumed_or_overwritten(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", "npg", "CartPole-v1", "--steps", "128", "--out", out, "--no-progress", "--n-envs", "2",
            "--set", "n_steps=32"]
    assert cli(args) == 0
    model = open(os.path.join(out, "model.pt"), "rb").read()
    capsys.readouterr()
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "already holds a natpg run (npg on CartPole-v1, seed 0, 128 env steps)" in err and "Traceback" not in err
    assert open(os.path.join(out, "model.pt"), "rb").read() == model
    assert cli(args + ["--resume", out, "--overwrite"]) == 2
    assert cli(["train", "trpo", "Pendulum-v1", "--steps", "64", "--out", out, "--no-progress", "--n-envs", "2",
                "--set", "n_steps=32", "--overwrite"]) == 0
    assert natpg.load(out).algorithm == "trpo" and _rows(tmp_path / "run") == [64]
    capsys.readouterr()
    assert cli(args[:6] + [str(tmp_path / "m.pt")] + args[7:]) == 2
    assert "must be a directory" in capsys.readouterr().err and not (tmp_path / "m.pt").exists()


def test_an_environment_error_mid_run_keeps_every_completed_update(tmp_path, capsys):
    run = tmp_path / "run"
    a = natpg.NPG("natpg_test/CartPoleBreaks-v0", seed=3, **small())  # copy 0 breaks in its 125th step: rollout 4
    with pytest.raises(RuntimeError, match="the simulator broke") as info:
        a.learn(640, out_dir=str(run))
    assert a.updates == 3 and any("(3 updates, 192 env steps) is saved" in n for n in info.value.__notes__)
    saved = natpg.load(str(run))
    ref = natpg.NPG("natpg_test/CartPoleSound-v0", seed=3, **small())
    ref.learn(192)  # the same run, stopped after three updates
    assert saved.env_steps == 192 and _rows(run) == [64, 128, 192]
    assert all(torch.equal(p, q) for p, q in zip(saved.policy.parameters(), ref.policy.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(saved.critic.parameters(), ref.critic.parameters()))
    # the normalisers as they were after update 3, not with the broken rollout's first steps merged in
    assert saved.obs_normalizer.rms.count == ref.obs_normalizer.rms.count
    np.testing.assert_array_equal(saved.obs_normalizer.rms.mean, ref.obs_normalizer.rms.mean)
    np.testing.assert_array_equal(a.obs_normalizer.rms.var, ref.obs_normalizer.rms.var)
    # the episode statistics too: the broken rollout's finished episodes are not counted, the window not doubled
    assert a._sampler.episodes == ref._sampler.episodes > 0
    assert list(a._sampler.recent_returns) == list(ref._sampler.recent_returns)
    assert list(a._sampler.recent_lengths) == list(ref._sampler.recent_lengths)
    assert saved.recent_return() == ref.recent_return()
    assert a._sampler.episodes < ref.learn(64, reset=False)._sampler.episodes  # the broken rollout ended some
    # the broken environments are not stepped again: the next learn builds them afresh, the statistics kept
    with pytest.warns(RuntimeWarning, match=r"freshly reset environments.*stopped mid-rollout \(RuntimeError\)"):
        a.learn(64, reset=False)
    assert a.updates == 4
    with pytest.raises(RuntimeError, match="the simulator broke"):  # the environment's own error, shown as it is
        cli(["train", "npg", "natpg_test/CartPoleBreaks-v0", "--seed", "3", "--steps", "640", "--out",
             str(tmp_path / "c"), "--no-progress", "--n-envs", "2", "--set", "n_steps=32"])
    assert natpg.load(str(tmp_path / "c")).env_steps == 192


def test_cli_prints_where_a_failed_run_was_saved(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli(["train", "npg", "natpg_test/PendulumNaNAt5-v0", "--steps", "640", "--out", out, "--no-progress",
                "--n-envs", "2", "--set", "n_steps=2", "--set", "max_kl=0.01"]) == 2
    err = capsys.readouterr().err
    assert "non-finite observation" in err and "(2 updates, 8 env steps) is saved in" in err
    assert natpg.load(out).env_steps == 8


def test_stochastic_acting_between_learn_calls_leaves_training_alone():
    def final_params(act: bool):
        agent = natpg.NPG("CartPole-v1", seed=0, **small())
        agent.learn(128)
        if act:
            agent.predict(np.zeros(4), deterministic=False)
            natpg.evaluate(agent, episodes=2, deterministic=False)
        agent.learn(128, reset=False)
        return torch.cat([p.detach().reshape(-1) for p in agent.policy.parameters()])

    assert torch.equal(final_params(False), final_params(True))
    agent = natpg.NPG("CartPole-v1", seed=0, **small())  # a stochastic evaluation repeats for its seed
    assert natpg.evaluate(agent, episodes=3, seed=5, deterministic=False) == \
        natpg.evaluate(agent, episodes=3, seed=5, deterministic=False)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_a_stochastic_evaluation_episode_is_its_own_whatever_runs_beside_it(env_id):
    """Episode i draws from its own generator seeded seed + i, as its environment is: its return is the same
    when it runs alone, or as episode i - 1 of an evaluation seeded seed + 1, as among the others."""
    agent = natpg.NPG(env_id, seed=0, **small())
    returns = evaluation_episodes(agent, episodes=4, seed=5, deterministic=False)["return"]
    alone = [evaluation_episodes(agent, episodes=1, seed=5 + i, deterministic=False)["return"][0] for i in range(4)]
    same = partial(np.testing.assert_allclose, rtol=1e-6)  # a batch of 1, 3 or 4 rows: rounding alone differs
    same(alone, returns)
    same(evaluation_episodes(agent, episodes=3, seed=6, deterministic=False)["return"], returns[1:])
    assert len(set(returns)) > 1  # the copies did not draw alike
    assert (returns != evaluation_episodes(agent, episodes=4, seed=5)["return"]).any()  # nor act by the mode


@pytest.mark.parametrize("deterministic", [True, False])
def test_a_large_evaluation_runs_in_turns_of_eval_chunk_copies_with_the_same_episodes(monkeypatch, deterministic):
    """Episodes beyond EVAL_CHUNK run in later turns (natpg eval --episodes 10**20 built every copy at once and
    filled the memory): each turn's copies and generators are seeded as in one turn, so the episodes are the same."""
    from natpg import evaluation

    agent = natpg.NPG("Pendulum-v1", seed=0, **small())
    agent.learn(128)
    at_once = evaluation_episodes(agent, episodes=7, seed=5, deterministic=deterministic)
    built = []
    make = evaluation.make_vec_env
    monkeypatch.setattr(evaluation, "make_vec_env",
                        lambda env_id, n, *a, **k: built.append(n) or make(env_id, n, *a, **k))
    monkeypatch.setattr(evaluation, "EVAL_CHUNK", 3)
    in_turns = evaluation_episodes(agent, episodes=7, seed=5, deterministic=deterministic)
    assert built == [3, 3, 1] and in_turns.keys() == at_once.keys() == {"return", "length", "terminated", "last_obs"}
    for key in at_once:  # a batch of 7, 3 or 1 rows: rounding alone differs
        np.testing.assert_allclose(in_turns[key], at_once[key], rtol=1e-6, atol=1e-6)
    assert len(set(at_once["return"])) == 7


def test_every_evaluation_and_each_learn_calls_last_update_are_logged_whatever_the_log_interval(tmp_path):
    """The last update of a learn call is the saved model's: its row is written, also where a callback stops."""
    agent = natpg.NPG("CartPole-v1", **small(eval_every=192, eval_episodes=1, log_interval=2))
    agent.learn(64 * 7, out_dir=str(tmp_path))
    rows = {int(r["updates"]): float(r["eval/return_mean"]) for r in csv.DictReader(open(tmp_path / "progress.csv"))}
    assert sorted(rows) == [2, 3, 4, 6, 7] and [k for k, v in rows.items() if math.isfinite(v)] == [3, 6]

    def stop_at_11(agent, row):
        row["custom/mark"] = row["updates"]
        return row["updates"] < 11

    agent.learn(64 * 7, out_dir=str(tmp_path), callback=stop_at_11)
    rows = list(csv.DictReader(open(tmp_path / "progress.csv")))
    assert [int(r["updates"]) for r in rows] == [2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert rows[-1]["custom/mark"] == "11" and natpg.load(str(tmp_path)).updates == 11


def test_evaluation_stops_at_a_non_finite_observation_or_ends_the_episode_under_drop():
    agent = natpg.NPG("natpg_test/PendulumNaNAt5-v0", **small())
    with pytest.raises(natpg.rollout.NonFiniteEnvError, match=r"step 5 of evaluation episode\(s\) \[0, 1\]"):
        natpg.evaluate(agent, episodes=2)
    dropping = natpg.NPG("natpg_test/PendulumNaNAt5-v0", **small(nonfinite_env="drop"))
    with pytest.warns(RuntimeWarning, match="2 of 2 evaluation episodes .* ended at a non-finite"):
        out = natpg.evaluation.evaluation_episodes(dropping, episodes=2)
    assert out["length"].tolist() == [4, 4] and np.isfinite(out["return"]).all()


def test_predict_names_a_tuple_observation_off_its_space_as_one_observation():
    """(32, 10, 0) is one Blackjack observation with a sum out of range, not a list of three observations (whose
    error would end "'int' object is not iterable"); three valid ones in a tuple are still a list of them."""
    agent = natpg.NPG("Blackjack-v1", seed=1, **small())
    with pytest.raises(ValueError, match=r"^observation \(32, 10, 0\) is not in the policy's observation space "
                                         r"Tuple\(Discrete\(32\), Discrete\(11\), Discrete\(2\)\)$"):
        agent.predict((32, 10, 0))
    three = ((3, 10, 0), (4, 2, 1), (5, 1, 0))
    assert agent.predict(three).tolist() == [int(agent.predict(o)) for o in three]


def test_predict_reads_a_vector_envs_batch_of_tuple_observations_as_the_single_ones():
    agent = natpg.NPG("Blackjack-v1", seed=1, **small())
    envs = gym.make_vec("Blackjack-v1", num_envs=6)
    obs, _ = envs.reset(seed=4)
    assert isinstance(obs, tuple) and obs[0].shape == (6,)
    singles = [agent.predict(tuple(int(part[i]) for part in obs)) for i in range(6)]
    assert agent.predict(obs).tolist() == [int(s) for s in singles]
    envs.close()


@pytest.mark.parametrize("setting, message", [
    (dict(hidden=(10**7, 10**7)), r"the networks \(hidden=\(10000000, 10000000\), critic_hidden=\(8,\)\) do not fit in "
                                  r"memory on cpu: .*allocate"),
    (dict(critic_hidden=(10**7, 10**7)), r"critic_hidden=\(10000000, 10000000\)\) do not fit in memory"),
    (dict(n_steps=10**13), r"a batch of n_envs × n_steps = 20000000000000 observations of 4 values needs "
                           r"596046\.4 GiB, more than this machine's .* GiB of memory; lower n_envs or n_steps")])
def test_networks_or_a_batch_too_large_for_memory_are_refused_when_the_agent_is_built(setting, message):
    """Not torch's allocator traceback from inside a layer, nor numpy's at the first rollout (after a checkpoint)."""
    with pytest.raises(ValueError, match=message):
        natpg.NPG("CartPole-v1", **{**small(), "critic_hidden": (8,), **setting})


def test_a_batch_too_large_for_memory_given_at_load_is_refused_before_learn_writes(tmp_path):
    natpg.NPG("CartPole-v1", seed=0, **small()).save(str(tmp_path / "run"))
    agent = natpg.load(str(tmp_path / "run"), n_steps=10**13)  # acting needs no batch: it loads
    assert agent.predict(np.zeros(4)) in (0, 1)
    with pytest.raises(ValueError, match=r"a batch of n_envs × n_steps = 20000000000000 observations .* lower n_envs"):
        agent.learn(64 * 10**13, out_dir=str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_a_dense_fisher_too_large_for_memory_is_refused_when_the_agent_is_built(tmp_path):
    with pytest.raises(ValueError, match=r"a dense 1054722x1054722 Fisher needs .* use fisher='cg'"):
        natpg.NPG("Pendulum-v1", fisher="dense", hidden=(1024, 1024), **small())
    natpg.NPG("Pendulum-v1", fisher="dense", hidden=(8,), **small()).learn(64)  # a small one trains


def test_an_empirical_score_matrix_too_large_for_memory_is_refused_when_the_agent_is_built(tmp_path):
    """S [N, P] and the Gram matrix of the smaller side (the empirical Fisher's when N < P, NAC's always) that
    cannot fit: refused naming the batch;
    a small one trains, its conjugate gradient (N ≥ P) capped by the run's cg_iters."""
    with pytest.raises(ValueError, match=r"empirical Fisher's 1024x1054722 score matrix and its 1024x1024 Gram "
                                         r"matrix need 4\.03 GiB.*lower the batch, n_envs × n_steps, or use another "
                                         r"fisher"):  # N < P: Woodbury's Gram matrix
        natpg.NPG("Pendulum-v1", fisher="empirical", hidden=(1024, 1024), n_envs=2, n_steps=512, tensorboard=False)
    with pytest.raises(ValueError, match=r"80000x67074 score matrix needs 19\.99 GiB"):  # N ≥ P: CG, no Gram
        natpg.NPG("Pendulum-v1", fisher="empirical", hidden=(256, 256), n_envs=2, n_steps=40000, tensorboard=False)
    with pytest.raises(ValueError, match=r"1024x1054722 score matrix and its 1024x1024 Gram matrix need 4\.03 GiB"
                                         r".*or use another algorithm"):
        natpg.NAC("Pendulum-v1", hidden=(1024, 1024), n_envs=2, n_steps=512, tensorboard=False)
    with pytest.raises(ValueError, match=r"24576x20722 score matrix and its 20722x20722 Gram matrix need 5\.10 GiB"):
        natpg.NAC("CartPole-v1", hidden=(140, 140), n_envs=1, n_steps=24576, tensorboard=False)  # N ≥ P: S alone fits
    agent = natpg.NPG("Pendulum-v1", fisher="empirical", hidden=(4,), cg_iters=2, cg_tol=0.0, **small())
    rows = []
    agent.learn(128, callback=lambda a, row: rows.append(row))
    assert [row["fisher/cg_iters"] for row in rows] == [2.0, 2.0] and agent.actor_update.curvature.cg_iters == 2


def test_numpy_integers_count_as_integers_everywhere_a_count_is_taken(tmp_path):
    agent = natpg.NPG("CartPole-v1", seed=np.int64(2), **small())
    agent.learn(np.int64(64), schedule_end=np.int64(128))
    ref = natpg.NPG("CartPole-v1", seed=2, **small())
    ref.learn(64, schedule_end=128)
    assert agent.seed == 2 and type(agent.seed) is int
    assert all(torch.equal(p, q) for p, q in zip(agent.policy.parameters(), ref.policy.parameters()))
    assert natpg.evaluate(agent, episodes=np.int64(2), seed=np.int64(5), max_episode_steps=np.int64(50)) == \
        natpg.evaluate(ref, episodes=2, seed=5, max_episode_steps=50)


# For each refused setting: a changed value where the run reads it, and the same value where it would not.
REFUSED_CASES = {"fvp_subsample": ("npg", {"fvp_subsample": 0.5}, {"fisher": "kfac"}),
                 "cg_preconditioner": ("npg", {"cg_preconditioner": "diagonal"}, {"fisher": "diagonal"}),
                 "kl_schedule": ("npg", {"kl_schedule": "linear"}, {"step": "adam"}),
                 "lr_schedule": ("vpg", {"lr_schedule": "linear"}, {"step": "kl", "env": "CartPole-v1"}),
                 "target_kl": ("ppo", {"target_kl": 0.03}, {"step": "kl"}),
                 "ent_coef": ("npg", {"ent_coef": 0.01}, {"algorithm": "nac"}),
                 "value_clip": ("ppo", {"value_clip": 0.2}, {"critic_optimizer": "kfac"}),
                 "action_squash": ("npg", {"action_squash": "tanh"}, {"env": "CartPole-v1"}),
                 "fisher_estimator": ("acktr", {"fisher_estimator": "empirical"}, {"fisher": "cg"})}


@pytest.mark.parametrize("fisher, estimator, expected", [("kfac", None, "sampled"), ("kfac", "empirical", "empirical"),
                                                         ("kfac", "exact", "exact"), ("diagonal", None, "exact"),
                                                         ("diagonal", "sampled", "sampled"),
                                                         ("diagonal", "empirical", "empirical")])
def test_fisher_estimator_reaches_kfac_and_the_diagonal(fisher, estimator, expected):
    agent = natpg.NPG("CartPole-v1", fisher=fisher, fisher_estimator=estimator, **small())
    assert agent.actor_update.curvature.estimator == expected
    rows = []
    agent.learn(128, callback=lambda a, row: rows.append(row))
    assert [row["step/skipped"] for row in rows] == [0.0, 0.0]


@pytest.mark.parametrize("key", sorted(REFUSED_CASES))
def test_a_changed_setting_the_run_would_not_read_is_refused_and_one_it_reads_is_not(key):
    from natpg.config import REFUSED_WHEN_UNREAD

    assert set(REFUSED_CASES) == set(REFUSED_WHEN_UNREAD)
    algorithm, value, elsewhere = REFUSED_CASES[key]
    env = "Pendulum-v1"
    read = getattr(natpg, algorithm.upper())(env, **value)
    assert read.config.get(key) == value[key]
    algorithm = elsewhere.pop("algorithm", algorithm)
    env = elsewhere.pop("env", env)
    with pytest.raises(ValueError, match=rf"{key}=.* would not be read: .*leave it at its default"):
        getattr(natpg, algorithm.upper())(env, **value, **elsewhere)


def test_a_presets_value_left_unread_by_the_users_choice_goes_back_to_its_default():
    agent = natpg.PPO("Pendulum-v1", step="kl")  # PPO's Pendulum preset sets target_kl and a linear lr_schedule
    assert agent.config.step.target_kl == 0.0 and agent.config.step.lr_schedule == "constant"
    assert natpg.PPO("Pendulum-v1").config.step.target_kl == 0.02


def test_a_checkpoint_with_a_setting_that_did_nothing_still_loads(tmp_path):
    from natpg import checkpoint

    agent = natpg.NPG("CartPole-v1", fisher="kfac", **small())
    agent.learn(64)
    agent.save(str(tmp_path))
    meta, tensors = checkpoint.read(str(tmp_path))  # as written before such settings were refused
    meta["config"]["curvature"]["fvp_subsample"] = 0.2
    meta["config"]["policy"]["action_squash"] = "tanh"
    meta["config"]["step"]["target_kl"] = 0.01
    checkpoint.write(str(tmp_path), meta, tensors)
    with pytest.raises(ValueError, match="fvp_subsample"):
        natpg.NPG("CartPole-v1", fisher="kfac", fvp_subsample=0.2, **small())
    loaded = natpg.load(str(tmp_path))
    assert loaded.config.curvature.fvp_subsample == 1.0 and loaded.config.policy.action_squash == "clip"
    assert loaded.config.step.target_kl == 0.0
    assert loaded.predict(np.zeros((3, 4))).tolist() == agent.predict(np.zeros((3, 4))).tolist()


def test_an_algorithm_class_loads_its_own_runs_only(tmp_path, capsys):
    natpg.TRPO("CartPole-v1", **small()).save(str(tmp_path))
    assert type(natpg.TRPO.load(str(tmp_path))) is natpg.TRPO and type(natpg.Agent.load(str(tmp_path))) is natpg.TRPO
    with pytest.raises(ValueError, match="holds a trpo run, not npg; load it with natpg.load or natpg.TRPO.load"):
        natpg.NPG.load(str(tmp_path))
    assert cli(["--version"]) == 0 and capsys.readouterr().out.strip() == f"natpg {natpg.__version__}"


def test_cli_default_run_directory_is_one_directory_and_plot_names_the_file_it_wrote(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(["train", "npg", "natpg_test/CartPoleSound-v0", "--steps", "64", "--no-progress", "--n-envs", "2",
                "--set", "n_steps=32"]) == 0
    assert os.listdir(tmp_path / "runs") == ["npg-natpg_test-CartPoleSound-v0-s0"]
    pytest.importorskip("matplotlib")
    capsys.readouterr()
    assert cli(["plot", "runs/npg-natpg_test-CartPoleSound-v0-s0", "-o", "curve"]) == 0
    assert capsys.readouterr().out.strip() == "wrote curve.png" and (tmp_path / "curve.png").exists()


def test_cli_resume_of_a_checkpoint_file_needs_out_and_trains_there(tmp_path, capsys):
    natpg.NPG("CartPole-v1", seed=0, **small()).learn(64, out_dir=str(tmp_path / "a"))
    file = str(tmp_path / "a" / "model.pt")
    capsys.readouterr()
    assert cli(["train", "npg", "CartPole-v1", "--steps", "128", "--resume", file, "--no-progress"]) == 2
    assert "is one checkpoint file, not a run directory: give --out DIR" in capsys.readouterr().err
    assert cli(["train", "npg", "CartPole-v1", "--steps", "128", "--resume", file, "--out", str(tmp_path / "b"),
                "--no-progress"]) == 0
    assert natpg.load(str(tmp_path / "b")).env_steps == 128 and _rows(tmp_path / "b") == [128]


def test_cli_resume_without_steps_trains_to_the_runs_own_target(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("natpg.cli.DEFAULT_STEPS", 128)  # a resume that fell back on the default would stop at once
    out = str(tmp_path / "run")
    agent = natpg.NPG("CartPole-v1", seed=0, **small())
    agent.learn(256, out_dir=out, callback=lambda a, row: a.updates < 2)  # stopped after 2 of its 4 updates
    assert natpg.load(out).env_steps == 128 and natpg.load(out).target_steps == 256
    assert cli(["train", "npg", "CartPole-v1", "--resume", out, "--no-progress"]) == 0
    assert natpg.load(out).env_steps == 256 and _rows(tmp_path / "run") == [64, 128, 192, 256]
    capsys.readouterr()
    assert cli(["train", "npg", "CartPole-v1", "--resume", out, "--no-progress", "--steps", "300"]) == 0
    assert "already has 256 of --steps 300 environment steps; the 44 left are less than one batch (64)" in \
        capsys.readouterr().out


def test_a_run_that_failed_before_its_first_update_may_be_started_again_in_its_directory(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="the simulator broke"):
        cli(["train", "npg", "natpg_test/CartPoleBreaksAt1-v0", "--steps", "64", "--out", out, "--no-progress",
             "--n-envs", "2", "--set", "n_steps=32"])
    assert natpg.load(out).env_steps == 0
    assert cli(["train", "trpo", "CartPole-v1", "--steps", "64", "--out", out, "--no-progress", "--n-envs", "2",
                "--set", "n_steps=32"]) == 0  # nothing trained there: no --overwrite needed
    assert natpg.load(out).algorithm == "trpo" and _rows(tmp_path / "run") == [64]


def test_a_callback_that_cannot_take_agent_and_row_is_refused_before_any_work(tmp_path):
    agent = natpg.NPG("CartPole-v1", **small())
    for bad, pattern in ((lambda agent: None, "cannot be called as callback\\(agent, row\\)"),
                         ("stop", "callback must be callable")):
        with pytest.raises(ValueError, match=pattern):
            agent.learn(64, out_dir=str(tmp_path / "run"), callback=bad)
    assert agent.env_steps == 0 and not (tmp_path / "run").exists()
    agent.learn(64, callback=lambda agent, row, *rest: None)


def test_the_cli_error_line_carries_natpgs_notes_not_a_workers_traceback():
    from natpg.cli import _natpg_notes

    exc = ValueError("environment returned a non-finite observation")
    exc.add_note("raised in rollout worker 0:\nTraceback (most recent call last):\n  ...")
    exc.add_note("natpg: the last completed update (2 updates, 8 env steps) is saved in run/model.pt")
    assert _natpg_notes(exc) == "\nnatpg: the last completed update (2 updates, 8 env steps) is saved in run/model.pt"
    assert _natpg_notes(ValueError("plain")) == ""


def test_a_setting_the_run_would_not_read_is_named_in_a_warning():
    import warnings

    with pytest.warns(UserWarning, match=r"ppo on CartPole-v1 does not read these settings: fisher \(PPO's clipped "
                                         r"objective uses no Fisher\)"):
        natpg.PPO("CartPole-v1", fisher="kfac", **small())
    with pytest.warns(UserWarning, match=r"cg_iters \(read by fisher='cg' and 'empirical'; this run's fisher is 'kfac'\)"):
        natpg.NPG("CartPole-v1", fisher="kfac", cg_iters=5, **small())
    with pytest.warns(UserWarning, match=r"alpha \(read by step fixed / adam / ppo_clip; this run's step is 'kl'\)"):
        natpg.NPG("CartPole-v1", alpha=0.05, **small())
    with pytest.warns(UserWarning, match=r"damping \(the identity \(the plain gradient\) is not damped\)"):
        natpg.VPG("CartPole-v1", damping=0.05, **small())
    with warnings.catch_warnings():  # settings the run reads: no warning
        warnings.simplefilter("error")
        natpg.TRPO("CartPole-v1", backtrack_iters=5, cg_iters=5, damping=0.05, **small())
        natpg.ACKTR("CartPole-v1", momentum=0.5, kfac_ema_decay=0.9, kfac_refresh_every=2, **small())
        natpg.NPG("CartPole-v1", cg_preconditioner="kfac", kfac_ema_decay=0.0, **small())
        natpg.PPO("CartPole-v1", alpha=1e-3, clip_range=0.1, ppo_epochs=3, **small())
        natpg.NPG("CartPole-v1", alpha=0.1, clip_range=0.2, **small())  # the values the run has anyway
        natpg.NPG("Pendulum-v1", log_std_init=-1.0, reward_clip=5.0, normalize_reward=True, obs_clip=5.0,
                  sampler="processes", workers=2, n_envs=2, worker_timeout=60.0, eval_every=64, eval_episodes=2,
                  fvp_subsample=0.5, fvp_subsample_step_length="subsample")
        natpg.NPG("CartPole-v1", hidden=(16,), activation="relu", **small())


class _ImageEnv(gym.Env):
    """One step of a random 36×36 grey image: what the Nature-CNN reads."""

    observation_space = gym.spaces.Box(0, 255, (36, 36, 1), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, True, {}


if "natpg_test/Image-v0" not in gym.registry:
    gym.register(id="natpg_test/Image-v0", entry_point=_ImageEnv)


def test_settings_that_the_spaces_or_other_settings_leave_unread_are_named_in_one_warning():
    with pytest.warns(UserWarning) as caught:
        natpg.NPG("CartPole-v1", log_std_init=-1.0, reward_clip=5.0, normalize_obs=False, obs_clip=5.0,
                  worker_timeout=5.0, worker_start_timeout=5.0, eval_episodes=3, fvp_subsample_step_length="subsample",
                  **small())
    assert len(caught) == 1
    assert str(caught[0].message) == (  # in the order given
        "npg on CartPole-v1 does not read these settings: "
        "log_std_init (the Gaussian policy's starting log σ, for Box actions; this run's action space is a Discrete); "
        "reward_clip (clips scaled rewards; this run's normalize_reward is False); "
        "obs_clip (clips normalised observations; this run's normalize_obs is False); "
        "worker_timeout (read by sampler='processes' and 'ray', and by vectorization='multiproc' and 'async'; this "
        "run's sampler is 'local', its vectorization 'sync'); "
        "worker_start_timeout (read by sampler='processes' and 'ray', and by vectorization='multiproc'; this run's sampler "
        "is 'local', its vectorization 'sync'); "
        "eval_episodes (read by the periodic evaluation; this run's eval_every is 0); "
        "fvp_subsample_step_length (where the KL step of a Fisher subsample is measured; this run's fvp_subsample "
        "is 1, the whole batch)")
    with pytest.warns(UserWarning, match=r"does not read these settings: hidden \(image observations get the "
                                         r"Nature-CNN torso.*critic_hidden .*activation .*obs_clip \(images are scaled"):
        natpg.PPO("natpg_test/Image-v0", hidden=(8,), critic_hidden=(8,), activation="relu", obs_clip=3.0, **small())
    with pytest.warns(UserWarning, match=r"does not read these settings: ppo_minibatch \(larger than the batch, "
                                         r"n_envs × n_steps = 64: each minibatch is the whole batch, whatever its value\)$"):
        natpg.PPO("CartPole-v1", ppo_minibatch=65, **small())
    with pytest.warns(UserWarning, match=r"critic_minibatch \(larger than the batch, n_envs × n_steps = 64"):
        natpg.NPG("CartPole-v1", critic_minibatch=100, **small())
    with pytest.warns(UserWarning, match=r"cg_iters \(nac solves its compatible least squares directly"):
        natpg.NAC("CartPole-v1", cg_iters=3, **small())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the preset's own values, as a config.json (JSON lists) or a TOML file gives them: nothing changed
        natpg.PPO("natpg_test/Image-v0", hidden=[64, 64], critic_hidden=[64, 64], **small())
        natpg.NPG("CartPole-v1", fisher="empirical", cg_iters=3, cg_tol=0.0, **small())  # its CG reads them
        with pytest.raises(ValueError, match="action_squash='tanh' would not be read"):  # refused, not also warned
            natpg.NPG("CartPole-v1", action_squash="tanh", **small())

def test_the_cli_stops_quietly_when_its_reader_goes_away():
    """natpg config ... | head: the pipe closes before natpg writes; it exits as a pipeline's writer does (141 =
    128 + SIGPIPE) without 'error: [Errno 32] Broken pipe' or a second error when Python flushes at exit."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "natpg.cli", "config", "npg", "CartPole-v1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before natpg has imported torch, let alone printed
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err.decode() == ""


def test_a_broken_pipe_that_is_not_stdouts_is_an_error(monkeypatch, capsys):
    """A worker's pipe that breaks (its process died) is an error like any other, not a closed stdout."""
    import natpg.cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(natpg.cli, "cmd_config", broken)
    assert cli(["config", "npg", "CartPole-v1"]) == 2
    assert capsys.readouterr().err == "natpg config: error: [Errno 32] Broken pipe\n"


def test_the_cli_prints_natpgs_warnings_as_one_line(tmp_path):
    import subprocess
    import sys
    import warnings

    before = warnings.formatwarning
    done = subprocess.run([sys.executable, "-m", "natpg.cli", "train", "npg", "CartPole-v1", "--steps", "64", "--out",
                           str(tmp_path / "r"), "--no-progress", "--n-envs", "2", "--set", "n_steps=32",
                           "--set", "clip_range=0.1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "natpg train: warning: npg on CartPole-v1 does not read these settings: clip_range" in done.stderr
    assert "UserWarning" not in done.stderr
    assert cli(["config", "npg", "CartPole-v1"]) == 0 and warnings.formatwarning is before  # put back after main
    strict = subprocess.run([sys.executable, "-W", "error", "-m", "natpg", "train", "npg", "CartPole-v1", "--steps", "64",
                             "--out", str(tmp_path / "s"), "--no-progress", "--n-envs", "2", "--set", "n_steps=32",
                             "--set", "clip_range=0.1"], capture_output=True, text=True, timeout=120)
    assert strict.returncode == 2 and "Traceback" not in strict.stderr, strict.stderr
    assert ("natpg train: error: npg on CartPole-v1 does not read these settings: clip_range (read by step ppo_clip; "
            "this run's step is 'kl') (a warning, made an error by -W error)") in strict.stderr


def test_cli_config_file_reproduces_a_run_and_layers_under_set(tmp_path, capsys):
    """A run's config.json given to --config trains the same run (its seed too); a flat TOML file sits between the
    presets and --set; a file of another algorithm's run, or with an unknown name, is refused naming the file."""
    import csv

    first, again = str(tmp_path / "first"), str(tmp_path / "again")
    assert cli(["train", "npg", "CartPole-v1", "--steps", "256", "--seed", "7", "--no-progress", "--out", first,
                "--set", "n_envs=2", "--set", "n_steps=64", "--set", "hidden=[16,16]", "--set", "max_kl=0.03"]) == 0
    assert cli(["train", "npg", "CartPole-v1", "--steps", "256", "--no-progress", "--out", again,
                "--config", os.path.join(first, "config.json")]) == 0
    rows = [[{k: v for k, v in r.items() if not k.startswith("time/") and k not in ("wall_s", "steps_per_s")}
             for r in csv.DictReader(open(os.path.join(d, "progress.csv")))] for d in (first, again)]
    assert len(rows[0]) == 2 and rows[0] == rows[1]
    assert natpg.load(again).seed == 7 and natpg.load(again).config.policy.hidden == (16, 16)
    toml = tmp_path / "s.toml"
    toml.write_text('max_kl = 0.02\nhidden = [32, 32]\n[curvature]\ncg_iters = 5\n')
    capsys.readouterr()
    assert cli(["config", "npg", "CartPole-v1", "--config", str(toml), "--set", "max_kl=0.05", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["hidden"] == {"value": [32, 32], "source": str(toml)} and shown["cg_iters"]["source"] == str(toml)
    assert shown["max_kl"] == {"value": 0.05, "source": "user"}
    assert cli(["config", "trpo", "CartPole-v1", "--config", os.path.join(first, "config.json")]) == 2
    assert "holds the settings of a run of 'npg', not 'trpo'" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"max_kll": 1}')
    assert cli(["config", "npg", "CartPole-v1", "--config", str(tmp_path / "bad.json")]) == 2
    assert re.search(r"--config '.*bad.json': unknown setting\(s\) \['max_kll'\] \(did you mean", capsys.readouterr().err)
    # a bad value names the file it came from, unless --set replaced it; a seed inside a section is not silently lost
    (tmp_path / "values.toml").write_text('max_kl = -1\ngamma = 2\n')
    assert cli(["config", "npg", "CartPole-v1", "--config", str(tmp_path / "values.toml"), "--set", "gamma=3"]) == 2
    err = capsys.readouterr().err
    assert f"max_kl must be a finite number > 0, got -1 (from --config {tmp_path / 'values.toml'})" in err
    assert "gamma must be in [0, 1), got 3;" in err and err.count("(from --config") == 1
    (tmp_path / "seed.toml").write_text('[run]\nseed = 3\n')
    assert cli(["train", "npg", "CartPole-v1", "--config", str(tmp_path / "seed.toml"), "--out", str(tmp_path / "s")]) == 2
    assert "seed goes at the top level of the file" in capsys.readouterr().err and not (tmp_path / "s").exists()


def parameters_of(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


@pytest.mark.parametrize("value_clip", [0.0, 0.2])  # Adam's regression, and PPO's clipped one
def test_load_with_another_critic_rate_fits_at_that_rate_with_the_saved_moments(tmp_path, value_clip):
    """natpg.load(path, critic_lr=...) keeps the critic's Adam moments and step counts, and fits at the new rate
    (loading Adam's state put the saved rate back, so the rate the run recorded was not the one it used)."""
    agent = natpg.PPO("CartPole-v1", seed=0, critic_lr=1e-3, value_clip=value_clip, **small())
    agent.learn(64)
    agent.save(tmp_path / "m")
    moments = agent.critic.fitter.state_dict()["state"]
    loaded = natpg.load(tmp_path / "m", critic_lr=5e-4)
    assert loaded.config.critic.critic_lr == 5e-4
    assert [g["lr"] for g in loaded.critic.fitter.optimizer.param_groups] == [5e-4]
    state = loaded.critic.fitter.state_dict()["state"]
    assert all(torch.equal(state[i][k], moments[i][k]) for i in moments for k in moments[i])
    assert [g["lr"] for g in natpg.load(tmp_path / "m").critic.fitter.optimizer.param_groups] == [1e-3]


def test_load_with_a_change_the_run_would_not_read_warns_as_the_constructor_does(tmp_path):
    """natpg.load(path, clip_range=...) on an NPG run: recorded but never read, which the constructor says and
    loading said nothing of; a change equal to the run's own value, and loading with no changes, warn of nothing."""
    agent = natpg.NPG("CartPole-v1", seed=0, **small())
    agent.learn(64)
    agent.save(tmp_path / "m")
    with pytest.warns(UserWarning, match=r"npg on CartPole-v1 does not read these settings: clip_range \(read by "
                                         r"step ppo_clip; this run's step is 'kl'\); backtrack_iters") as caught:
        natpg.load(tmp_path / "m", clip_range=0.05, backtrack_iters=1, max_kl=0.01)
    assert caught[0].filename == __file__  # pointing at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        natpg.load(tmp_path / "m", max_kl=agent.config.step.max_kl)
        natpg.load(tmp_path / "m")


def test_load_with_another_kfac_damping_keeps_the_factors_and_damps_by_the_new_value(tmp_path):
    """natpg.load(path, damping=...) with K-FAC (ACKTR's F⁻¹, CG's K-FAC preconditioner): the factors' moving
    averages go on, damped by the new λ (the saved λ came back with them at the first fit, so the run recorded a
    damping it did not use)."""
    for cls, extra in ((natpg.ACKTR, {}), (natpg.NPG, {"cg_preconditioner": "kfac"})):
        agent = cls("CartPole-v1", seed=0, **small(**extra))
        agent.learn(64)
        agent.save(tmp_path / cls.algorithm)
        kfac = lambda a: getattr(a.actor_update.curvature, "preconditioner", None) or a.actor_update.curvature  # noqa
        fits = kfac(agent).fits
        loaded = natpg.load(tmp_path / cls.algorithm, damping=0.05)
        loaded.learn(64, reset=False)
        assert kfac(loaded).damping == loaded.config.curvature.damping == 0.05 and kfac(loaded).fits == fits + 1


def test_load_with_another_step_rule_or_curvature_starts_their_state_afresh(tmp_path):
    """The state of a part (ACKTR's momentum, Adam's moments, K-FAC's factors) goes only into a part of the kind
    that wrote it: an Adam checkpoint's second moments are not ACKTR's momentum, nor its missing 'm' an error."""
    acktr = natpg.ACKTR("CartPole-v1", seed=0, **small())
    acktr.learn(64)
    acktr.save(tmp_path / "acktr")
    momentum = acktr.actor_update.step_rule.v
    assert momentum is not None
    assert torch.equal(natpg.load(tmp_path / "acktr", max_kl=0.005).actor_update.step_rule.v, momentum)  # kept
    as_adam = natpg.load(tmp_path / "acktr", step="adam")
    assert as_adam.actor_update.step_rule.m is None and as_adam.actor_update.step_rule.t == 0
    kept = natpg.load(tmp_path / "acktr", kfac_refresh_every=2).actor_update.curvature.state_dict()
    assert kept["fits"] == acktr.actor_update.curvature.state_dict()["fits"] > 0  # K-FAC's factors: kept
    vpg = natpg.VPG("CartPole-v1", seed=0, step="adam", **small())
    vpg.learn(64)
    vpg.save(tmp_path / "vpg")
    assert vpg.actor_update.step_rule.v is not None
    assert natpg.load(tmp_path / "vpg", step="kfac_clip", fisher="kfac").actor_update.step_rule.v is None
    as_adam.learn(64, reset=False)  # and they learn on
    assert as_adam.actor_update.step_rule.t == 1


def test_load_with_other_n_envs_continues_from_fresh_environments_with_a_warning(tmp_path):
    """The saved copies cannot go on as more (or fewer): like any continuation that cannot be bit-exact, the run
    goes on from freshly reset environments with a warning, keeping its episode statistics; the per-copy
    discounted returns of reward normalisation start at 0 (they were a shape error deep inside)."""
    agent = natpg.NPG("CartPole-v1", seed=0, normalize_reward=True, **small())
    agent.learn(128)
    agent.save(tmp_path / "m")
    for reset in (False, True):
        more = natpg.load(tmp_path / "m", n_envs=4)
        assert more.reward_scaler.ret.tolist() == [0.0] * 4
        if reset:
            more.learn(128, reset=True)
        else:
            with pytest.warns(RuntimeWarning, match="saved with 2 environment copies and goes on with 4"):
                more.learn(128, reset=False)
            assert more._sampler.total_steps == 256  # its counters went on
        assert more.env_steps == 256


@pytest.mark.parametrize("how", ["reset", "continue", "resume", "resume-not-exact"])
def test_reward_normalisation_tracks_each_episodes_own_discounted_return(tmp_path, how):
    """The return reward normalisation accumulates per copy starts at 0 with fresh episodes (learn's default
    reset=True, a resume that cannot restore the environments) and goes on where they go on (reset=False, a
    bit-exact resume): its first value in the next learn is one reward (Pendulum: ≥ −16.3 a step) or not."""
    agent = natpg.NPG("Pendulum-v1", seed=0, normalize_reward=True, gamma=0.99, **small())  # a long memory
    agent.learn(64)
    carried = agent.reward_scaler.ret.copy()
    assert (carried < -40).all()  # 32 steps into Pendulum's 200-step episodes
    if how.startswith("resume"):
        agent.save(tmp_path / "m")
        agent = natpg.load(tmp_path / "m", **({"vectorization": "async"} if how == "resume-not-exact" else {}))
    seen = []
    observe = agent.reward_scaler.observe
    agent.reward_scaler.observe = lambda ret, valid=None: (seen.append(ret.copy()), observe(ret, valid))
    if how == "resume-not-exact":
        with pytest.warns(RuntimeWarning, match="resuming with freshly reset environments"):
            agent.learn(64, reset=False)
    else:
        agent.learn(64, reset=how == "reset")
    fresh = how in ("reset", "resume-not-exact")
    assert (seen[0] >= -16.3).all() if fresh else (seen[0] <= 0.99 * carried).all()  # γ·ret + a reward ≤ 0
    agent.close()


def test_a_runs_episode_statistics_go_on_when_its_environments_start_afresh(tmp_path):
    """learn(reset=True) (the default: fresh environments), a load without the environments' state and
    Agent.close keep the run's episode count and its window of recent returns: progress.csv's episodes and
    ep_return_mean go on from episodes.csv's, rather than restarting at 0 and NaN."""
    run = tmp_path / "run"
    agent = natpg.NPG("CartPole-v1", seed=0, **small())
    agent.learn(256, out_dir=str(run))
    agent.learn(128, out_dir=str(run))  # reset=True
    natpg.load(str(run)).learn(128, out_dir=str(run))  # reset=True
    closing = natpg.load(str(run))
    closing.learn(128, out_dir=str(run), reset=False)
    closing.close()
    with open(run / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert closing.recent_return() == pytest.approx(float(rows[-1]["ep_return_mean"]))
    closing.save(str(run))  # its episode statistics are saved too
    with pytest.warns(RuntimeWarning, match=r"freshly reset environments.*closed before \(Agent.close\)"):
        natpg.load(str(run)).learn(128, out_dir=str(run), reset=False)
    # interrupted mid-rollout (after episodes ended in it): its checkpoint and the agent keep the statistics of the
    # last completed update, and both go on from them
    interrupted = natpg.load(str(run))
    interrupted.learn(64, out_dir=str(run), reset=False)
    collect = interrupted._sampler.collect

    def collect_then_interrupt(policy, n_steps):
        collect(policy, n_steps)
        raise KeyboardInterrupt

    interrupted._sampler.collect = collect_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        interrupted.learn(64, out_dir=str(run), reset=False)
    saved = natpg.load(str(run))
    assert saved._saved_sampler["episodes"] == interrupted._sampler.episodes > 0  # the lost rollout's are out
    assert saved.recent_return() == interrupted.recent_return()
    with pytest.warns(RuntimeWarning, match=r"freshly reset environments.*interrupted mid-rollout"):
        saved.learn(64, out_dir=str(run), reset=False)
    with open(run / "episodes.csv") as f:
        episodes = list(csv.DictReader(f))
    with open(run / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 14  # 896 steps, 64 a row
    for row in rows:
        done = [float(e["return"]) for e in episodes if int(e["env_steps"]) <= int(row["env_steps"])]
        assert int(row["episodes"]) == len(done)
        assert float(row["ep_return_mean"]) == pytest.approx(np.mean(done[-100:]), rel=1e-6)


def test_the_k_fac_critics_count_of_fallbacks_goes_on_across_a_checkpoint(tmp_path):
    agent = natpg.ACKTR("CartPole-v1", seed=0, critic_optimizer="kfac", **small())
    agent.learn(64)
    agent.critic.fitter.curvature.fallbacks = 3  # as after three numerically singular factors
    agent.save(tmp_path / "m")
    loaded = natpg.load(tmp_path / "m")
    assert loaded.critic.fitter.curvature.fallbacks == 3
    loaded.learn(64, reset=False)
    assert loaded.critic.fitter.curvature.stats["critic/kfac_fallbacks"] >= 3


def test_load_with_changes_continues_the_run_with_other_settings_and_records_them(tmp_path):
    """natpg.load(path, max_kl=...) builds every part from the changed settings around the saved networks; the
    config is frozen, so changing it in place is an error rather than a silent no-op that config.json would
    record; a run trained on CUDA loads on the CPU where there is none."""
    import dataclasses
    import warnings

    from natpg import checkpoint

    run = str(tmp_path / "run")
    agent = natpg.NPG("CartPole-v1", seed=1, **small())
    agent.learn(128, out_dir=run)
    with pytest.raises(dataclasses.FrozenInstanceError):
        agent.config.step.max_kl = 0.5
    with pytest.raises(AttributeError, match=r"natpg.load\(path, max_kl=...\)"):
        agent.config = agent.config.override(max_kl=0.5)
    changed = natpg.load(run, max_kl=0.005)
    assert changed.config.step.max_kl == 0.005 and changed.actor_update.step_rule.max_kl == 0.005
    assert torch.equal(parameters_of(changed.policy), parameters_of(agent.policy)) and changed.env_steps == 128
    assert natpg.load(run).config.step.max_kl == 0.02  # the run on disk is unchanged
    with pytest.raises(ValueError, match=r"with other settings \(max_kl .* → 0.005\): a changed run goes to a new "
                                         r"directory"):
        changed.learn(64, out_dir=run)
    changed.learn(64, out_dir=str(tmp_path / "branch"))
    assert natpg.load(str(tmp_path / "branch")).config.step.max_kl == 0.005
    with open(tmp_path / "branch" / "progress.csv") as f:
        assert float(list(csv.DictReader(f))[-1]["step/kl"]) <= 0.005 * 1.5
    with pytest.raises(ValueError, match=r"natpg.load cannot change \['hidden'\]"):
        natpg.load(run, hidden=(8,))
    meta, tensors = checkpoint.read(run)
    meta["config"]["run"]["device"] = "cuda"
    checkpoint.write(str(tmp_path / "gpu"), meta, tensors)
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match=r"trained with device='cuda' and CUDA is not available here: loaded on "
                                             r"the CPU"):
            on_cpu = natpg.load(str(tmp_path / "gpu"))
        assert on_cpu.config.run.device == "cpu" and torch.equal(parameters_of(on_cpu.policy), parameters_of(agent.policy))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert natpg.load(str(tmp_path / "gpu"), device="cpu").config.run.device == "cpu"


def test_a_callbacks_own_numbers_are_logged_and_a_false_return_stops(tmp_path):
    """SB3's logger.record inside a callback: here the callback adds keys to the row it is given. A key first seen
    after some rows becomes a new column, NaN in the rows before (the file rewritten, its rows kept)."""
    def callback(agent, row):
        if agent.updates >= 2:
            row["custom/twice_updates"] = 2 * agent.updates
        return agent.updates < 4

    agent = natpg.NPG("CartPole-v1", seed=0, **small())
    agent.learn(64 * 6, out_dir=str(tmp_path), callback=callback)
    assert agent.updates == 4
    with open(tmp_path / "progress.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["updates"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["custom/twice_updates"] for r in rows] == ["nan", "4", "6", "8"]
    assert all(r["env_steps"] == str(64 * int(r["updates"])) for r in rows)  # earlier columns untouched
    natpg.load(str(tmp_path)).learn(64, out_dir=str(tmp_path))  # continued without the callback: NaN there
    with open(tmp_path / "progress.csv", newline="") as f:
        assert [r["custom/twice_updates"] for r in csv.DictReader(f)][-1] == "nan"


def test_cli_settings_edge_cases_from_the_audit(tmp_path, capsys):
    """A run's config.json repeats its preset's values: changing the step rule is not refused over them; JSON's
    true/null in --set; every invalid setting on one line; natpg config checks the environment as train does."""
    from natpg.cli import parse_setting

    natpg.PPO("Pendulum-v1").save(str(tmp_path / "ppo"))
    capsys.readouterr()
    assert cli(["config", "ppo", "Pendulum-v1", "--config", str(tmp_path / "ppo" / "config.json"), "--set",
                "step=kl", "--json"]) == 0
    out = capsys.readouterr()
    shown = json.loads(out.out)
    assert shown["target_kl"]["value"] == 0.0 and shown["target_kl"]["source"].startswith("default (the preset's")
    assert "warning" not in out.err
    assert parse_setting('env_kwargs={"continuous": true, "x": null}') == ("env_kwargs", {"continuous": True, "x": None})
    assert cli(["train", "npg", "CartPole-v1", "--set", "max_kl=-1", "--set", "gamma=2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid settings: gamma must be in [0, 1), got 2; max_kl must be" in err
    assert cli(["config", "npg", "MountainCar-v0", "--set", "action_squash=tanh"]) == 2
    assert "action_squash='tanh' would not be read" in capsys.readouterr().err
    (tmp_path / "twice.json").write_text('{"max_kl": 0.01, "step": {"max_kl": 0.02}}')
    assert cli(["config", "npg", "CartPole-v1", "--config", str(tmp_path / "twice.json")]) == 2
    assert "sets max_kl twice, to 0.01 and 0.02" in capsys.readouterr().err


def test_a_checkpoint_with_more_multiproc_workers_than_copies_still_loads(tmp_path):
    from natpg import checkpoint

    natpg.NPG("CartPole-v1", vectorization="multiproc", n_envs=2, n_workers=2, n_steps=32, tensorboard=False).save(str(tmp_path))
    meta, tensors = checkpoint.read(str(tmp_path))
    meta["config"]["env"]["n_workers"] = 4  # clamped to 2 by the natpg that wrote it; refused now
    checkpoint.write(str(tmp_path), meta, tensors)
    assert natpg.load(str(tmp_path)).config.env.n_workers == 2
    assert natpg.NPG("CartPole-v1", vectorization="multiproc", n_envs=1, n_steps=32, tensorboard=False).config.env.n_workers == 2


@pytest.mark.parametrize("engine", [{}, {"sampler": "processes", "workers": 2}, {"normalize_reward": True}])
def test_episodes_csv_has_every_finished_training_episode_and_resumes_like_progress(engine, tmp_path):
    """One row per training episode, (return, length) as the sampler counted them: as many rows as the sampler's
    episode count, the last 100 equal to the episodes ep_return_mean averages, returns of the environment's own
    rewards (not the scaled ones the critic learns from); a resumed run's file equals an uninterrupted one's."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    agent = natpg.NPG("CartPole-v1", seed=3, **small(**engine))
    agent.learn(64 * 6, out_dir=one)
    with open(os.path.join(one, "episodes.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == agent._sampler.episodes > 10
    assert [float(r["return"]) for r in rows[-100:]] == list(agent._sampler.recent_returns)
    assert [int(r["length"]) for r in rows[-100:]] == list(agent._sampler.recent_lengths)
    assert all(float(r["return"]) == int(r["length"]) for r in rows)  # CartPole: reward 1 per step
    steps = [int(r["env_steps"]) for r in rows]
    assert steps == sorted(steps) and set(steps) <= {64 * k for k in range(1, 7)}
    agent.close()
    if engine:
        return
    first = natpg.NPG("CartPole-v1", seed=3, **small())
    first.learn(64 * 3, out_dir=two)
    natpg.load(two).learn(64 * 3, out_dir=two, reset=False)
    assert (tmp_path / "two" / "episodes.csv").read_text() == (tmp_path / "one" / "episodes.csv").read_text()


def test_device_auto_takes_the_gpu_where_there_is_one_and_is_recorded_as_auto(tmp_path):
    agent = natpg.NPG("CartPole-v1", device="auto", **small())
    assert agent.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    agent.learn(64)
    agent.save(str(tmp_path))
    assert natpg.load(str(tmp_path)).config.run.device == "auto"
    with pytest.raises(ValueError, match=r"device must be 'cpu', 'cuda\[:N\]' or 'auto', got 'gpu'"):
        natpg.NPG("CartPole-v1", device="gpu")


def test_an_agent_in_a_with_block_closes_its_environments_at_its_end():
    with natpg.NPG("CartPole-v1", seed=0, vectorization="multiproc", n_workers=2, **small()) as agent:
        agent.learn(64)
        envs = agent._sampler.envs
        assert all(p.is_alive() for p in envs.procs)
    assert agent._sampler is None and not any(p.is_alive() for p in envs.procs)
    assert all(conn.closed for conn in envs.conns)  # the pipes' descriptors too
    agent.learn(64)  # a closed agent learns on, from fresh environments
    agent.close()


def test_a_callback_that_closes_the_agent_ends_learn_after_that_update(tmp_path):
    """agent.close() inside the callback (to free the environments) stops training like a False return: that
    update is logged and saved, and a later learn builds the environments afresh."""
    run = tmp_path / "run"
    agent = natpg.NPG("CartPole-v1", seed=0, **small())
    agent.learn(4 * 64, out_dir=str(run), callback=lambda a, row: a.close())
    assert agent.updates == 1 and agent._sampler is None and _rows(run) == [64]
    assert natpg.load(str(run)).updates == 1
    with pytest.warns(RuntimeWarning, match="closed before"):
        agent.learn(64, out_dir=str(run), reset=False)
    assert agent.updates == 2


def test_a_callback_that_raises_leaves_the_completed_update_logged_and_saved(tmp_path):
    def callback(agent, row):
        if agent.updates == 2:
            raise RuntimeError("my callback's bug")

    agent = natpg.NPG("CartPole-v1", seed=0, **small())
    with pytest.raises(RuntimeError, match="my callback's bug") as info:
        agent.learn(64 * 4, out_dir=str(tmp_path), callback=callback)
    assert any(n.startswith("natpg: the callback raised after update 2") for n in info.value.__notes__)
    with open(tmp_path / "progress.csv", newline="") as f:
        assert [r["updates"] for r in csv.DictReader(f)] == ["1", "2"]
    loaded = natpg.load(str(tmp_path))
    assert loaded.updates == 2 and torch.equal(parameters_of(loaded.policy), parameters_of(agent.policy))


@pytest.mark.parametrize("said, stops_after", [(np.False_, 2), (np.True_, 4), (0, 4), (17, 4), ("stop", None),
                                               ("", None)])
def test_a_callback_stops_on_false_alone_and_a_string_is_an_error(tmp_path, said, stops_after):
    """SB3 stops on any falsy return; natpg on False alone, NumPy's too (a plain function returns None, a logging
    one what its writer returns: 0, 17); a string, which could mean either, is an error once the update that
    returned it is logged and saved."""
    def callback(agent, row):
        return said if agent.updates == 2 else None

    agent = natpg.NPG("CartPole-v1", seed=0, **small())
    if stops_after is not None:
        agent.learn(64 * 4, out_dir=str(tmp_path), callback=callback)
        assert agent.updates == stops_after
        return
    with pytest.raises(ValueError, match=rf"the callback returned {said!r}: return False to stop training, True or "
                                         rf"None to go on"):
        agent.learn(64 * 4, out_dir=str(tmp_path), callback=callback)
    assert natpg.load(str(tmp_path)).updates == 2 == len(_rows(tmp_path))


def test_a_list_of_callbacks_runs_each_in_order_and_stops_when_one_says_false(tmp_path):
    """SB3's CallbackList: every callback sees every update's row (in order, numbers the first adds visible to the
    second), training stops after the update where one returns False, and a bad one is refused before any work."""
    seen = []

    def first(agent, row):
        row["custom/first"] = agent.updates
        seen.append(("first", agent.updates))

    def second(agent, row):
        seen.append(("second", agent.updates, row["custom/first"]))
        return agent.updates < 2

    agent = natpg.NPG("CartPole-v1", seed=0, **small())
    agent.learn(64 * 4, out_dir=str(tmp_path), callback=[first, second])
    assert agent.updates == 2 and seen == [("first", 1), ("second", 1, 1), ("first", 2), ("second", 2, 2)]
    assert [r["custom/first"] for r in csv.DictReader(open(tmp_path / "progress.csv"))] == ["1", "2"]
    with pytest.raises(ValueError, match=r"cannot be called as callback\(agent, row\)"):
        agent.learn(64, callback=(first, lambda agent: None))
    with pytest.raises(ValueError, match=r"the callback returned 'stop'"):
        agent.learn(64, callback=[first, lambda agent, row: "stop"])


def test_latest_audit_edges(tmp_path):
    """A CUDA run loaded on the CPU goes on in its own directory; a callback's NumPy/torch numbers are numbers, and
    changing natpg's own columns is an error (the update saved); settings the saved state is made by cannot change
    at load; env_kwargs is frozen with the Config; 'cuda:x' is not a device."""
    from natpg import checkpoint

    run = tmp_path / "run"
    natpg.NPG("CartPole-v1", seed=1, **small()).learn(64, out_dir=str(run))
    meta, tensors = checkpoint.read(str(run))
    meta["config"]["run"]["device"] = "cuda:0"
    tensors["rng"]["generator"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state is 16 bytes
    checkpoint.write(str(run), meta, tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on_cpu = natpg.load(str(run))
        assert torch.equal(on_cpu.update_generator.get_state(), tensors["rng"]["cpu_generator"])  # still restored
        on_cpu.learn(64, out_dir=str(run), reset=False)
        assert natpg.load(str(run)).env_steps == 128

    def numbers(agent, row):
        row.update({"custom/f32": np.float32(0.5), "custom/i64": np.int64(3), "custom/t": torch.tensor(2.5),
                    "custom/text": "hello"})

    other = tmp_path / "other"
    natpg.NPG("CartPole-v1", **small()).learn(64, out_dir=str(other), callback=numbers)
    with open(other / "progress.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert (row["custom/f32"], row["custom/i64"], row["custom/t"]) == ("0.5", "3", "2.5") and "custom/text" not in row
    with pytest.raises(ValueError, match=r"the callback changed natpg's own columns \['env_steps'\]") as info:
        natpg.NPG("CartPole-v1", **small()).learn(
            128, out_dir=str(tmp_path / "bad"), callback=lambda a, r: r.update(env_steps=999))
    assert any("that update is saved in" in n for n in info.value.__notes__)
    with pytest.raises(ValueError, match=r"natpg.load cannot change \['log_std_init'\]"):
        natpg.load(str(other), log_std_init=-2.0)
    agent = natpg.NPG("Pendulum-v1", env_kwargs={"g": 3.0}, **small())
    with pytest.raises(TypeError, match="a Config is frozen, env_kwargs too"):
        agent.config.env.env_kwargs["g"] = 5.0
    with pytest.raises(ValueError, match=r"device must be 'cpu', 'cuda\[:N\]' or 'auto', got 'cuda:x'"):
        natpg.NPG("CartPole-v1", device="cuda:x")


def test_cli_flags_reach_what_they_name(tmp_path, capsys):
    """natpg train's flags become the settings they stand for; natpg eval's --seed, --stochastic, --env-kwargs and
    --max-episode-steps give exactly natpg.evaluate's numbers with those arguments."""
    run = str(tmp_path / "run")
    assert cli(["train", "npg", "Pendulum-v1", "--steps", "128", "--no-progress", "--out", run, "--fisher", "kfac",
                "--n-envs", "2", "--device", "cpu", "--eval-every", "128", "--set", "n_steps=64",
                "--set", "tensorboard=False"]) == 0
    recorded = json.load(open(os.path.join(run, "config.json")))
    assert (recorded["curvature"]["fisher"], recorded["env"]["n_envs"], recorded["run"]["eval_every"]) == ("kfac", 2, 128)
    agent = natpg.load(run)
    cases = [(["--seed", "5"], dict(seed=5)), (["--seed", "5", "--stochastic"], dict(seed=5, deterministic=False)),
             (["--env-kwargs", "{'max_episode_steps': 4}"], dict(seed=123, env_kwargs={"max_episode_steps": 4})),
             (["--max-episode-steps", "7"], dict(seed=123, max_episode_steps=7))]
    means = []
    for flags, kwargs in cases:
        capsys.readouterr()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # episodes cut by --max-episode-steps
            assert cli(["eval", run, "--episodes", "2", "--json", *flags]) == 0
            shown = json.loads(capsys.readouterr().out)
            expected = natpg.evaluate(agent, episodes=2, **kwargs)
        assert (shown["return_mean"], shown["return_std"]) == pytest.approx(expected, rel=0, abs=1e-9)
        means.append(shown["return_mean"])
    assert len(set(means)) == 4  # each flag changed the result


def test_a_worker_sampler_resumes_its_episode_statistics(tmp_path):
    """sampler='workers' (the code of 'processes' and 'ray'): after load(...).learn(reset=False) the episode count,
    the window of recent returns and the env-step count continue from the checkpoint's, in progress.csv too."""
    agent = natpg.NPG("CartPole-v1", seed=1, sampler="workers", workers=2, **small())
    agent.learn(256, out_dir=str(tmp_path))
    episodes, recent = agent._sampler.episodes, list(agent._sampler.recent_returns)
    agent.close()
    rows = []
    loaded = natpg.load(str(tmp_path))
    with pytest.warns(RuntimeWarning, match="resuming with freshly reset environments in the rollout workers"):
        loaded.learn(64, out_dir=str(tmp_path), reset=False, callback=lambda a, row: rows.append(row))
    new = loaded._sampler.last_episodes
    assert episodes > 3 and loaded._sampler.episodes == episodes + len(new) == rows[-1]["episodes"]
    assert list(loaded._sampler.recent_returns) == recent + [ret for ret, _, _ in new]
    assert rows[-1]["ep_return_mean"] == pytest.approx(np.mean(recent + [ret for ret, _, _ in new]))
    assert loaded._sampler.total_steps == 320 and rows[-1]["env_steps"] == 320
    loaded.close()


def test_observation_statistics_take_every_stepped_observation_and_checkpoints_come_every_k_updates(tmp_path):
    """The running observation statistics count each observation the policy acted on once (n_envs × n_steps per
    update); a new run directory gets a checkpoint before any work, then one every checkpoint_every=2 updates,
    and the final one at the end."""
    from natpg import checkpoint

    seen = []

    def on_disk(agent, row):
        seen.append(checkpoint.read(str(tmp_path))[0]["env_steps"] if (tmp_path / "model.pt").exists() else None)

    agent = natpg.NPG("CartPole-v1", checkpoint_every=2, **small())
    agent.learn(5 * 64, out_dir=str(tmp_path), callback=on_disk)
    assert agent.obs_normalizer.rms.count == pytest.approx(1e-4 + 5 * 64, abs=1e-9)
    assert seen == [0, 0, 128, 128, 256]  # the one written before any work, then every second update's (the
    # callback runs before that update's checkpoint): a process killed at any moment leaves a run that goes on
    assert checkpoint.read(str(tmp_path))[0]["env_steps"] == 320


def test_torch_threads_0_leaves_the_process_thread_count_alone(tmp_path):
    """torch_threads=0: an agent inside a program that sets its own thread count leaves it as it is (building,
    learning, loading); the default sets it."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        agent = natpg.NPG("CartPole-v1", seed=0, torch_threads=0, n_envs=2, n_steps=32).learn(64)
        agent.save(str(tmp_path / "m"))
        natpg.load(str(tmp_path / "m"))
        assert torch.get_num_threads() == 2
        natpg.NPG("CartPole-v1", seed=0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_building_or_loading_an_agent_leaves_the_global_random_stream_alone(tmp_path):
    """The networks' initialisation is drawn from the agent's seed without reseeding torch's global generator (a
    user's own draws go on as they would), and is still a function of the seed alone."""
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    a = natpg.NPG("CartPole-v1", seed=0, n_envs=2, n_steps=32)
    a.save(str(tmp_path / "m"))
    natpg.load(str(tmp_path / "m"))
    assert torch.equal(torch.rand(3), expected) and torch.initial_seed() == 1234
    torch.manual_seed(999)
    same, other = (natpg.NPG("CartPole-v1", seed=s, n_envs=2, n_steps=32) for s in (0, 1))
    for net in ("policy", "critic"):
        pairs = list(zip(getattr(a, net).parameters(), getattr(same, net).parameters()))
        assert all(torch.equal(p, q) for p, q in pairs)
        assert not all(torch.equal(p, q) for p, q in zip(getattr(a, net).parameters(), getattr(other, net).parameters()))


@pytest.mark.parametrize("algo", ["NPG", "ACKTR", "PPO"])
def test_learn_and_load_work_inside_the_callers_no_grad_or_inference_mode(tmp_path, algo):
    """Training computes gradients whatever grad mode the caller is in: an agent built, trained or loaded under
    torch.no_grad() or torch.inference_mode() trains bit-identically to one outside them."""
    kw = dict(seed=0, n_envs=2, n_steps=32)
    plain = getattr(natpg, algo)("CartPole-v1", **kw).learn(128)
    with torch.no_grad():
        no_grad = getattr(natpg, algo)("CartPole-v1", **kw).learn(128)
    with torch.inference_mode():
        inference = getattr(natpg, algo)("CartPole-v1", **kw).learn(128)
        inference.save(str(tmp_path / "m"))
        loaded = natpg.load(str(tmp_path / "m"))
    assert torch.is_grad_enabled()
    for agent in (no_grad, inference):
        assert all(torch.equal(p, q) for p, q in zip(plain.policy.parameters(), agent.policy.parameters()))
    loaded.learn(64)  # outside inference mode: its tensors, the optimiser's state too, are ordinary ones
    plain.learn(64)
    assert all(torch.equal(p, q) for p, q in zip(plain.policy.parameters(), loaded.policy.parameters()))


def test_cli_resume_into_an_older_copy_of_the_run_is_refused_or_with_overwrite_replaced(tmp_path, capsys):
    """--resume DIR --out NEW where NEW holds the run as it was some updates before DIR: going on in NEW would leave
    those updates out of its logs. Refused, naming the ways on; --overwrite makes NEW a whole copy of DIR's run."""
    run, new = str(tmp_path / "run"), str(tmp_path / "new")
    args = ["train", "npg", "CartPole-v1", "--no-progress", "--n-envs", "2", "--set", "n_steps=32",
            "--set", "tensorboard=false"]
    assert cli(args + ["--steps", "128", "--out", run]) == 0
    assert cli(args + ["--steps", "192", "--resume", run, "--out", new]) == 0  # NEW: a copy at 128, then 192
    assert cli(args + ["--steps", "320", "--resume", run]) == 0  # DIR itself goes on to 320
    capsys.readouterr()
    assert cli(args + ["--steps", "384", "--resume", run, "--out", new]) == 2
    err = capsys.readouterr().err
    assert "holds this run's log up to env step 192, the run resumed is at 320" in err and "--overwrite" in err
    assert natpg.load(new).env_steps == 192 and _rows(tmp_path / "new") == [64, 128, 192]
    assert cli(args + ["--steps", "384", "--resume", run, "--out", new, "--overwrite"]) == 0
    assert natpg.load(new).env_steps == 384 and _rows(tmp_path / "new") == [64, 128, 192, 256, 320, 384]
    assert _rows(tmp_path / "run") == [64, 128, 192, 256, 320]


def test_cli_resume_out_that_fails_while_copying_leaves_nothing_and_goes_again(tmp_path, capsys, monkeypatch):
    """--resume DIR --out NEW that fails while copying DIR's run (a full disk, Ctrl-C) deletes what it copied: the
    same command then copies the whole run (it went on in NEW without DIR's logs). A copy cut short by a kill (no
    chance to clean up) leaves no checkpoint, copied last, and the same command refuses NEW until --overwrite."""
    import shutil

    from natpg.rundir import copy_run

    run, new = str(tmp_path / "run"), str(tmp_path / "new")
    args = ["train", "npg", "CartPole-v1", "--no-progress", "--n-envs", "2", "--set", "n_steps=32",
            "--set", "tensorboard=false"]
    assert cli(args + ["--steps", "128", "--out", run]) == 0
    copy = shutil.copy2
    copied = []

    def disk_full(src, dst, **kwargs):
        copied.append(os.path.basename(src))
        if os.path.basename(src) == "model.pt":
            raise OSError(28, "No space left on device", dst)
        return copy(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copy2", disk_full)
    assert cli(args + ["--steps", "192", "--resume", run, "--out", new]) == 2
    monkeypatch.setattr(shutil, "copy2", copy)
    assert copied[-1] == "model.pt" and {"progress.csv", "episodes.csv", "config.json"} <= set(copied)
    assert not set(os.listdir(new)) & {"model.pt", "config.json", "progress.csv", "episodes.csv", "best"}
    assert cli(args + ["--steps", "192", "--resume", run, "--out", new]) == 0
    assert _rows(tmp_path / "new") == [64, 128, 192] and natpg.load(new).env_steps == 192

    killed = str(tmp_path / "killed")  # what a kill in the copy's last file leaves: everything but the checkpoint
    os.makedirs(killed)
    copy_run(run, killed)
    os.remove(os.path.join(killed, "model.pt"))
    capsys.readouterr()
    assert cli(args + ["--steps", "192", "--resume", run, "--out", killed]) == 2
    err = capsys.readouterr().err
    assert f"--out {killed!r} already holds natpg outputs" in err and "replace it with --overwrite" in err
    assert cli(args + ["--steps", "192", "--resume", run, "--out", killed, "--overwrite"]) == 0
    assert _rows(tmp_path / "killed") == [64, 128, 192]
