"""Exact Fisher-vector products of a policy's actor parameters.

Two independent constructions of the same matrix (DESIGN.md, house rule 3):

* ``fisher_vector_product`` — the Gauss–Newton form ``F v = (1/B) Σ_b J_bᵀ F_out(η_b) J_b v`` where
  ``η = policy(obs)`` are the distribution parameters, ``J_b = ∂η_b/∂θ`` and ``F_out`` the analytic
  Fisher of the output distribution (``policy.head.fisher_mv``). Jv by the double-backward R-operator and
  Jᵀw by reverse mode, both on graphs built once per ``fit``; for plain MLP policies the same kernels are
  called by hand (``_mlp_fisher_vector_product``), bit for bit the same numbers at less cost.
* ``kl_hessian_vector_product`` — the Hessian of ``mean_b KL(π_old(·|s_b) ‖ π_θ(·|s_b))`` at θ_old by
  double backward, kept as a test oracle. The old distribution is detached: if it were not, the
  gradient would flow through both arguments and the Hessian at zero displacement would vanish.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributions import kl_divergence
from torch.func import functional_call

from ..params import flatten, parameter_names
from ..policies import (BACKWARD_FROM_OUTPUT, DiscreteMLP, GaussianMLP, hooked, linear_activation_pairs, mlp_backward,
                        mlp_outputs)

MatVec = Callable[[torch.Tensor], torch.Tensor]


def checked_states(policy: nn.Module, obs) -> torch.Tensor:
    """``obs`` if the curvature functions can read it as the policy's batch of states: a tensor [B, obs_dim] of the
    actor parameters' dtype and device (a clear error here, not one from inside torch.func or a matmul); and
    ``policy`` one of natpg's policy networks."""
    if not (callable(getattr(policy, "actor_parameters", None)) and hasattr(getattr(policy, "head", None), "fisher_mv")):
        raise TypeError(f"the curvature functions take one of natpg.policies' networks (GaussianMLP, CategoricalMLP, "
                        f"MultiCategoricalMLP, BernoulliMLP, or an agent's agent.policy), whose output distribution's "
                        f"exact Fisher (policy.head.fisher_mv) and actor_parameters() they read; got "
                        f"{type(policy).__name__}")
    param = next(iter(policy.actor_parameters()), None)
    if not isinstance(obs, torch.Tensor):
        raise TypeError(f"observations must be a torch.Tensor [B, obs_dim], got {type(obs).__name__}: "
                        f"torch.as_tensor(obs, dtype={getattr(param, 'dtype', torch.float32)}) first")
    if obs.dim() != 2:
        raise ValueError(f"observations must be a batch [B, obs_dim], got shape {tuple(obs.shape)} (one state: "
                         f"obs.unsqueeze(0); images flattened, as natpg keeps every observation)")
    if param is not None and (obs.dtype, obs.device) != (param.dtype, param.device):
        raise ValueError(f"observations are {obs.dtype} on {obs.device}, the policy's parameters {param.dtype} on "
                         f"{param.device}: move one to the other (policy.double() for float64 maths checks)")
    return obs


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
    result are flat vectors in ``actor_parameters()`` order. The Fisher is the one at the parameters of
    this call (a copy is taken): later in-place changes of the policy do not affect ``mv``.

    Construction: one forward pass η = f(θ) and one backward pass u ↦ Jᵀu kept as a graph (with u a
    leaf, ``create_graph``). Each product then costs two backward passes and no forward pass: Jv is the
    derivative of the linear map u ↦ (Jᵀu)·v with respect to u (the "double-backward" R-operator), and
    Jᵀ(F_out Jv) reuses the forward graph. This is 1.4–2.3× cheaper per product than forward-mode jvp
    (which recomputes the primal every call) followed by vjp (measured, docs/curvature.md).
    A plain MLP policy takes ``_mlp_fisher_vector_product``: the same numbers, bit for bit, cheaper.
    """
    obs = checked_states(policy, obs)
    plain = _plain_mlp(policy)
    if plain is not None:
        return _mlp_fisher_vector_product(policy, obs, damping, *plain)
    return _autograd_fisher_vector_product(policy, obs, damping)


def _autograd_fisher_vector_product(policy: nn.Module, obs: torch.Tensor, damping: float) -> MatVec:
    """``fisher_vector_product`` by autograd, for any policy."""
    f_obs, theta = functional_policy(policy)
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in theta)
    with torch.enable_grad():
        eta_graph = f_obs(leaves, obs)
        u = torch.zeros_like(eta_graph, requires_grad=True)
        JTu = torch.autograd.grad(eta_graph, leaves, grad_outputs=u, create_graph=True, allow_unused=True)
    JTu_flat = flatten([torch.zeros_like(t) if g is None else g for g, t in zip(JTu, leaves)])
    eta = eta_graph.detach()
    batch = eta.shape[0]
    head = policy.head

    def mv(v: torch.Tensor) -> torch.Tensor:
        if not JTu_flat.requires_grad:  # η does not depend on θ at all
            return damping * v
        (Jv,) = torch.autograd.grad(JTu_flat, u, grad_outputs=v, retain_graph=True, allow_unused=True)
        Jv = torch.zeros_like(eta) if Jv is None else Jv
        w = head.fisher_mv(eta, Jv) / batch
        grads = torch.autograd.grad(eta_graph, leaves, grad_outputs=w, retain_graph=True, allow_unused=True)
        Fv = flatten([torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)])
        return Fv + damping * v if damping else Fv

    return mv


def _plain_mlp(policy: nn.Module):
    """(layers, tail) when η = [MLP(obs), tail] with a plain MLP (``linear_activation_pairs``) and ``tail`` a
    state-independent parameter or None: ``GaussianMLP`` (tail log σ) and an unmasked ``DiscreteMLP``. None
    for any other policy, or one with forward hooks (they could change what the network computes)."""
    if type(policy) is GaussianMLP:
        net, tail = policy.mean_net, policy.log_std
    elif type(policy) is DiscreteMLP and not policy.mask_dim:
        net, tail = policy.logits_net, None
    else:
        return None
    pairs = linear_activation_pairs(net)
    if pairs is None or hooked(policy):
        return None
    return pairs, tail


def _mlp_fisher_vector_product(policy: nn.Module, obs: torch.Tensor, damping: float, pairs,
                               tail: torch.Tensor | None) -> MatVec:
    """``fisher_vector_product`` of a plain MLP policy (``_plain_mlp``) with Jv and Jᵀw written out: the kernels
    autograd's double backward and backward run, in their order and with their operand layouts, so every
    product is bit-identical to the autograd construction (test), without its graphs. Cheaper: the fit is one
    forward pass, and each product skips autograd's transposed, strided intermediates (HalfCheetah's
    2048 × 64 × 64 actor, one thread: ≈ 1.95 ms per product against 2.3 ms, 1.4 ms per fit against 2.7 ms)."""
    with torch.no_grad():
        outs = mlp_outputs(pairs, obs)
        out = outs.pop()  # the network's output; outs: its input and the hidden layers' outputs
        eta = out if tail is None else torch.cat([out, tail.detach().expand_as(out)], dim=-1)
        weights = [linear.weight.detach().clone() for linear, _ in pairs]
    batch, width = out.shape
    shapes = [s for linear, _ in pairs for s in (linear.weight.shape, linear.bias.shape)]
    shapes += [] if tail is None else [tail.shape]
    sizes = [s.numel() for s in shapes]
    head, last = policy.head, len(pairs) - 1

    @torch.no_grad()
    def mv(v: torch.Tensor) -> torch.Tensor:
        parts = [p.view(s) for p, s in zip(v.split(sizes), shapes)]
        # Jv, layer by layer: R(h_i) = V_i a_{i-1} + v_b_i + W_i R(a_{i-1}), R(a_i) = σ'(h_i) R(h_i).
        R = None
        for i, (_, activation) in enumerate(pairs):
            V, vb = parts[2 * i], parts[2 * i + 1]
            # autograd forms V a transposed where the output's gradient was a column slice of η's (a tail follows)
            Va = torch.mm(V, outs[i].t()).t() if i == last and tail is not None else torch.mm(outs[i], V.t())
            Rh = vb.expand(batch, -1) + Va
            if R is not None:
                Rh.add_(torch.mm(R, weights[i].t()))
            R = Rh if activation is None else BACKWARD_FROM_OUTPUT[type(activation)](Rh, outs[i + 1])
        if tail is not None:  # "+ 0": autograd sums the two zero-padded slices, which turns −0 into +0
            R = torch.cat([R, parts[-1].expand(batch, -1)], dim=-1).add_(0.0)
        w = head.fisher_mv(eta, R) / batch
        grads = mlp_backward(pairs, weights, [*outs, out], w if tail is None else w[:, :width])
        if tail is not None:
            grads.append(w[:, width:].sum(0))
        Fv = flatten(grads)
        return Fv + damping * v if damping else Fv

    return mv


def kl_hessian_vector_product(policy: nn.Module, obs: torch.Tensor) -> MatVec:
    """``v ↦ ∇²_θ mean_b KL(π_old ‖ π_θ) v`` at θ = θ_old, by double backward (test oracle)."""
    obs = checked_states(policy, obs)
    params = list(policy.actor_parameters())
    with torch.no_grad():
        old = policy.head.dist(policy(obs))  # detached: KL(old‖new) has zero value and gradient here

    def mv(v: torch.Tensor) -> torch.Tensor:
        kl = kl_divergence(old, policy.dist(obs)).mean()
        grads = torch.autograd.grad(kl, params, create_graph=True)
        gv = torch.dot(flatten(grads), v)
        return flatten(torch.autograd.grad(gv, params)).detach()

    return mv
