"""The sampler that splits the environment copies over rollout workers, whichever pool runs them.

``DistributedSampler`` presents the interface of ``natpg.rollout.Sampler`` that training uses
(``collect(policy, n_steps)``, ``recent_returns``, ``recent_lengths``, ``episodes``, ``total_steps``,
``close``); a worker pool runs the ``RolloutWorker``s: ``InProcessPool`` one after the other in this
process (``sampler='workers'``, the reference), ``ProcessPool`` as local processes (``'processes'``),
``RayPool`` as Ray actors (``'ray'``), each built from the ``WorkerPlan`` (``WorkerPool`` says what a pool
does). One iteration:

1. the learner sends every worker the policy weights (``state_dict`` as CPU tensors) and the statistics
   of the observation normaliser and the reward scaler;
2. each worker steps its copies ``n_steps`` times with its own policy copy and its own generator, the
   statistics frozen for the whole rollout;
3. the rollouts come back and are concatenated along the copy axis in worker order (worker 0's copies
   first), so copy i of the batch is the global copy i, seeded ``seed + i`` as in the local sampler;
4. the learner updates the statistics from the raw observations (and discounted returns) the workers
   saw, one sampler step at a time over all copies, and keeps the episode statistics.

Unlike the local sampler, which updates the observation statistics before every step, the statistics
change once per iteration here; with the same seed and number of workers, the three pools give identical
batches (docs/distributed.md).
"""

from __future__ import annotations

from collections import deque
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch

from ..envs import ObsNormalizer, RewardScaler
from ..errors import warn
from ..rollout import Rollout, episode_counters, restore_episode_counters, state_without_envs
from .processes import ProcessPool
from .ray_pool import RayPool
from .workers import RolloutWorker, WorkerPlan, WorkerResult


class WorkerPool(Protocol):
    """Runs the ``RolloutWorker``s of a ``WorkerPlan``: ``InProcessPool``, ``ProcessPool`` or ``RayPool``."""

    def submit(self, weights: dict[str, torch.Tensor], obs_stats: dict[str, Any] | None,
               reward_stats: dict[str, Any] | None, n_steps: int) -> Any:
        """Start one rollout of every worker with these weights and (frozen) statistics; a handle for gather."""

    def gather(self, handle: Any) -> list[WorkerResult]:
        """The workers' results of that rollout, a worker that fails replaced and its share run again (a second
        failure raises ``WorkerFailure``)."""

    def close(self) -> None:
        """Stop the workers (one still stepping a rollout too)."""


