"""One training iteration, in the order of the paper: collect → advantages → g → solve → step → critic.

Numerical faults never reach the parameters: a batch with non-finite advantages or returns is not used, and
an actor update or critic fit that fails is undone bit-exactly (``natpg.guards``). Each such iteration is logged
with its reason, and the caller counts consecutive faults (``Agent.learn`` stops with ``TrainingFault`` after
``max_consecutive_faults``).

The critic fit may run in a second thread beside the actor update (``CriticFit``), in the otherwise idle
core of the phase in which the environments wait for the new policy; the numbers stay those of the order
above, bit for bit.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time
from typing import Any

import torch
from torch import nn

from .advantages import gae, normalize_advantages
from .algorithms import Batch
from .config import AdvantageConfig, RunConfig
from .guards import ActorSnapshot, critic_restore, critic_snapshot, guarded_actor_update, guarded_critic_fit
from .params import finite
from .rollout import Rollout
from .steps import skipped


class TrainingFault(RuntimeError):
    """Training stopped after ``max_consecutive_faults`` updates in a row were skipped for numerical faults."""


@torch.no_grad()
def make_batch(rollout: Rollout, policy: nn.Module, critic: nn.Module, cfg: AdvantageConfig) -> Batch:
    """Old distribution parameters, values and GAE for a rollout, in batched forwards, flattened over (T, N).

    Transitions marked invalid (``rollout.valid``, dropped for a non-finite observation or reward) are left
    out after GAE, which never runs across them (the transition before each is marked truncated).
    """
    T, N = rollout.rew.shape
    obs = rollout.obs.reshape(T * N, -1)
    act = rollout.act.reshape(T * N, *rollout.act.shape[2:])
    values = critic(obs).reshape(T, N)
    next_values = critic(rollout.next_obs.reshape(T * N, -1)).reshape(T, N)
    done = rollout.terminated | rollout.truncated
    adv, ret = gae(rollout.rew, values, next_values, rollout.terminated, done, cfg.gamma, cfg.gae_lambda)
    adv, ret = adv.reshape(-1), ret.reshape(-1)
    if rollout.valid is not None:
        keep = rollout.valid.reshape(-1)
        obs, act, adv, ret = obs[keep], act[keep], adv[keep], ret[keep]
    eta_old = policy(obs)
    logp_old = policy.head.dist(eta_old).log_prob(act)
    if cfg.normalize_advantages:
        adv = normalize_advantages(adv)
    return Batch(obs=obs, act=act, adv=adv, ret=ret, logp_old=logp_old, eta_old=eta_old)



class CriticFit:
    """The critic fit of ``iteration``, run in a second thread beside the actor update when that leaves every
    number as it is.

    The two read disjoint state (the critic and the batch; the policy and the batch), so they may run at
    once, but for the generator they share: in the paper's order the critic's shuffles come after whatever
    the actor update draws (K-FAC's sampled actions, a Fisher subsample, PPO's minibatches). So the
    overlapped fit shuffles with a copy of the generator taken before the actor update, and is kept only if
    the actor update drew nothing; otherwise it is undone and the critic fitted again after the actor, as
    without overlap, and later iterations of this run do not overlap (one wasted fit per run). Either way
    the parameters, the optimiser state and the generator end bit for bit as in the sequential order (test).
    It does not overlap when ``run.critic_thread`` is off, nor when the update phase uses more than one torch
    thread (``run.update_threads``), whose kernels could round differently from the fit's one-thread run."""

    # One thread, shared, made on first use in each process: a child forked after training has the
    # executor but not its thread, and would wait forever on it.
    _executor: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None

    def __init__(self, overlap: bool = True):
        self.overlap = overlap

    def start(self, critic: nn.Module, batch: Batch, generator: torch.Generator, run: RunConfig):
        """Begin the fit (returns a handle for ``finish``), or None when it is to run after the actor update."""
        if not (self.overlap and run.critic_thread) or run.update_threads > 1:
            return None
        if CriticFit._executor is None or CriticFit._executor[0] != os.getpid():
            CriticFit._executor = (os.getpid(),
                                   concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="natpg-critic"))
        state = generator.get_state()
        shuffles = torch.Generator(generator.device)
        shuffles.set_state(state)
        snapshot = critic_snapshot(critic)
        return state, shuffles, snapshot, CriticFit._executor[1].submit(guarded_critic_fit, critic, batch, shuffles,
                                                                        snapshot)

    def finish(self, handle, critic: nn.Module, batch: Batch, generator: torch.Generator) -> dict[str, Any]:
        """The fit's log entries, once it is done and kept (or redone in order)."""
        if handle is None:
            return guarded_critic_fit(critic, batch, generator)
        state, shuffles, snapshot, future = handle
        try:
            stats = future.result()
        except BaseException:  # a bug in the fit, or an interrupt while waiting: the critic as it was
            self.cancel(handle, critic)
            raise
        if torch.equal(generator.get_state(), state):
            generator.set_state(shuffles.get_state())
            return stats
        self.overlap = False
        critic_restore(critic, snapshot)
        return guarded_critic_fit(critic, batch, generator)

    @staticmethod
    def cancel(handle, critic: nn.Module) -> None:
        """Wait for an overlapped fit and undo it (the actor update raised): the critic is left as it was."""
        if handle is not None:
            concurrent.futures.wait([handle[3]])
            critic_restore(critic, handle[2])



