"""Natural actor-critic (Peters & Schaal 2008): the compatible critic's weights are the natural gradient.

The compatible critic (Sutton et al. 2000; Kakade 2001) is

    Q_w(s, a) = ψ(s, a)ᵀ w + V(s),        ψ(s, a) = ∇_θ log π_θ(a|s)   (the compatible features),

with V(s) the value network, trained as usual, and w fitted by least squares of ψᵀw onto the
advantage estimates Â (GAE from V) — the least-squares-on-advantages form of NAC:

    w = argmin_w  Σ_b ω_b (Â_b − ψ_bᵀ w)² + λ ‖w‖²  =  (ΨᵀΩΨ + λI)⁻¹ ΨᵀΩÂ,      Ψ [N, P], Ω = diag(ω).

Under the on-policy weighting ω = d^π(s) π(a|s) with the exact advantages, ΨᵀΩΨ = F and ΨᵀΩA^π = ∇J,
so w* = F⁻¹∇J (Kakade's theorem; ``tests/test_nac.py`` checks it to 1e-10 on a tabular MDP). On a batch
of N samples (ω_b = 1/N), ΨᵀΨ/N = F_emp is the empirical Fisher and ΨᵀÂ/N = g is exactly the gradient of
the surrogate at θ_old, so

    w = (ΨᵀΨ + λN I)⁻¹ ΨᵀÂ = (F_emp + λI)⁻¹ g:

the compatible critic's solution *is* the empirical-Fisher natural gradient on the same samples
(``natpg.fisher.Empirical``; this module reuses its per-sample scores, computed with torch.func.vmap).
The solve here is the same system in its dual (sample-space) form w = Ψᵀ(ΨΨᵀ + λN I)⁻¹Â when N < P,
which needs no g and never divides by λ (``Empirical.solve`` reaches the same w from g by Woodbury,
(g − Ψᵀ(ΨΨᵀ + λN I)⁻¹Ψg)/λ, which cancels O(1) terms to leave an O(λ) one); the tests check that the
two agree.

The step length is measured with the *exact* Fisher (Gauss–Newton products, ``fisher.fvp``), not with
F_emp: the KL budget is about the policy, KL(old‖new) ≈ ½ ΔᵀFΔ, and F_emp along a w fitted to the
same samples is a biased measure of it (``examples/empirical_vs_true_fisher.py``; the ratio is logged
as ``nac/emp_to_true_curvature``). Maths and code line by line: docs/nac.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .algorithms import Batch, step_along, surrogate
from .fisher import curvature
from .fisher.empirical import per_sample_scores
from .fisher.fvp import fisher_vector_product


def compatible_features(policy: nn.Module, obs: torch.Tensor, act: torch.Tensor, chunk: int | None = 256
                        ) -> torch.Tensor:
    """Ψ: row b is ψ_b = ∇_θ log π(a_b|s_b), in ``actor_parameters()`` order; obs [N, D], act [N, …] → [N, P]."""
    return per_sample_scores(policy, obs, act, chunk)


def ridge_solve(M: torch.Tensor, b: torch.Tensor, ridge: float, formed_in: torch.dtype | None = None) -> torch.Tensor:
    """(M + ridge·I)⁻¹ b for a symmetric PSD M [n, n], b [n] → [n].

    Cholesky when ridge > 0; the pseudo-inverse (the minimum-norm solution) when ridge = 0 or the damped
    matrix is numerically indefinite, so that nothing is added along M's null space; ``formed_in``: the dtype
    M was computed in, whose rounding sets which eigenvalues count as zero.
    """
    A = M + ridge * torch.eye(M.shape[0], dtype=M.dtype, device=M.device) if ridge else M
    return curvature.psd_solve(A, b, cholesky=ridge > 0, formed_in=formed_in)


def compatible_least_squares(psi: torch.Tensor, adv: torch.Tensor, ridge: float = 0.0,
                             weights: torch.Tensor | None = None, dual: bool | None = None) -> torch.Tensor:
    """The compatible critic's weights w = (ΨᵀΩΨ + λI)⁻¹ ΨᵀΩÂ (minimum-norm when λ = 0).

    Shapes: psi Ψ [N, P], adv Â [N], weights ω [N] (non-negative; default 1/N, so ΨᵀΩΨ = F_emp and
    ΨᵀΩÂ = g) → w [P]. With Ψ̃ = Ω^½Ψ and Ã = Ω^½Â the problem is unweighted, and is solved

    * ``dual`` (default when N < P): w = Ψ̃ᵀ (Ψ̃Ψ̃ᵀ + λI)⁻¹ Ã — an N×N system (push-through identity);
    * primal (default when N ≥ P): (Ψ̃ᵀΨ̃ + λI) w = Ψ̃ᵀÃ — a P×P system.

    The Gram matrix is formed in psi's dtype (the O(N²P) product; float32 for a float32 policy) and
    factorised in float64 (it squares Ψ's condition number); w is returned in psi's dtype.
    """
    N, P = psi.shape
    omega = torch.full((N,), 1.0 / N, dtype=psi.dtype, device=psi.device) if weights is None else weights
    if bool((omega < 0).any()):
        raise ValueError("least-squares weights must be non-negative")
    root = omega.to(psi.dtype).sqrt()
    psi_t, adv_t = root[:, None] * psi, root * adv.to(psi.dtype)
    if N < P if dual is None else dual:
        y = ridge_solve((psi_t @ psi_t.T).double(), adv_t.double(), ridge, psi.dtype)
        return psi_t.T @ y.to(psi.dtype)
    return ridge_solve((psi_t.T @ psi_t).double(), (psi_t.T @ adv_t).double(), ridge, psi.dtype).to(psi.dtype)


class NaturalActorCritic:
    """The NAC actor update: fit the compatible critic, then move θ along its weights w with a step rule.

    One call: Ψ = ψ(s_b, a_b) for the batch; w = compatible_least_squares(Ψ, Â, ridge); g = ΨᵀÂ/N (the
    surrogate's gradient, for the step rule and logging); the step rule from ``steps`` ('kl': α = √(2δ /
    wᵀFw); 'fixed': α as given, Peters & Schaal's θ ← θ + αw; 'linesearch' also works) with wᵀFw from
    exact Fisher products. The value network V is fitted afterwards by ``train.iteration`` as for NPG.
    Logged: ``nac/critic_r2`` (fraction of the advantages' variance the compatible critic explains),
    ``nac/emp_to_true_curvature`` (wᵀF_emp w / wᵀFw), ``nac/w_norm``, ``grad/norm``, and the step's stats.
    """

    def __init__(self, ridge: float, step_rule, chunk: int | None = 256):
        if not ridge >= 0:
            raise ValueError(f"ridge must be ≥ 0, got {ridge!r}")
        self.ridge, self.step_rule, self.chunk = ridge, step_rule, chunk

    def update(self, policy: nn.Module, batch: Batch) -> dict[str, Any]:
        params = policy.actor_parameters()
        psi = compatible_features(policy, batch.obs, batch.act, self.chunk)  # Ψ [N, P]
        adv = batch.adv.to(psi.dtype)
        N = psi.shape[0]
        w = compatible_least_squares(psi, adv, self.ridge)  # d = w ≈ F⁻¹∇J
        g = psi.T @ adv / N
        metric = _ExactFisher(fisher_vector_product(policy, batch.obs))  # built at θ_old, before the step
        psi_w = psi @ w
        wFw, wFw_emp = float(torch.dot(w, metric.mv(w))), float(psi_w.square().mean())
        with torch.no_grad():
            surr_before = float(surrogate(policy, batch))
        stats = step_along(policy, batch, params, w, g, metric, self.step_rule, surr_before)
        centred = adv - adv.mean()
        return {**stats, "nac/w_norm": float(w.norm()),
                "nac/critic_r2": 1.0 - float((adv - psi_w).square().sum() / centred.square().sum().clamp_min(1e-30)),
                "nac/emp_to_true_curvature": wFw_emp / wFw if wFw > 0 else float("nan"),
                "fisher/emp_samples": float(N)}


class _ExactFisher:
    """v ↦ F v with the exact (undamped) Fisher: the metric a step rule measures wᵀFw with."""

    damping = 0.0

    def __init__(self, fvp):
        self.mv, self.stats = fvp, {}
