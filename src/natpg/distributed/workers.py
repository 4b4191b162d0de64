"""A rollout worker: a share of the environment copies, its own policy copy, frozen normalisers.

``RolloutWorker`` is plain Python (no Ray): the Ray pool wraps it in an actor with ``ray.remote``, the process
pool runs it in a worker process, the in-process pool (``sampler='workers'``) calls it directly, so all three
run the same code and, given the same seed and number of workers, produce the same batches bit for bit.
``WorkerPlan`` says which copies each worker steps and how it (and each of its replacements) is seeded;
``WorkerFailure`` is what a pool raises when a worker fails again after being replaced.

Each call of ``collect`` receives the learner's policy weights and normaliser statistics, steps the
worker's copies ``n_steps`` times with the normalisers frozen, and returns the rollout together with what
the learner needs to update its statistics (the raw observations the policy saw, the discounted returns
the reward scaler tracked) and the episodes that finished, each tagged with the sampler step it ended at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..envs import ObsNormalizer, RewardScaler, make_vec_env, probe_spaces
from ..policies import input_layout, make_policy
from ..rollout import Rollout, Sampler
from ..vector import first_copies, split_copies


@dataclass
class WorkerSpec:
    """Everything a worker needs to build itself; plain data, cheap to ship to a remote machine."""

    env_id: str
    offset: int
    """Global index of the worker's first environment copy (worker 0's copies come first)."""
    n_envs: int
    """Number of copies this worker steps."""
    reset_seed: int
    """Seed of the worker's first copy; copy j of the worker is seeded ``reset_seed + j``."""
    generator_seed: int
    """Seed of the worker's torch.Generator for action sampling."""
    hidden: tuple
    activation: str
    log_std_init: float
    obs_clip: float
    normalize_obs: bool
    gamma: float
    reward_clip: float
    normalize_reward: bool
    nonfinite: str = "raise"
    torch_threads: int = 1
    action_squash: str = "clip"
    action_mask: Any = None
    """None, an info key, or a callable (pickled to a worker process; cloudpickled to a Ray actor)."""
    env_kwargs: dict = field(default_factory=dict)
    """Keyword arguments for gymnasium.make of each copy."""
    info_keys: tuple = ()
    """Keys of an episode's last info to return with it."""


def generator_seed(seed: int, worker: int, restart: int = 0) -> int:
    """The action-sampling seed of worker ``worker`` (its ``restart``-th replacement), from the run seed."""
    return int(np.random.SeedSequence([seed, worker, restart]).generate_state(1, np.uint64)[0] >> 1)


class WorkerFailure(RuntimeError):
    """A rollout worker died (or did not answer in time) again after being replaced."""


class WorkerPlan:
    """Which environment copies each worker steps, and how each worker and each of its replacements is seeded.

    The copies are split as evenly as possible, worker 0's first; global copy i is seeded ``seed + i``. The
    worker pools ask ``spec(w)`` for what to build and ``replace(w)`` for a replacement's spec; the plan counts
    the replacements of each worker, which choose the replacement's seeds.
    """

    def __init__(self, env_id: str, config, seed: int, action_mask=None):
        e, p = config.env, config.policy
        self.env_id, self.seed, self.n_envs = env_id, seed, e.n_envs
        self.n_workers = config.distributed.workers
        self.sizes = split_copies(self.n_envs, self.n_workers, "workers")
        self.offsets = first_copies(self.sizes)
        self.action_mask, self.info_keys = action_mask, tuple(e.info_keys)
        self._spec_args = dict(env_id=env_id, hidden=tuple(p.hidden), activation=p.activation,
                               log_std_init=float(p.log_std_init), obs_clip=e.obs_clip,
                               normalize_obs=e.normalize_obs, gamma=config.advantage.gamma,
                               reward_clip=e.reward_clip, normalize_reward=e.normalize_reward,
                               nonfinite=e.nonfinite_env, torch_threads=config.run.torch_threads,
                               action_squash=p.action_squash, action_mask=action_mask,
                               env_kwargs=dict(e.env_kwargs), info_keys=tuple(e.info_keys))
        self.replacements = [0] * self.n_workers

    def spec(self, w: int) -> WorkerSpec:
        """The spec of worker w; its r-th replacement seeds its copies ``seed + i + r·n_envs`` (fresh
        episodes, no seed shared with any other copy) and its generator from ``(seed, w, r)``."""
        r = self.replacements[w]
        return WorkerSpec(offset=self.offsets[w], n_envs=self.sizes[w],
                          reset_seed=self.seed + self.offsets[w] + r * self.n_envs,
                          generator_seed=generator_seed(self.seed, w, r), **self._spec_args)

    def replace(self, w: int) -> WorkerSpec:
        """Count a replacement of worker w and return the spec it is built from."""
        self.replacements[w] += 1
        return self.spec(w)


