"""Policies: an MLP torso that outputs distribution parameters, and a head that turns them into a
``torch.distributions.Distribution`` and knows that distribution's analytic Fisher.

The split matters for the natural gradient: the Fisher of the actor is ``E_s[Jᵀ F_out J]`` where
``J = ∂η/∂θ`` is the Jacobian of the network output ``η`` and ``F_out`` the Fisher of the output
distribution with respect to ``η`` (known in closed form for every head below). ``natpg.fisher``
builds Fisher-vector products and the dense Fisher from exactly these two pieces.

Action bounds: the Gaussian policy samples unbounded actions; the agent clips them to the Box bounds
only when sending them to the environment, and log-probabilities, the Fisher and the KL are those of
the unclipped Gaussian (the usual convention of Stable-Baselines3 and CleanRL).
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, Normal

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}


def mlp(in_dim: int, out_dim: int, hidden: Sequence[int], activation: str, out_gain: float) -> nn.Sequential:
    """Fully connected network with orthogonal init (gain √2 on hidden layers, ``out_gain`` on the last)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    dims = [in_dim, *hidden]
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [_orthogonal(nn.Linear(a, b), math.sqrt(2)), ACTIVATIONS[activation]()]
    layers.append(_orthogonal(nn.Linear(dims[-1], out_dim), out_gain))
    return nn.Sequential(*layers)


def _orthogonal(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class DistributionHead(Protocol):
    """Maps network outputs η [B, K] to a distribution and gives the Fisher of that distribution in η."""

    def dist(self, eta: torch.Tensor) -> Distribution: ...

    def fisher_mv(self, eta: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Per-sample F_out(η_b) u_b; eta, u: [B, K] → [B, K]."""
        ...

    def fisher(self, eta: torch.Tensor) -> torch.Tensor:
        """Per-sample dense F_out(η_b): [B, K] → [B, K, K]."""
        ...


class DiagGaussianHead:
    """η = [mean (d), log_std (d)]; F_out = diag(1/σ², …, 2, …) — the Fisher of N(μ, diag σ²) in (μ, log σ)."""

    def __init__(self, act_dim: int):
        self.act_dim = act_dim

    def split(self, eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return eta[..., : self.act_dim], eta[..., self.act_dim :]

    def dist(self, eta: torch.Tensor) -> Distribution:
        mean, log_std = self.split(eta)
        return Independent(Normal(mean, log_std.exp(), validate_args=False), 1, validate_args=False)

    def fisher_diag(self, eta: torch.Tensor) -> torch.Tensor:
        _, log_std = self.split(eta)
        return torch.cat([torch.exp(-2.0 * log_std), torch.full_like(log_std, 2.0)], dim=-1)

    def fisher_mv(self, eta: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.fisher_diag(eta) * u

    def fisher(self, eta: torch.Tensor) -> torch.Tensor:
        return torch.diag_embed(self.fisher_diag(eta))


class CategoricalHead:
    """η = logits; F_out = diag(p) − p pᵀ (rank K−1: logits are defined up to a constant)."""

    def dist(self, eta: torch.Tensor) -> Distribution:
        return Categorical(logits=eta, validate_args=False)

    def fisher_mv(self, eta: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(eta, dim=-1)
        return p * u - p * (p * u).sum(-1, keepdim=True)

    def fisher(self, eta: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(eta, dim=-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


class GaussianMLP(nn.Module):
    """Diagonal Gaussian policy: mean from an MLP, a state-independent log-std that belongs to the actor.

    ``forward(obs)`` returns η = [mean, log_std] of shape [B, 2·act_dim].
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (64, 64),
                 activation: str = "tanh", log_std_init: float = 0.0):
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.mean_net = mlp(obs_dim, act_dim, hidden, activation, out_gain=0.01)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(log_std_init)))
        self.head = DiagGaussianHead(act_dim)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        mean = self.mean_net(obs)
        return torch.cat([mean, self.log_std.expand_as(mean)], dim=-1)

    def dist(self, obs: torch.Tensor) -> Distribution:
        return self.head.dist(self(obs))

    def actor_parameters(self) -> list[nn.Parameter]:
        return [*self.mean_net.parameters(), self.log_std]

    def mode(self, eta: torch.Tensor) -> torch.Tensor:
        return eta[..., : self.act_dim]

    def sample(self, eta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, log_std = self.head.split(eta)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + log_std.exp() * noise


class CategoricalMLP(nn.Module):
    """Categorical policy over ``n_actions``: logits from an MLP. ``forward(obs)`` returns logits [B, n]."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: Sequence[int] = (64, 64), activation: str = "tanh"):
        super().__init__()
        self.obs_dim, self.n_actions = obs_dim, n_actions
        self.logits_net = mlp(obs_dim, n_actions, hidden, activation, out_gain=0.01)
        self.head = CategoricalHead()

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.logits_net(obs)

    def dist(self, obs: torch.Tensor) -> Distribution:
        return self.head.dist(self(obs))

    def actor_parameters(self) -> list[nn.Parameter]:
        return list(self.logits_net.parameters())

    def mode(self, eta: torch.Tensor) -> torch.Tensor:
        return eta.argmax(-1)

    def sample(self, eta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        p = torch.softmax(eta, dim=-1)
        return torch.multinomial(p, 1, generator=generator).squeeze(-1)


def make_policy(observation_space, action_space, hidden: Sequence[int], activation: str,
                log_std_init: float) -> nn.Module:
    """Policy for a flat Box observation space and a Box or Discrete action space."""
    import gymnasium as gym

    obs_dim = int(np.prod(observation_space.shape))
    if isinstance(action_space, gym.spaces.Box):
        return GaussianMLP(obs_dim, int(np.prod(action_space.shape)), hidden, activation, log_std_init)
    if isinstance(action_space, gym.spaces.Discrete):
        return CategoricalMLP(obs_dim, int(action_space.n), hidden, activation)
    raise ValueError(f"unsupported action space {action_space}; supported: Box (Gaussian), Discrete (categorical)")
