"""One training iteration, in the order of the paper: collect → advantages → g → solve → step → critic.

Numerical faults never reach the parameters: a batch with non-finite advantages or returns is not
used; an actor update that reports a fault (``step/skipped`` with ``step/fault``) or leaves a
non-finite parameter or KL behind is undone bit-exactly from a copy; a critic fit whose loss or
parameters end non-finite is undone together with its optimiser state. Each such iteration is logged
with its reason, and the caller counts consecutive faults (``Agent.learn`` stops with
``TrainingFault`` after ``max_consecutive_faults``).

The critic fit may run in a second thread beside the actor update (``CriticFit``), in the otherwise idle
core of the phase in which the environments wait for the new policy; the numbers stay those of the order
above, bit for bit.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import math
import os
import time
from typing import Any

import torch
from torch import nn

from .advantages import gae, normalize_advantages
from .algorithms import Batch
from .config import AdvantageConfig, RunConfig
from .errors import first_line
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


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _finite_module(module: nn.Module) -> bool:
    return _finite(*(p.detach() for p in module.parameters()))


def restore_parameters(module: nn.Module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(module.parameters(), saved):
            p.copy_(s)


def numerical_error(exc: BaseException) -> str | None:
    """The reason, when an exception raised inside an update is a numerical fault rather than a bug: a value
    that overflows the parameters' dtype, a distribution built from NaN/inf parameters, a failed factorisation."""
    msg = first_line(exc)
    if isinstance(exc, torch.linalg.LinAlgError) or (isinstance(exc, RuntimeError) and "overflow" in msg) or \
            (isinstance(exc, ValueError) and "invalid values" in str(exc)):
        return f"{type(exc).__name__}: {msg[:200]}"
    return None


def stateful_update_parts(actor_update: Any) -> dict[str, Any]:
    """Parts of an actor update that carry state across updates and can save it (``state_dict``)."""
    parts = {"update": actor_update, "step_rule": getattr(actor_update, "step_rule", None),
             "curvature": getattr(actor_update, "curvature", None)}
    return {k: v for k, v in parts.items() if hasattr(v, "state_dict") and hasattr(v, "load_state_dict")}


def step_state_of(actor_update: Any) -> dict[str, tuple[Any, Any]]:
    """A copy of what the actor update's step carries to the next update (PPO's Adam moments, the Adam step rule's,
    ACKTR's momentum), each with its part, to undo with the parameters (``restore_step_state``). The curvature's
    state is not copied (K-FAC's moving averages: it leaves a non-finite batch out of them by itself)."""
    return {name: (part, copy.deepcopy(part.state_dict()))
            for name, part in stateful_update_parts(actor_update).items() if name != "curvature"}


def restore_step_state(actor_update: Any, saved: dict[str, tuple[Any, Any]]) -> None:
    for part, state in saved.values():
        part.load_state_dict(state)


def guarded_actor_update(actor_update, policy: nn.Module, batch: Batch) -> dict[str, Any]:
    """``actor_update.update(policy, batch)``, undone when it reports a fault, raises a numerical error or leaves a
    non-finite parameter or KL behind: the parameters and the step's own state (``step_state_of``). Always returns
    ``step/skipped`` (0 or 1); ``step/fault`` names the reason."""
    saved = [p.detach().clone() for p in policy.parameters()]
    step_state = step_state_of(actor_update)
    try:
        stats = actor_update.update(policy, batch)
    except (RuntimeError, ValueError) as exc:
        reason = numerical_error(exc)
        if reason is None:
            raise
        stats = skipped(f"numerical error in the actor update ({reason})")
    fault = stats.get("step/fault") if stats.get("step/skipped") else None
    if fault is None and not _finite_module(policy):
        fault = "non-finite parameters after the step"
    if fault is None and not math.isfinite(float(stats.get("step/kl", 0.0))):
        fault = "non-finite KL after the step (the stepped policy is not finite)"
    if fault is not None:
        restore_parameters(policy, saved)
        restore_step_state(actor_update, step_state)
        stats = {**stats, **skipped(fault)}
    stats.setdefault("step/skipped", 0.0)
    return stats


