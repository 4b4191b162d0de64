"""Vector environments, space checks with clear errors, and running normalisers."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

SUPPORTED = "observations: Box (flat or any shape, flattened); actions: Box (Gaussian) or Discrete (categorical)"


def check_env_id(env_id: str) -> gym.envs.registration.EnvSpec:
    """The registered spec of ``env_id``, or a ValueError that says what went wrong."""
    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"environment id must be a non-empty string such as 'CartPole-v1', got {env_id!r}")
    try:
        return gym.spec(env_id)
    except gym.error.Error as exc:  # NameNotFound, VersionNotFound, DeprecatedEnv, ...
        raise ValueError(f"unknown environment id {env_id!r}: {exc}") from None


def env_family(env_id: str) -> str:
    """'mujoco' for MuJoCo locomotion tasks, else 'classic' (used to pick presets)."""
    entry = str(check_env_id(env_id).entry_point)
    return "mujoco" if "mujoco" in entry else "classic"


def check_spaces(observation_space: gym.Space, action_space: gym.Space) -> None:
    if not isinstance(observation_space, gym.spaces.Box):
        raise ValueError(f"unsupported observation space {observation_space}; supported {SUPPORTED}")
    if not isinstance(action_space, (gym.spaces.Box, gym.spaces.Discrete)):
        raise ValueError(f"unsupported action space {action_space}; supported {SUPPORTED}")


def probe_spaces(env_id: str) -> tuple[gym.Space, gym.Space]:
    """Observation and action space of one copy of the environment (checked)."""
    check_env_id(env_id)
    try:
        env = gym.make(env_id)
    except gym.error.DependencyNotInstalled as exc:
        raise ValueError(f"environment {env_id!r} needs an optional dependency: {exc}. For MuJoCo tasks: "
                         f"pip install 'natpg[mujoco]'") from None
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    check_spaces(obs_space, act_space)
    return obs_space, act_space


def make_vec_env(env_id: str, n_envs: int, vectorization: str = "sync") -> gym.vector.VectorEnv:
    """``n_envs`` copies in one vector env that resets a finished copy in the same step.

    With same-step autoreset the observation returned for a finished copy is already the first one of
    its next episode, and the true last observation is in ``info['final_obs']``: the sampler reads it
    to bootstrap truncated episodes from V(final observation).
    """
    check_env_id(env_id)
    return gym.make_vec(env_id, num_envs=n_envs, vectorization_mode=vectorization,
                        vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP})


class RunningMeanStd:
    """Running mean and variance over the leading axis (Chan et al. parallel merge), float64."""

    def __init__(self, shape: tuple[int, ...] = ()):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        b_mean, b_var, b_count = x.mean(0), x.var(0), x.shape[0]
        delta = b_mean - self.mean
        total = self.count + b_count
        self.mean = self.mean + delta * b_count / total
        self.var = (self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total) / total
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "var": self.var.tolist(), "count": float(self.count)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.mean = np.asarray(d["mean"], np.float64)
        self.var = np.asarray(d["var"], np.float64)
        self.count = float(d["count"])


class ObsNormalizer:
    """(obs − mean) / √(var + eps), clipped; statistics update only while not ``frozen``."""

    def __init__(self, shape: tuple[int, ...], clip: float, enabled: bool = True):
        self.rms = RunningMeanStd(shape)
        self.clip, self.enabled, self.frozen = clip, enabled, False

    def __call__(self, obs: np.ndarray, update: bool = True) -> np.ndarray:
        if not self.enabled:
            return np.asarray(obs, np.float32)
        if update and not self.frozen:
            self.rms.update(obs)
        return self.normalize(obs)

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return np.asarray(obs, np.float32)
        z = (obs - self.rms.mean) / np.sqrt(self.rms.var + 1e-8)
        return np.clip(z, -self.clip, self.clip).astype(np.float32)


class RewardScaler:
    """Divides rewards by the running std of the discounted return (per env copy), then clips."""

    def __init__(self, n_envs: int, gamma: float, clip: float, enabled: bool = False):
        self.rms = RunningMeanStd(())
        self.ret = np.zeros(n_envs, np.float64)
        self.gamma, self.clip, self.enabled = gamma, clip, enabled

    def __call__(self, rew: np.ndarray, done: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return rew
        self.ret = self.ret * self.gamma + rew
        self.rms.update(self.ret)
        self.ret[done] = 0.0
        return np.clip(rew / np.sqrt(self.rms.var + 1e-8), -self.clip, self.clip)
