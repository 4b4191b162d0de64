"""Policies: an MLP torso that outputs distribution parameters, and a head that turns them into a
``torch.distributions.Distribution`` and knows that distribution's analytic Fisher.

The split matters for the natural gradient: the Fisher of the actor is ``E_s[Jᵀ F_out J]`` where
``J = ∂η/∂θ`` is the Jacobian of the network output ``η`` and ``F_out`` the Fisher of the output
distribution with respect to ``η`` (known in closed form for every head below). ``natpg.fisher``
builds Fisher-vector products and the dense Fisher from exactly these two pieces.

Action bounds: the Gaussian policy samples unbounded actions; the agent clips them to the Box bounds
only when sending them to the environment, and log-probabilities, the Fisher and the KL are those of
the unclipped Gaussian (the usual convention of Stable-Baselines3 and CleanRL). With ``squash=True``
(``action_squash="tanh"``) the environment receives ``low + (tanh(u) + 1)(high − low)/2`` instead, where
u is the Gaussian sample. The squashed action a = f(u) is a smooth bijection of u, so
log π(a|s) = log N(u; μ, σ²) − log|det ∂a/∂u|, and the Jacobian term does not depend on θ: the score, the
Fisher and the KL of the squashed Gaussian are exactly those of the Gaussian over u. natpg therefore
stores u as the action and uses the Gaussian's analytic Fisher unchanged (no atanh of a clipped a).

Heads: ``DiagGaussianHead`` (Box), ``CategoricalHead`` (Discrete, also masked: masked logits are set to
a large negative constant, so their probability is 0 and their Jacobian is 0), ``MultiCategoricalHead``
(MultiDiscrete: independent categoricals, block-diagonal Fisher) and ``BernoulliHead`` (MultiBinary:
independent Bernoullis, F_out = diag(p(1 − p))).
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.distributions import Bernoulli, Categorical, Distribution, Independent, Normal, kl_divergence
from torch.distributions.kl import register_kl

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


# The backward of each activation from its output y: the kernels autograd itself calls for them, so that
# hand-written backward passes through an MLP (the critic's fit, the actor's Fisher products) are bit-identical.
BACKWARD_FROM_OUTPUT = {nn.Tanh: torch.ops.aten.tanh_backward,
                        nn.ReLU: lambda g, y: torch.ops.aten.threshold_backward(g, y, 0)}


def hooked(module: nn.Module) -> bool:
    """Whether a forward hook sits on ``module`` or inside it: it could change what the network computes, so the
    hand-written passes over plain MLPs leave such a network to autograd."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def linear_activation_pairs(net: nn.Module) -> list[tuple[nn.Linear, nn.Module | None]] | None:
    """A plain MLP (``mlp``) as its (Linear, activation or None) layers; None for any other network (a CNN
    torso, an activation without a backward in ``BACKWARD_FROM_OUTPUT``), which autograd differentiates."""
    if not isinstance(net, nn.Sequential):
        return None
    pairs: list[tuple[nn.Linear, nn.Module | None]] = []
    for layer in net:
        if type(layer) is nn.Linear and layer.bias is not None:
            pairs.append((layer, None))
        elif type(layer) in BACKWARD_FROM_OUTPUT and pairs and pairs[-1][1] is None:
            pairs[-1] = (pairs[-1][0], layer)
        else:
            return None
    return pairs if pairs and pairs[-1][1] is None else None


def mlp_outputs(pairs: list[tuple[nn.Linear, nn.Module | None]], x: torch.Tensor) -> list[torch.Tensor]:
    """[x, a₁, …, output] of a plain MLP (``linear_activation_pairs``): its input and each layer's output, the
    ``outputs`` ``mlp_backward`` takes, by the kernels of the modules' own forward (call it under no_grad)."""
    outputs = [x]
    for linear, activation in pairs:
        h = linear.forward(outputs[-1])
        outputs.append(h if activation is None else activation.forward(h))
    return outputs


