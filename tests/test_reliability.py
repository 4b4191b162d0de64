"""Reliability and safety (issue #8): clear errors for bad input, numerical faults that never reach the
parameters, crash-safe checkpoints, bit-exact resume, and property-based checks of the maths.

docs/RELIABILITY.md lists each guarantee with the test here that shows it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from hypothesis import example, given, settings
from hypothesis import strategies as st

import natpg
from natpg import bench, checkpoint
from natpg.advantages import gae, normalize_advantages
from natpg.cli import main as cli
from natpg.envs import EnvStateError, ObsNormalizer, RewardScaler, env_state, make_env, set_env_state
from natpg.fisher import CG, KFAC, Dense, Diagonal, Empirical, conjugate_gradient
from natpg.policies import CategoricalMLP, GaussianMLP
from natpg.rollout import NonFiniteEnvError, Rollout, Sampler
from natpg.train import TrainingFault, make_batch

SRC = Path(natpg.__file__).resolve().parent


def small(**kw):
    """A fast configuration: batch 2 × 16 = 32 transitions."""
    return dict(n_envs=2, n_steps=16, tensorboard=False, hidden=(16,), critic_hidden=(16,), critic_epochs=2,
                cg_iters=5, **kw)


BATCH = 32


# ------------------------------------------------------------------------------------------------------
# Test environments
# ------------------------------------------------------------------------------------------------------

class _SpaceEnv(gym.Env):
    """An environment with arbitrary spaces (only its spaces matter here)."""

    def __init__(self, observation_space, action_space):
        self.observation_space, self.action_space = observation_space, action_space

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


class DriftEnv(gym.Env):
    """A custom (neither classic-control nor MuJoCo) task: natpg cannot snapshot its state."""

    observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float64)
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = self.np_random.normal(size=2)
        return self.x.copy(), {}

    def step(self, action):
        self.x = 0.9 * self.x + (0.1 if action else -0.1) + 0.01 * self.np_random.normal(size=2)
        return self.x.copy(), float(-abs(self.x[0])), bool(abs(self.x[0]) > 3), False, {}


class NaNAt(gym.Wrapper):
    """Returns a NaN observation (or reward) at the ``at``-th step of this copy, once."""

    def __init__(self, env, at: int = 5, what: str = "obs"):
        super().__init__(env)
        self.at, self.what, self.count = at, what, 0
        if what == "huge_obs":  # float64 observations: a float32 buffer would make 1e39 inf before natpg sees it
            space = env.observation_space
            self.observation_space = spaces.Box(space.low, space.high, dtype=np.float64)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return np.asarray(obs, self.observation_space.dtype), info

    def step(self, action):
        obs, rew, term, trunc, info = self.env.step(action)
        self.count += 1
        if self.count == self.at:
            if self.what == "obs":
                obs = np.full_like(obs, np.nan)
            elif self.what == "inf_obs":
                obs = np.full_like(obs, np.inf)
            elif self.what == "huge_obs":  # finite, but no float32
                obs = np.full(obs.shape, 1e39)
            elif self.what == "huge_reward":  # its square overflows even float64
                rew = 1e200
            else:
                rew = float("nan")
        return np.asarray(obs, self.observation_space.dtype), rew, term, trunc, info


def _nan_cartpole(at: int = 7, what: str = "obs"):
    from gymnasium.envs.classic_control import CartPoleEnv

    return NaNAt(CartPoleEnv(), at=at, what=what)


TEST_ENVS = {
    "natpgtest/TextObs-v0": lambda: _SpaceEnv(spaces.Text(5), spaces.Discrete(2)),
    "natpgtest/DictTextObs-v0": lambda: _SpaceEnv(spaces.Dict({"pos": spaces.Box(-1, 1, (2,)), "name": spaces.Text(4)}),
                                                  spaces.Discrete(2)),
    "natpgtest/DictAct-v0": lambda: _SpaceEnv(spaces.Box(-1, 1, (3,)), spaces.Dict({"a": spaces.Discrete(2)})),
    "natpgtest/TupleAct-v0": lambda: _SpaceEnv(spaces.Box(-1, 1, (3,)), spaces.Tuple([spaces.Discrete(2)])),
    "natpgtest/ShiftedMultiDiscrete-v0": lambda: _SpaceEnv(spaces.Box(-1, 1, (3,)),
                                                           spaces.MultiDiscrete([2, 3], start=[1, 0])),
    "natpgtest/ShiftedDiscrete-v0": lambda: _SpaceEnv(spaces.Box(-1, 1, (3,)), spaces.Discrete(3, start=1)),
    "natpgtest/Drift-v0": DriftEnv,
    "natpgtest/UnboundedBox-v0": lambda: _SpaceEnv(spaces.Box(-1, 1, (3,)), spaces.Box(-np.inf, np.inf, (2,))),
    "natpgtest/Float32MaxBox-v0": lambda: _SpaceEnv(spaces.Box(-1, 1, (3,)),
                                                    spaces.Box(-np.finfo(np.float32).max, np.finfo(np.float32).max, (2,))),
    "natpgtest/OneAction-v0": lambda: _SpaceEnv(spaces.Box(-1, 1, (3,)), spaces.Discrete(1)),
    "natpgtest/NaNCartPole-v0": _nan_cartpole,
    "natpgtest/HugeObsCartPole-v0": lambda: _nan_cartpole(at=3, what="huge_obs"),
}
for _id, _entry in TEST_ENVS.items():
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_entry, max_episode_steps=200)


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def progress_rows(run_dir) -> list[dict[str, str]]:
    """progress.csv without its wall-clock columns."""
    with open(os.path.join(run_dir, "progress.csv"), newline="") as f:
        return [{k: v for k, v in r.items() if not (k.startswith("time/") or k in ("wall_s", "steps_per_s"))}
                for r in csv.DictReader(f)]


# ------------------------------------------------------------------------------------------------------
# 1. Bad input: a clear error before any work, raised by natpg itself (never from deep inside)
# ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A saved CartPole run, a saved Pendulum run, and broken or foreign checkpoint files."""
    root = tmp_path_factory.mktemp("artifacts")
    cart = natpg.NPG("CartPole-v1", **small())
    cart.save(str(root / "cart"))
    natpg.NPG("Pendulum-v1", **small()).save(str(root / "pend"))
    (root / "empty").mkdir()
    (root / "logs_only").mkdir()
    (root / "logs_only" / "progress.csv").write_text("env_steps\n32\n")
    (root / "garbage").mkdir()
    (root / "garbage" / "model.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"weights": torch.zeros(3)}, root / "foreign.pt")
    meta, tensors = checkpoint.read(str(root / "cart"))
    payload = {"format": checkpoint.FORMAT, "version": 99, "meta": json.dumps(meta), **tensors}
    torch.save(payload, root / "future.pt")
    checkpoint.write(str(root / "no_config.pt"), {k: v for k, v in meta.items() if k != "config"}, tensors)
    checkpoint.write(str(root / "alien_algo.pt"), {**meta, "algorithm": "sarsa"}, tensors)
    shrunk = dict(tensors, policy={k: v[..., :1] for k, v in tensors["policy"].items()})
    checkpoint.write(str(root / "wrong_shapes.pt"), meta, shrunk)
    (root / "a_file").write_text("x")
    return {"root": root, "cart": cart}


def _agent_cls(algorithm):
    return type("Custom", (natpg.Agent,), {"algorithm": algorithm})


API_CASES = [
    ("unknown env id", lambda a: natpg.NPG("NoSuchEnv-v0"), ValueError, "unknown environment id 'NoSuchEnv-v0'"),
    ("empty env id", lambda a: natpg.NPG(""), ValueError, "environment id must be a non-empty string"),
    ("env id not a string", lambda a: natpg.NPG(123), ValueError, "environment id must be a non-empty string"),
    ("Text observations", lambda a: natpg.NPG("natpgtest/TextObs-v0"), ValueError,
     r"unsupported observation space Text.*supported observations: Box.*Dict and Tuple.*actions: Box .*Discrete"),
    ("Dict observations holding Text", lambda a: natpg.NPG("natpgtest/DictTextObs-v0"), ValueError,
     r"unsupported observation space Dict.*it holds Text.*supported observations: Box"),
    ("Dict actions", lambda a: natpg.NPG("natpgtest/DictAct-v0"), ValueError,
     r"unsupported action space Dict.*supported observations: Box.*MultiBinary \(independent Bernoullis\)"),
    ("Tuple actions", lambda a: natpg.NPG("natpgtest/TupleAct-v0"), ValueError,
     r"unsupported action space Tuple.*supported"),
    ("MultiDiscrete(start=1) actions", lambda a: natpg.NPG("natpgtest/ShiftedMultiDiscrete-v0"), ValueError,
     r"MultiDiscrete actions must start at 0"),
    ("action mask on Box actions", lambda a: natpg.NPG("Pendulum-v1", action_mask="action_mask"), ValueError,
     r"action masking \(action_mask\) is for Discrete action spaces, 'Pendulum-v1' has Box"),
    ("action mask key missing from info", lambda a: natpg.NPG("CartPole-v1", action_mask="nokey", **small()).learn(BATCH),
     ValueError, r"action_mask='nokey': the environment's info has no such key"),
    ("tanh squash with unbounded actions", lambda a: natpg.NPG("natpgtest/UnboundedBox-v0", action_squash="tanh"),
     ValueError, r"action_squash='tanh' needs finite action bounds"),
    ("tanh squash with float32's largest as bounds", lambda a: natpg.NPG("natpgtest/Float32MaxBox-v0", action_squash="tanh"),
     ValueError, r"action_squash='tanh' needs finite action bounds whose width, high - low, is finite in the space's float dtype"),
    ("unknown action_squash", lambda a: natpg.NPG("Pendulum-v1", action_squash="sigmoid"), ValueError,
     r"action_squash must be one of \['clip', 'tanh'\]"),
    ("tanh squash on Discrete actions", lambda a: natpg.NPG("MountainCar-v0", action_squash="tanh"), ValueError,
     r"action_squash='tanh' would not be read: squashes Box actions .*action space is a Discrete"),
    ("fvp_subsample with K-FAC", lambda a: natpg.NPG("CartPole-v1", fisher="kfac", fvp_subsample=0.5), ValueError,
     r"fvp_subsample=0.5 would not be read: subsamples the Fisher-vector products of fisher='cg' or 'dense'; this run's fisher is 'kfac'"),
    ("fvp_subsample with ACKTR's preset", lambda a: natpg.ACKTR("CartPole-v1", fvp_subsample=0.2), ValueError,
     r"this run's fisher is 'kfac' \(leave it at its default, 1.0\)"),
    ("fvp_subsample with the identity", lambda a: natpg.NPG("CartPole-v1", fisher="identity", fvp_subsample=0.2),
     ValueError, r"this run's fisher is 'identity'"),
    ("bool gae_lambda", lambda a: natpg.NPG("CartPole-v1", gae_lambda=True), ValueError,
     r"gae_lambda must be in \[0, 1\], got True"),
    ("bool fvp_subsample", lambda a: natpg.NPG("CartPole-v1", fvp_subsample=True), ValueError,
     r"fvp_subsample must be in \(0, 1\], got True"),
    ("string flag", lambda a: natpg.NPG("CartPole-v1", normalize_obs="False"), ValueError,
     "normalize_obs must be True or False, got 'False'"),
    ("unpicklable action mask with worker processes",
     lambda a: natpg.NPG("Taxi-v4", sampler="processes", workers=2, action_mask=lambda env: np.ones(6),
                         **small()).learn(BATCH),
     ValueError, r"sampler='processes' sends the action mask .* cannot be pickled .*use a function defined at module "
                 r"level"),
    ("SB3's policy name first", lambda a: natpg.PPO("MlpPolicy", "CartPole-v1"), ValueError,
     r"'MlpPolicy' is Stable-Baselines3's policy name: .*natpg.PPO\('CartPole-v1'\)"),
    ("an environment instance", lambda a: natpg.PPO(gym.make("CartPole-v1")), ValueError,
     r"environment id must be a non-empty string .*from a registered id: pass 'CartPole-v1' \(constructor"),
    ("a vector environment", lambda a: natpg.PPO(gym.make_vec("CartPole-v1", 2)), ValueError,
     r"environment id must be a non-empty string .*from a registered id: pass 'CartPole-v1' \(constructor"),
    ("an environment spec", lambda a: natpg.PPO(gym.spec("CartPole-v1")), ValueError,
     r"non-empty string such as 'CartPole-v1', got the spec of 'CartPole-v1'; .*pass 'CartPole-v1' \(constructor"),
    ("an environment class", lambda a: natpg.PPO(CartPoleEnv), ValueError,
     r"environment id must be a non-empty string .*gymnasium.register\('MyEnv-v0', entry_point=MyEnv\)"),
    ("a seed torch cannot take", lambda a: natpg.NPG("CartPole-v1", seed=2**70), ValueError, "below 2\\*\\*62"),
    ("evaluate given a path", lambda a: natpg.evaluate("runs/x"), ValueError,
     r"evaluate takes an agent, got 'runs/x': natpg.evaluate\(natpg.load\(path\)\)"),
    ("save to an empty path", lambda a: natpg.NPG("CartPole-v1", **small()).save(""), ValueError,
     "a checkpoint path must be a directory or a .pt file name, got ''"),
    ("predict with deterministic='no'", lambda a: natpg.NPG("CartPole-v1", **small()).predict(np.zeros(4), "no"),
     ValueError, "deterministic must be True or False, got 'no'"),
    ("evaluate with deterministic=None", lambda a: natpg.evaluate(natpg.NPG("CartPole-v1", **small()), episodes=1,
                                                                  deterministic=None),
     ValueError, "deterministic must be True or False, got None"),
    ("SB3's policy= keyword", lambda a: natpg.PPO(policy="MlpPolicy", env="CartPole-v1"), ValueError,
     r"'policy' is Stable-Baselines3's name: natpg's is hidden, activation, log_std_init"),
    ("SB3's clip_range_vf", lambda a: natpg.PPO("CartPole-v1", clip_range_vf=0.2), ValueError,
     r"'clip_range_vf' is Stable-Baselines3's name: natpg's is value_clip"),
    ("bench with zero envs", lambda a: bench.throughput("npg", "CartPole-v1", 256, 1, n_envs=0), ValueError,
     r"--n-envs \(n_envs\) must be an integer ≥ 1, got 0"),
    ("bench with n_steps", lambda a: bench.throughput("npg", "CartPole-v1", 256, 1, n_steps=4), ValueError,
     "not available in bench: n_steps=4"),
    ("Discrete(start=1) actions", lambda a: natpg.NPG("natpgtest/ShiftedDiscrete-v0"), ValueError,
     r"Discrete actions must start at 0"),
    ("negative seed", lambda a: natpg.NPG("CartPole-v1", seed=-1), ValueError, "seed must be a non-negative integer"),
    ("float seed", lambda a: natpg.NPG("CartPole-v1", seed=1.5), ValueError, "seed must be a non-negative integer"),
    ("string seed", lambda a: natpg.NPG("CartPole-v1", seed="0"), ValueError, "seed must be a non-negative integer"),
    ("negative delta", lambda a: natpg.NPG("CartPole-v1", max_kl=-0.01), ValueError,
     "max_kl must be a finite number > 0, got -0.01"),
    ("NaN delta", lambda a: natpg.NPG("CartPole-v1", max_kl=float("nan")), ValueError, "max_kl must be a finite number"),
    ("log σ whose σ overflows float32", lambda a: natpg.PPO("Pendulum-v1", log_std_init=100.0), ValueError,
     r"log_std_init must be in \[-40, 40\] \(the initial σ = e\^log_std_init, 4e-18 to 2e17\), got 100.0"),
    ("zero envs", lambda a: natpg.NPG("CartPole-v1", n_envs=0), ValueError, "n_envs must be an integer ≥ 1, got 0"),
    ("non-integer envs", lambda a: natpg.NPG("CartPole-v1", n_envs=2.5), ValueError, "n_envs must be an integer ≥ 1"),
    ("string n_steps", lambda a: natpg.NPG("CartPole-v1", n_steps="32"), ValueError, "n_steps must be an integer ≥ 1"),
    ("gamma out of range", lambda a: natpg.NPG("CartPole-v1", gamma=1.5), ValueError, r"gamma must be in \[0, 1\)"),
    ("hidden not a tuple", lambda a: natpg.NPG("CartPole-v1", hidden=5), ValueError,
     "hidden must be a tuple of positive integers"),
    ("hidden with a zero", lambda a: natpg.NPG("CartPole-v1", hidden=(64, 0)), ValueError,
     "hidden must be a tuple of positive integers"),
    ("string flag", lambda a: natpg.NPG("CartPole-v1", normalize_obs="yes"), ValueError,
     "normalize_obs must be True or False"),
    ("integer critic_thread", lambda a: natpg.NPG("CartPole-v1", critic_thread=1), ValueError,
     "critic_thread must be True or False"),
    ("unknown fisher", lambda a: natpg.NPG("CartPole-v1", fisher="bogus"), ValueError, r"fisher must be one of \['cg'"),
    ("unknown step rule", lambda a: natpg.NPG("CartPole-v1", step="nope"), ValueError, "step must be one of"),
    ("unknown algorithm", lambda a: _agent_cls("bogus")("CartPole-v1"), ValueError, "unknown algorithm 'bogus'"),
    ("unknown key", lambda a: natpg.NPG("CartPole-v1", max_kll=0.1), ValueError,
     r"unknown setting\(s\) \['max_kll'\].*max_kl"),
    ("unknown nonfinite mode", lambda a: natpg.NPG("CartPole-v1", nonfinite_env="ignore"), ValueError,
     r"nonfinite_env must be one of \['raise', 'drop'\]"),
    ("zero fault budget", lambda a: natpg.NPG("CartPole-v1", max_consecutive_faults=0), ValueError,
     "max_consecutive_faults must be an integer ≥ 1"),
    ("unknown device", lambda a: natpg.NPG("CartPole-v1", device="tpu"), ValueError, "device must be"),
    ("unknown config section", lambda a: natpg.Config.from_dict({"bogus": {}}), ValueError,
     r"unknown config section\(s\) \['bogus'\]"),
    ("budget below one batch", lambda a: a["cart"].learn(10), ValueError,
     r"total_steps must be an integer ≥ one batch \(2 envs × 16 steps = 32\), got 10"),
    ("fractional budget", lambda a: a["cart"].learn(64.5), ValueError, "total_steps must be an integer"),
    ("out_dir is a file", lambda a: a["cart"].learn(BATCH, out_dir=str(a["root"] / "a_file")), ValueError,
     "exists and is not a directory"),
    ("predict wrong shape", lambda a: a["cart"].predict(np.zeros(5)), ValueError,
     r"observation of shape \(5,\) does not match the policy's observation shape \(4,\)"),
    ("predict wrong batch shape", lambda a: a["cart"].predict(np.zeros((2, 3))), ValueError,
     r"observation of shape \(2, 3\) does not match"),
    ("predict non-numeric", lambda a: a["cart"].predict("abc"), ValueError, "observation must be numeric"),
    ("predict NaN", lambda a: a["cart"].predict(np.array([0.0, np.nan, 0.0, 0.0])), ValueError,
     "observation holds a non-finite value"),
    ("predict None", lambda a: a["cart"].predict(None), ValueError,  # not "holds a non-finite value"
     "observation must be numeric .*got NoneType"),
    ("out_dir empty", lambda a: a["cart"].learn(BATCH, out_dir=""), ValueError,
     "out_dir must be a directory path, got ''"),
    ("video to no path", lambda a: natpg.record_video(a["cart"], None), ValueError,
     "video file must be a path such as 'run.gif' or 'run.mp4', got None"),
    ("load missing", lambda a: natpg.load(str(a["root"] / "missing")), FileNotFoundError, "no natpg checkpoint"),
    ("load directory without model.pt", lambda a: natpg.load(str(a["root"] / "empty")), FileNotFoundError,
     "no natpg checkpoint .*directory without model.pt"),
    ("load non-path", lambda a: natpg.load(123), ValueError, "must be a run directory or a .pt checkpoint"),
    ("load garbage", lambda a: natpg.load(str(a["root"] / "garbage")), ValueError,
     "not a readable natpg checkpoint"),
    ("load foreign torch file", lambda a: natpg.load(str(a["root"] / "foreign.pt")), ValueError,
     "is not a natpg checkpoint"),
    ("load future version", lambda a: natpg.load(str(a["root"] / "future.pt")), ValueError,
     r"checkpoint version 99; this natpg reads versions \[1, 2\]"),
    ("load checkpoint without config", lambda a: natpg.load(str(a["root"] / "no_config.pt")), ValueError,
     "lacks the entry 'config'"),
    ("load unknown algorithm", lambda a: natpg.load(str(a["root"] / "alien_algo.pt")), ValueError,
     "algorithm 'sarsa', unknown to this natpg"),
    ("load tensors that do not fit", lambda a: natpg.load(str(a["root"] / "wrong_shapes.pt")), ValueError,
     r"inconsistent with its recorded config: Error\(s\) in loading state_dict for \w+: size mismatch for "
     r"\S+: copying a param with shape"),
    ("evaluate zero episodes", lambda a: natpg.evaluate(a["cart"], episodes=0), ValueError,
     "episodes must be an integer ≥ 1"),
    ("evaluate with a step cap of 0", lambda a: natpg.evaluate(a["cart"], max_episode_steps=0), ValueError,
     "max_episode_steps must be an integer ≥ 1"),
    ("evaluate on another task", lambda a: natpg.evaluate(a["cart"], "Pendulum-v1", episodes=1), ValueError,
     "does not match the agent trained on 'CartPole-v1'"),
    ("video to an unknown format", lambda a: natpg.record_video(a["cart"], a["root"] / "v.avi.txt"), ValueError,
     r"must end in one of \.mp4"),
    ("video of another task", lambda a: natpg.record_video(a["cart"], a["root"] / "v.gif", "Pendulum-v1"), ValueError,
     "does not match the agent trained on 'CartPole-v1'"),
]


@pytest.mark.parametrize("name,call,exc,pattern", API_CASES, ids=[c[0] for c in API_CASES])
def test_bad_input_is_a_clear_error_from_natpg(artifacts, name, call, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        call(artifacts)
    # Raised by natpg's own checks, not by torch/numpy/gymnasium deep inside (whose errors are re-worded).
    raised_in = Path(str(info.traceback[-1].path)).resolve()
    assert SRC in raised_in.parents, f"raised from {raised_in}"


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers(tmp_path):
    """A sweep over np.arange or np.linspace passes NumPy scalars: accepted where an int, a float or a bool is, and
    stored as that int, float or bool, so config.json and the numbers trained are those of the same values typed in
    Python."""
    np_kw = dict(n_envs=np.int64(2), n_steps=np.int32(16), hidden=(np.int64(16),), critic_epochs=np.uint8(2),
                 cg_iters=np.int16(5), max_kl=np.float32(0.25), gae_lambda=np.float32(0.75), gamma=np.float64(0.9),
                 damping=np.int64(1), checkpoint_every=np.int64(0), update_threads=np.int64(0),
                 normalize_obs=np.bool_(True), critic_thread=np.bool_(False))
    py_kw = {k: tuple(int(x) for x in v) if isinstance(v, tuple) else v.item() for k, v in np_kw.items()}
    np_kw["env_kwargs"], py_kw["env_kwargs"] = {"sutton_barto_reward": np.bool_(False)}, {"sutton_barto_reward": False}
    common = dict(tensorboard=False, critic_hidden=(16,))
    with_np = natpg.NPG("CartPole-v1", seed=0, **common, **np_kw)
    plain = natpg.NPG("CartPole-v1", seed=0, **common, **py_kw)
    assert with_np.config.to_dict() == plain.config.to_dict()
    for section in with_np.config.to_dict().values():
        for name, value in (section.items() if isinstance(section, dict) else ()):
            for v in value if isinstance(value, tuple) else value.values() if isinstance(value, dict) else (value,):
                assert type(v) in (int, float, bool, str, type(None)), (name, type(v))
    with_np.learn(BATCH)
    plain.learn(BATCH)
    assert torch.equal(flat_params(with_np.policy), flat_params(plain.policy))
    with_np.save(str(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["rollout"]["n_steps"] == 16


def _cli_cases():
    cases = [
        (["train", "npgg", "CartPole-v1"], "unknown algorithm 'npgg'"),
        (["train", "npg", "NoSuchEnv-v0"], "unknown environment id"),
        (["train", "npg", "natpgtest/TextObs-v0"], "unsupported observation space Text"),
        (["train", "npg", "CartPole-v1", "--set", "max_kl=-1"], "max_kl must be"),
        (["train", "npg", "CartPole-v1", "--set", "oops"], "--set expects key=value"),
        (["train", "npg", "CartPole-v1", "--set", "nosuch=1"], r"unknown setting\(s\) \['nosuch'\]"),
        (["train", "npg", "CartPole-v1", "--set", "hidden=5"], "hidden must be a tuple"),
        (["train", "npg", "CartPole-v1", "--n-envs", "0"], "n_envs must be an integer ≥ 1"),
        (["train", "npg", "CartPole-v1", "--steps", "abc"], "argument --steps: invalid step_count value"),
        (["train", "npg", "CartPole-v1", "--steps", "10"], "total_steps must be an integer ≥ one batch"),
        (["train", "npg", "CartPole-v1", "--resume", "{root}/missing"], "not a natpg run"),
        (["train", "npg", "CartPole-v1", "--resume", "{root}/logs_only"], "not a natpg run"),
        (["train", "npg", "CartPole-v1", "--resume", "{root}/pend"], "that run is npg on Pendulum-v1"),
        (["train", "npg", "CartPole-v1", "--resume", "{root}/cart", "--set", "max_kl=0.1"],
         r"to go on with other \['max_kl'\], give --out NEW"),
        (["train", "npg", "CartPole-v1", "--resume", "{root}/cart", "--seed", "7"], "that run has seed 0, not 7"),
        (["train", "npg", "CartPole-v1", "--out", "{root}/foreign.pt/run"], r"foreign.pt' is a file"),
        (["train", "npg", "CartPole-v1", "--seed", str(2**70)], r"seed must be a non-negative integer below 2\*\*62"),
        (["eval", "{root}/missing"], "no natpg checkpoint"),
        (["eval", "{root}/garbage"], "not a readable natpg checkpoint"),
        (["eval", "{root}/cart", "--episodes", "0"], "episodes must be an integer ≥ 1"),
        (["eval", "{root}/cart", "--max-episode-steps", "0"], "max_episode_steps must be an integer ≥ 1"),
        (["eval", "{root}/cart", "--env", "Pendulum-v1"], "does not match the agent"),
        (["eval", "{root}/cart", "--video", "{root}/cart.txt"], r"must end in one of \.mp4"),
        (["eval", "{root}/cart", "--video", "{root}/cart.mp4", "--episodes", "0"], "episodes must be an integer ≥ 1"),
        (["eval", "{root}/cart", "--video", "{root}/cart.gif", "--env", "Pendulum-v1"], "does not match the agent"),
        # bench checks its own arguments before building anything (no warm-up update, no torch traceback)
        (["bench", "npg", "CartPole-v1", "--batch", "256", "--updates", "1", "--n-envs", "0"],
         r"--n-envs \(n_envs\) must be an integer ≥ 1, got 0"),
        (["bench", "npg", "CartPole-v1", "--batch", "256", "--updates", "1", "--set", "n_envs=0"],
         r"--n-envs \(n_envs\) must be an integer ≥ 1, got 0"),
        (["bench", "npg", "CartPole-v1", "--batch", "0", "--updates", "1"], "--batch must be an integer ≥ 1, got 0"),
        (["bench", "npg", "CartPole-v1", "--batch", "256", "--updates", "0"], "--updates must be an integer ≥ 1, got 0"),
        (["bench", "npg", "CartPole-v1", "--batch", "100", "--updates", "1", "--n-envs", "8"],
         "--batch 100 must be a multiple of --n-envs 8"),
        (["bench", "npg", "CartPole-v1", "--batch", "256", "--updates", "1", "--set", "n_steps=4"],
         "not available in bench: n_steps=4 .*change --batch"),
        (["bench", "npg", "CartPole-v1", "--batch", "256", "--updates", "1", "--set", "seed=3", "--set",
          "total_steps=512"], r"seed=3 \(bench always uses seed 0\); total_steps=512 \(.*--updates"),
    ]
    if not torch.cuda.is_available():
        cases.append((["train", "npg", "CartPole-v1", "--device", "cuda"], "CUDA is not available"))
    return cases


@pytest.mark.parametrize("argv,pattern", _cli_cases(), ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_cli_bad_input_exits_2_with_one_message(artifacts, argv, pattern, capsys):
    argv = [a.format(root=artifacts["root"]) for a in argv]
    capsys.readouterr()
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"natpg {argv[0]}: error: "), err
    assert "Traceback" not in err and err.count("error:") == 1, err  # one message (it may list several problems)
    assert re.search(pattern, err), err


# ------------------------------------------------------------------------------------------------------
# 2a. Non-finite observations and rewards from the environment
# ------------------------------------------------------------------------------------------------------

def _nan_vec_env(at=6, what="obs"):
    return SyncVectorEnv([lambda: NaNAt(gym.make("CartPole-v1"), at=at, what=what),
                          lambda: NaNAt(gym.make("CartPole-v1"), at=0, what=what)],  # never: the same spaces
                         autoreset_mode=AutoresetMode.SAME_STEP)


def _sampler(envs, nonfinite):
    policy = CategoricalMLP(4, 2, (8,))
    sampler = Sampler(envs, ObsNormalizer((4,), 10.0, enabled=False), RewardScaler(2, 0.99, 10.0), 0,
                      torch.device("cpu"), torch.Generator().manual_seed(0), nonfinite)
    return policy, sampler


@pytest.mark.parametrize("what,shown", [("obs", r"non-finite observation \[nan"), ("inf_obs", r"non-finite observation \[inf"),
                                        ("reward", "non-finite reward nan"),
                                        ("huge_obs", r"an observation \[1.e\+39 .*\] beyond float32's range \(\|x\| > 3.4e\+38\)"),
                                        ("huge_reward", r"a reward 1e\+200 beyond float32's range \(\|x\| > 3.4e\+38\)")])
def test_nonfinite_env_raise_names_the_step_and_copy(what, shown):
    policy, sampler = _sampler(_nan_vec_env(at=6, what=what), "raise")
    with pytest.raises(NonFiniteEnvError, match=shown + r".* at sampler step 5 \(env copy 0, step \d+ of its episode"
                                                         r"; affected copies \[0\]\)\. Set nonfinite_env='drop'"):
        sampler.collect(policy, 12)


def test_nonfinite_env_drop_ends_the_episode_and_masks_the_transition():
    policy, sampler = _sampler(_nan_vec_env(at=6, what="obs"), "drop")
    torch.manual_seed(0)
    ro = sampler.collect(policy, 12)
    valid = ro.valid.numpy()
    assert valid.sum() == 12 * 2 - 1 and not valid[5, 0]  # only the NaN transition is left out
    if not ro.terminated[4, 0]:
        assert ro.truncated[4, 0]  # the episode ends, truncated, at the last finite observation ...
        torch.testing.assert_close(ro.next_obs[4, 0], ro.obs[5, 0], rtol=0, atol=0)  # ... s_5, bootstrapped
    assert torch.isfinite(ro.obs).all() and torch.isfinite(ro.next_obs).all() and torch.isfinite(ro.rew).all()
    assert abs(ro.obs[6, 0]).max() <= 0.05  # copy 0 was reset: CartPole starts within ±0.05
    assert sampler.dropped == 1 and len(sampler.recent_returns) == sampler.episodes
    # the dropped episode (cut, truncated, at step 4) is not counted or logged as one that finished
    assert sampler.episodes == int(((ro.terminated | ro.truncated) & ro.valid).sum()) - sampler.dropped
    batch = make_batch(ro, policy, natpg.critics.ValueCritic(4, (8,)), natpg.config.AdvantageConfig())
    assert batch.obs.shape[0] == 23 and all(torch.isfinite(t).all() for t in (batch.adv, batch.ret, batch.logp_old))
    # advantages normalised over the 23 transitions kept, not the 24 of the rollout
    assert abs(float(batch.adv.mean())) < 1e-6 and abs(float(batch.adv.std()) - 1) < 1e-6


def test_a_dropped_step_starts_the_copys_episode_counters_afresh_when_no_other_episode_ended():
    """Copy 0's third step is NaN and dropped; no episode ends in that step otherwise (CartPole lasts longer). Its
    running return and length start again at 0, so that its next episode is not logged with the dropped one's."""
    policy, sampler = _sampler(_nan_vec_env(at=3, what="obs"), "drop")
    ro = sampler.collect(policy, 3)
    assert not bool((ro.terminated | ro.truncated)[:, 1].any())  # copy 1 ended nothing
    assert sampler.dropped == 1 and sampler.ep_length.tolist() == [0, 3] and sampler.ep_return[0] == 0.0


def test_nonfinite_env_drop_leaves_the_dropped_copy_out_of_the_reward_statistics():
    """With reward scaling, the running statistics take one discounted return per kept (step, copy): none from the
    step whose reward or observation was dropped."""
    policy = CategoricalMLP(4, 2, (8,))
    scaler = RewardScaler(2, 0.99, 10.0, enabled=True)
    sampler = Sampler(_nan_vec_env(at=6, what="reward"), ObsNormalizer((4,), 10.0, enabled=False), scaler, 0,
                      torch.device("cpu"), torch.Generator().manual_seed(0), "drop")
    ro = sampler.collect(policy, 12)
    assert int((~ro.valid).sum()) == 1
    assert scaler.rms.count == pytest.approx(1e-4 + int(ro.valid.sum()), abs=1e-9)


def test_values_beyond_float32_are_non_finite_in_training_prediction_and_evaluation():
    """A finite value past float32's range would become inf in natpg's float32 buffers (1e39), and one past about
    1e154 would overflow the normalisers' float64 running variance, blinding that input (or zeroing every later
    reward) for the rest of the run: both are non-finite. Under 'drop' the run trains on with finite statistics."""
    policy, sampler = _sampler(_nan_vec_env(at=6, what="huge_reward"), "drop")
    scaler = RewardScaler(2, 0.99, 10.0, enabled=True)
    sampler.rew_scale = scaler
    ro = sampler.collect(policy, 12)
    assert int((~ro.valid).sum()) == 1 and torch.isfinite(ro.rew).all() and np.isfinite(scaler.rms.var).all()
    obs_norm = ObsNormalizer((4,), 10.0, enabled=True)
    policy, sampler = _sampler(_nan_vec_env(at=6, what="huge_obs"), "drop")
    sampler.obs_norm = obs_norm
    sampler.collect(policy, 12)
    assert sampler.dropped == 1 and np.isfinite(obs_norm.rms.var).all() and (obs_norm.rms.var < 1e3).all()
    agent = natpg.NPG("CartPole-v1", **small(normalize_obs=False))
    with pytest.raises(ValueError, match=r"observation holds a value beyond float32's range \(\|x\| > 3.4e\+38\)"):
        agent.predict(np.array([1e39, 0.0, 0.0, 0.0]))
    assert agent.predict(np.array([3e38, 0.0, 0.0, 0.0])) in (0, 1)  # float32's largest are storable
    with pytest.raises(NonFiniteEnvError, match=r"evaluation on 'natpgtest/HugeObsCartPole-v0': the environment "
                                                r"returned an observation or reward beyond float32's range .* at step 3"):
        natpg.evaluate(agent, "natpgtest/HugeObsCartPole-v0", episodes=2)


def test_nonfinite_env_through_the_agent_and_the_cli(tmp_path, capsys):
    agent = natpg.NPG("natpgtest/NaNCartPole-v0", **small(nonfinite_env="drop"))
    rows = []
    agent.learn(2 * BATCH, callback=lambda ag, row: rows.append(row))
    assert rows[-1]["env/nonfinite_dropped"] == 2.0  # each copy's 7th step is NaN, once
    assert torch.isfinite(flat_params(agent.policy)).all()
    with pytest.raises(NonFiniteEnvError, match=r"non-finite observation .* at sampler step 6 \(env copy 0"):
        natpg.NPG("natpgtest/NaNCartPole-v0", **small()).learn(BATCH)
    argv = ["train", "npg", "natpgtest/NaNCartPole-v0", "--steps", "64", "--out", str(tmp_path / "r"), "--no-progress",
            "--n-envs", "2", "--set", "n_steps=16", "--set", "tensorboard=False"]
    capsys.readouterr()
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("natpg train: error: environment returned a non-finite observation") and "Traceback" not in err


# ------------------------------------------------------------------------------------------------------
# 2b. Numerical faults in the update never reach the parameters; K in a row stop training
# ------------------------------------------------------------------------------------------------------

def _nan_solve(agent, mp):
    mp.setattr(agent.actor_update.curvature, "solve", lambda g: torch.full_like(g, float("nan")))


def _nan_surrogate(agent, mp):
    orig = natpg.algorithms.surrogate
    mp.setattr(natpg.algorithms, "surrogate", lambda *args: orig(*args) * float("nan"))


def _inf_step_size(agent, mp):
    mp.setattr(natpg.steps, "quadratic_kl_step", lambda d, curvature, max_kl: (float("inf"), 1.0, None))


def _huge_step_size(agent, mp):
    mp.setattr(natpg.steps, "quadratic_kl_step", lambda d, curvature, max_kl: (1e300, 1.0, None))


def _nan_critic_loss(agent, mp):
    orig = agent.critic.fit
    mp.setattr(agent.critic, "fit", lambda obs, ret, generator=None: orig(obs, ret * float("nan"), generator))


def _nan_values(agent, mp):
    orig = agent.critic.forward
    mp.setattr(agent.critic, "forward", lambda obs: orig(obs) * float("nan"))


FAULTS = [
    ("NaN direction (solve)", _nan_solve, "actor", "non-finite direction"),
    ("NaN surrogate/gradient", _nan_surrogate, "actor", "non-finite surrogate or gradient"),
    ("infinite step size", _inf_step_size, "actor", "non-finite parameters after the step"),
    ("overflowing step", _huge_step_size, "actor", r"numerical error in the actor update \(RuntimeError: value "
                                                    r"cannot be converted to type float without overflow"),
    ("NaN critic loss", _nan_critic_loss, "critic", "non-finite critic parameters after the fit"),
    ("NaN values (advantages)", _nan_values, "both", "non-finite advantages"),
]


@pytest.mark.parametrize("name,inject,side,reason", FAULTS, ids=[f[0] for f in FAULTS])
def test_numerical_fault_leaves_parameters_untouched_then_stops(tmp_path, monkeypatch, name, inject, side, reason):
    agent = natpg.NPG("CartPole-v1", seed=2, **small(max_consecutive_faults=3))
    actor0, critic0 = flat_params(agent.policy), flat_params(agent.critic)
    opt0 = [s["exp_avg"].clone() for s in agent.critic.fitter.state_dict()["state"].values()]
    inject(agent, monkeypatch)
    rows = []
    agent.learn(BATCH, out_dir=str(tmp_path), callback=lambda ag, row: rows.append(row))
    fault = " ".join(str(rows[0].get(k, "")) for k in ("step/fault", "critic/fault"))
    assert re.search(reason, fault), fault
    if side in ("actor", "both"):
        assert torch.equal(flat_params(agent.policy), actor0) and rows[0]["step/skipped"] == 1.0
    if side in ("critic", "both"):
        assert torch.equal(flat_params(agent.critic), critic0) and rows[0]["critic/skipped"] == 1.0
        assert opt0 == [] or all(torch.isfinite(s["exp_avg"]).all() for s in agent.critic.fitter.state_dict()["state"].values())
    assert torch.isfinite(flat_params(agent.policy)).all() and torch.isfinite(flat_params(agent.critic)).all()
    assert agent.consecutive_faults == 1
    assert re.search(reason, (tmp_path / "events.log").read_text())  # logged with its reason
    with pytest.raises(TrainingFault, match=r"3 consecutive updates .* skipped, in whole or in part, for numerical "
                                            r"faults.*checkpoint written"
                       ) as stopped:
        agent.learn(4 * BATCH, out_dir=str(tmp_path), reset=False)
    assert len(re.findall(reason, str(stopped.value))) == 1  # named once, though actor and critic both skipped
    undone = {"actor": "The last update undid the policy's step and kept the critic's fit",
              "critic": "The last update undid the critic's fit and kept the policy's step",
              "both": "The last update undid both the policy's step and the critic's fit"}[side]
    assert undone in str(stopped.value)
    assert ("normalize_reward=True scales them" in str(stopped.value)) == (side != "actor")
    if side == "actor":  # the critic went on learning
        assert not torch.equal(flat_params(agent.critic), critic0)
    assert agent.env_steps == 3 * BATCH
    loaded = natpg.load(str(tmp_path))  # a usable checkpoint, with the parameters from before the faults
    assert loaded.env_steps == 3 * BATCH and torch.isfinite(flat_params(loaded.policy)).all()
    if side in ("actor", "both"):
        assert torch.equal(flat_params(loaded.policy), actor0)


def _state_tensors(state) -> list[torch.Tensor]:
    """Every tensor of a (nested) state dict, in order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for k in sorted(state, key=str) for t in _state_tensors(state[k])]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _state_tensors(v)]
    return []


@pytest.mark.parametrize("algo,extra", [("PPO", {}), ("VPG", {"step": "adam"}), ("ACKTR", {"momentum": 0.9})])
def test_a_faulty_update_undoes_the_steps_own_state_and_the_next_one_trains(algo, extra):
    """A NaN gradient reaches PPO's Adam (or the Adam step rule's moments) before the guard sees the stepped
    parameters: the guard puts back the moments (ACKTR: its momentum) with the parameters, so that the next
    update, on a finite batch, trains instead of faulting for good."""
    from natpg.guards import step_state_of

    def _step_state(actor_update):
        return {name: state for name, (_, state) in step_state_of(actor_update).items()}

    agent = getattr(natpg, algo)("Pendulum-v1", seed=4, **small(**extra))
    rows = []
    agent.learn(BATCH, callback=lambda ag, row: rows.append(row))  # the step's state now exists
    before = _step_state(agent.actor_update)
    assert _state_tensors(before), "nothing to check: the step rule keeps no state"
    params0 = flat_params(agent.policy)
    hooks = [p.register_hook(lambda g: g * float("nan")) for p in agent.policy.parameters()]
    agent.learn(BATCH, reset=False, callback=lambda ag, row: rows.append(row))
    for h in hooks:
        h.remove()
    assert rows[-1]["step/skipped"] == 1.0 and torch.equal(flat_params(agent.policy), params0)
    after = _step_state(agent.actor_update)
    assert len(_state_tensors(after)) == len(_state_tensors(before))
    for t0, t1 in zip(_state_tensors(before), _state_tensors(after)):
        assert torch.equal(t0, t1)
    agent.learn(BATCH, reset=False, callback=lambda ag, row: rows.append(row))
    assert rows[-1]["step/skipped"] == 0.0 and not torch.equal(flat_params(agent.policy), params0)
    assert torch.isfinite(flat_params(agent.policy)).all()


def test_an_update_interrupted_midway_leaves_the_last_completed_ones_step_state_and_draws(tmp_path, monkeypatch):
    """Ctrl-C after PPO's minibatch steps but before the update returned: the checkpoint of "the last completed
    update" holds that update's Adam moments and generator state, not those of the interrupted one."""
    from natpg.guards import step_state_of

    agent = natpg.PPO("Pendulum-v1", seed=4, **small())
    agent.learn(BATCH, out_dir=str(tmp_path))
    adam = [t.clone() for _, state in step_state_of(agent.actor_update).values() for t in _state_tensors(state)]
    draws, params = agent.update_generator.get_state(), flat_params(agent.policy)
    real = agent.actor_update.update

    def interrupted(policy, batch):
        real(policy, batch)  # Adam stepped, minibatches drawn
        raise KeyboardInterrupt

    monkeypatch.setattr(agent.actor_update, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        agent.learn(BATCH, out_dir=str(tmp_path), reset=False)
    now = [t for _, state in step_state_of(agent.actor_update).values() for t in _state_tensors(state)]
    assert len(now) == len(adam) > 0 and all(torch.equal(a, b) for a, b in zip(adam, now))
    assert torch.equal(agent.update_generator.get_state(), draws) and torch.equal(flat_params(agent.policy), params)
    saved = natpg.load(str(tmp_path))
    kept = [t for _, state in step_state_of(saved.actor_update).values() for t in _state_tensors(state)]
    assert len(kept) == len(adam) and all(torch.equal(a, b) for a, b in zip(adam, kept))


OVERLAP_CASES = [("npg", "Pendulum-v1", {}, True), ("trpo", "CartPole-v1", {}, True),
                 ("acktr", "Pendulum-v1", {}, False),  # K-FAC samples actions from the shared generator
                 ("ppo", "CartPole-v1", {}, False),  # PPO draws its minibatches from it
                 ("npg", "CartPole-v1", {"update_threads": 2}, True),  # runs after it: two torch threads
                 ("npg", "CartPole-v1", {"critic_thread": False}, True)]  # runs after it: asked to


@pytest.mark.parametrize("algo,env_id,extra,overlaps", OVERLAP_CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in OVERLAP_CASES])
def test_critic_fit_beside_the_actor_update_is_bit_identical_to_after_it(algo, env_id, extra, overlaps):
    """``CriticFit`` fits the critic in a second thread during the actor update: policy, critic, Adam state
    and generator end equal bit for bit to the sequential order, and it keeps overlapping only where the
    actor update draws nothing from the generator the critic's shuffles share."""
    from natpg.train import CriticFit

    cls = natpg.agent.ALGORITHM_CLASSES[algo]
    runs = []
    for overlap in (False, True):
        agent = cls(env_id, seed=4, **small(**extra))
        agent._critic_fit = CriticFit(overlap=overlap)
        agent.learn(4 * BATCH)
        runs.append(agent)
    sequential, overlapped = runs
    assert overlapped._critic_fit.overlap is overlaps
    if extra.get("update_threads", 0) > 1 or extra.get("critic_thread") is False:
        assert overlapped._critic_fit.start(overlapped.critic, None, overlapped.update_generator,
                                            overlapped.config.run) is None
    assert torch.equal(flat_params(sequential.policy), flat_params(overlapped.policy))
    assert torch.equal(flat_params(sequential.critic), flat_params(overlapped.critic))
    assert torch.equal(sequential.update_generator.get_state(), overlapped.update_generator.get_state())
    opt = [_leaves(a.critic.fitter.state_dict()) for a in runs]  # Adam's moments, or K-FAC's momentum
    assert len(opt[0]) == len(opt[1]) and all(
        torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(*opt))


def _leaves(tree) -> list:
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree, key=str) for leaf in _leaves(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree]


def test_an_actor_update_that_raises_leaves_the_overlapped_critic_as_it_was(monkeypatch):
    agent = natpg.NPG("Pendulum-v1", seed=4, **small())
    agent.learn(BATCH)
    critic0 = flat_params(agent.critic)
    opt0 = {k: v["exp_avg"].clone() for k, v in agent.critic.fitter.state_dict()["state"].items()}

    def broken(policy, batch):
        time.sleep(0.05)  # the critic fit is under way in its thread
        raise AssertionError("a bug in the actor update")

    monkeypatch.setattr(agent.actor_update, "update", broken)
    with pytest.raises(AssertionError, match="a bug in the actor update"):
        agent.learn(BATCH, reset=False)
    assert agent._critic_fit.overlap
    assert torch.equal(flat_params(agent.critic), critic0)
    assert all(torch.equal(v["exp_avg"], opt0[k]) for k, v in agent.critic.fitter.state_dict()["state"].items())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_process_forked_after_training_trains_on():
    """The critic fit's thread does not survive a fork; the child makes its own instead of waiting forever."""
    agent = natpg.NPG("CartPole-v1", seed=1, **small())
    agent.learn(BATCH)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            agent.learn(BATCH, reset=False)
            code = 0 if agent.env_steps == 2 * BATCH else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0


def test_cli_stops_after_consecutive_faults_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(natpg.fisher.CG, "solve", lambda self, g: torch.full_like(g, float("nan")))
    out = tmp_path / "run"
    argv = ["train", "npg", "CartPole-v1", "--steps", "640", "--out", str(out), "--no-progress", "--n-envs", "2",
            "--set", "n_steps=16", "--set", "tensorboard=False", "--set", "max_consecutive_faults=2", "--seed", "3"]
    capsys.readouterr()
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("natpg train: error: training stopped: 2 consecutive updates") and "Traceback" not in err
    assert "non-finite direction" in err and f"checkpoint written to {out}" in err
    loaded = natpg.load(str(out))
    fresh = natpg.NPG("CartPole-v1", seed=3, n_envs=2, n_steps=16, tensorboard=False, max_consecutive_faults=2)
    assert loaded.env_steps == 64 and torch.equal(flat_params(loaded.policy), flat_params(fresh.policy))


# ------------------------------------------------------------------------------------------------------
# 3. Checkpoints: no code on load; truncation and corruption are errors, never different weights
# ------------------------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_load_executes_no_code(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "legacy").mkdir()
    with open(tmp_path / "legacy" / "model.pt", "wb") as f:  # a raw pickle
        pickle.dump({"format": checkpoint.FORMAT, "x": _Payload(marker)}, f)
    torch.save({"format": checkpoint.FORMAT, "version": 2, "meta": "{}", "x": _Payload(marker)},
               tmp_path / "zipped.pt")  # torch's zip format with a pickled callable inside
    for path in (tmp_path / "legacy", tmp_path / "zipped.pt"):
        with pytest.raises(ValueError, match="not a readable natpg checkpoint"):
            natpg.load(str(path))
    assert not marker.exists()


def test_truncated_or_corrupted_checkpoint_is_an_error_or_identical(tmp_path):
    agent = natpg.NPG("CartPole-v1", seed=1, **small())
    agent.learn(BATCH)
    data = Path(agent.save(str(tmp_path / "good"))).read_bytes()
    ref_meta, ref_tensors = checkpoint.read(str(tmp_path / "good"))
    rng = random.Random(8)
    damaged = [data[:n] for n in (0, 1, 10, 100, len(data) // 4, len(data) // 2, len(data) - 100, len(data) - 1)]
    for pos in sorted(rng.sample(range(len(data)), 60)):
        b = bytearray(data)
        b[pos] ^= 0xFF
        damaged.append(bytes(b))
    outcomes = {"error": 0, "identical": 0}
    for i, blob in enumerate(damaged):
        file = tmp_path / f"d{i}.pt"
        file.write_bytes(blob)
        try:
            meta, tensors = checkpoint.read(str(file))
            loaded = natpg.load(str(file))
        except ValueError as exc:
            assert re.search(r"truncated or corrupted|is corrupted|not a natpg checkpoint", str(exc)), str(exc)
            outcomes["error"] += 1
            continue
        # A flip in bytes the reader ignores (zip padding, timestamps): then everything must be identical.
        assert meta == ref_meta and checkpoint.digest(json.dumps(meta), tensors) == \
            checkpoint.digest(json.dumps(ref_meta), ref_tensors)
        assert torch.equal(flat_params(loaded.policy), flat_params(agent.policy))
        outcomes["identical"] += 1
    assert outcomes["error"] >= 8 + 40, outcomes  # every truncation, and most flips, are detected


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_checkpoint_and_config_get_the_mode_open_would_give(tmp_path, umask_027, monkeypatch):
    """0o666 & ~umask for a new file (mkstemp's 0600 would keep a shared run from others); an existing file keeps
    its own mode, as open(path, 'w') keeps it."""
    agent = natpg.NPG("CartPole-v1", **small())
    agent.save(str(tmp_path / "run"))
    for name in ("model.pt", "config.json"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o666 & ~umask_027 == 0o640, name
    (tmp_path / "run" / "model.pt").chmod(0o604)
    agent.save(str(tmp_path / "run"))
    assert (tmp_path / "run" / "model.pt").stat().st_mode & 0o777 == 0o604
    assert checkpoint._umask() == umask_027

    def no_proc(*a, **k):
        raise OSError("no /proc here")

    monkeypatch.setattr(checkpoint, "open", no_proc, raising=False)  # the fallback reads it by setting it
    assert checkpoint._umask() == umask_027 and os.umask(umask_027) == umask_027


def test_version_1_checkpoint_still_loads(artifacts, tmp_path):
    meta, tensors = checkpoint.read(str(artifacts["root"] / "cart"))
    torch.save({"format": checkpoint.FORMAT, "version": 1, "meta": json.dumps(meta), **tensors}, tmp_path / "v1.pt")
    loaded = natpg.load(str(tmp_path / "v1.pt"))  # no digest in version 1
    assert torch.equal(flat_params(loaded.policy), flat_params(artifacts["cart"].policy))


# ------------------------------------------------------------------------------------------------------
# 4. Resume: N + M steps in one run == N steps, save, load, M more (parameters, statistics, logs)
# ------------------------------------------------------------------------------------------------------

def _assert_same_run(a, b, dir_a, dir_b):
    assert torch.equal(flat_params(a.policy), flat_params(b.policy))
    assert torch.equal(flat_params(a.critic), flat_params(b.critic))
    for x, y in ((a.obs_normalizer.rms, b.obs_normalizer.rms), (a.reward_scaler.rms, b.reward_scaler.rms)):
        assert np.array_equal(x.mean, y.mean) and np.array_equal(x.var, y.var) and x.count == y.count
    assert np.array_equal(a.reward_scaler.ret, b.reward_scaler.ret)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert torch.equal(a.update_generator.get_state(), b.update_generator.get_state())
    assert (a.env_steps, a.updates) == (b.env_steps, b.updates)
    assert progress_rows(dir_a) == progress_rows(dir_b)
    assert (Path(dir_a) / "episodes.csv").read_text() == (Path(dir_b) / "episodes.csv").read_text()


RESUME_CASES = [("npg", "CartPole-v1", {}),
                # a constant δ: learn(N + M) and learn(N), learn(M) decay δ towards other ends (the preset's decay
                # is resumed by test_interrupted_run_with_a_kl_schedule_resumes_bit_exactly)
                ("trpo", "Pendulum-v1", {"normalize_reward": True, "kl_schedule": "constant"}),
                ("npg", "Hopper-v5", {}),  # MuJoCo preset: reward normalisation on
                ("acktr", "Pendulum-v1", {"momentum": 0.9}),  # K-FAC's moving averages and momentum carried over
                ("acktr", "CartPole-v1", {"kfac_refresh_every": 2}),  # and the snapshot between refreshes
                ("npg", "Pendulum-v1", {"cg_preconditioner": "kfac"}),  # CG's K-FAC preconditioner's averages
                ("npg", "Pendulum-v1", {"cg_warm_start": True}),  # the solution CG starts from
                ("ppo", "Pendulum-v1", {"value_clip": 0.2, "lr_schedule": "constant"}),  # both Adams' moments
                ("vpg", "Pendulum-v1", {"lr_schedule": "constant"}),  # its preset's Adam step rule
                ("nac", "CartPole-v1", {}), ("npg", "CartPole-v1", {"fisher": "diagonal"}),
                ("acktr", "Pendulum-v1", {"critic_momentum": 0.9})]  # the K-FAC critic's momentum


@pytest.mark.parametrize("algo,env_id,extra", RESUME_CASES,
                         ids=[f"{algo}-{env}" + "".join(f"-{k}" for k in extra) for algo, env, extra in RESUME_CASES])
def test_resume_is_bit_exact(tmp_path, algo, env_id, extra):
    if env_id == "Hopper-v5":
        pytest.importorskip("mujoco")
    cls = natpg.agent.ALGORITHM_CLASSES[algo]
    kw = small(**extra)
    N, M = 3 * BATCH, 2 * BATCH
    one = cls(env_id, seed=5, **kw).learn(N + M, out_dir=str(tmp_path / "one"))
    cls(env_id, seed=5, **kw).learn(N, out_dir=str(tmp_path / "two"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        two = natpg.load(str(tmp_path / "two")).learn(M, out_dir=str(tmp_path / "two"), reset=False)
    assert not [w for w in caught if "not bit-exact" in str(w.message)]  # the environments were restored
    _assert_same_run(one, two, tmp_path / "one", tmp_path / "two")
    if algo == "npg" and env_id == "CartPole-v1":  # and without a checkpoint in between
        three = cls(env_id, seed=5, **kw).learn(N, out_dir=str(tmp_path / "three"))
        three.learn(M, out_dir=str(tmp_path / "three"), reset=False)
        _assert_same_run(one, three, tmp_path / "one", tmp_path / "three")


def test_interrupted_run_with_a_kl_schedule_resumes_bit_exactly(tmp_path):
    """kl_schedule='linear' decays δ towards the step count the run was started for; a run stopped halfway
    and resumed for the steps it had left decays it exactly as the uninterrupted run does."""
    kw = small(kl_schedule="linear", normalize_reward=True)
    N, M = 3 * BATCH, 2 * BATCH
    one = natpg.TRPO("Pendulum-v1", seed=6, **kw).learn(N + M, out_dir=str(tmp_path / "one"))
    natpg.TRPO("Pendulum-v1", seed=6, **kw).learn(N + M, out_dir=str(tmp_path / "two"),
                                                  callback=lambda agent, row: agent.env_steps < N)  # stops at N
    two = natpg.load(str(tmp_path / "two"))
    delta = two.config.step.max_kl  # 0.02, TRPO's Pendulum preset
    assert two.env_steps == N and two.actor_update.step_rule.max_kl == delta == 0.02  # not a decayed δ
    two.learn(M, out_dir=str(tmp_path / "two"), reset=False)
    _assert_same_run(one, two, tmp_path / "one", tmp_path / "two")
    deltas = [float(r["step/max_kl"]) for r in progress_rows(tmp_path / "two")]
    assert deltas == pytest.approx([delta * (1 - k * BATCH / (N + M)) for k in range(5)], rel=0, abs=1e-15)


@pytest.mark.parametrize("algo,extra", [("npg", {}), ("npg", {"cg_preconditioner": "kfac", "cg_warm_start": True}),
                                         ("acktr", {"kfac_refresh_every": 3}), ("ppo", {}), ("nac", {})])
def test_a_pickled_or_deep_copied_agent_goes_on_exactly_as_the_original(algo, extra):
    """pickle and copy.deepcopy of an agent that has learned: the copy continues bit for bit as the original. CG's
    Fisher products of the last batch (closures) made pickling fail; K-FAC finds its layers by the parameters'
    identities, which a copy does not keep, and so started its factors afresh in a copy."""
    import copy
    import pickle

    for make_copy in (lambda a: pickle.loads(pickle.dumps(a)), copy.deepcopy):
        agent = natpg.agent.ALGORITHM_CLASSES[algo]("CartPole-v1", seed=3, **small(**extra))
        agent.learn(3 * BATCH)
        twin = make_copy(agent)
        agent.learn(3 * BATCH, reset=False)
        twin.learn(3 * BATCH, reset=False)
        assert all(torch.equal(p, q) for p, q in zip(agent.policy.parameters(), twin.policy.parameters()))
        assert all(torch.equal(p, q) for p, q in zip(agent.critic.parameters(), twin.critic.parameters()))


def test_cli_resume_is_bit_exact(tmp_path):
    common = ["--n-envs", "2", "--set", "n_steps=16", "--set", "tensorboard=False", "--set", "hidden=(16,)",
              "--no-progress", "--seed", "4", "--set", "checkpoint_every=2", "--eval-every", "48",
              "--set", "eval_episodes=2"]
    assert cli(["train", "npg", "CartPole-v1", "--steps", "160", "--out", str(tmp_path / "a"), *common]) == 0
    assert cli(["train", "npg", "CartPole-v1", "--steps", "96", "--out", str(tmp_path / "b"), *common]) == 0
    # continued elsewhere (--out C): C gets the whole run, its history and best policy included; B is untouched
    before = {f.name: f.read_bytes() for f in (tmp_path / "b").rglob("*") if f.is_file() and f.name != ".natpg.lock"}
    assert cli(["train", "npg", "CartPole-v1", "--steps", "160", "--resume", str(tmp_path / "b"), "--out",
                str(tmp_path / "c"), "--no-progress"]) == 0
    assert before == {f.name: f.read_bytes() for f in (tmp_path / "b").rglob("*") if f.is_file() and f.name != ".natpg.lock"}
    assert cli(["train", "npg", "CartPole-v1", "--steps", "160", "--resume", str(tmp_path / "b"), "--no-progress"]) == 0
    for run in ("b", "c"):
        _assert_same_run(natpg.load(str(tmp_path / "a")), natpg.load(str(tmp_path / run)), tmp_path / "a", tmp_path / run)
        # the periodic evaluations (eval/* columns, compared above) and the best policy carry over the resume
        best_a, best = natpg.load(str(tmp_path / "a" / "best")), natpg.load(str(tmp_path / run / "best"))
        assert best_a.env_steps == best.env_steps and best_a.best_eval_return == best.best_eval_return
    assert [r["env_steps"] for r in progress_rows(tmp_path / "b") if r["eval/return_mean"] != "nan"] == ["64", "96", "160"]


def test_a_run_resumes_with_other_logging_checkpoint_and_evaluation_settings(tmp_path, capsys):
    """log_interval, checkpoint_every, tensorboard, eval_every and eval_episodes say how a run is recorded, not
    what it learns: --resume (or natpg.load with them) takes new values, records them and goes on in the run's
    own directory, with the same numbers as without the change; another setting is still refused."""
    common = ["--n-envs", "2", "--set", "n_steps=16", "--set", "tensorboard=False", "--set", "hidden=(16,)",
              "--no-progress", "--seed", "4"]
    run, ref = str(tmp_path / "run"), str(tmp_path / "ref")
    assert cli(["train", "npg", "CartPole-v1", "--steps", "64", "--out", run, *common]) == 0
    assert cli(["train", "npg", "CartPole-v1", "--steps", "128", "--resume", run, "--eval-every", "96", "--set",
                "eval_episodes=2", "--set", "checkpoint_every=1", *common]) == 0
    natpg.load(run, log_interval=2).learn(64, out_dir=run, reset=False)
    assert cli(["train", "npg", "CartPole-v1", "--steps", "192", "--out", ref, *common]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())["run"]
    assert (config["eval_every"], config["eval_episodes"], config["checkpoint_every"], config["log_interval"]) == \
        (96, 2, 1, 2)
    assert torch.equal(flat_params(natpg.load(run).policy), flat_params(natpg.load(ref).policy))
    rows = progress_rows(tmp_path / "run")
    assert [int(r["env_steps"]) for r in rows] == [32, 64, 96, 128, 192]  # 160 not logged (log_interval 2)
    assert [r["env_steps"] for r in rows if r.get("eval/return_mean", "nan") != "nan"] == ["96", "192"]
    capsys.readouterr()
    assert cli(["train", "npg", "CartPole-v1", "--steps", "256", "--resume", run, "--set", "max_kl=0.1", *common]) == 2
    assert ("--resume DIR keeps the run's recorded config in DIR, but for the settings of logging and evaluation "
            "(log_interval, ") in capsys.readouterr().err
    # into a new directory the run goes on with the change, as natpg.load(DIR, max_kl=0.1) does
    tuned, by_hand = str(tmp_path / "tuned"), str(tmp_path / "by_hand")
    assert cli(["train", "npg", "CartPole-v1", "--steps", "256", "--resume", run, "--out", tuned, "--set",
                "max_kl=0.1", *common]) == 0
    natpg.load(run, max_kl=0.1).learn(64, out_dir=by_hand, reset=False)
    assert natpg.load(tuned).config.step.max_kl == 0.1 and natpg.load(tuned).env_steps == 256
    assert torch.equal(flat_params(natpg.load(tuned).policy), flat_params(natpg.load(by_hand).policy))
    assert [int(r["env_steps"]) for r in progress_rows(tmp_path / "tuned")] == [256]  # its own log (log_interval 2)
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["step"]["max_kl"] == 0.1
    assert natpg.load(run).config.step.max_kl != 0.1 and natpg.load(run).env_steps == 192  # left as it was


def test_a_resume_into_another_directory_leaves_the_first_free_and_may_overwrite_there(tmp_path, monkeypatch, capsys):
    """--resume DIR --out NEW reads DIR, then trains in NEW: DIR is not locked while it trains (a second fine-tune
    from DIR may start beside it), and --overwrite replaces another run in NEW (never DIR itself)."""
    import threading

    from natpg.checkpoint import run_dir_lock

    common = ["--n-envs", "2", "--set", "n_steps=16", "--set", "tensorboard=False", "--no-progress"]
    run = str(tmp_path / "run")
    assert cli(["train", "npg", "CartPole-v1", "--steps", "64", "--out", run, *common]) == 0
    free = []
    learn = natpg.agent.Agent.learn

    def learn_noting_whether_run_is_free(agent, *args, **kwargs):
        def try_lock():
            try:
                with run_dir_lock(run):
                    free.append(True)
            except ValueError:
                free.append(False)
        t = threading.Thread(target=try_lock)
        t.start()
        t.join()
        return learn(agent, *args, **kwargs)

    monkeypatch.setattr(natpg.agent.Agent, "learn", learn_noting_whether_run_is_free)
    for steps in ("128", "160"):  # the second replaces the first's NEW with --overwrite
        extra = ["--overwrite"] if steps == "160" else []
        assert cli(["train", "npg", "CartPole-v1", "--steps", steps, "--resume", run, "--out", str(tmp_path / "tuned"),
                    "--set", "max_kl=0.05", *extra, *common]) == 0, capsys.readouterr().err
    assert free == [True, True]
    assert natpg.load(str(tmp_path / "tuned")).env_steps == 160
    assert cli(["train", "npg", "CartPole-v1", "--resume", run, "--overwrite", *common]) == 2
    assert "(with --out NEW, --overwrite replaces another run in NEW)" in capsys.readouterr().err
    monkeypatch.setattr(natpg.agent.Agent, "learn", learn)
    with run_dir_lock(run, shared=True):  # another fine-tune reading DIR at this moment: a reader beside it is fine,
        assert cli(["train", "npg", "CartPole-v1", "--steps", "128", "--resume", run, "--out", str(tmp_path / "t2"),
                    "--set", "max_kl=0.04", *common]) == 0, capsys.readouterr().err
        assert cli(["train", "npg", "CartPole-v1", "--steps", "128", "--resume", run, *common]) == 2  # a writer not
        assert "is being read by another natpg process (a --resume of it into another --out)" in capsys.readouterr().err


def test_tensorboard_drops_what_a_killed_run_logged_after_its_checkpoint(tmp_path):
    """A run killed between log rows and its next checkpoint resumes from the checkpoint: progress.csv drops the
    rows after it, and TensorBoard (purge_step) the scalars after it, so each step has the resumed run's value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from natpg.logger import Logger

    killed = Logger(str(tmp_path), tensorboard=True)
    for step in (64, 128, 192, 256):
        killed.record({"env_steps": step, "x": float(step)})
    killed.close()  # its checkpoint holds step 128
    resumed = Logger(str(tmp_path), tensorboard=True, resume=True, resume_step=128)
    for step in (192, 256, 320):
        resumed.record({"env_steps": step, "x": -float(step)})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    expected = [(64, 64.0), (128, 128.0), (192, -192.0), (256, -256.0), (320, -320.0)]
    assert [(e.step, e.value) for e in events.Scalars("x")] == expected
    assert [(int(r["env_steps"]), float(r["x"])) for r in progress_rows(tmp_path)] == expected


ENV_STATE_IDS = ["CartPole-v1", "Pendulum-v1", "MountainCar-v0", "MountainCarContinuous-v0", "Acrobot-v1",
                 "HalfCheetah-v5", "Hopper-v5", "Ant-v5", "Humanoid-v5", "Reacher-v5"]


@pytest.mark.parametrize("env_id", ENV_STATE_IDS)
def test_env_state_round_trip_is_bit_exact(env_id):
    if env_id.endswith("-v5"):
        pytest.importorskip("mujoco")
    a = gym.make(env_id)
    a.reset(seed=3)
    a.action_space.seed(1)
    actions = [a.action_space.sample() for _ in range(250)]
    for act in actions[:100]:
        if any(a.step(act)[2:4]):
            a.reset()
    state = json.loads(json.dumps(env_state(a)))  # plain JSON, no pickle
    b = gym.make(env_id)
    b.reset(seed=99)
    set_env_state(b, state)
    for act in actions[100:]:
        ra, rb = a.step(act), b.step(act)
        assert np.array_equal(ra[0], rb[0]) and ra[1:4] == rb[1:4]
        if any(ra[2:4]):
            assert np.array_equal(a.reset()[0], b.reset()[0])


def test_unsnapshottable_env_resumes_with_a_warning(tmp_path):
    env = gym.make("natpgtest/Drift-v0")
    env.reset(seed=0)
    with pytest.raises(EnvStateError, match="classic-control and MuJoCo tasks, and of an environment with "
                                            r"natpg_state\(\) and natpg_set_state\(state\) methods"):
        env_state(env)
    natpg.NPG("natpgtest/Drift-v0", **small()).learn(BATCH, out_dir=str(tmp_path))
    agent = natpg.load(str(tmp_path))
    with pytest.warns(RuntimeWarning, match="not bit-exact: cannot snapshot environment"):
        agent.learn(BATCH, out_dir=str(tmp_path), reset=False)
    assert agent.env_steps == 2 * BATCH and [int(r["env_steps"]) for r in progress_rows(tmp_path)] == [32, 64]


class SnapshotDriftEnv(DriftEnv):
    """DriftEnv saying how to save its state (the natpg_state protocol)."""

    def natpg_state(self):
        return {"x": self.x.tolist()}

    def natpg_set_state(self, state):
        self.x = np.asarray(state["x"], np.float64)


class ScaleReward(gym.RewardWrapper):
    natpg_stateless = True  # declared: nothing of its own to save

    def reward(self, reward):
        return 0.5 * reward


class CountSteps(gym.Wrapper):
    """A stateful wrapper with its own snapshot: the steps seen, added to the reward."""

    def __init__(self, env):
        super().__init__(env)
        self.count = 0

    def step(self, action):
        obs, rew, term, trunc, info = self.env.step(action)
        self.count += 1
        return obs, rew + 1e-3 * self.count, term, trunc, info

    def natpg_state(self):
        return self.count

    def natpg_set_state(self, state):
        self.count = state


class SnapshotDictEnv(SnapshotDriftEnv):
    observation_space = spaces.Dict({"x": spaces.Box(-np.inf, np.inf, (2,), np.float64)})

    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed, options=options)
        return {"x": obs}, info

    def step(self, action):
        obs, *rest = super().step(action)
        return {"x": obs}, *rest


if "natpgtest/SnapshotDict-v0" not in gym.registry:
    gym.register("natpgtest/SnapshotDict-v0", entry_point=SnapshotDictEnv, max_episode_steps=60)
if "natpgtest/SnapshotDrift-v0" not in gym.registry:
    gym.register("natpgtest/SnapshotDrift-v0", max_episode_steps=60,
                 entry_point=lambda: CountSteps(ScaleReward(SnapshotDriftEnv())))


def test_an_own_state_holding_nan_or_inf_is_saved_and_given_back(monkeypatch):
    """A natpg_state() with NaN (an unset sensor) or inf comes back from the checkpoint's JSON as it was: it is
    not refused as "what JSON would not give back" (NaN != NaN), and set_env_state receives it."""
    received = []
    monkeypatch.setattr(SnapshotDriftEnv, "natpg_state", lambda self: {"x": [float("nan"), float("inf"), 1.0]})
    monkeypatch.setattr(SnapshotDriftEnv, "natpg_set_state", lambda self, state: received.append(state))
    env = make_env("natpgtest/SnapshotDrift-v0", wrap=False)
    env.reset(seed=0)
    state = json.loads(json.dumps(env_state(env), allow_nan=True))  # as the checkpoint holds it
    set_env_state(env, state)
    x = received[0]["x"]
    assert math.isnan(x[0]) and x[1:] == [float("inf"), 1.0]


def test_an_environment_and_wrappers_that_say_how_to_save_their_state_resume_bit_exactly(tmp_path):
    """natpg_state()/natpg_set_state(state) on the environment and on a wrapper class, natpg_stateless on another:
    a resume from a checkpoint equals the run without one, episodes.csv too; natpg_state must give JSON."""
    kw, N, M = small(), 3 * BATCH, 2 * BATCH
    one = natpg.NPG("natpgtest/SnapshotDrift-v0", seed=5, **kw).learn(N + M, out_dir=str(tmp_path / "one"))
    natpg.NPG("natpgtest/SnapshotDrift-v0", seed=5, **kw).learn(N, out_dir=str(tmp_path / "two"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not bit-exact" warning: the environments were restored
        two = natpg.load(str(tmp_path / "two")).learn(M, out_dir=str(tmp_path / "two"), reset=False)
    _assert_same_run(one, two, tmp_path / "one", tmp_path / "two")
    env = gym.make("natpgtest/SnapshotDrift-v0")
    env.reset(seed=1)
    env.step(1)
    state = json.loads(json.dumps(env_state(env)))
    assert state["own"] == {"x": env.unwrapped.x.tolist()} and state["wrappers"]["CountSteps"] == {"own": 1}
    flattened = make_env("natpgtest/SnapshotDict-v0", None)  # natpg's own flattening wrapper has no state
    flattened.reset(seed=0)
    assert set(env_state(flattened)["wrappers"]) == {"TimeLimit", "OrderEnforcing"}
    env.unwrapped.natpg_state = lambda: {"x": env.unwrapped.x}  # an array: not JSON
    with pytest.raises(EnvStateError, match=r"SnapshotDriftEnv.natpg_state\(\) returned what JSON cannot hold"):
        env_state(env)
    env.unwrapped.natpg_state = lambda: {"x": tuple(env.unwrapped.x)}  # JSON gives a list back
    with pytest.raises(EnvStateError, match=r"natpg_state\(\) returned what JSON does not give back as it is"):
        env_state(env)
    twice = CountSteps(CountSteps(SnapshotDriftEnv()))
    twice.reset(seed=0)
    with pytest.raises(EnvStateError, match="two wrappers named CountSteps"):  # snapshots are kept by name
        env_state(twice)


def test_a_restore_that_fails_in_the_users_code_goes_on_from_fresh_environments(tmp_path, monkeypatch):
    natpg.NPG("natpgtest/SnapshotDrift-v0", seed=5, **small()).learn(2 * BATCH, out_dir=str(tmp_path))

    def broken(self, state):
        self.x = np.full(2, 99.0)  # half restored, then failing
        raise TypeError("state vector must be a tuple")

    fresh = natpg.load(str(tmp_path))
    fresh.learn(BATCH, reset=True)  # the reference: the same run from freshly reset environments
    monkeypatch.setattr(SnapshotDriftEnv, "natpg_set_state", broken)
    agent = natpg.load(str(tmp_path))
    with pytest.warns(RuntimeWarning, match=r"not bit-exact: SnapshotDriftEnv.natpg_set_state failed: TypeError: "
                                            r"state vector must be a tuple"):
        agent.learn(BATCH, out_dir=str(tmp_path), reset=False)
    assert agent.env_steps == 3 * BATCH
    # nothing of the half-done restore is left (CountSteps' count, restored before the failure, survives a reset):
    # the environments were made afresh, as reset=True does
    assert torch.equal(flat_params(agent.policy), flat_params(fresh.policy))
    assert torch.equal(flat_params(agent.critic), flat_params(fresh.critic))


# ------------------------------------------------------------------------------------------------------
# 3 + 4 in real processes: SIGKILL at random moments, SIGTERM/SIGINT
# ------------------------------------------------------------------------------------------------------

FORK_SERVER = r"""
import json, os, signal, sys, traceback
os.environ.setdefault("MUJOCO_GL", "disabled")
import tempfile
import torch
torch.set_num_threads(1)
import natpg, natpg.cli  # the heavy imports (torch, and the lazy ones of a first update and save), once:
with tempfile.TemporaryDirectory() as tmp:  # each run is a fork of this warmed-up process
    natpg.load(natpg.NPG("CartPole-v1", n_envs=2, n_steps=8, tensorboard=False).learn(16).save(tmp))
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "run":
        pid = os.fork()
        if pid == 0:
            rc = 70
            try:
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                rc = natpg.cli.main(req["argv"])
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc if isinstance(rc, int) else 1)
        print(json.dumps({"pid": pid}), flush=True)
    elif req["op"] == "wait":
        _, status = os.waitpid(req["pid"], 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class ForkServer:
    """Runs `natpg train` (natpg.cli.main) in fresh processes forked from one that has already imported torch,
    so that each run starts in milliseconds instead of seconds."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "MUJOCO_GL": "disabled"})
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def _call(self, req):
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, argv, log) -> int:
        return self._call({"op": "run", "argv": argv, "log": str(log)})["pid"]

    def wait(self, pid) -> int:
        return self._call({"op": "wait", "pid": pid})["rc"]

    def close(self):
        self.proc.kill()  # its runs have all been reaped
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def fork_server():
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    server = ForkServer()
    yield server
    server.close()


KILL_ARGS = ["--no-progress", "--n-envs", "2", "--set", "n_steps=8", "--set", "checkpoint_every=1",
             "--set", "tensorboard=False", "--set", "hidden=(8,)", "--set", "critic_hidden=(8,)",
             "--set", "critic_epochs=1", "--set", "cg_iters=3", "--seed", "6"]
KILL_STEPS = 16 * 64


def test_sigkill_at_random_moments_leaves_loadable_checkpoints(tmp_path, fork_server):
    out = tmp_path / "run"
    rng = random.Random(20)
    steps_seen, kills, mid_write = [], 0, 0
    while kills < 24:
        resume = (out / "model.pt").exists()
        argv = ["train", "npg", "CartPole-v1", "--steps", str(KILL_STEPS), *KILL_ARGS,
                *(["--resume", str(out)] if resume else ["--out", str(out)])]
        pid = fork_server.start(argv, tmp_path / f"log{kills}")
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(pid, signal.SIGKILL)
        rc = fork_server.wait(pid)
        kills += 1
        assert rc in (-signal.SIGKILL, 0), (rc, (tmp_path / f"log{kills - 1}").read_text())
        mid_write += any(p.name.startswith(".model.pt.tmp-") for p in out.glob(".*")) if out.exists() else 0
        if (out / "model.pt").exists():  # whatever was left behind loads
            agent = natpg.load(str(out))
            steps_seen.append(agent.env_steps)
            json.loads((out / "config.json").read_text())
    assert len(steps_seen) >= 18 and steps_seen == sorted(steps_seen) and steps_seen[-1] > 0
    # Finish the run from whatever the kills left: identical to a run never interrupted.
    pid = fork_server.start(["train", "npg", "CartPole-v1", "--steps", str(KILL_STEPS), *KILL_ARGS,
                             "--resume", str(out)], tmp_path / "final")
    assert fork_server.wait(pid) == 0, (tmp_path / "final").read_text()
    assert cli(["train", "npg", "CartPole-v1", "--steps", str(KILL_STEPS), *KILL_ARGS, "--out", str(tmp_path / "ref")]) == 0
    _assert_same_run(natpg.load(str(out)), natpg.load(str(tmp_path / "ref")), out, tmp_path / "ref")
    print(f"{kills} kills, {mid_write} during a checkpoint write, checkpoints at env_steps {steps_seen}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_sigint_save_a_final_checkpoint_and_exit_cleanly(tmp_path, fork_server, sig):
    out = tmp_path / "run"
    pid = fork_server.start(["train", "npg", "CartPole-v1", "--steps", "1000000", *KILL_ARGS, "--out", str(out)],
                            tmp_path / "log")
    deadline = time.monotonic() + 60
    while not ((out / "progress.csv").exists() and len((out / "progress.csv").read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline, (tmp_path / "log").read_text()
        time.sleep(0.02)
    os.kill(pid, sig)
    rc = fork_server.wait(pid)
    log = (tmp_path / "log").read_text()
    assert rc == 128 + sig, log
    assert f"stopped by {signal.Signals(sig).name} after" in log and "Traceback" not in log
    assert f"{signal.Signals(sig).name}: stopping after this update and saving it" in log  # said at once
    agent = natpg.load(str(out))
    assert agent.env_steps > 0 and agent.env_steps == int(progress_rows(out)[-1]["env_steps"])


def test_an_async_run_ends_quietly_and_a_ctrl_c_to_its_process_group_is_the_learners_alone(tmp_path):
    """natpg train with vectorization='async' (env workers forked from the CLI, with its signal handlers): a run
    that ends closes its workers (they were terminated at exit, each printing the SIGTERM message and a broken
    pipe's traceback); a SIGINT to the whole process group, as Ctrl-C sends, is acted on by the learner alone."""
    cmd = [sys.executable, "-c", "import sys, natpg.cli; sys.exit(natpg.cli.main(sys.argv[1:]))", "train", "npg",
           "CartPole-v1", *KILL_ARGS, "--set", "vectorization=async"]
    env = {**os.environ, "MUJOCO_GL": "disabled"}
    done = subprocess.run([*cmd, "--steps", "64", "--out", str(tmp_path / "a")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.startswith("trained npg on CartPole-v1 for 64 steps; recent return")
    out = tmp_path / "b"
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen([*cmd, "--steps", "1000000", "--out", str(out)], stdout=log, stderr=log, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ((out / "progress.csv").exists() and len((out / "progress.csv").read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "log").read_text()
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "log").read_text()
    assert rc == 128 + signal.SIGINT, text
    assert text.count("SIGINT: stopping after this update") == 1 and "Traceback" not in text, text
    assert natpg.load(str(out)).env_steps == int(progress_rows(out)[-1]["env_steps"])


# ------------------------------------------------------------------------------------------------------
# 5. Property-based tests (hypothesis): CG, every Fisher solver, GAE
# ------------------------------------------------------------------------------------------------------

def _spd(n, seed, cond):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, float(np.log10(cond)), n, dtype=torch.float64)
    return (q * lam) @ q.T, torch.randn(n, generator=g, dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 16), seed=st.integers(0, 2**31 - 1), cond=st.sampled_from([1.0, 10.0, 1e3]),
       zero_rhs=st.booleans())
@example(n=1, seed=0, cond=1.0, zero_rhs=False)
@example(n=1, seed=0, cond=1.0, zero_rhs=True)
def test_conjugate_gradient_solves_random_spd_systems(n, seed, cond, zero_rhs):
    A, b = _spd(n, seed, cond)
    if zero_rhs:
        b = torch.zeros(n, dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: A @ v, b, max_iters=3 * n + 5, tol=1e-12)
    assert torch.isfinite(x).all()
    if zero_rhs:
        assert torch.equal(x, torch.zeros(n, dtype=torch.float64)) and info.iterations == 0
    else:
        torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-7, atol=1e-9)
        assert float(torch.linalg.vector_norm(A @ x - b)) <= 1e-8 * float(torch.linalg.vector_norm(b))


def _matrix_of(mv, P):
    eye = torch.eye(P, dtype=torch.float64)
    return torch.stack([mv(eye[i]) for i in range(P)], dim=1)


@settings(max_examples=25, deadline=None)
@given(obs_dim=st.integers(1, 3), hidden=st.sampled_from([(), (3,), (3, 2)]), discrete=st.booleans(),
       n_act=st.integers(1, 3), batch=st.integers(1, 12), constant_obs=st.booleans(),
       damping=st.sampled_from([0.01, 0.1, 1.0]), seed=st.integers(0, 2**31 - 1))
@example(obs_dim=1, hidden=(), discrete=False, n_act=1, batch=1, constant_obs=True, damping=0.01, seed=0)
def test_fisher_solvers_invert_their_own_matrix(obs_dim, hidden, discrete, n_act, batch, constant_obs, damping, seed):
    torch.manual_seed(seed)
    policy = (CategoricalMLP(obs_dim, n_act + 1, hidden) if discrete else GaussianMLP(obs_dim, n_act, hidden)).double()
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(batch, obs_dim, generator=g, dtype=torch.float64)
    if constant_obs:
        obs = obs[:1].expand(batch, obs_dim).clone()
    with torch.no_grad():
        act = policy.sample(policy(obs), g)
    P = sum(p.numel() for p in policy.actor_parameters())
    grad = torch.randn(P, generator=g, dtype=torch.float64)
    solvers = {"CG": CG(damping=damping, iters=2 * P + 10, tol=1e-14), "Dense": Dense(damping=damping),
               "KFAC": KFAC(damping=damping, estimator="exact"), "Diagonal": Diagonal(damping=damping),
               "Empirical": Empirical(damping=damping, cg_iters=2 * P + 10, cg_tol=1e-14)}
    for name, solver in solvers.items():
        solver.fit(policy, obs, act)
        x = solver.solve(grad)
        assert x.shape == (P,) and torch.isfinite(x).all(), name
        M = _matrix_of(solver.mv, P)
        torch.testing.assert_close(M, M.T, rtol=1e-8, atol=1e-10, msg=name)
        torch.testing.assert_close(x, torch.linalg.solve(M, grad), rtol=1e-6, atol=1e-8, msg=name)


def _gae_loop(rew, val, next_val, term, done, gamma, lam):
    T, N = rew.shape
    adv = np.zeros((T, N))
    for n in range(N):
        running = 0.0
        for t in reversed(range(T)):
            delta = rew[t, n] + gamma * (0.0 if term[t, n] else next_val[t, n]) - val[t, n]
            running = delta + gamma * lam * (0.0 if done[t, n] else running)
            adv[t, n] = running
    return adv


@settings(max_examples=50, deadline=None)
@given(T=st.integers(1, 12), N=st.integers(1, 4), gamma=st.floats(0.0, 0.999), lam=st.floats(0.0, 1.0),
       p_term=st.sampled_from([0.0, 0.2, 1.0]), p_trunc=st.sampled_from([0.0, 0.2, 1.0]),
       constant_values=st.booleans(), seed=st.integers(0, 2**31 - 1))
@example(T=1, N=1, gamma=0.99, lam=0.95, p_term=0.0, p_trunc=0.0, constant_values=True, seed=0)
def test_gae_matches_a_plain_loop(T, N, gamma, lam, p_term, p_trunc, constant_values, seed):
    rng = np.random.default_rng(seed)
    rew, val, next_val = rng.normal(size=(3, T, N))
    if constant_values:
        val[:] = next_val[:] = 0.7
    term = rng.random((T, N)) < p_term
    done = term | (rng.random((T, N)) < p_trunc)
    t = lambda a: torch.as_tensor(a)  # noqa: E731
    adv, ret = gae(t(rew), t(val), t(next_val), t(term), t(done), gamma, lam)
    np.testing.assert_allclose(adv.numpy(), _gae_loop(rew, val, next_val, term, done, gamma, lam), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ret.numpy(), adv.numpy() + val, rtol=0, atol=1e-12)
    norm = normalize_advantages(adv.reshape(-1))
    assert torch.isfinite(norm).all()
    # Degenerate: rewards that the values explain exactly give zero advantages, and stay zero when normalised.
    zero_rew = val - gamma * np.where(term, 0.0, next_val)
    adv0, _ = gae(t(zero_rew), t(val), t(next_val), t(term), t(done), gamma, lam)
    assert float(adv0.abs().max()) < 1e-12 and float(normalize_advantages(adv0.reshape(-1)).abs().max()) < 1e-3


def test_batch_of_one_sample_with_a_constant_observation_is_finite():
    policy, critic = GaussianMLP(3, 1, (4,)), natpg.critics.ValueCritic(3, (4,))
    obs = torch.ones(1, 1, 3)
    ro = Rollout(obs=obs, act=torch.zeros(1, 1, 1), rew=torch.ones(1, 1), terminated=torch.zeros(1, 1, dtype=torch.bool),
                 truncated=torch.ones(1, 1, dtype=torch.bool), next_obs=obs.clone())
    batch = make_batch(ro, policy, critic, natpg.config.AdvantageConfig())
    assert batch.adv.shape == (1,) and all(torch.isfinite(x).all() for x in (batch.adv, batch.ret, batch.logp_old))
    update = natpg.algorithms.make_actor_update(natpg.Config().override(max_kl=0.01), None)
    before = flat_params(policy)
    stats = update.update(policy, batch)  # zero advantage after centring: a zero gradient, never a NaN step
    assert torch.isfinite(flat_params(policy)).all()
    if stats.get("step/skipped"):
        assert torch.equal(flat_params(policy), before)


def test_errors_quoted_inside_natpgs_messages_by_their_first_line_even_when_empty():
    """An error from below with no text (a bare RuntimeError()) is quoted as '' rather than failing to be quoted."""
    from natpg.errors import first_line, one_line

    assert first_line(RuntimeError()) == "" and first_line(RuntimeError("a\nb")) == "a" and first_line("\n") == ""
    assert one_line("invalid settings:\n  a\n  b") == "invalid settings: a; b"


# One bad value for every setting (the edge just outside its range where it has one), refused by Config.validate
# with a message naming the setting; the completeness check fails when a setting is added without a case here.
BAD_VALUE = {
    "n_envs": 0, "vectorization": "thread", "n_workers": 0, "normalize_obs": 1, "obs_clip": 0.0,
    "normalize_reward": "yes", "reward_clip": -1.0, "sign_rewards": 1, "action_mask": "", "env_kwargs": "g=3", "info_keys": "is_success",
    "nonfinite_env": "ignore", "n_steps": 0, "gamma": 1.0, "gae_lambda": 1.01, "normalize_advantages": None,
    "hidden": (64, 0), "activation": "sigmoid", "log_std_init": float("inf"), "action_squash": "sigmoid",
    "critic_hidden": ("64",), "critic_lr": 0.0, "critic_epochs": 0, "critic_minibatch": 0, "critic_optimizer": "sgd",
    "critic_max_kl": 0.0, "critic_eta_max": 0.0, "critic_damping": -0.1, "critic_momentum": 1.0,
    "value_clip": -1.0, "fisher": "exact", "damping": -1e-3, "cg_iters": 0, "cg_tol": -1.0, "fvp_subsample": 0.0,
    "fvp_subsample_step_length": "all", "cg_warm_start": "no", "cg_preconditioner": "jacobi",
    "kfac_ema_decay": 1.0, "kfac_refresh_every": 0, "fisher_estimator": "taken", "step": "newton", "alpha": 0.0, "max_kl": 0.0,
    "kl_schedule": "cosine", "lr_schedule": "cosine", "backtrack_shrink": 1.0, "backtrack_iters": 0,
    "eta_max": 0.0, "momentum": 1.0, "clip_range": 0.0, "ppo_epochs": 0, "ppo_minibatch": 0, "target_kl": -0.01,
    "max_grad_norm": -1.0, "ent_coef": -0.01, "device": "gpu", "torch_threads": -1, "update_threads": -1,
    "critic_thread": 0, "log_interval": 0, "checkpoint_every": -1, "tensorboard": "on",
    "max_consecutive_faults": 0, "eval_every": -1, "eval_episodes": 0, "sampler": "dask", "workers": 0,
    "ray_address": "", "worker_timeout": 0.0, "worker_start_timeout": float("nan"),
}

Config = natpg.Config

RELATIONS = [  # settings valid alone, refused together
    (dict(vectorization="multiproc", n_envs=2, n_workers=3), r"n_workers \(3\) must be at most n_envs \(2\)"),
    (dict(vectorization="multiproc", nonfinite_env="drop"), "nonfinite_env='drop' needs vectorization"),
    (dict(sampler="processes", workers=3, n_envs=2), r"workers \(3\) must be at most n_envs \(2\)"),
    (dict(workers=2), "workers=2 needs sampler='processes' or 'ray'"),
    (dict(ray_address="auto"), "ray_address needs sampler='ray'"),
    (dict(sampler="processes", workers=2, vectorization="async"), "applies to sampler='local' only"),
]


def test_every_setting_has_a_refused_bad_value():
    assert set(BAD_VALUE) == set(Config.field_index())


@pytest.mark.parametrize("key", sorted(BAD_VALUE))
def test_a_bad_value_of_any_setting_is_refused_naming_it(key):
    with pytest.raises(ValueError, match=rf"invalid settings:\n  (.*\n  )*{key} must"):
        Config().override(**{key: BAD_VALUE[key]}).validate()


@pytest.mark.parametrize("settings, message", RELATIONS, ids=[str(r[0]) for r in RELATIONS])
def test_settings_valid_alone_are_refused_together(settings, message):
    with pytest.raises(ValueError, match=message):
        Config().override(**settings).validate()


@pytest.mark.parametrize("algo", ["trpo", "ppo"])
def test_ctrl_c_after_the_policy_step_leaves_and_saves_the_last_completed_update(algo, tmp_path):
    """A KeyboardInterrupt raised after the actor's step (as while learn waits for the critic thread) puts the
    policy, critic and normalisers back as they were after the last completed update, and saves that state."""
    cls = {"trpo": natpg.TRPO, "ppo": natpg.PPO}[algo]
    agent = cls("Pendulum-v1", seed=0, n_envs=2, n_steps=64, tensorboard=False)
    agent.learn(256, out_dir=str(tmp_path))
    actor, critic = flat_params(agent.policy), flat_params(agent.critic)
    obs_stats = agent.obs_normalizer.rms.state_dict()
    real = agent.actor_update.update

    def step_then_interrupt(policy, batch):
        real(policy, batch)
        raise KeyboardInterrupt

    agent.actor_update.update = step_then_interrupt
    with pytest.raises(KeyboardInterrupt) as interrupted:
        agent.learn(128, out_dir=str(tmp_path), reset=False)
    assert (agent.updates, agent.env_steps) == (2, 256)
    assert torch.equal(flat_params(agent.policy), actor) and torch.equal(flat_params(agent.critic), critic)
    assert agent.obs_normalizer.rms.state_dict() == obs_stats
    assert any("the last completed update (2 updates, 256 env steps) is saved" in n for n in interrupted.value.__notes__)
    saved = natpg.load(str(tmp_path))
    assert saved.env_steps == 256 and torch.equal(flat_params(saved.policy), actor)
    saved.learn(128, out_dir=str(tmp_path))  # the directory goes on


def test_a_run_directory_has_one_writer(tmp_path, capsys):
    """While one process writes a run in DIR (here: holds its lock), learn, save and natpg train --resume/--out
    into DIR are refused naming that process, and write nothing; once it has ended (however), DIR is free."""
    import subprocess
    import sys as _sys

    run = tmp_path / "run"
    natpg.NPG("CartPole-v1", **small()).learn(BATCH, out_dir=str(run))
    files = lambda: {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".natpg.lock"}  # noqa: E731
    before = files()
    holder = subprocess.Popen([_sys.executable, "-c", "import sys, time, natpg.checkpoint as c\n"
                               "with c.run_dir_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
                               str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = rf"in use by another natpg process \(pid {holder.pid}\)"
        with pytest.raises(ValueError, match=busy):
            natpg.load(str(run)).learn(BATCH, out_dir=str(run), reset=False)
        with pytest.raises(ValueError, match=busy):
            natpg.NPG("CartPole-v1", **small()).save(str(run))
        capsys.readouterr()
        assert cli(["train", "npg", "CartPole-v1", "--resume", str(run), "--steps", str(4 * BATCH),
                    "--no-progress"]) == 2
        assert re.search(busy, capsys.readouterr().err)
        assert cli(["train", "npg", "CartPole-v1", "--out", str(run), "--overwrite", "--no-progress"]) == 2
        assert files() == before
    finally:
        holder.kill()
        holder.wait()
    natpg.load(str(run)).learn(BATCH, out_dir=str(run), reset=False)  # the lock died with its process


def test_a_second_writer_in_the_same_process_is_refused(tmp_path):
    """An agent learning into DIR from another thread, while the first holds DIR (here: from inside its callback),
    is refused naming that thread, and the first run goes on undisturbed; nested use in one thread is fine."""
    import threading

    run = str(tmp_path / "run")
    errors: list[str] = []

    def second_writer(agent, row):
        if row["updates"] == 1:
            other = natpg.NPG("CartPole-v1", **small(seed=1))
            t = threading.Thread(target=lambda: _record_error(errors, other.learn, BATCH, out_dir=run),
                                 name="second-writer")
            t.start()
            t.join()
            with checkpoint.run_dir_lock(run):  # the same thread again: nested, not refused
                pass

    first = natpg.NPG("CartPole-v1", **small()).learn(2 * BATCH, out_dir=run, callback=second_writer)
    assert len(errors) == 1 and "in use by another natpg writer in this process (thread MainThread)" in errors[0]
    assert first.updates == 2 and natpg.load(run).updates == 2
    natpg.NPG("CartPole-v1", **small(seed=1)).learn(BATCH, out_dir=str(tmp_path / "free"))  # the lock was let go
    natpg.load(run).learn(BATCH, out_dir=run, reset=False)


def _record_error(errors: list[str], fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except ValueError as exc:
        errors.append(str(exc))


def test_a_full_disk_is_one_error_line_from_the_cli(tmp_path, monkeypatch, capsys):
    import errno

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(checkpoint, "atomic_write", full)
    capsys.readouterr()
    assert cli(["train", "npg", "CartPole-v1", "--steps", "64", "--out", str(tmp_path / "r"), "--no-progress",
                "--set", "n_envs=2", "--set", "n_steps=32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("natpg train: error: [Errno 28] No space left on device") and "Traceback" not in err


from gymnasium.envs.classic_control.cartpole import CartPoleEnv  # noqa: E402


class _OffApiCartPole(CartPoleEnv):
    """CartPole returning what Gymnasium's API does not allow, in the way ``mode`` names."""

    def __init__(self, mode: str = "", **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def step(self, action):
        obs, rew, term, trunc, info = super().step(action)
        return {"short_obs": (obs[:3], rew, term, trunc, info), "one_obs": (obs[:1], rew, term, trunc, info),
                "scalar_obs": (obs[0], rew, term, trunc, info), "four": (obs, rew, term, info),
                "vector_reward": (obs, np.array([rew, rew]), term, trunc, info),
                "string_reward": (obs, str(rew), term, trunc, info), "none_reward": (obs, None, term, trunc, info)
                }[self.mode]

    def reset(self, **kwargs):
        obs, info = super().reset(**kwargs)
        return {"bare_reset": obs, "obs_pair_reset": (obs, obs), "short_reset": (obs[:1], info)}.get(self.mode,
                                                                                                    (obs, info))


if "natpgtest/OffApiCartPole-v0" not in gym.registry:
    gym.register("natpgtest/OffApiCartPole-v0", entry_point=_OffApiCartPole, max_episode_steps=200,
                 disable_env_checker=True)


@pytest.mark.parametrize("vectorization", ["sync", "async"])
@pytest.mark.parametrize("mode, call, detail", [
    ("short_obs", "step", r"5-tuple: an observation of shape \(3,\), not the space's \(4,\)"),
    # numpy would broadcast these two into the observation buffer and train on them
    ("one_obs", "step", r"5-tuple: an observation of shape \(1,\), not the space's \(4,\)"),
    ("scalar_obs", "step", r"5-tuple: an observation of shape \(\), not the space's \(4,\)"),
    ("four", "step", r"not enough values to unpack \(expected 5, got 4\)"),
    ("vector_reward", "step", r"5-tuple: the reward array\(\[.*\]\) is not a number"),
    ("string_reward", "step", "5-tuple: the reward '1.0' is not a number"),
    ("none_reward", "step", "5-tuple: the reward None is not a number"),
    ("bare_reset", "reset", r"ndarray: not an \(observation, info dict\) pair"),
    ("obs_pair_reset", "reset", r"2-tuple: not an \(observation, info dict\) pair"),  # a 2-element obs alone too
    ("short_reset", "reset", r"2-tuple: an observation of shape \(1,\), not the space's \(4,\)")])
def test_an_environment_off_gymnasiums_api_is_named_with_what_it_returned(mode, call, detail, vectorization):
    with pytest.raises(ValueError, match=rf"environment 'natpgtest/OffApiCartPole-v0' \(copy \d\) returned from "
                                         rf"{call}\(\) what natpg cannot read \({detail}.*Gymnasium's API: reset\(\) "
                                         rf"returns \(observation, info\)"):
        natpg.NPG("natpgtest/OffApiCartPole-v0", env_kwargs={"mode": mode}, vectorization=vectorization,
                  **small()).learn(BATCH)


class _OffSpaceEnv(gym.Env):
    """Observations off the space in the way ``kind`` names, from the 3rd step on (or a reset that raises)."""

    SPACES = {"uint8_300": gym.spaces.Box(0, 255, (6,), np.uint8), "uint8_float": gym.spaces.Box(0, 255, (6,), np.uint8),
              "discrete_below": gym.spaces.Discrete(5, start=-2), "discrete_above": gym.spaces.Discrete(5, start=-2),
              "dict_missing": gym.spaces.Dict({"a": gym.spaces.Box(-1, 1, (3,)), "b": gym.spaces.Discrete(3)}),
              "reset_raises": gym.spaces.Box(-1, 1, (3,)),
              "dict_uint8_300": gym.spaces.Dict({"img": gym.spaces.Box(0, 255, (6,), np.uint8)}),
              "odd_copy": gym.spaces.Box(-1, 1, (3,)), "discrete_float": gym.spaces.Discrete(3),
              "multibinary_2": gym.spaces.MultiBinary(3), "dict_extra": gym.spaces.Dict({"a": gym.spaces.Box(-1, 1, (3,))}),
              "reset_short": gym.spaces.Box(-1, 1, (3,))}

    def __init__(self, kind: str):
        self.kind, self.observation_space, self.action_space = kind, self.SPACES[kind], gym.spaces.Discrete(2)
        self.episodes = 0

    def _obs(self, bad: bool):
        good = {"uint8_300": np.zeros(6, np.uint8), "uint8_float": np.zeros(6, np.uint8), "discrete_below": 0,
                "discrete_above": 0, "dict_missing": {"a": np.zeros(3, np.float32), "b": 1},
                "reset_raises": np.zeros(3, np.float32), "dict_uint8_300": {"img": np.zeros(6, np.uint8)},
                "odd_copy": np.zeros(3, np.float32), "discrete_float": 1, "multibinary_2": np.array([0, 1, 1], np.int8),
                "dict_extra": {"a": np.zeros(3, np.float32)}, "reset_short": np.zeros(3, np.float32)}[self.kind]
        bad = bad and (self.kind != "odd_copy" or self.odd)  # only the copies seeded with an odd number
        return {"uint8_300": np.full(6, 300), "uint8_float": np.full(6, 7.5), "discrete_below": -3,
                "discrete_above": 3, "dict_missing": {"b": 1}, "reset_raises": good,
                "dict_uint8_300": {"img": np.full(6, 300)}, "odd_copy": np.zeros(2, np.float32),
                "discrete_float": np.float64(1.0), "multibinary_2": np.array([0, 2, 1], np.int8),
                "dict_extra": {"a": np.zeros(3, np.float32), "z": 1}, "reset_short": good}[self.kind] \
            if bad else good

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self.odd = seed % 2 == 1
        if self.kind == "reset_raises" and self.episodes:
            raise ValueError("license server unreachable")  # the environment's own error, at an autoreset
        self.episodes, self.t = self.episodes + 1, 0
        if self.kind == "reset_short" and self.episodes > 1:  # an autoreset's observation of the wrong shape
            return np.zeros(1, np.float32), {}
        return self._obs(False), {}

    def step(self, action):
        self.t += 1
        return self._obs(self.t >= 3), 0.0, self.t >= 4, False, {}


if "natpgtest/OffSpace-v0" not in gym.registry:
    gym.register("natpgtest/OffSpace-v0", entry_point=_OffSpaceEnv, max_episode_steps=50, disable_env_checker=True)
OFF_SPACE_ID = f"{__name__}:natpgtest/OffSpace-v0"  # importable by the multiproc workers


@pytest.mark.parametrize("vectorization", ["sync", "async", "multiproc"])
@pytest.mark.parametrize("kind, detail", [
    ("uint8_300", r"5-tuple: an observation of int64 values from 300 to 300, which the space's uint8 cannot hold"),
    ("uint8_float", r"5-tuple: an observation of float64 values from 7.5 to 7.5, which the space's uint8 cannot hold"),
    ("discrete_below", r"an observation -3 outside Discrete\(5, start=-2\)"),  # Gymnasium would read it as 2
    ("discrete_above", r"an observation 3 outside Discrete\(5, start=-2\)"),  # and fail deep inside on this one
    ("dict_missing", r"an observation with keys \['b'\], not the Dict space's \['a', 'b'\]"),
    ("dict_uint8_300", r"\['img'\]: an observation of int64 values from 300 to 300, which the space's uint8"),
    ("discrete_float", r"an observation np.float64\(1.0\) outside Discrete\(3\)\)\..* each observation in "
                       r"Discrete\(3\) and"),  # flattening failed inside; the space named is the env's, not the Box
    ("multibinary_2", r"an observation array\(\[0, 2, 1\], dtype=int8\) that is not 0/1 everywhere\)\..* each "
                      r"observation in MultiBinary\(3\) and"),  # read as a 2
    ("dict_extra", r"an observation with keys \['a', 'z'\], not the Dict space's \['a'\]")])
def test_an_observation_off_its_space_is_named_not_wrapped_or_read_as_another(kind, detail, vectorization):
    """numpy would wrap 300 to 44 in a uint8 buffer; Gymnasium's flattening reads a Discrete value below its start
    as another value and fails inside on the others: natpg names the environment and what it returned instead."""
    with pytest.raises(ValueError, match=rf"environment 'natpgtest/OffSpace-v0' \(copy \d\) returned from step\(\) "
                                         rf"what natpg cannot read \({detail}"):
        natpg.NPG(OFF_SPACE_ID, env_kwargs={"kind": kind}, vectorization=vectorization, **small()).learn(BATCH)


@pytest.mark.parametrize("vectorization", ["sync", "async", "multiproc"])
def test_the_copy_named_is_the_one_that_failed_among_all_copies(vectorization):
    """Copy 1 (seeded seed + 1) fails: multiproc's second worker calls it its copy 0, the message copy 1."""
    with pytest.raises(ValueError, match=r"environment 'natpgtest/OffSpace-v0' \(copy 1\) returned from step\(\)"):
        natpg.NPG(OFF_SPACE_ID, env_kwargs={"kind": "odd_copy"}, vectorization=vectorization, seed=0, n_workers=2,
                  **small()).learn(BATCH)


@pytest.mark.parametrize("vectorization", ["sync", "async", "multiproc"])
def test_an_observation_off_its_space_from_an_autoreset_is_named(vectorization):
    """The first reset is fine; the one after the first episode (step 4) returns shape (1,), which numpy would
    broadcast over the copy's row of the buffer: the autoreset's result is checked like every other reset."""
    with pytest.raises(ValueError, match=r"environment 'natpgtest/OffSpace-v0' \(copy \d\) returned from reset\(\) "
                                         r"what natpg cannot read \(2-tuple: an observation of shape \(1,\)"):
        natpg.NPG(OFF_SPACE_ID, env_kwargs={"kind": "reset_short"}, vectorization=vectorization,
                  **small()).learn(BATCH)


@pytest.mark.parametrize("vectorization", ["sync", "async", "multiproc"])
def test_an_environments_own_error_at_an_autoreset_goes_on_as_it_is(vectorization):
    with pytest.raises(ValueError, match=r"^license server unreachable"):
        natpg.NPG(OFF_SPACE_ID, env_kwargs={"kind": "reset_raises"}, vectorization=vectorization,
                  **small()).learn(BATCH)


@pytest.mark.parametrize("vectorization", ["sync", "async", "multiproc"])
def test_learn_after_an_environments_error_mid_rollout_builds_the_environments_afresh(vectorization):
    """Environments stopped mid-rollout by their own error (Gymnasium's AsyncVectorEnv closes itself then, a
    multiproc worker reports and exits) are not reused by a later learn(reset=False): it builds them afresh with a
    warning, and here meets the environment's own error again rather than a dead pipe."""
    agent = natpg.NPG(OFF_SPACE_ID, env_kwargs={"kind": "reset_raises"}, vectorization=vectorization, **small())
    for _ in range(2):
        with pytest.raises(ValueError, match=r"^license server unreachable"):
            agent.learn(BATCH, reset=False)
        with pytest.warns(RuntimeWarning, match=r"freshly reset environments.*stopped mid-rollout \(ValueError\)"):
            with pytest.raises(ValueError, match=r"^license server unreachable"):
                agent.learn(BATCH, reset=False)
    agent.close()


def test_an_edited_config_json_is_named_as_not_read(tmp_path):
    """The checkpoint's settings are the run's; a config.json edited by hand is said to be ignored, not obeyed
    silently or overwritten without a word."""
    natpg.NPG("CartPole-v1", **small()).learn(BATCH, out_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        natpg.load(str(tmp_path))  # as written: no warning
    edited = json.loads((tmp_path / "config.json").read_text())
    edited["step"]["max_kl"], edited["seed"] = 0.5, 9
    (tmp_path / "config.json").write_text(json.dumps(edited))
    with pytest.warns(RuntimeWarning, match=r"config.json differs from the settings recorded in the checkpoint "
                                            r"\(max_kl, seed\): natpg reads the checkpoint's"):
        agent = natpg.load(str(tmp_path))
    assert agent.config.step.max_kl == natpg.NPG("CartPole-v1").config.step.max_kl and agent.seed == 0


def test_continuing_a_run_whose_log_is_not_text_names_the_file(tmp_path):
    natpg.NPG("CartPole-v1", **small()).learn(BATCH, out_dir=str(tmp_path))
    (tmp_path / "progress.csv").write_bytes(b"env_steps\n\xc4\xff\xfe\n")
    with pytest.raises(ValueError, match=r"progress.csv is not a log natpg can continue \(not UTF-8 text: invalid "
                                         r".* at byte \d+\); move it away"):
        natpg.load(str(tmp_path)).learn(BATCH, out_dir=str(tmp_path))
    assert natpg.load(str(tmp_path)).env_steps == BATCH  # nothing written over


@pytest.mark.parametrize("cls,extra,gap", [(natpg.NPG, {}, 200.0), (natpg.TRPO, {}, 200.0), (natpg.ACKTR, {}, 200.0),
                                           (natpg.NPG, {"fisher": "dense"}, 55.0),
                                           (natpg.NPG, {"fisher": "diagonal"}, 55.0),
                                           (natpg.TRPO, {"fisher": "dense"}, 55.0)])
def test_a_policy_that_has_become_deterministic_trains_on_without_faults(cls, extra, gap):
    """Logits 200 apart: every sampled action is the mode and its score is exactly 0, so the gradient, the
    direction and dᵀFd vanish. That is nothing to learn, not a numerical fault (it used to stop training).
    55 apart: the gradient is subnormal, not 0, and dᵀFd underflows to 0 (dense and diagonal Fishers): no step."""
    agent = cls("CartPole-v1", seed=0, **small(max_consecutive_faults=2, **extra))
    last = [m for m in agent.policy.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([gap / 2, -gap / 2]))
    before, rows = flat_params(agent.policy), []
    agent.learn(4 * BATCH, callback=lambda a, row: rows.append(row))
    assert [r["step/skipped"] for r in rows] == [0.0] * 4 and agent.consecutive_faults == 0
    assert torch.equal(flat_params(agent.policy), before)


def test_a_missing_dependency_names_natpgs_extra_only_where_it_has_one():
    """MuJoCo and Atari tasks name natpg's extra (installed from the source directory, natpg is not on PyPI);
    Box2D's LunarLander has none: gymnasium's own hint stands alone, without an unrelated Atari one."""
    from natpg.envs import check_env_id, extra_for

    assert extra_for("HalfCheetah-v5") == '. natpg\'s extra for MuJoCo: pip install -e ".[mujoco]" in natpg\'s source directory'
    check_env_id("ALE/Pong-v5")  # registers ale_py's ids where it is installed
    if "ALE/Pong-v5" in gym.registry:
        assert "natpg's extra for Atari: pip install -e \".[atari]\"" in extra_for("ALE/Pong-v5")
    assert extra_for("LunarLander-v3") == "" and extra_for("CartPole-v1") == ""


@pytest.mark.parametrize("algo", ["NPG", "ACKTR"])
def test_undamped_kfac_on_a_single_action_takes_no_step_and_no_fault(algo):
    """damping=0 and a single action: K-FAC's G factors are exactly 0, and the gradient too. The direction is 0,
    no step, not a "non-finite direction" fault from inverting a zero factor."""
    extra = {"fisher": "kfac"} if algo == "NPG" else {}
    agent = getattr(natpg, algo)("natpgtest/OneAction-v0", damping=0.0, **small(max_consecutive_faults=2, **extra))
    rows = []
    agent.learn(3 * BATCH, callback=lambda a, row: rows.append(row))
    assert [r["step/skipped"] for r in rows] == [0.0] * 3 and agent.consecutive_faults == 0


# ------------------------------------------------------------------------------------------------------
# Against the mutation audit's survivors (stop 37): each test fails when its named mistake is put back
# ------------------------------------------------------------------------------------------------------

class _RecordRewards(gym.Wrapper):
    def __init__(self, env, log):
        super().__init__(env)
        self.log = log

    def step(self, action):
        result = super().step(action)
        self.log.append((float(result[1]), bool(result[2] or result[3])))
        return result


def test_the_reward_scalers_discounted_return_restarts_at_every_episode_end():
    """Pendulum cut by a 5-step time limit ends only by truncation: the discounted return the statistics see
    restarts there too (a reset at termination alone would run it across episodes)."""
    from gymnasium.envs.classic_control.pendulum import PendulumEnv
    from natpg.envs import RunningMeanStd
    from natpg.vector import SerialVectorEnv

    logs = [[], []]
    envs = SerialVectorEnv([lambda i=i: _RecordRewards(gym.wrappers.TimeLimit(PendulumEnv(), 5), logs[i])
                            for i in range(2)])
    scaler = RewardScaler(2, 0.9, 10.0, enabled=True)
    sampler = Sampler(envs, ObsNormalizer((3,), 10.0, enabled=False), scaler, 0, torch.device("cpu"),
                      torch.Generator().manual_seed(0))
    sampler.collect(GaussianMLP(3, 1, (8,)), 12)
    reference, ret = RunningMeanStd(()), np.zeros(2)
    for t in range(12):  # the discounted return of each copy, by a loop over the recorded rewards
        ret = 0.9 * ret + np.array([logs[0][t][0], logs[1][t][0]])
        reference.update(ret)
        ret[[logs[0][t][1], logs[1][t][1]]] = 0.0
    assert [done for _, done in logs[0]].count(True) == 2
    np.testing.assert_allclose([scaler.rms.mean, scaler.rms.var], [reference.mean, reference.var], rtol=1e-12)
    np.testing.assert_allclose(scaler.ret, ret, rtol=1e-12)


def test_reward_scaler_and_observation_normaliser_against_their_formulas():
    scaler = RewardScaler(2, 0.5, 3.0, enabled=True)
    scaler.rms.mean, scaler.rms.var, scaler.rms.count = 0.0, 0.25, 1e12  # a settled std of 0.5
    out = scaler(np.array([1.0, 4.0]), np.array([True, False]))
    assert scaler.ret.tolist() == [0.0, 4.0]  # the finished copy's return restarts
    np.testing.assert_allclose(out, [1.0 / 0.5, 3.0], rtol=1e-6)  # 4 / 0.5 = 8, clipped to 3
    norm = ObsNormalizer((4,), 2.0, passthrough=2)
    norm.rms.mean, norm.rms.var = np.array([1.0, 1.0, 5.0, 5.0]), np.array([4.0, 4.0, 4.0, 4.0])
    z = norm.normalize(np.array([[3.0, 101.0, 0.0, 1.0]]))
    np.testing.assert_allclose(z, [[1.0, 2.0, 0.0, 1.0]], rtol=1e-6)  # (3 − 1)/2; 50 clipped to 2; mask as given


def test_a_sampler_resumes_its_dropped_count():
    policy, sampler = _sampler(_nan_vec_env(at=6, what="obs"), "drop")
    sampler.collect(policy, 12)
    _, fresh = _sampler(_nan_vec_env(at=6, what="obs"), "drop")
    fresh.load_state_dict(json.loads(json.dumps(sampler.state_dict())))
    assert sampler.dropped == 1 and fresh.dropped == 1 and fresh.episodes == sampler.episodes


def test_the_first_of_equal_best_evaluations_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(natpg.agent, "evaluate", lambda *args, **kwargs: (100.0, 0.0))
    agent = natpg.NPG("CartPole-v1", **small(eval_every=BATCH, eval_episodes=1))
    agent.learn(3 * BATCH, out_dir=str(tmp_path))
    assert natpg.load(str(tmp_path / "best")).env_steps == BATCH and agent.best_eval_return == 100.0


def test_load_restores_the_fault_count_and_the_training_time(tmp_path):
    agent = natpg.NPG("CartPole-v1", **small())
    agent.learn(BATCH)
    agent.consecutive_faults, agent.train_wall_s = 2, 12.5
    agent.save(str(tmp_path))
    loaded = natpg.load(str(tmp_path))
    assert (loaded.consecutive_faults, loaded.train_wall_s) == (2, 12.5)


def test_a_log_row_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    natpg.NPG("CartPole-v1", **small()).learn(2 * BATCH, out_dir=str(tmp_path))
    with open(tmp_path / "progress.csv", "a") as f:
        f.write(str(3 * BATCH)[0])  # the start of a row, no newline: the process died writing its env_steps
    natpg.load(str(tmp_path)).learn(BATCH, out_dir=str(tmp_path), reset=False)
    rows = progress_rows(tmp_path)
    assert [r["env_steps"] for r in rows] == [str(BATCH), str(2 * BATCH), str(3 * BATCH)]
    assert all(None not in r.values() and None not in r for r in rows)


def test_resume_drops_an_unreadable_log_line_and_keeps_the_rows_around_it(tmp_path):
    """A blank or garbled line inside progress.csv or episodes.csv (an editor, a disk error) is dropped with a
    warning naming it; the rows after it up to the checkpoint stay (they were all dropped, without a word)."""
    natpg.NPG("CartPole-v1", **small()).learn(3 * BATCH, out_dir=str(tmp_path))
    for name in ("progress.csv", "episodes.csv"):
        lines = (tmp_path / name).read_text().splitlines(keepends=True)
        (tmp_path / name).write_text("".join([*lines[:2], "\n" if name == "progress.csv" else "x,\n", *lines[2:]]))
    episodes_before = len((tmp_path / "episodes.csv").read_text().splitlines()) - 2
    with pytest.warns(UserWarning) as caught:
        natpg.load(str(tmp_path)).learn(BATCH, out_dir=str(tmp_path), reset=False)
    for name in ("progress.csv", "episodes.csv"):
        assert any(f"{name}: line(s) [3] hold no row natpg can read" in str(w.message) for w in caught)
    assert [r["env_steps"] for r in progress_rows(tmp_path)] == [str(k * BATCH) for k in (1, 2, 3, 4)]
    episodes = list(csv.DictReader(open(tmp_path / "episodes.csv")))
    assert len(episodes) >= episodes_before and all(r["env_steps"].isdigit() for r in episodes)


def test_resume_cuts_events_log_back_to_the_checkpoint(tmp_path):
    """events.log (a row's text values) goes back to the checkpoint with progress.csv: a run killed after logging
    text past its checkpoint does not log those steps' lines twice."""
    from natpg.logger import Logger

    killed = Logger(str(tmp_path), tensorboard=False)
    for step in (64, 128, 192):
        killed.record({"env_steps": step, "note": f"update {step // 64}"})
    killed.close()
    with open(tmp_path / "events.log", "a") as f:
        f.write("env_steps=256 {'no")  # cut short by the kill
    resumed = Logger(str(tmp_path), tensorboard=False, resume=True, resume_step=128)
    resumed.record({"env_steps": 192, "note": "update 3"})
    resumed.close()
    assert (tmp_path / "events.log").read_text().splitlines() == [
        "env_steps=64 {'note': 'update 1'}", "env_steps=128 {'note': 'update 2'}", "env_steps=192 {'note': 'update 3'}"]


def test_the_checkpoint_digest_covers_the_metadata(tmp_path):
    natpg.NPG("CartPole-v1", **small()).save(str(tmp_path))
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    meta = json.loads(payload["meta"])
    meta["env_steps"] = 10_000  # an edit of the metadata alone
    payload["meta"] = json.dumps(meta)
    torch.save(payload, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="does not match the SHA-256 digest"):
        natpg.load(str(tmp_path))


def test_a_temporary_file_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    stale = tmp_path / ".model.pt.tmp-abc123"
    stale.write_bytes(b"half a checkpoint")
    natpg.NPG("CartPole-v1", **small()).save(str(tmp_path))
    assert not stale.exists() and natpg.load(str(tmp_path)).env_steps == 0


def test_a_ctrl_c_while_a_checkpoint_is_written_waits_until_it_is_written(tmp_path, monkeypatch):
    """A Ctrl-C that lands in a checkpoint's write (the second of two quick ones: the first asked natpg train to stop
    after the update and save it) takes effect once the checkpoint is written in full: it left the previous
    checkpoint in place, up to checkpoint_every - 1 updates behind the log."""
    out = str(tmp_path)
    agent = natpg.NPG("CartPole-v1", seed=0, **small())
    agent.learn(64, out_dir=out)
    real_save = torch.save

    def save_interrupted(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # delivered at once: mid-write
        real_save(obj, f, *args, **kwargs)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a plain interpreter
    try:
        monkeypatch.setattr(torch, "save", save_interrupted)
        with pytest.raises(KeyboardInterrupt) as caught:
            agent.learn(64, out_dir=out, reset=False)  # checkpoint_every 50: the learn call's last save only
        monkeypatch.setattr(torch, "save", real_save)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert f"natpg: SIGINT came while {os.path.join(out, 'model.pt')} was written; it was written in full first" \
        in caught.value.__notes__
    assert natpg.load(out).env_steps == 128 and not [f for f in os.listdir(out) if ".tmp-" in f]


def test_an_update_stopped_after_is_saved_once_and_the_note_says_what_was_kept(tmp_path, monkeypatch):
    """A Ctrl-C held while update 2's periodic checkpoint is written: that checkpoint is not written a second time
    by the stop; a progress.csv that cannot be written (a full disk) stops the run with the update saved all the
    same, and the note does not claim the row was logged."""
    out = str(tmp_path / "held")
    agent = natpg.NPG("CartPole-v1", seed=0, checkpoint_every=1, **small())
    real_save, writes = torch.save, []

    def save_interrupted(obj, f, *args, **kwargs):
        writes.append(json.loads(obj["meta"])["updates"])
        if writes[-1] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        real_save(obj, f, *args, **kwargs)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        monkeypatch.setattr(torch, "save", save_interrupted)
        with pytest.raises(KeyboardInterrupt) as caught:
            agent.learn(4 * BATCH, out_dir=out)
        monkeypatch.setattr(torch, "save", real_save)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert writes == [0, 1, 2] and natpg.load(out).updates == 2
    assert f"natpg: stopped after update 2 ({2 * BATCH} env steps), which is logged and saved in " \
        f"{os.path.join(out, 'model.pt')}" in caught.value.__notes__

    out = str(tmp_path / "full")
    agent = natpg.NPG("CartPole-v1", seed=0, **small())
    record = natpg.logger.Logger.record

    def disk_full(logger, row):
        if row["updates"] == 2:
            raise OSError(28, "No space left on device")
        record(logger, row)

    monkeypatch.setattr(natpg.logger.Logger, "record", disk_full)
    with pytest.raises(OSError) as caught:
        agent.learn(4 * BATCH, out_dir=out)
    assert natpg.load(out).updates == 2 and [r["updates"] for r in progress_rows(out)] == ["1"]
    assert f"natpg: stopped after update 2 ({2 * BATCH} env steps), which is saved in " \
        f"{os.path.join(out, 'model.pt')}" in caught.value.__notes__


def test_ctrl_c_during_a_periodic_evaluation_saves_the_update_before_it(tmp_path, monkeypatch):
    """The evaluation runs after an update is complete: an interrupt there (or an evaluation environment's error)
    saves that update, whose checkpoint would otherwise be the last periodic one (checkpoint_every 50: the start)."""
    agent = natpg.NPG("CartPole-v1", seed=0, n_envs=2, n_steps=32, tensorboard=False, eval_every=128,
                      eval_episodes=1)
    evaluate = natpg.agent.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    agent.learn(128, out_dir=str(tmp_path))
    monkeypatch.setattr(natpg.agent, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt) as caught:
        agent.learn(192, out_dir=str(tmp_path), reset=False)
    assert "stopped after update 4 (256 env steps), which is logged and saved in" in str(caught.value.__notes__)
    monkeypatch.setattr(natpg.agent, "evaluate", evaluate)
    assert natpg.load(str(tmp_path)).updates == 4 == agent.updates
    # its row is logged (the evaluation's columns empty), so the resumed log has no gap
    natpg.load(str(tmp_path)).learn(128, out_dir=str(tmp_path), reset=False)
    rows = list(csv.DictReader(open(tmp_path / "progress.csv")))
    assert [int(r["env_steps"]) for r in rows] == [64, 128, 192, 256, 320, 384]
    assert [r["eval/return_mean"] != "nan" for r in rows] == [False, True, False, False, False, True]
