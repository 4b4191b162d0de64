"""Algorithms as compositions: actor update = curvature × step rule (or PPO's clip), plus the critic.

NPG, TRPO, ACKTR and VPG differ only in how F⁻¹g is approximated and how the step length is chosen;
PPO replaces the natural step by the clipped surrogate. Each is a row of ``presets.ALGORITHM_DEFAULTS`` (the
composition) plus presets, never a subclass with a copied update; docs/algorithms.md maps the maths to the code
and cites the presets' sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributions import kl_divergence

from . import fisher
from .config import Config
from .critics import AdamRegression, ValueCritic
from .params import finite, flatten
from .steps import AdamStep, FixedStep, KFACClip, KLStep, LineSearch, skipped


@dataclass
class Batch:
    """One update's data, flattened over (T, N). obs [B, D], act [B, ...], adv [B], ret [B],
    logp_old [B] and eta_old [B, K] (old distribution parameters, detached)."""

    obs: torch.Tensor
    act: torch.Tensor
    adv: torch.Tensor
    ret: torch.Tensor
    logp_old: torch.Tensor
    eta_old: torch.Tensor


def surrogate(policy: nn.Module, batch: Batch, ent_coef: float = 0.0) -> torch.Tensor:
    """L(θ) = mean_b π_θ(a_b|s_b)/π_old(a_b|s_b) · A_b; its gradient at θ_old is the policy gradient. With
    ``ent_coef`` = c the actor's objective adds the entropy bonus c·mean_b H(π_θ(·|s_b))."""
    return _surrogate(policy.dist(batch.obs), batch, ent_coef)


def mean_kl(policy: nn.Module, batch: Batch) -> torch.Tensor:
    """mean_b KL(π_old(·|s_b) ‖ π_θ(·|s_b)), old first and detached."""
    return _mean_kl(policy, policy.dist(batch.obs), batch)


@torch.no_grad()
def surrogate_and_kl(policy: nn.Module, batch: Batch, ent_coef: float = 0.0) -> tuple[float, float]:
    """(``surrogate``, ``mean_kl``) at the current parameters from one forward pass (each alone takes one)."""
    dist = policy.dist(batch.obs)
    return float(_surrogate(dist, batch, ent_coef)), float(_mean_kl(policy, dist, batch))


def _surrogate(dist, batch: Batch, ent_coef: float) -> torch.Tensor:
    value = (torch.exp(dist.log_prob(batch.act) - batch.logp_old) * batch.adv).mean()
    return value + ent_coef * dist.entropy().mean() if ent_coef else value


def _mean_kl(policy: nn.Module, dist, batch: Batch) -> torch.Tensor:
    return kl_divergence(policy.head.dist(batch.eta_old), dist).mean()


def make_curvature(cfg: Config, generator: torch.Generator | None):
    c = cfg.curvature
    if c.fisher == "cg":
        return fisher.CG(damping=c.damping, iters=c.cg_iters, tol=c.cg_tol, subsample=c.fvp_subsample,
                         warm_start=c.cg_warm_start, generator=generator, step_length=c.fvp_subsample_step_length,
                         preconditioner=c.cg_preconditioner, kfac_ema_decay=c.kfac_ema_decay)
    if c.fisher == "dense":
        return fisher.Dense(damping=c.damping, subsample=c.fvp_subsample, generator=generator,
                            step_length=c.fvp_subsample_step_length)
    if c.fisher == "identity":
        return fisher.Identity()
    estimator = {"estimator": c.fisher_estimator} if c.fisher_estimator is not None else {}
    if c.fisher == "kfac":
        return fisher.KFAC(damping=c.damping, ema_decay=c.kfac_ema_decay, refresh_every=c.kfac_refresh_every,
                           generator=generator, **estimator)
    if c.fisher == "diagonal":
        return fisher.Diagonal(damping=c.damping, generator=generator, **estimator)
    return fisher.Empirical(damping=c.damping, cg_iters=c.cg_iters, cg_tol=c.cg_tol, generator=generator)


def make_step_rule(cfg: Config):
    s = cfg.step
    if s.step == "fixed":
        return FixedStep(s.alpha)
    if s.step == "adam":
        return AdamStep(s.alpha, s.max_grad_norm)
    if s.step == "kl":
        return KLStep(s.max_kl)
    if s.step == "linesearch":
        return LineSearch(s.max_kl, s.backtrack_shrink, s.backtrack_iters)
    if s.step == "kfac_clip":
        return KFACClip(s.max_kl, s.eta_max, s.momentum)
    raise ValueError(f"step={s.step!r} is not available for algorithm {cfg.algorithm!r}")


