"""The exact dense P×P Fisher of a policy's actor parameters (small policies and tests)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import jacrev, vmap

from ..params import num_params
from .fvp import checked_states, functional_policy

DEFAULT_MAX_BYTES = 2 * 1024**3


def check_dense_size(P: int, dtype: torch.dtype, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    nbytes = P * P * torch.empty((), dtype=dtype).element_size()
    if nbytes > max_bytes:
        raise ValueError(f"a dense {P}x{P} Fisher needs {nbytes / 2**30:.2f} GiB, more than max_bytes="
                         f"{max_bytes / 2**30:.2f} GiB; use fisher='cg', 'kfac' or 'diagonal' for this policy")


def output_jacobian(policy: nn.Module, obs: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobian J_b = ∂η_b/∂θ of the distribution parameters; obs [B, obs_dim] → [B, K, P]."""
    f, theta = functional_policy(policy)

    def eta_single(th: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        return f(th, x.unsqueeze(0)).squeeze(0)

    parts = vmap(jacrev(eta_single), in_dims=(None, 0))(theta, obs)  # tuple of [B, K, *shape]
    return torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in parts], dim=-1)


def dense_fisher(policy: nn.Module, obs: torch.Tensor, chunk: int = 256,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """F = (1/B) Σ_b J_bᵀ F_out(η_b) J_b in ``actor_parameters()`` order; obs [B, obs_dim] → [P, P].

    Actions are integrated out analytically through ``policy.head.fisher``. Refuses, with a
    ValueError, a matrix larger than ``max_bytes``.
    """
    obs = checked_states(policy, obs)
    params = list(policy.actor_parameters())
    P = num_params(params)
    check_dense_size(P, params[0].dtype, max_bytes)
    F = torch.zeros(P, P, dtype=params[0].dtype, device=params[0].device)
    for start in range(0, obs.shape[0], chunk):
        o = obs[start : start + chunk]
        J = output_jacobian(policy, o)
        with torch.no_grad():
            Fout = policy.head.fisher(policy(o))  # [b, K, K]
        F += torch.einsum("bkp,bkl,blq->pq", J, Fout, J)
    return F / obs.shape[0]
