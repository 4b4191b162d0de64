"""Sampling: step a vector environment with one batched policy forward per step.

Per step the policy computes only the action; the old distribution parameters, log-probabilities and
values are computed afterwards in one batched forward over the whole rollout, so per-step work is a
single small forward pass whatever the number of environment copies.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from .envs import ObsNormalizer, RewardScaler


@dataclass
class Rollout:
    """T steps from N copies. obs [T, N, D] (normalised, as the policy saw them), act [T, N, ...],
    rew [T, N] (scaled), terminated/truncated [T, N] bool, next_obs [T, N, D]: the observation after the
    step (the episode's final one where it ended; zeros after a termination, where it is never used)."""

    obs: torch.Tensor
    act: torch.Tensor
    rew: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    next_obs: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.rew.numel()


class NonFiniteEnvError(RuntimeError):
    pass


class Sampler:
    """Owns the vector env, the running normalisers and episode statistics across updates."""

    def __init__(self, envs: gym.vector.VectorEnv, obs_normalizer: ObsNormalizer, reward_scaler: RewardScaler,
                 seed: int, device: torch.device, generator: torch.Generator):
        self.envs, self.obs_norm, self.rew_scale = envs, obs_normalizer, reward_scaler
        self.device, self.generator = device, generator
        self.n_envs = envs.num_envs
        space = envs.single_action_space
        self.discrete = isinstance(space, gym.spaces.Discrete)
        self.low = None if self.discrete else space.low
        self.high = None if self.discrete else space.high
        raw, _ = envs.reset(seed=seed)
        self.obs = self._flat(raw)
        self.ep_return = np.zeros(self.n_envs)
        self.ep_length = np.zeros(self.n_envs, np.int64)
        self.recent_returns: deque[float] = deque(maxlen=100)
        self.recent_lengths: deque[int] = deque(maxlen=100)
        self.episodes = 0
        self.total_steps = 0

    def _flat(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, np.float64).reshape(self.n_envs, -1)
        if not np.isfinite(obs).all():
            bad = np.where(~np.isfinite(obs).all(1))[0].tolist()
            raise NonFiniteEnvError(f"environment returned a non-finite observation (env copies {bad}, "
                                    f"after {self.total_steps} steps)")
        return obs

    @torch.no_grad()
    def collect(self, policy: torch.nn.Module, n_steps: int) -> Rollout:
        T, N = n_steps, self.n_envs
        D = self.obs.shape[1]
        obs_buf = np.zeros((T, N, D), np.float32)
        next_buf = np.zeros((T, N, D), np.float32)
        rew_buf = np.zeros((T, N), np.float32)
        term_buf = np.zeros((T, N), bool)
        trunc_buf = np.zeros((T, N), bool)
        acts = []
        for t in range(T):
            obs_n = self.obs_norm(self.obs)
            obs_buf[t] = obs_n
            eta = policy(torch.from_numpy(obs_n).to(self.device))
            act = policy.sample(eta, self.generator).cpu()
            acts.append(act)
            env_act = act.numpy() if self.discrete else np.clip(act.numpy(), self.low, self.high)
            raw_next, rew, term, trunc, info = self.envs.step(env_act)
            rew = np.asarray(rew, np.float64)
            if not np.isfinite(rew).all():
                raise NonFiniteEnvError(f"environment returned a non-finite reward (env copies "
                                        f"{np.where(~np.isfinite(rew))[0].tolist()}, after {self.total_steps} steps)")
            next_obs = self._flat(raw_next)
            done = term | trunc
            self.ep_return += rew
            self.ep_length += 1
            rew_buf[t] = self.rew_scale(rew, done)
            term_buf[t], trunc_buf[t] = term, trunc
            # The observation after this step: the next one, or the final one of a finished episode.
            after = next_obs.copy()
            if done.any():
                for i in np.flatnonzero(done):
                    after[i] = np.asarray(info["final_obs"][i], np.float64).reshape(-1)
                    self.recent_returns.append(float(self.ep_return[i]))
                    self.recent_lengths.append(int(self.ep_length[i]))
                self.episodes += int(done.sum())
                self.ep_return[done] = 0.0
                self.ep_length[done] = 0
            next_buf[t] = self.obs_norm.normalize(after)
            self.obs = next_obs
            self.total_steps += N
        to = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        return Rollout(obs=to(obs_buf), act=torch.stack(acts).to(self.device), rew=to(rew_buf),
                       terminated=to(term_buf), truncated=to(trunc_buf), next_obs=to(next_buf))

    def close(self) -> None:
        self.envs.close()