@contextlib.contextmanager
def _threads(n: int):
    """torch uses ``n`` intra-op threads inside the block (0: leave the setting alone)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)


@torch.no_grad()
def batch_diagnostics(policy: nn.Module, batch: Batch, critic_loss_before: float | None) -> dict[str, float]:
    """What RL practitioners read first: the old policy's mean entropy on the batch (collapsing exploration), and
    the critic's explained variance 1 − E[(V − R)²]/Var[R] before its fit (1: V predicts the returns; ≤ 0: no
    better than their mean), V being the values GAE used."""
    out = {"policy/entropy": float(policy.head.dist(batch.eta_old).entropy().mean())}
    if critic_loss_before is not None:
        var = float(batch.ret.var(unbiased=False))
        # returns equal up to rounding (γ = 0 with a constant reward) have no variance to explain
        spread = var > 1e-10 * float((batch.ret**2).mean())
        out["critic/explained_variance"] = 1.0 - critic_loss_before / var if spread else float("nan")
    return out


def iteration(rollout: Rollout, collect_s: float, sampler, policy: nn.Module, critic, actor_update, cfg,
              generator: torch.Generator, prefetch: bool = False, critic_fit: CriticFit | None = None,
              snapshot: ActorSnapshot | None = None) -> dict[str, Any]:
    """After ``sampler.collect`` (``rollout``, in ``collect_s`` seconds): advantages → actor update (g, d = F⁻¹g,
    step) → critic regression; returns the log row.

    ``prefetch``: a sampler whose workers run elsewhere (``sampler.prefetch``) starts the next rollout as
    soon as the actor has stepped, so that it runs while the critic is fitted here. The next batch is the
    same either way: the rollout reads only the policy and the normaliser statistics, the critic is read
    only by the next ``make_batch``. ``critic_fit``: a ``CriticFit`` that may overlap the critic fit with
    the actor update (None: the fit runs after it); ``time/critic_s`` is then the wait after the actor.
    ``snapshot``: the actor as it was before this iteration, to undo a faulty step to (None: one taken here)."""
    t1 = time.perf_counter()
    n_steps = cfg.rollout.n_steps
    unusable = "non-finite advantages, returns or old policy outputs"
    critic_fit = critic_fit or CriticFit(overlap=False)
    with _threads(cfg.run.update_threads):  # the environments wait for this phase's result
        batch = make_batch(rollout, policy, critic, cfg.advantage)
        usable = finite(batch.adv, batch.ret, batch.eta_old, batch.logp_old)
        fitting = critic_fit.start(critic, batch, generator, cfg.run) if usable else None
        try:
            stats: dict[str, Any] = (guarded_actor_update(actor_update, policy, batch, snapshot) if usable else
                                     {**skipped(unusable), "critic/skipped": 1.0, "critic/fault": unusable})
            if usable and prefetch:
                sampler.prefetch(policy, n_steps)
        except BaseException:  # an interrupt or a bug: leave the critic as it was, not half-fitted
            critic_fit.cancel(fitting, critic)
            raise
    if usable:
        t2 = time.perf_counter()
        stats |= critic_fit.finish(fitting, critic, batch, generator)
        t3 = time.perf_counter()
        stats |= batch_diagnostics(policy, batch, stats.get("critic/loss_before"))
    else:
        t2 = t3 = time.perf_counter()
    # time/actor_s: the phase the environments wait for, the batch (GAE, old-policy outputs) and the actor update
    stats |= {"env/nonfinite_dropped": float(sampler.dropped),
              "time/collect_s": collect_s, "time/actor_s": t2 - t1, "time/critic_s": t3 - t2}
    return stats
