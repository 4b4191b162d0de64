"""One training iteration, in the order of the paper: collect → advantages → g → solve → step → critic."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from .advantages import gae, normalize_advantages
from .algorithms import Batch
from .config import AdvantageConfig
from .rollout import Rollout


@torch.no_grad()
def make_batch(rollout: Rollout, policy: nn.Module, critic: nn.Module, cfg: AdvantageConfig) -> Batch:
    """Old distribution parameters, values and GAE for a rollout, in batched forwards, flattened over (T, N)."""
    T, N = rollout.rew.shape
    obs = rollout.obs.reshape(T * N, -1)
    act = rollout.act.reshape(T * N, *rollout.act.shape[2:])
    eta_old = policy(obs)
    logp_old = policy.head.dist(eta_old).log_prob(act)
    values = critic(obs).reshape(T, N)
    next_values = critic(rollout.next_obs.reshape(T * N, -1)).reshape(T, N)
    done = rollout.terminated | rollout.truncated
    adv, ret = gae(rollout.rew, values, next_values, rollout.terminated, done, cfg.gamma, cfg.gae_lambda)
    adv = adv.reshape(-1)
    if cfg.normalize_advantages:
        adv = normalize_advantages(adv)
    return Batch(obs=obs, act=act, adv=adv, ret=ret.reshape(-1), logp_old=logp_old, eta_old=eta_old)


def iteration(sampler, policy: nn.Module, critic, actor_update, cfg, n_steps: int,
              generator: torch.Generator) -> dict[str, Any]:
    """collect → advantages → actor update (g, d = F⁻¹g, step) → critic regression; returns the log row."""
    t0 = time.perf_counter()
    rollout = sampler.collect(policy, n_steps)
    t1 = time.perf_counter()
    batch = make_batch(rollout, policy, critic, cfg.advantage)
    stats = actor_update.update(policy, batch)
    t2 = time.perf_counter()
    stats |= critic.fit(batch.obs, batch.ret, generator)
    t3 = time.perf_counter()
    stats |= {"time/collect_s": t1 - t0, "time/actor_s": t2 - t1, "time/critic_s": t3 - t2}
    return stats