class DistributedSampler:
    """The learner's side of the worker samplers: the merge of the workers' rollouts, the statistics.

    ``obs_normalizer`` and ``reward_scaler`` are the learner's (saved with the model); the workers only
    ever normalise with a frozen copy of their statistics. ``plan`` says which copies each worker of ``pool``
    steps and how they are seeded.
    """

    def __init__(self, plan: WorkerPlan, pool: WorkerPool, obs_normalizer: ObsNormalizer,
                 reward_scaler: RewardScaler, device: torch.device):
        self.plan, self.pool, self.device = plan, pool, torch.device(device)
        self.obs_norm, self.rew_scale = obs_normalizer, reward_scaler
        self.n_envs, self.n_workers, self.info_keys = plan.n_envs, plan.n_workers, plan.info_keys
        self.recent_returns: deque[float] = deque(maxlen=100)
        self.recent_lengths: deque[int] = deque(maxlen=100)
        self.recent_infos: deque[tuple[float, ...]] = deque(maxlen=100)
        self.episodes = 0
        # (return, length, info_keys' values) of each episode the last collect ended
        self.last_episodes: list[tuple[float, int, tuple[float, ...]]] = []
        self.total_steps = 0
        self.steps = 0
        self.dropped = 0
        self.half_restored = False  # no environment snapshot to restore part of
        self._pending = None  # (weights, n_steps, handle) of a rollout started by prefetch

    @property
    def worker_restarts(self) -> int:
        return sum(self.plan.replacements)

    def log_stats(self) -> dict[str, Any]:
        """Columns for the progress log."""
        return {"sampler/workers": self.n_workers, "sampler/worker_restarts": self.worker_restarts}

    # --- one iteration ----------------------------------------------------------------------------
    def collect(self, policy: torch.nn.Module, n_steps: int) -> Rollout:
        """The next rollout of ``policy``: the one ``prefetch`` started, if it was started with these weights
        and ``n_steps`` (otherwise it is discarded with a warning), or a fresh one."""
        if self._pending is not None:
            weights, steps, handle = self._pending
            self._pending = None
            results = self.pool.gather(handle)
            if steps == n_steps and _same_weights(policy, weights):
                return self._merge(results, n_steps)
            warn("the policy changed after its next rollout was started (prefetch); that rollout is "
                 "discarded and a new one collected", RuntimeWarning)
        return self._merge(self.pool.gather(self.pool.submit(*self._request(policy), n_steps)), n_steps)

    def prefetch(self, policy: torch.nn.Module, n_steps: int) -> None:
        """Start the next rollout now with the current weights and statistics, so that the workers step their
        environments while the learner fits the critic; ``collect`` then only waits for it. The batch is the
        same as without prefetching: the rollout needs only the policy and the normaliser statistics, both
        final once the actor has stepped."""
        if self._pending is None:
            weights, obs_stats, reward_stats = self._request(policy)
            self._pending = (weights, n_steps, self.pool.submit(weights, obs_stats, reward_stats, n_steps))

    def _request(self, policy: torch.nn.Module):
        weights = {k: v.detach().to("cpu", copy=True) for k, v in policy.state_dict().items()}
        obs_stats = self.obs_norm.rms.state_dict() if self.obs_norm.enabled else None
        reward_stats = self.rew_scale.rms.state_dict() if self.rew_scale.enabled else None
        return weights, obs_stats, reward_stats

    def _merge(self, results: list[WorkerResult], n_steps: int) -> Rollout:
        results = sorted(results, key=lambda r: r.worker)
        rolls = [r.rollout for r in results]
        cat = lambda name: torch.cat([getattr(x, name) for x in rolls], dim=1).to(self.device)  # noqa: E731
        valid = None
        if any(x.valid is not None for x in rolls):
            valid = torch.cat([x.valid if x.valid is not None else torch.ones_like(x.rew, dtype=torch.bool)
                               for x in rolls], dim=1).to(self.device)
        rollout = Rollout(obs=cat("obs"), act=cat("act"), rew=cat("rew"), terminated=cat("terminated"),
                          truncated=cat("truncated"), next_obs=cat("next_obs"), valid=valid)
        # Statistics: step by step over all copies, as one sampler updating once per step would.
        if self.obs_norm.enabled:
            raw = np.concatenate([r.raw_obs for r in results], axis=1)
            for t in range(raw.shape[0]):
                self.obs_norm.rms.update(raw[t])
        if self.rew_scale.enabled:
            ret = np.concatenate([r.returns for r in results], axis=1)
            ok = np.concatenate([r.returns_valid for r in results], axis=1)
            for t in range(ret.shape[0]):
                if ok[t].any():
                    self.rew_scale.rms.update(ret[t][ok[t]])
        finished = sorted(((t, r.worker, k, ret, length, values) for r in results
                           for k, (t, ret, length, values) in enumerate(r.episodes)), key=lambda e: e[:3])
        self.last_episodes = [(float(ret), int(length), values) for _, _, _, ret, length, values in finished]
        for ret, length, values in self.last_episodes:
            self.recent_returns.append(ret)
            self.recent_lengths.append(length)
            self.recent_infos.append(values)
        self.episodes += len(finished)
        self.dropped += sum(r.dropped for r in results)
        self.total_steps += rollout.num_steps
        self.steps += n_steps
        return rollout

    # --- resume (statistics only: remote environments are not snapshot) ----------------------------
    def state_dict(self) -> dict[str, Any]:
        reason = "the environments of a worker sampler live in its rollout workers and are not snapshot"
        return state_without_envs(episode_counters(self), reason)

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        restore_episode_counters(self, state)
        warn("resuming with freshly reset environments in the rollout workers, so the continuation "
             "is not bit-exact", RuntimeWarning)
        return False

    def close(self) -> None:
        self._pending = None
        self.pool.close()


class InProcessPool:
    """The reference pool (``sampler='workers'``): the same ``RolloutWorker`` code as the process and Ray
    pools, run one worker after the other in this process."""

    def __init__(self, plan: WorkerPlan):
        self.workers = [RolloutWorker(plan.spec(w), w) for w in range(plan.n_workers)]

    def submit(self, weights, obs_stats, reward_stats, n_steps: int) -> list[WorkerResult]:
        return [w.collect(weights, obs_stats, reward_stats, n_steps) for w in self.workers]

    def gather(self, results: list[WorkerResult]) -> list[WorkerResult]:
        return results

    def close(self) -> None:
        for w in self.workers:
            w.close()
        self.workers = []


def _same_weights(policy: torch.nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    state = policy.state_dict()
    return state.keys() == weights.keys() and all(torch.equal(v.detach().cpu(), weights[k]) for k, v in state.items())


def make_sampler(kind: str, env_id: str, config, seed: int, obs_normalizer: ObsNormalizer,
                 reward_scaler: RewardScaler, device: torch.device, action_mask=None) -> DistributedSampler:
    """The ``sampler='workers'``, ``'processes'`` or ``'ray'`` sampler for a run (``config.distributed``); global copy i
    is seeded ``seed + i``; ``action_mask``: None, an info key or a callable (``Agent.action_mask_source``)."""
    d = config.distributed
    pools = {"workers": InProcessPool,
             "processes": partial(ProcessPool, timeout=d.worker_timeout, start_timeout=d.worker_start_timeout),
             "ray": partial(RayPool, address=d.ray_address, timeout=d.worker_timeout,
                            start_timeout=d.worker_start_timeout)}
    if kind not in pools:
        raise ValueError(f"unknown sampler {kind!r}; valid: 'local', 'processes', 'workers', 'ray'")
    plan = WorkerPlan(env_id, config, seed, action_mask)
    return DistributedSampler(plan, pools[kind](plan), obs_normalizer, reward_scaler, device)
