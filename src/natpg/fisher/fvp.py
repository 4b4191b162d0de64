"""Exact Fisher-vector products of a policy's actor parameters.

Two independent constructions of the same matrix (DESIGN.md, house rule 3):

* ``fisher_vector_product`` — the Gauss–Newton form ``F v = (1/B) Σ_b J_bᵀ F_out(η_b) J_b v`` where
  ``η = policy(obs)`` are the distribution parameters, ``J_b = ∂η_b/∂θ`` and ``F_out`` the analytic
  Fisher of the output distribution (``policy.head.fisher_mv``). One forward-mode product (jvp) and one
  reverse-mode product (vjp) per call; the reverse graph is built once per ``fit``.
* ``kl_hessian_vector_product`` — the Hessian of ``mean_b KL(π_old(·|s_b) ‖ π_θ(·|s_b))`` at θ_old by
  double backward, kept as a test oracle. The old distribution is detached: if it were not, the
  gradient would flow through both arguments and the Hessian at zero displacement would vanish.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributions import kl_divergence
from torch.func import functional_call, jvp, vjp

from ..params import flatten, parameter_names, unflatten

MatVec = Callable[[torch.Tensor], torch.Tensor]


def functional_policy(policy: nn.Module):
    """``(θ-tuple, obs) ↦ η = policy(obs)`` as a pure function of the actor parameters, and the current θ."""
    params = list(policy.actor_parameters())
    names = parameter_names(policy, params)

    def f(theta: tuple[torch.Tensor, ...], obs: torch.Tensor) -> torch.Tensor:
        return functional_call(policy, dict(zip(names, theta)), (obs,), strict=False)

    return f, tuple(p.detach() for p in params)


def fisher_vector_product(policy: nn.Module, obs: torch.Tensor, damping: float = 0.0) -> MatVec:
    """``v ↦ (F + damping·I) v`` for the exact Fisher of the actor averaged over ``obs`` [B, obs_dim].

    Actions are integrated out analytically through the output distribution's Fisher; ``v`` and the
    result are flat vectors in ``actor_parameters()`` order.
    """
    f_obs, theta = functional_policy(policy)
    f = lambda *th: f_obs(th, obs)  # noqa: E731
    eta, pullback = vjp(f, *theta)
    eta = eta.detach()
    batch = eta.shape[0]
    head = policy.head

    def mv(v: torch.Tensor) -> torch.Tensor:
        _, Jv = jvp(f, theta, tuple(unflatten(v, theta)))
        u = head.fisher_mv(eta, Jv) / batch
        Fv = flatten(pullback(u))
        return Fv + damping * v if damping else Fv

    return mv


def kl_hessian_vector_product(policy: nn.Module, obs: torch.Tensor) -> MatVec:
    """``v ↦ ∇²_θ mean_b KL(π_old ‖ π_θ) v`` at θ = θ_old, by double backward (test oracle)."""
    params = list(policy.actor_parameters())
    with torch.no_grad():
        old = policy.head.dist(policy(obs))  # detached: KL(old‖new) has zero value and gradient here

    def mv(v: torch.Tensor) -> torch.Tensor:
        kl = kl_divergence(old, policy.dist(obs)).mean()
        grads = torch.autograd.grad(kl, params, create_graph=True)
        gv = torch.dot(flatten(grads), v)
        return flatten(torch.autograd.grad(gv, params)).detach()

    return mv
