"""Step rules: given a direction d ≈ F⁻¹g, choose how far to move the actor parameters.

Every rule checks what it is about to apply: a non-finite direction, a non-finite or non-positive
curvature dᵀFd, or a non-finite step leaves the parameters untouched and is logged as
``step/skipped = 1`` with the reason in ``step/fault``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .fisher.curvature import Curvature
from .params import add_flat, get_flat, set_flat

Evaluate = Callable[[], tuple[float, float]]  # () ↦ (surrogate, mean KL(old‖new)) at the current parameters


def skipped(reason: str) -> dict[str, float]:
    return {"step/skipped": 1.0, "step/fault": reason, "step/size": 0.0}


def quadratic_kl_step(d: torch.Tensor, curvature: Curvature, max_kl: float) -> tuple[float, float, str | None]:
    """α = √(2δ / dᵀFd), so that the quadratic model of the KL, ½ α² dᵀFd, equals δ.

    Returns (α, dᵀFd, fault) with fault None when the step is safe to take.
    """
    if not bool(torch.isfinite(d).all()):
        return 0.0, float("nan"), "non-finite direction"
    dFd = float(torch.dot(d, curvature.mv(d)))
    if not math.isfinite(dFd) or dFd <= 0.0:
        return 0.0, dFd, f"dᵀFd = {dFd!r} is not positive and finite"
    return math.sqrt(2.0 * max_kl / dFd), dFd, None


class FixedStep:
    """The seed's update θ ← θ + α·F⁻¹∇J with a fixed learning rate α."""

    def __init__(self, alpha: float):
        self.alpha = alpha

    def apply(self, params, d: torch.Tensor, g: torch.Tensor, curvature: Curvature, evaluate: Evaluate) -> dict:
        if not bool(torch.isfinite(d).all()):
            return skipped("non-finite direction")
        add_flat(params, d, self.alpha)
        return {"step/size": self.alpha, "step/skipped": 0.0}


class KLStep:
    """The constrained reading: max gᵀΔ s.t. ½ ΔᵀFΔ ≤ δ, i.e. Δ = √(2δ / dᵀFd)·d (no line search)."""

    def __init__(self, max_kl: float):
        self.max_kl = max_kl

    def apply(self, params, d: torch.Tensor, g: torch.Tensor, curvature: Curvature, evaluate: Evaluate) -> dict:
        alpha, dFd, fault = quadratic_kl_step(d, curvature, self.max_kl)
        if fault:
            return skipped(fault)
        add_flat(params, d, alpha)
        return {"step/size": alpha, "step/dFd": dFd, "step/skipped": 0.0}


class LineSearch:
    """TRPO: the KL step, then backtracking Δ ← shrink·Δ until KL(old‖new) ≤ δ and the surrogate improves.

    If every try fails the parameters are restored bit-exactly from a saved copy.
    """

    def __init__(self, max_kl: float, shrink: float = 0.8, tries: int = 10):
        self.max_kl, self.shrink, self.tries = max_kl, shrink, tries

    def apply(self, params, d: torch.Tensor, g: torch.Tensor, curvature: Curvature, evaluate: Evaluate) -> dict:
        alpha, dFd, fault = quadratic_kl_step(d, curvature, self.max_kl)
        if fault:
            return skipped(fault)
        theta_old = get_flat(params)
        surr_before, _ = evaluate()
        expected = alpha * float(torch.dot(g, d))  # first-order improvement of the full step
        for k in range(self.tries):
            frac = self.shrink**k
            set_flat(params, theta_old + (frac * alpha) * d)
            surr, kl = evaluate()
            if math.isfinite(surr) and math.isfinite(kl) and kl <= self.max_kl and surr > surr_before:
                return {"step/size": frac * alpha, "step/dFd": dFd, "step/backtracks": float(k),
                        "step/accepted": 1.0, "step/skipped": 0.0, "step/kl": kl,
                        "step/expected_improve": frac * expected, "step/actual_improve": surr - surr_before}
        set_flat(params, theta_old)
        return {"step/size": 0.0, "step/dFd": dFd, "step/backtracks": float(self.tries), "step/accepted": 0.0,
                "step/skipped": 0.0, "step/kl": 0.0, "step/expected_improve": expected, "step/actual_improve": 0.0}