class RecordingObsNormalizer(ObsNormalizer):
    """Normalises with statistics set from outside and never updated here; records the raw observations
    it was asked to normalise-and-update (one array [n_envs, D] per sampler step) for the learner."""

    def __init__(self, shape: tuple[int, ...], clip: float, enabled: bool = True, passthrough: int = 0):
        super().__init__(shape, clip, enabled, passthrough)
        self.seen: list[np.ndarray] = []

    def observe(self, obs: np.ndarray) -> None:
        self.seen.append(np.array(obs, np.float64))


class RecordingRewardScaler(RewardScaler):
    """Like ``RewardScaler`` but with statistics frozen for the iteration: keeps the per-copy discounted
    returns, scales by the statistics set from outside, and records the returns (and which copies were
    valid) so that the learner can update the shared statistics afterwards."""

    def __init__(self, n_envs: int, gamma: float, clip: float, enabled: bool = False):
        super().__init__(n_envs, gamma, clip, enabled)
        self.seen: list[tuple[np.ndarray, np.ndarray]] = []

    def observe(self, ret: np.ndarray, valid: np.ndarray | None) -> None:
        ok = np.ones(len(ret), bool) if valid is None else np.asarray(valid, bool).copy()
        self.seen.append((ret.copy(), ok))


@dataclass
class WorkerResult:
    """What one worker returns from ``collect`` (CPU tensors and numpy arrays only)."""

    worker: int
    rollout: Rollout
    raw_obs: np.ndarray | None
    """[T, n, D] float64: the raw observations the policy saw (None when observation normalisation is off)."""
    returns: np.ndarray | None
    """[T, n] float64: the reward scaler's discounted returns per step (None when reward scaling is off)."""
    returns_valid: np.ndarray | None
    """[T, n] bool: which of those returns enter the statistics (copies not dropped that step)."""
    episodes: list[tuple[int, float, int, tuple[float, ...]]]
    """(step of this rollout, return, length, info_keys' values) of every episode that finished, in the order
    they finished."""
    dropped: int
    """Episodes ended this iteration for a non-finite observation or reward."""


class RolloutWorker:
    """Steps ``spec.n_envs`` copies of the environment (copy j seeded ``spec.reset_seed + j``) with a local
    policy copy; ``collect`` is the only thing the learner calls each iteration."""

    def __init__(self, spec: WorkerSpec, worker: int):
        if spec.torch_threads:  # 0: the process's own setting
            torch.set_num_threads(spec.torch_threads)
        self.spec, self.worker = spec, worker
        envs = make_vec_env(spec.env_id, spec.n_envs, "sync", action_mask=spec.action_mask, env_kwargs=spec.env_kwargs)
        obs_space, act_space = probe_spaces(spec.env_id, env_kwargs=spec.env_kwargs)
        masked = spec.action_mask is not None
        features, mask_dim, image = input_layout(obs_space, act_space, masked)
        self.obs_norm = RecordingObsNormalizer((features + mask_dim,), spec.obs_clip,
                                               spec.normalize_obs and image is None, passthrough=mask_dim)
        self.rew_scale = RecordingRewardScaler(spec.n_envs, spec.gamma, spec.reward_clip, spec.normalize_reward)
        self.generator = torch.Generator().manual_seed(spec.generator_seed)
        self.sampler = Sampler(envs, self.obs_norm, self.rew_scale, spec.reset_seed, torch.device("cpu"),
                               self.generator, spec.nonfinite, spec.info_keys)
        with torch.random.fork_rng(devices=[]):  # its weights come from the learner: leave the process's stream
            self.policy = make_policy(obs_space, act_space, spec.hidden, spec.activation, spec.log_std_init,
                                      spec.action_squash, masked)

    def ready(self) -> int:
        """The worker's index (a cheap call to wait for the actor to have started)."""
        return self.worker

    @torch.no_grad()
    def collect(self, weights: dict[str, torch.Tensor], obs_stats: dict[str, Any] | None,
                reward_stats: dict[str, Any] | None, n_steps: int) -> WorkerResult:
        """One rollout of ``n_steps`` steps with the given policy weights and (frozen) normaliser statistics."""
        self.policy.load_state_dict(weights)
        if obs_stats is not None:
            self.obs_norm.rms.load_state_dict(obs_stats)
        if reward_stats is not None:
            self.rew_scale.rms.load_state_dict(reward_stats)
        self.obs_norm.seen, self.rew_scale.seen = [], []
        s = self.sampler
        dropped_before = s.dropped
        rollout = s.collect(self.policy, n_steps)
        raw = np.stack(self.obs_norm.seen) if self.obs_norm.seen else None
        if self.rew_scale.seen:
            returns = np.stack([r for r, _ in self.rew_scale.seen])
            returns_valid = np.stack([v for _, v in self.rew_scale.seen])
        else:
            returns = returns_valid = None
        # with the step each ended in, for the learner to merge the workers' episodes in the order one sampler
        # would have (by step, then by copy)
        episodes = [(t, *episode) for t, episode in zip(s.last_episode_steps, s.last_episodes)]
        return WorkerResult(self.worker, rollout, raw, returns, returns_valid, episodes, s.dropped - dropped_before)

    def close(self) -> None:
        self.sampler.close()
