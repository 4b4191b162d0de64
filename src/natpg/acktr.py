"""ACKTR's critic (Wu et al. 2017, §3.2): a Gauss-Newton K-FAC natural step on the value network.

The actor half of ACKTR needs nothing new: ``NaturalGradientUpdate(fisher.KFAC, steps.KFACClip)``.
The critic is given the output model p(R | s) = N(R; V(s), σ²), whose Fisher is the Gauss-Newton
matrix of the squared error divided by σ²:

    F_V = GN / σ²,   GN = mean_b J_bᵀ J_b,   J_b = ∂V(s_b)/∂θ,   KL(N(V, σ²) ‖ N(V', σ²)) = (V − V')² / (2σ²).

The paper takes σ = 1 (plain Gauss-Newton, absolute value units). Here σ² is the output model's
maximum-likelihood noise at the start of each ``fit``, mean_b (V(s_b) − R_b)², so the critic's KL
budget δ_c reads "each step changes V by at most √(2δ_c) residual RMS" whatever the scale of the
returns, and a critic far from its targets may move far. K-FAC approximates GN per Linear layer
(s = W̄ā, W̄ = [W | b], ā = [a; 1]):

    GN_W̄ ≈ A ⊗ G,   A = mean ā āᵀ,   G = mean (∂V/∂s)(∂V/∂s)ᵀ,

which is exact for the output layer (∂V/∂s = 1) and so for a linear critic. The damped matrix is
blockdiag((A + π√λ I) ⊗ (G + √λ/π I)) / σ² — the factored Tikhonov damping of ``fisher.KFAC``, λ in
the units of the σ = 1 Gauss-Newton matrix — inverted factor by factor (Cholesky, float64).

The step is ``steps.KFACClip``, the same rule as the actor's. With g = −∇ ½ mean (V − R)²/σ², the
direction d = F̂⁻¹g = (damped A⊗G)⁻¹ ∇(−½ mean (V − R)²) is a damped Gauss-Newton step (η = 1 fits the
linearised targets), and η = min(η_max, √(2δ_c / vᵀF̂v)).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .critics import ValueCritic, mean_squared_error, minibatch_indices
from .fisher.kfac import Damped, damp_and_invert
from .policies import BACKWARD_FROM_OUTPUT, hooked, linear_activation_pairs, mlp_outputs
from .steps import KFACClip


def linear_layers(net: nn.Module) -> list[nn.Linear]:
    """The Linear layers of the value network, in ``net.parameters()`` order ([W, b] per layer)."""
    layers = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if sum(p.numel() for m in layers for p in m.parameters()) != sum(p.numel() for p in net.parameters()):
        raise ValueError("the K-FAC critic needs a network whose parameters all belong to nn.Linear layers")
    return layers


def _values_and_output_gradients(net: nn.Module, layers: list[nn.Linear], obs: torch.Tensor):
    """(V [B], each Linear layer's input [B, in], ∂(Σ_b V_b)/∂s at each layer's output s [B, out]).

    A plain MLP (``policies.linear_activation_pairs``, no hooks) by its modules' forward kernels and the backward
    kernels autograd runs for it, in its order (as ``policies.mlp_backward``): bit-identical to the autograd
    construction below it, without registering hooks and building a graph on every minibatch (test)."""
    pairs = linear_activation_pairs(net)
    if pairs is not None and not hooked(net):
        with torch.no_grad():
            outs = mlp_outputs(pairs, obs)
            V = outs[-1].squeeze(-1)
            # ∂ΣV/∂V as autograd forms it (the scalar 1 expanded), through the squeeze: [B, 1]
            g = torch.ones((), dtype=V.dtype, device=V.device).expand(V.shape).unsqueeze(-1)
            grads = [g] * len(pairs)
            for i in range(len(pairs) - 1, 0, -1):
                g = g.mm(pairs[i][0].weight)  # ∂ΣV/∂a_{i-1}: the input gradient of addmm
                activation = pairs[i - 1][1]
                g = BACKWARD_FROM_OUTPUT[type(activation)](g, outs[i]) if activation is not None else g
                grads[i - 1] = g
        return V, outs[:-1], grads
    inputs, outputs = {}, {}

    def hook(i):
        def fn(module, args, out):
            inputs[i], outputs[i] = args[0].detach(), out
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        with torch.enable_grad():
            V = net(obs).squeeze(-1)
            dV_ds = torch.autograd.grad(V.sum(), [outputs[i] for i in range(len(layers))])
    finally:
        for h in handles:
            h.remove()
    return V.detach(), [inputs[i] for i in range(len(layers))], list(dV_ds)


class GaussNewtonKFAC:
    """K-FAC of the critic's Gauss-Newton matrix; the Curvature interface on flat vectors in ``net.parameters()``
    order, plus ``fit(net, obs, returns, sigma)`` that also returns the log-likelihood gradient g [P]."""

    def __init__(self, damping: float = 0.01):
        self.damping = damping
        self.sigma2 = 1.0
        self.factors: list[tuple[torch.Tensor, torch.Tensor]] = []  # undamped (A [in+1, in+1], G [out, out]), float64
        self._damped: list[Damped] = []
        self._shapes: list[tuple[int, int]] = []
        self.fallbacks = 0
        self.stats: dict[str, float] = {}

    def fit(self, net: nn.Module, obs: torch.Tensor, returns: torch.Tensor, sigma: float) -> torch.Tensor:
        """Factors A_l, G_l on this batch and g = −∇_θ ½ mean_b (V(s_b) − R_b)² / σ² (flat [P]), one forward."""
        layers = linear_layers(net)
        # Per-sample ∂V_b/∂s_b at every layer: the samples do not interact, so ∂(Σ_b V_b)/∂s = rows.
        V, inputs, dV_ds = _values_and_output_gradients(net, layers, obs)
        B = obs.shape[0]
        self.sigma2 = sigma * sigma
        r = (V.detach() - returns) / self.sigma2  # ∂(½(V − R)²/σ²)/∂V
        sq = self.damping**0.5
        g_parts, self.factors, self._damped, self._shapes = [], [], [], []
        for i, m in enumerate(layers):
            a = torch.cat([inputs[i], inputs[i].new_ones(B, 1)], dim=1)  # ā [B, in+1]
            s = dV_ds[i]  # [B, out]
            W_grad = -(s * r.unsqueeze(1)).T @ a / B  # [out, in+1] = [∇W | ∇b] of the log-likelihood
            g_parts += [W_grad[:, :-1].reshape(-1), W_grad[:, -1]]
            A, G = (a.T @ a / B).double(), (s.T @ s / B).double()
            damped, fallbacks = damp_and_invert(A, G, sq)  # as the actor's K-FAC
            self.fallbacks += fallbacks
            self.factors.append((A, G))
            self._damped.append(damped)
            self._shapes.append((m.out_features, m.in_features))
        self.stats = {"critic/kfac_fallbacks": float(self.fallbacks), "critic/sigma": sigma}
        return torch.cat(g_parts).detach()

    def _apply(self, v: torch.Tensor, inverse: bool) -> torch.Tensor:
        """(damped K-FAC / σ²)^(±1) · v, per layer G_d V A_d / σ² or σ² G_d⁻¹ V A_d⁻¹ (float64 inside)."""
        out, i = [], 0
        for (out_dim, in_dim), d in zip(self._shapes, self._damped):
            nW = out_dim * in_dim
            V = torch.cat([v[i : i + nW].view(out_dim, in_dim), v[i + nW : i + nW + out_dim].view(-1, 1)], 1).double()
            i += nW + out_dim
            M = (d.G_inv @ V @ d.A_inv) * self.sigma2 if inverse else (d.G @ V @ d.A) / self.sigma2  # (A⊗G) vec V
            M = M.to(v.dtype)
            out += [M[:, :-1].reshape(-1), M[:, -1]]
        return torch.cat(out)

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        return self._apply(g, inverse=True)

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        return self._apply(v, inverse=False)


class KFACRegression:
    """ACKTR's fit of the value network (``critics.ValueCritic``'s fitter): ``epochs`` shuffled passes of
    ``minibatch``-sized K-FAC steps (factors refitted on each minibatch); each step is
    ``KFACClip(max_kl, eta_max, momentum)`` on the Gauss-Newton K-FAC matrix. Its state is that step's momentum.
    """

    def __init__(self, net: nn.Module, epochs: int = 10, minibatch: int = 256, *, max_kl: float = 0.01,
                 eta_max: float = 1.0, damping: float = 0.01, momentum: float = 0.0):
        self.epochs, self.minibatch = epochs, minibatch
        self.curvature = GaussNewtonKFAC(damping)
        self.step = KFACClip(max_kl, eta_max, momentum)

    def fit(self, critic: ValueCritic, obs: torch.Tensor, returns: torch.Tensor,
            generator: torch.Generator | None = None) -> dict[str, float]:
        params = list(critic.net.parameters())
        before = mean_squared_error(critic, obs, returns)
        # σ² of the output model N(R; V(s), σ²): its maximum-likelihood value at the start of the fit.
        sigma = max(before, 1e-12) ** 0.5
        sizes, kls, skipped = [], [], 0
        for idx in minibatch_indices(obs.shape[0], self.epochs, self.minibatch, generator, obs.device):
            g = self.curvature.fit(critic.net, obs[idx], returns[idx], sigma)
            d = self.curvature.solve(g)
            step = self.step.apply(params, d, g, self.curvature, None)
            skipped += int(step["step/skipped"])
            sizes.append(step["step/size"])
            kls.append(step.get("step/quadratic_kl", 0.0))
        after = mean_squared_error(critic, obs, returns)
        n = max(len(sizes), 1)
        return {"critic/loss_before": before, "critic/loss_after": after, "critic/step_size": sum(sizes) / n,
                "critic/quadratic_kl": sum(kls) / n, "critic/skipped_steps": float(skipped), **self.curvature.stats}

    def state_dict(self) -> dict[str, Any]:
        return self.step.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step.load_state_dict(state)
