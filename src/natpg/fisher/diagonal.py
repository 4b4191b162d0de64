"""The diagonal of the Fisher: F ≈ diag(F_11, …, F_PP), inverted entry by entry."""

from __future__ import annotations

import torch
from torch import nn

from .fvp import checked_states
from .kfac import Estimator, capture, checked_estimator, find_layers, make_cotangents, rest_block


class Diagonal:
    """F ≈ diag(F) + λI; ``solve(g) = g / (diag F + λ)``, ``mv(v) = (diag F + λ) v``.

    ``diag F_pp = (1/B) Σ_b E_a[(∂_p log π(a|s_b))²]``. For the weight/bias of a Linear layer the per-sample
    score is ``g āᵀ`` (g = ∂ log π/∂ layer output, ā = input with a 1 appended), so the diagonal is
    ``(1/B) Σ_b (g_b ∘ g_b)(ā_b ∘ ā_b)ᵀ`` — one forward and one backward pass with the hooks K-FAC uses;
    for a Conv2d the per-sample score sums over positions first. ``estimator`` says what g is:

    * ``"exact"`` (default) — actions integrated out: g runs over the R columns of a square root of the
      output Fisher (``F_out = L Lᵀ``), giving the diagonal of the true Fisher exactly (R vectorised
      backward vectors, R = dimension of η).
    * ``"sampled"`` — one action a ~ π(·|s) per state: an unbiased estimate, one backward vector.
    * ``"empirical"`` — the taken actions ``act``: the diagonal of the empirical Fisher (see
      ``natpg.fisher.empirical`` for how that differs).

    Other parameters (the Gaussian log-std) use the diagonal of their exact block (empirical block for
    ``"empirical"``). With ``damping=0`` an entry whose diagonal is exactly zero (a parameter the
    policy does not depend on) is left at zero in ``solve`` (a pseudo-inverse) instead of dividing by 0.
    Cost: about one gradient evaluation (R backward vectors for ``"exact"``); solve is O(P).
    """

    def __init__(self, damping: float = 0.01, estimator: Estimator = "exact",
                 generator: torch.Generator | None = None, chunk: int = 1024):
        self.damping, self.estimator = damping, checked_estimator(estimator)
        self.generator, self.chunk = generator, chunk
        self.diag: torch.Tensor | None = None  # [P], undamped diagonal of F in actor_parameters() order
        self.stats: dict[str, float] = {}

    def fit(self, policy: nn.Module, obs: torch.Tensor, act: torch.Tensor | None = None) -> None:
        obs = checked_states(policy, obs)
        s = find_layers(policy)
        cap = capture(policy, obs, s.layers, make_cotangents(self.estimator, policy, act, self.generator))
        B = obs.shape[0]
        diag = torch.zeros(s.num_params, dtype=cap.eta.dtype, device=cap.eta.device)
        for slot, a, g in zip(s.layers, cap.a, cap.g):
            if a.shape[1] == 1:  # one position: per-sample score g āᵀ, so its square is g² (ā²)ᵀ; sum g² over s first
                D = g[:, :, 0].square().sum(0).T @ a[:, 0].square()
            else:  # positions share the weight: sum the per-sample score over them before squaring
                D = torch.zeros(slot.out_dim, slot.cols, dtype=a.dtype, device=a.device)
                for i in range(0, B, self.chunk):
                    D += torch.einsum("sbto,bti->sboi", g[:, i : i + self.chunk], a[i : i + self.chunk]
                                      ).square().sum((0, 1))
            slot.scatter(diag, D / B)
        if s.rest:
            block = rest_block(policy, obs, s.rest, cap.eta, act if self.estimator == "empirical" else None)
            diag[s.rest_idx] = block.diagonal()
        self.diag = diag
        self.stats = {"fisher/diag_min": float(diag.min()), "fisher/diag_max": float(diag.max()),
                      "fisher/diag_mean": float(diag.mean())}

    def _damped(self) -> torch.Tensor:
        if self.diag is None:
            raise RuntimeError("call fit(policy, obs) before solve/mv")
        return self.diag + self.damping

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        return self._damped() * v

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        d = self._damped()
        return torch.where(d > 0, g / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(g))
