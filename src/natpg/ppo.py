"""PPO (Schulman et al. 2017): the clipped surrogate as an actor update, and the optionally clipped critic fit.

PPO is the first-order baseline beside the natural-gradient updates: it shares sampling, advantages
(``train.make_batch``) and the value network (``critics.ValueCritic``) with them and replaces only the
actor step, ``ClippedSurrogateUpdate.update(policy, batch)``, which has the same signature as
``algorithms.NaturalGradientUpdate.update``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributions import kl_divergence

from .algorithms import Batch, surrogate, surrogate_and_kl
from .critics import AdamRegression, ValueCritic, adam_step, mean_squared_error, minibatch_indices
from .params import flatten


def clipped_surrogate(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor,
                      clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L^CLIP = mean_b min(r_b A_b, clip(r_b, 1 − ε, 1 + ε) A_b) with r_b = exp(logp_b − logp_old_b).

    Shapes: logp, logp_old, adv [B]. Returns (L^CLIP, fraction of samples where the clipped term is
    the smaller one, i.e. where the gradient is zero).
    """
    ratio = torch.exp(logp - logp_old)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * adv
    return torch.minimum(unclipped, clipped).mean(), (clipped < unclipped).float().mean()


class ClippedSurrogateUpdate:
    """PPO's actor update: ``epochs`` shuffled passes of Adam steps on −L^CLIP over minibatches.

    With ``target_kl > 0`` the passes stop before the first minibatch whose exact mean KL(old‖new)
    (old first, from the batch's detached ``eta_old``) exceeds target_kl. Stable-Baselines3 stops at
    1.5·target_kl of an estimated KL, so its target_kl = 0.01 is about 0.015 here. The Adam state
    persists across updates; it is created on the first update, for ``policy.actor_parameters()``.
    ``ent_coef`` adds c·(mean entropy of the minibatch) to L^CLIP.
    """

    def __init__(self, alpha: float, clip_range: float, epochs: int, minibatch: int, target_kl: float = 0.0,
                 max_grad_norm: float = 0.0, generator: torch.Generator | None = None, ent_coef: float = 0.0):
        self.alpha, self.clip_range, self.epochs, self.minibatch = alpha, clip_range, epochs, minibatch
        self.ent_coef = ent_coef
        self.target_kl, self.max_grad_norm, self.generator = target_kl, max_grad_norm, generator
        self.optimizer: torch.optim.Optimizer | None = None
        self._params: list[nn.Parameter] = []
        self._pending: dict | None = None  # Adam state loaded before the first update

    def state_dict(self) -> dict:
        return {"adam": self.optimizer.state_dict() if self.optimizer is not None else self._pending}

    def load_state_dict(self, state: dict) -> None:
        self._pending = state["adam"]
        if self._pending is None:  # the state before the first update: a fresh Adam at the next one
            self.optimizer = None
        elif self.optimizer is not None:
            self.optimizer.load_state_dict(self._pending)

    def update(self, policy: nn.Module, batch: Batch) -> dict[str, Any]:
        params = list(policy.actor_parameters())
        if self.optimizer is None or [id(p) for p in params] != [id(p) for p in self._params]:
            self.optimizer, self._params = torch.optim.Adam(params, lr=self.alpha, eps=1e-5, foreach=True), params
            if self._pending is not None:
                self.optimizer.load_state_dict(self._pending)
        for group in self.optimizer.param_groups:  # self.alpha may change between updates (lr_schedule)
            group["lr"] = self.alpha
        with torch.no_grad():
            surr_before = float(surrogate(policy, batch, self.ent_coef))
        B = batch.obs.shape[0]
        steps, samples, clip_fracs, grad_norms, stopped = 0, 0, [], [], False
        for idx in minibatch_indices(B, self.epochs, self.minibatch, self.generator, batch.obs.device):
            dist = policy.dist(batch.obs[idx])
            if self.target_kl:
                with torch.no_grad():
                    kl = float(kl_divergence(policy.head.dist(batch.eta_old[idx]), dist).mean())
                if kl > self.target_kl:
                    stopped = True
                    break
            L, clip_frac = clipped_surrogate(dist.log_prob(batch.act[idx]), batch.logp_old[idx], batch.adv[idx],
                                             self.clip_range)
            if self.ent_coef:
                L = L + self.ent_coef * dist.entropy().mean()
            for p in params:  # optimizer.zero_grad(set_to_none=True), without its profiler scope per step
                p.grad = None
            (-L).backward()
            if self.max_grad_norm:
                grad_norms.append(float(nn.utils.clip_grad_norm_(params, self.max_grad_norm)))
            else:
                grad_norms.append(float(flatten([p.grad for p in params]).norm()))
            adam_step(self.optimizer)  # optimizer.step() by the same foreach kernels, without its per-call overhead
            steps += 1
            samples += len(idx)
            clip_fracs.append(float(clip_frac))
        surr_after, kl = surrogate_and_kl(policy, batch, self.ent_coef)
        return {"step/kl": kl, "step/surrogate_gain": surr_after - surr_before, "step/sgd_steps": float(steps),
                "step/epochs": samples / B, "step/early_stop": float(stopped),
                "step/clip_fraction": sum(clip_fracs) / max(len(clip_fracs), 1),
                "grad/norm": sum(grad_norms) / max(len(grad_norms), 1), "step/skipped": 0.0}


class ClippedRegression(AdamRegression):
    """The value regression with PPO2's value clipping (baselines ``cliprange_vf``, SB3 ``clip_range_vf``):
    ``AdamRegression`` with another loss.

    Loss per sample: max((V − R)², (V_old + clip(V − V_old, −c, c) − R)²), with V_old the critic's values
    at the start of ``fit`` (those GAE used). c is in return units, so it is only meaningful with
    normalised rewards.
    """

    def __init__(self, net: nn.Module, lr: float = 1e-3, epochs: int = 10, minibatch: int = 256, *,
                 value_clip: float):
        super().__init__(net, lr, epochs, minibatch)
        self.value_clip = value_clip

    def fit(self, critic: ValueCritic, obs: torch.Tensor, returns: torch.Tensor,
            generator: torch.Generator | None = None) -> dict[str, float]:
        c = self.value_clip
        with torch.no_grad():
            v_old = critic(obs)
            before = float(((v_old - returns) ** 2).mean())
        clipped = []
        for idx in minibatch_indices(obs.shape[0], self.epochs, self.minibatch, generator, obs.device):
            v, R, v0 = critic(obs[idx]), returns[idx], v_old[idx]
            v_clip = v0 + torch.clamp(v - v0, -c, c)
            loss = torch.maximum((v - R) ** 2, (v_clip - R) ** 2).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            adam_step(self.optimizer)
            clipped.append(float(((v - v0).abs() > c).float().mean()))
        return {"critic/loss_before": before, "critic/loss_after": mean_squared_error(critic, obs, returns),
                "critic/clip_fraction": sum(clipped) / max(len(clipped), 1)}
