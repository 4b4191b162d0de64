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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..envs import ObsNormalizer, RewardScaler, make_normalisers, make_vec_env, probe_spaces
from ..errors import warn
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
    config: Config
    """The run's settings: the policy's shape, the normalisers', how each copy is made and stepped
    (env_kwargs, nonfinite_env, info_keys), torch_threads."""
    action_mask: Any = None
    """None, an info key, or a callable (pickled to a worker process; cloudpickled to a Ray actor)."""


def generator_seed(seed: int, worker: int, restart: int = 0) -> int:
    """The action-sampling seed of worker ``worker`` (its ``restart``-th replacement), from the run seed."""
    return int(np.random.SeedSequence([seed, worker, restart]).generate_state(1, np.uint64)[0] >> 1)


class WorkerFailure(RuntimeError):
    """A rollout worker died (or did not answer in time) again after being replaced."""


def warn_replaced(worker: int, why: str) -> None:
    """Say that a worker failed and is replaced (fresh episodes on its copies; sampler/worker_restarts counts it)."""
    warn(f"rollout worker {worker} failed ({why}): replaced by a fresh one, which runs its share of this "
         f"iteration again on freshly reset copies", RuntimeWarning)


class WorkerPlan:
    """Which environment copies each worker steps, and how each worker and each of its replacements is seeded.

    The copies are split as evenly as possible, worker 0's first; global copy i is seeded ``seed + i``. The
    worker pools ask ``spec(w)`` for what to build and ``replace(w)`` for a replacement's spec; the plan counts
    the replacements of each worker, which choose the replacement's seeds.
    """

    def __init__(self, env_id: str, config, seed: int, action_mask=None):
        e = config.env
        self.env_id, self.seed, self.n_envs = env_id, seed, e.n_envs
        self.n_workers = config.distributed.workers
        self.sizes = split_copies(self.n_envs, self.n_workers, "workers")
        self.offsets = first_copies(self.sizes)
        self.action_mask, self.info_keys, self.config = action_mask, tuple(e.info_keys), config
        self.replacements = [0] * self.n_workers

    def spec(self, w: int) -> WorkerSpec:
        """The spec of worker w; its r-th replacement seeds its copies ``seed + i + r·n_envs`` (fresh
        episodes, no seed shared with any other copy) and its generator from ``(seed, w, r)``."""
        r = self.replacements[w]
        return WorkerSpec(self.env_id, self.offsets[w], self.sizes[w], self.seed + self.offsets[w] + r * self.n_envs,
                          generator_seed(self.seed, w, r), self.config, self.action_mask)

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

    def __init__(self, n_envs: int, gamma: float, clip: float, enabled: bool = False, sign: bool = False):
        super().__init__(n_envs, gamma, clip, enabled, sign)
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
        c = spec.config
        if c.run.torch_threads:  # 0: the process's own setting
            torch.set_num_threads(c.run.torch_threads)
        self.spec, self.worker = spec, worker
        envs = make_vec_env(spec.env_id, spec.n_envs, "sync", action_mask=spec.action_mask,
                            env_kwargs=c.env.env_kwargs, first_copy=spec.offset)  # errors name the run's copy
        obs_space, act_space = probe_spaces(spec.env_id, env_kwargs=c.env.env_kwargs)
        masked = spec.action_mask is not None
        self.obs_norm, self.rew_scale = make_normalisers(c, spec.n_envs, *input_layout(obs_space, act_space, masked),
                                                         RecordingObsNormalizer, RecordingRewardScaler)
        self.generator = torch.Generator().manual_seed(spec.generator_seed)
        self.sampler = Sampler(envs, self.obs_norm, self.rew_scale, spec.reset_seed, torch.device("cpu"),
                               self.generator, c.env.nonfinite_env, c.env.info_keys)
        with torch.random.fork_rng(devices=[]):  # its weights come from the learner: leave the process's stream
            p = c.policy
            self.policy = make_policy(obs_space, act_space, p.hidden, p.activation, p.log_std_init, p.action_squash,
                                      masked)

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