def _critic_snapshot(critic: nn.Module):
    optimizer = getattr(critic, "optimizer", None)
    return ([p.detach().clone() for p in critic.parameters()],
            copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None)


def _critic_restore(critic: nn.Module, snapshot) -> None:
    params, optimizer_state = snapshot
    restore_parameters(critic, params)
    if optimizer_state is not None:
        critic.optimizer.load_state_dict(optimizer_state)


def guarded_critic_fit(critic: nn.Module, batch: Batch, generator: torch.Generator, snapshot=None
                       ) -> dict[str, Any]:
    """``critic.fit``, undone (parameters and optimiser state, to ``snapshot`` or a copy taken here) when its
    loss or parameters end non-finite."""
    snapshot = snapshot or _critic_snapshot(critic)
    try:
        stats = critic.fit(batch.obs, batch.ret, generator)
    except (RuntimeError, ValueError) as exc:
        reason = numerical_error(exc)
        if reason is None:
            raise
        stats = {"critic/loss_after": float("nan"), "critic/error": reason}
    loss = float(stats.get("critic/loss_after", 0.0))
    fault = None
    if "critic/error" in stats:
        fault = f"numerical error in the critic fit ({stats.pop('critic/error')})"
    elif not _finite_module(critic):
        fault = "non-finite critic parameters after the fit"
    elif not math.isfinite(loss):
        fault = f"non-finite critic loss ({loss!r})"
    if fault is not None:
        _critic_restore(critic, snapshot)
        return {**stats, "critic/skipped": 1.0, "critic/fault": fault}
    return {**stats, "critic/skipped": 0.0}


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
        snapshot = _critic_snapshot(critic)
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
        _critic_restore(critic, snapshot)
        return guarded_critic_fit(critic, batch, generator)

    @staticmethod
    def cancel(handle, critic: nn.Module) -> None:
        """Wait for an overlapped fit and undo it (the actor update raised): the critic is left as it was."""
        if handle is not None:
            concurrent.futures.wait([handle[3]])
            _critic_restore(critic, handle[2])


def fault_of(stats: dict[str, Any]) -> str | None:
    """The reason an iteration's update was (partly) skipped, or None."""
    reasons = dict.fromkeys(str(stats[k]) for k in ("step/fault", "critic/fault") if stats.get(k))  # once each
    return "; ".join(reasons) or None


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
              generator: torch.Generator, prefetch: bool = False, critic_fit: CriticFit | None = None
              ) -> dict[str, Any]:
    """After ``sampler.collect`` (``rollout``, in ``collect_s`` seconds): advantages → actor update (g, d = F⁻¹g,
    step) → critic regression; returns the log row.

    ``prefetch``: a sampler whose workers run elsewhere (``sampler.prefetch``) starts the next rollout as
    soon as the actor has stepped, so that it runs while the critic is fitted here. The next batch is the
    same either way: the rollout reads only the policy and the normaliser statistics, the critic is read
    only by the next ``make_batch``. ``critic_fit``: a ``CriticFit`` that may overlap the critic fit with
    the actor update (None: the fit runs after it); ``time/critic_s`` is then the wait after the actor."""
    t1 = time.perf_counter()
    n_steps = cfg.rollout.n_steps
    unusable = "non-finite advantages, returns or old policy outputs"
    critic_fit = critic_fit or CriticFit(overlap=False)
    with _threads(cfg.run.update_threads):  # the environments wait for this phase's result
        batch = make_batch(rollout, policy, critic, cfg.advantage)
        usable = _finite(batch.adv, batch.ret, batch.eta_old, batch.logp_old)
        fitting = critic_fit.start(critic, batch, generator, cfg.run) if usable else None
        try:
            stats: dict[str, Any] = (guarded_actor_update(actor_update, policy, batch) if usable else
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