def mlp_backward(pairs: list[tuple[nn.Linear, nn.Module | None]], weights: Sequence[torch.Tensor],
                 outputs: Sequence[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    """[∂W₀, ∂b₀, ∂W₁, …] of a plain MLP (``linear_activation_pairs``) for the output gradient ``g``, by the
    kernels autograd runs for ``backward``, in its order: bit-identical to it. ``weights``: the layers' weights
    (or copies of them); ``outputs``: the network's input, then each layer's output, from the forward pass."""
    grads: list[torch.Tensor] = [g] * (2 * len(pairs))
    for i in range(len(pairs) - 1, -1, -1):
        activation = pairs[i][1]
        if activation is not None:
            g = BACKWARD_FROM_OUTPUT[type(activation)](g, outputs[i + 1])
        grads[2 * i], grads[2 * i + 1] = g.t().mm(outputs[i]), g.sum(0)  # ∂W as autograd forms it: gᵀa
        if i > 0:
            g = g.mm(weights[i])
    return grads


def rollout_forward(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``net``'s forward for the per-step calls of one rollout: the same operations, so the same numbers, at
    less per-call overhead, which dominates a forward on a few observations. Each layer of a Sequential is
    called by its ``forward``, past ``nn.Module.__call__``'s hook machinery (the rollout needs no hooks: K-FAC's
    are for the update's forward), and each Linear with its weights bound once as detached views, which spares
    every small op the autograd dispatch parameters cost (a worker's 8 × 128 HalfCheetah steps: −6 %). The
    views follow in-place updates of the parameters; a replaced parameter needs a new ``rollout_forward``.
    Anything but a Sequential is called as usual."""
    if not isinstance(net, nn.Sequential):
        return net
    calls = []
    for layer in net:
        if type(layer) is nn.Linear:
            weight, bias = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
            calls.append(lambda x, weight=weight, bias=bias: F.linear(x, weight, bias))
        else:
            calls.append(layer.forward)

    def forward(x: torch.Tensor) -> torch.Tensor:
        for call in calls:
            x = call(x)
        return x

    return forward


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


def categorical_draw(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of the softmax probabilities ``p`` [..., K]: ``torch.multinomial(p, 1, generator).squeeze(-1)``.

    On the CPU by the kernels of multinomial's one-sample path (q ~ Exp(1) from the generator, then argmax p/q):
    the same actions and the same generator state after (test), at about half its cost on the 8 × K
    probabilities of a rollout step, where multinomial's three validating reductions cost more than the draw.
    ``p`` comes from a softmax (no negative or infinite entries, rows summing to 1), so one check remains: NaN."""
    if p.device.type != "cpu" or p.dim() not in (1, 2):
        return torch.multinomial(p, 1, generator=generator).squeeze(-1)
    if not math.isfinite(float(p.sum())):  # a NaN logit (the message is multinomial's)
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    q = torch.empty_like(p).exponential_(1, generator=generator)
    return torch.div(p.detach(), q, out=q).argmax(-1)  # detached: an action is not differentiable


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

    def sample(self, eta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return categorical_draw(torch.softmax(eta, dim=-1), generator)

    def mode(self, eta: torch.Tensor) -> torch.Tensor:
        return eta.argmax(-1)


class MultiCategorical(Distribution):
    """Independent categoricals over the components of a MultiDiscrete action; logits [B, Σ n_i], actions [B, k]."""

    arg_constraints: dict = {}

    def __init__(self, logits: torch.Tensor, nvec: Sequence[int]):
        self.nvec = list(nvec)
        self.parts = [Categorical(logits=l, validate_args=False) for l in torch.split(logits, self.nvec, dim=-1)]
        super().__init__(batch_shape=logits.shape[:-1], event_shape=(len(self.nvec),), validate_args=False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return sum(d.log_prob(value[..., i]) for i, d in enumerate(self.parts))

    def entropy(self) -> torch.Tensor:
        return sum(d.entropy() for d in self.parts)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return torch.stack([d.sample(sample_shape) for d in self.parts], dim=-1)


@register_kl(MultiCategorical, MultiCategorical)
def _kl_multicategorical(p: MultiCategorical, q: MultiCategorical) -> torch.Tensor:
    return sum(kl_divergence(a, b) for a, b in zip(p.parts, q.parts))


class MultiCategoricalHead:
    """η = [logits_1, …, logits_k] (Σ n_i); F_out = blockdiag(diag(p_i) − p_i p_iᵀ): the components are
    independent, so the Fisher of their product is the direct sum of their Fisher matrices."""

    def __init__(self, nvec: Sequence[int]):
        self.nvec = [int(n) for n in nvec]
        self.parts = CategoricalHead()

    def split(self, eta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(eta, self.nvec, dim=-1)

    def dist(self, eta: torch.Tensor) -> Distribution:
        return MultiCategorical(eta, self.nvec)

    def fisher_mv(self, eta: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.parts.fisher_mv(e, v) for e, v in zip(self.split(eta), self.split(u))], dim=-1)

    def fisher(self, eta: torch.Tensor) -> torch.Tensor:
        return _batched_block_diag([self.parts.fisher(e) for e in self.split(eta)])

    def sample(self, eta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.stack([self.parts.sample(e, generator) for e in self.split(eta)], dim=-1)

    def mode(self, eta: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.parts.mode(e) for e in self.split(eta)], dim=-1)


def _batched_block_diag(blocks: list[torch.Tensor]) -> torch.Tensor:
    """[B, n_i, n_i] blocks → [B, Σn, Σn] block-diagonal."""
    n = sum(b.shape[-1] for b in blocks)
    out = blocks[0].new_zeros(*blocks[0].shape[:-2], n, n)
    i = 0
    for b in blocks:
        k = b.shape[-1]
        out[..., i : i + k, i : i + k] = b
        i += k
    return out


class BernoulliHead:
    """η = logits of n independent Bernoullis; F_out = diag(p(1 − p)), p = sigmoid(η)."""

    def dist(self, eta: torch.Tensor) -> Distribution:
        return Independent(Bernoulli(logits=eta, validate_args=False), 1, validate_args=False)

    def fisher_diag(self, eta: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(eta)
        return p * (1.0 - p)

    def fisher_mv(self, eta: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.fisher_diag(eta) * u

    def fisher(self, eta: torch.Tensor) -> torch.Tensor:
        return torch.diag_embed(self.fisher_diag(eta))

    def sample(self, eta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(eta), generator=generator)

    def mode(self, eta: torch.Tensor) -> torch.Tensor:
        return (eta > 0).to(eta.dtype)


MASKED_LOGIT = -1e9  # a masked action's logit: probability exactly 0 in float32/64, and no inf arithmetic


NATURE_CNN_MIN_SIDE = 36  # the smallest H and W the 8/4, 4/2, 3/1 convolutions leave a 1×1 output for


class NatureCNN(nn.Module):
    """The DQN torso (Mnih et al. 2015): conv 32×8×8/4, 64×4×4/2, 64×3×3/1, then a 512-unit ReLU layer.

    Takes flattened images [B, C·H·W] (natpg keeps every observation flat), reshapes them to ``shape``
    ([C, H, W], or [H, W, C] with ``channels_last``) and scales pixels by 1/255. Entries after the image (an
    action mask a critic is given) are not read.
    """

    def __init__(self, shape: Sequence[int], channels_last: bool = False, features: int = 512,
                 channels: Sequence[int] = (32, 64, 64)):
        super().__init__()
        self.shape, self.channels_last = tuple(int(n) for n in shape), channels_last
        if len(self.shape) != 3 or min(self._chw()[1:]) < NATURE_CNN_MIN_SIDE:
            raise ValueError(f"NatureCNN needs a [C, H, W] or [H, W, C] shape with H, W ≥ {NATURE_CNN_MIN_SIDE}, got "
                             f"{self.shape} (channels_last={channels_last})")
        c = self.shape[-1] if channels_last else self.shape[0]
        c1, c2, c3 = channels  # narrower than the paper's only for tests that build the dense Fisher
        self.convs = nn.Sequential(
            _orthogonal(nn.Conv2d(c, c1, 8, stride=4), math.sqrt(2)), nn.ReLU(),
            _orthogonal(nn.Conv2d(c1, c2, 4, stride=2), math.sqrt(2)), nn.ReLU(),
            _orthogonal(nn.Conv2d(c2, c3, 3, stride=1), math.sqrt(2)), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            n = self.convs(torch.zeros(1, *self._chw())).shape[-1]
        self.fc = nn.Sequential(_orthogonal(nn.Linear(n, features), math.sqrt(2)), nn.ReLU())
        self.out_features = features

    def _chw(self) -> tuple[int, int, int]:
        return (self.shape[2], self.shape[0], self.shape[1]) if self.channels_last else self.shape

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs[:, : math.prod(self.shape)].reshape(obs.shape[0], *self.shape)
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return self.fc(self.convs(x / 255.0))


def image_channels_last(shape: Sequence[int]) -> bool:
    """Whether a 3-axis image ``shape`` is [H, W, C] rather than [C, H, W]: the last axis is at most 4 and either
    smaller than the first ((84, 84, 3), (210, 160, 3), (4, 4, 1)) or the first two are equal (square, (84, 84, 4));
    otherwise channels come first ((4, 84, 84), frame-stacked Atari). Only shapes too small for the CNN stay
    ambiguous under this rule."""
    return bool(shape[2] <= 4 and (shape[2] < shape[0] or shape[0] == shape[1]))


def image_layout(shape: Sequence[int]) -> tuple[tuple[int, ...], bool] | None:
    """(shape, channels_last) when ``shape`` is an image the Nature-CNN can read ([C, H, W] or [H, W, C]), else
    None: not 3 axes, or H or W under ``NATURE_CNN_MIN_SIDE`` pixels, which a policy then reads flattened like
    any Box (e.g. MiniGrid's 7×7×3 symbols)."""
    if len(shape) != 3:
        return None
    shape = tuple(int(n) for n in shape)
    last = image_channels_last(shape)
    height, width = shape[:2] if last else shape[1:]
    if min(height, width) < NATURE_CNN_MIN_SIDE:
        return None
    return shape, last


def network(in_dim: int, out_dim: int, hidden: Sequence[int], activation: str, out_gain: float,
            image: tuple[tuple[int, ...], bool] | None = None) -> nn.Sequential:
    """An MLP on flat inputs, or Nature-CNN torso + linear output layer on images (``image_layout``)."""
    if image is None:
        return mlp(in_dim, out_dim, hidden, activation, out_gain)
    torso = NatureCNN(*image)
    return nn.Sequential(torso, _orthogonal(nn.Linear(torso.out_features, out_dim), out_gain))


class GaussianMLP(nn.Module):
    """Diagonal Gaussian policy: mean from an MLP (or a CNN on images), a state-independent log-std that
    belongs to the actor. ``squash=True``: the environment gets tanh(u) rescaled to the bounds (see above).

    ``forward(obs)`` returns η = [mean, log_std] of shape [B, 2·act_dim].
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (64, 64),
                 activation: str = "tanh", log_std_init: float = 0.0, squash: bool = False,
                 image: tuple[tuple[int, ...], bool] | None = None):
        super().__init__()
        self.obs_dim, self.act_dim, self.squash = obs_dim, act_dim, squash
        self.mean_net = network(obs_dim, act_dim, hidden, activation, 0.01, image)
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
        return self._draw(mean, log_std.exp(), generator)

    def rollout_actor(self) -> Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]:
        """``(obs, generator) ↦ sample(self(obs), generator)`` for the steps of one rollout, by a lean path
        (``rollout_forward``, σ computed once, no η built and split again): the same actions from the same
        draws, for as long as the parameters stay as they are now."""
        forward, std = rollout_forward(self.mean_net), self.log_std.detach().exp()
        return lambda obs, generator=None: self._draw(forward(obs), std, generator)

    @staticmethod
    def _draw(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + std * noise


class DiscreteMLP(nn.Module):
    """Logits from an MLP (or a CNN on images) into a discrete head: categorical, multi-categorical or
    Bernoulli. ``forward(obs)`` returns the logits η [B, K].

    With ``mask_dim = n`` the last n observation entries are an action mask (1 = allowed, appended by
    ``natpg.envs.ActionMaskObservation``): the network reads only the first ``obs_dim`` entries and the
    logits of masked actions are set to ``MASKED_LOGIT``. ``torch.where`` makes their Jacobian zero, so the
    Gauss–Newton Fisher Jᵀ(diag p − ppᵀ)J and the KL are those of the masked categorical.
    """

    def __init__(self, obs_dim: int, out_dim: int, head: DistributionHead, hidden: Sequence[int] = (64, 64),
                 activation: str = "tanh", mask_dim: int = 0, image: tuple[tuple[int, ...], bool] | None = None):
        super().__init__()
        if mask_dim and mask_dim != out_dim:
            raise ValueError(f"an action mask needs one entry per logit ({out_dim}), got {mask_dim}")
        self.obs_dim, self.out_dim, self.mask_dim = obs_dim, out_dim, mask_dim
        self.logits_net = network(obs_dim, out_dim, hidden, activation, 0.01, image)
        self.head = head

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self._logits(obs, self.logits_net)

    def rollout_actor(self) -> Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]:
        """``(obs, generator) ↦ sample(self(obs), generator)`` for the steps of one rollout, by
        ``rollout_forward``: the same actions from the same draws, while the parameters stay as they are now."""
        forward = rollout_forward(self.logits_net)
        return lambda obs, generator=None: self.head.sample(self._logits(obs, forward), generator)

    def _logits(self, obs: torch.Tensor, net) -> torch.Tensor:
        if not self.mask_dim:
            return net(obs)
        logits = net(obs[..., : self.obs_dim])
        allowed = obs[..., self.obs_dim :] > 0.5
        return torch.where(allowed, logits, torch.full_like(logits, MASKED_LOGIT))

    def dist(self, obs: torch.Tensor) -> Distribution:
        return self.head.dist(self(obs))

    def actor_parameters(self) -> list[nn.Parameter]:
        return list(self.logits_net.parameters())

    def mode(self, eta: torch.Tensor) -> torch.Tensor:
        return self.head.mode(eta)

    def sample(self, eta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.head.sample(eta, generator)


def CategoricalMLP(obs_dim: int, n_actions: int, hidden: Sequence[int] = (64, 64), activation: str = "tanh",
                   mask: bool = False, image: tuple[tuple[int, ...], bool] | None = None) -> DiscreteMLP:
    """Categorical policy over ``n_actions`` (Discrete); ``mask=True`` reads an action mask after the features."""
    return DiscreteMLP(obs_dim, n_actions, CategoricalHead(), hidden, activation, n_actions if mask else 0, image)


def MultiCategoricalMLP(obs_dim: int, nvec: Sequence[int], hidden: Sequence[int] = (64, 64),
                        activation: str = "tanh", image: tuple[tuple[int, ...], bool] | None = None) -> DiscreteMLP:
    """Independent categoricals, one per MultiDiscrete component."""
    return DiscreteMLP(obs_dim, int(sum(nvec)), MultiCategoricalHead(nvec), hidden, activation, 0, image)


def BernoulliMLP(obs_dim: int, n: int, hidden: Sequence[int] = (64, 64), activation: str = "tanh",
                 image: tuple[tuple[int, ...], bool] | None = None) -> DiscreteMLP:
    """Independent Bernoullis, one per MultiBinary entry."""
    return DiscreteMLP(obs_dim, n, BernoulliHead(), hidden, activation, 0, image)


def input_layout(observation_space, action_space, masked: bool = False):
    """(features, mask_dim, image) of the flat vector a policy reads for ``observation_space``: the flattened
    observation (one-hot for discrete parts) of ``features`` entries, then ``mask_dim`` action-mask entries;
    ``image`` is the CNN layout for uint8 images (``image_layout``), else None."""
    from .envs import is_image

    features = int(gym.spaces.flatdim(observation_space))
    mask_dim = int(action_space.n) if masked else 0
    image = image_layout(observation_space.shape) if is_image(observation_space) else None
    return features, mask_dim, image


def make_policy(observation_space, action_space, hidden: Sequence[int], activation: str,
                log_std_init: float, action_squash: str = "clip", masked: bool = False) -> nn.Module:
    """The policy for any supported pair of spaces (``natpg.envs.SUPPORTED``); observations as ``input_layout``."""
    obs_dim, _, image = input_layout(observation_space, action_space, masked)
    if masked:
        from .envs import check_maskable

        check_maskable(action_space)
    if isinstance(action_space, gym.spaces.Box):
        squash = action_squash == "tanh"
        if squash and not _squashable(action_space):
            raise ValueError(f"action_squash='tanh' needs finite action bounds whose width, high - low, is "
                             f"finite in the space's float dtype (the rescaled actions are computed in it), got "
                             f"{action_space}")
        return GaussianMLP(obs_dim, int(np.prod(action_space.shape)), hidden, activation, log_std_init, squash, image)
    if isinstance(action_space, gym.spaces.Discrete):
        return CategoricalMLP(obs_dim, int(action_space.n), hidden, activation, masked, image)
    if isinstance(action_space, gym.spaces.MultiDiscrete):
        return MultiCategoricalMLP(obs_dim, [int(n) for n in action_space.nvec.reshape(-1)], hidden, activation, image)
    if isinstance(action_space, gym.spaces.MultiBinary):
        return BernoulliMLP(obs_dim, int(np.prod(action_space.shape)), hidden, activation, image)
    from .envs import SUPPORTED

    raise ValueError(f"unsupported action space {action_space}; supported {SUPPORTED}")


def _squashable(space: gym.spaces.Box) -> bool:
    """Finite bounds whose width ``env_action`` can compute: in the dtype of its arithmetic (the policy's float32
    actions with a float space's bounds, float64 for an integer space's), ±3.4e38 (float32's largest, a common way
    to write "unbounded") overflows."""
    dtype = np.float64 if space.dtype.kind in "ui" else np.result_type(space.dtype, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        width = np.asarray(space.high, dtype) - np.asarray(space.low, dtype)
    return bool(np.isfinite(width).all())


def env_action(act: np.ndarray, action_space, squash: bool = False) -> np.ndarray:
    """What the environment receives for the policy's action(s) ``act`` [..., *]: Box → clipped to the bounds
    (or tanh-rescaled with ``squash``; rounded for an integer dtype), MultiDiscrete and MultiBinary → reshaped to the space in its dtype,
    Discrete → as is. The policy's actions are flat; the reshape restores the space's shape."""
    if isinstance(action_space, gym.spaces.Discrete):
        return act
    act = act.reshape(*act.shape[:-1], *action_space.shape)
    if isinstance(action_space, gym.spaces.Box):
        low, high = action_space.low, action_space.high
        integer = action_space.dtype.kind in "ui"
        if integer or squash:  # high - low in an integer dtype would wrap (int8's -100..100 is 200); tanh in float64:
            low, high = low.astype(np.float64), high.astype(np.float64)  # correctly rounded to float32 as torch's is
        if squash:  # clipped too: a saturated tanh can land an ULP past a bound (0.30000000000000004 for 0.3)
            act = low + (np.tanh(act.astype(np.float64)) + 1.0) * 0.5 * (high - low)
        act = act.clip(low, high)
        if integer:  # to the nearest value, not truncated towards 0
            act = np.rint(act).clip(*integer_range(action_space.dtype))
    return act.astype(action_space.dtype)


def integer_range(dtype: np.dtype) -> tuple[float, float]:
    """The floats an integer ``dtype`` holds at both ends: int64's largest, 2**63 - 1, is no float (it rounds up to
    2**63, which the cast would wrap to -2**63), so the top is the float below it."""
    info = np.iinfo(dtype)
    top = float(info.max)
    return float(info.min), top if top <= info.max else float(np.nextafter(top, 0.0))