class NaturalGradientUpdate:
    """One natural-gradient actor update: g = ∇L, d = F⁻¹g, then the step rule moves θ along d."""

    def __init__(self, curvature, step_rule, ent_coef: float = 0.0):
        self.curvature, self.step_rule, self.ent_coef = curvature, step_rule, ent_coef

    def update(self, policy: nn.Module, batch: Batch) -> dict[str, Any]:
        params = policy.actor_parameters()
        surr_before = surrogate(policy, batch, self.ent_coef)
        g = flatten(torch.autograd.grad(surr_before, params)).detach()
        if not finite(surr_before, g):  # before any curvature state
            return {**skipped("non-finite surrogate or gradient"), "grad/norm": float(g.norm())}
        self.curvature.fit(policy, batch.obs, batch.act)
        d = self.curvature.solve(g)  # d ≈ F⁻¹g
        stats = step_along(policy, batch, params, d, g, self.curvature, self.step_rule, float(surr_before.detach()),
                           self.ent_coef)  # θ ← θ + α d
        return {**stats, **self.curvature.stats}


def step_along(policy: nn.Module, batch: Batch, params: list[torch.Tensor], d: torch.Tensor, g: torch.Tensor,
               metric, step_rule, surr_before: float, ent_coef: float = 0.0) -> dict[str, Any]:
    """θ ← θ + α d, α by the step rule (its lengths measured in ``metric``'s F), then what the step achieved: the
    KL from the old policy and the surrogate's gain."""

    def evaluate() -> tuple[float, float]:
        return surrogate_and_kl(policy, batch, ent_coef)

    stats = step_rule.apply(params, d, g, metric, evaluate)
    surr_after, stats["step/kl"] = evaluate()
    stats["step/surrogate_gain"] = surr_after - surr_before
    stats["grad/norm"] = float(g.norm())
    return stats


def make_actor_update(cfg: Config, generator: torch.Generator | None):
    """PPO's clipped objective for step='ppo_clip', else curvature × step rule."""
    s = cfg.step
    if s.step == "ppo_clip":
        from .ppo import ClippedSurrogateUpdate

        return ClippedSurrogateUpdate(s.alpha, s.clip_range, s.ppo_epochs, s.ppo_minibatch, s.target_kl,
                                      s.max_grad_norm, generator, s.ent_coef)
    if cfg.algorithm == "nac":  # d = the compatible critic's weights, (F_emp + λI)⁻¹g with λ = damping
        from .nac import NaturalActorCritic

        return NaturalActorCritic(cfg.curvature.damping, make_step_rule(cfg))
    return NaturalGradientUpdate(make_curvature(cfg, generator), make_step_rule(cfg), s.ent_coef)


def make_critic(cfg: Config, obs_dim: int, image=None) -> nn.Module:
    """The value network with its fitter: Adam regression, PPO's clipped regression, or ACKTR's K-FAC step.
    ``image``: the CNN layout of image observations (``policies.image_layout``; Adam critics only)."""
    c = cfg.critic
    if image is not None and c.critic_optimizer == "kfac":
        raise ValueError("critic_optimizer='kfac' (ACKTR's K-FAC critic) supports MLP critics only; image "
                         "observations need critic_optimizer='adam'")
    if c.critic_optimizer == "kfac":
        from .acktr import KFACRegression

        fitter = partial(KFACRegression, epochs=c.critic_epochs, minibatch=c.critic_minibatch, max_kl=c.critic_max_kl,
                         eta_max=c.critic_eta_max, damping=c.critic_damping, momentum=c.critic_momentum)
    elif c.value_clip:
        from .ppo import ClippedRegression

        fitter = partial(ClippedRegression, lr=c.critic_lr, epochs=c.critic_epochs, minibatch=c.critic_minibatch,
                         value_clip=c.value_clip)
    else:
        fitter = partial(AdamRegression, lr=c.critic_lr, epochs=c.critic_epochs, minibatch=c.critic_minibatch)
    return ValueCritic(obs_dim, c.critic_hidden, cfg.policy.activation, image=image, fitter=fitter)
