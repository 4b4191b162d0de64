"""Step rules: given a direction d ≈ F⁻¹g, choose how far to move the actor parameters.

Every rule checks what it is about to apply: a non-finite direction (and, for the rules that measure it,
a non-finite or non-positive curvature dᵀFd of a direction of some size) leaves the parameters untouched and is
logged as ``step/skipped = 1`` with the reason in ``step/fault``; a zero direction, or one too small to square, is
no step. A step that leaves non-finite parameters or a non-finite KL behind is undone by the update's guard
(``guards.guarded_actor_update``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .fisher.curvature import Curvature
from .params import add_flat, finite, get_flat, set_flat

Evaluate = Callable[[], tuple[float, float]]  # () ↦ (surrogate, mean KL(old‖new)) at the current parameters


def skipped(reason: str) -> dict[str, float]:
    return {"step/skipped": 1.0, "step/fault": reason, "step/size": 0.0}


def quadratic_kl_step(d: torch.Tensor, curvature: Curvature, max_kl: float) -> tuple[float, float, str | None]:
    """α = √(2δ / dᵀFd), so that the quadratic model of the KL, ½ α² dᵀFd, equals δ.

    Returns (α, dᵀFd, fault) with fault None when the step is safe to take. A zero direction (the batch's
    gradient vanished, as for a policy that has become deterministic: nothing in it to learn) is no step, not a
    fault: (0, 0, None); so is a direction too small for its square to be a float (a nearly deterministic
    policy's subnormal gradient), whose dᵀFd underflows to 0. A dᵀFd of 0 for a direction of some size is a fault.
    """
    if not finite(d):
        return 0.0, float("nan"), "non-finite direction"
    if not bool(d.any()):
        return 0.0, 0.0, None
    dFd = float(torch.dot(d, curvature.mv(d)))
    if dFd == 0.0 and float(torch.dot(d, d)) == 0.0:
        return 0.0, 0.0, None
    if not math.isfinite(dFd) or dFd <= 0.0:
        return 0.0, dFd, f"dᵀFd = {dFd!r} is not positive and finite"
    return math.sqrt(2.0 * max_kl / dFd), dFd, None


class FixedStep:
    """The seed's update θ ← θ + α·F⁻¹∇J with a fixed learning rate α."""

    def __init__(self, alpha: float):
        self.alpha = alpha

    def apply(self, params, d: torch.Tensor, g: torch.Tensor, curvature: Curvature, evaluate: Evaluate) -> dict:
        if not finite(d):
            return skipped("non-finite direction")
        add_flat(params, d, self.alpha)
        return {"step/size": self.alpha, "step/skipped": 0.0}


class KLStep:
    """The constrained reading: max gᵀΔ s.t. ½ ΔᵀFΔ ≤ δ, i.e. Δ = √(2δ / dᵀFd)·d (no line search). F is the
    curvature's own, damped matrix (``curvature.mv``): with damping the undamped quadratic KL falls short of δ (by
    the factor dᵀF₀d / dᵀ(F₀ + λI)d where the damping is λI; K-FAC's factored damping adds more)."""

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

    Try k = 0, 1, …, tries − 1 sets θ = θ_old + shrinkᵏ·α·d (from the saved θ_old, never by repeated
    subtraction) and measures the exact mean KL and the surrogate there. The first try with both
    conditions is kept; if every try fails the parameters are restored bit-exactly from the saved copy.
    Logged: the first-order improvement predicted for the accepted length (``step/expected_improve``
    = shrinkᵏ·α·gᵀd), the measured one, their ratio, the KL of the full step and of the kept one.
    """

    def __init__(self, max_kl: float, shrink: float = 0.8, tries: int = 10):
        if not 0.0 < shrink < 1.0 or tries < 1:
            raise ValueError(f"need 0 < shrink < 1 and tries ≥ 1, got shrink={shrink!r}, tries={tries!r}")
        self.max_kl, self.shrink, self.tries = max_kl, shrink, tries

    def apply(self, params, d: torch.Tensor, g: torch.Tensor, curvature: Curvature, evaluate: Evaluate) -> dict:
        alpha, dFd, fault = quadratic_kl_step(d, curvature, self.max_kl)
        if fault:
            return skipped(fault)

        def searched(size: float, backtracks: int, accepted: bool, kl: float, kl_full: float, expected: float,
                     actual: float, ratio: float) -> dict:
            return {"step/size": size, "step/dFd": dFd, "step/backtracks": float(backtracks),
                    "step/accepted": float(accepted), "step/skipped": 0.0, "step/kl": kl, "step/kl_full_step": kl_full,
                    "step/expected_improve": expected, "step/actual_improve": actual, "step/improve_ratio": ratio}

        if alpha == 0.0:  # no step to search along: not a failed search
            return searched(0.0, 0, False, 0.0, 0.0, 0.0, 0.0, float("nan"))
        theta_old = get_flat(params)
        surr_before, _ = evaluate()
        expected = alpha * float(torch.dot(g, d))  # first-order improvement gᵀΔ of the full step
        kl_full = float("nan")
        for k in range(self.tries):
            frac = self.shrink**k
            set_flat(params, theta_old + (frac * alpha) * d)
            surr, kl = evaluate()
            if k == 0:
                kl_full = kl
            if math.isfinite(surr) and math.isfinite(kl) and kl <= self.max_kl and surr > surr_before:
                actual = surr - surr_before
                return searched(frac * alpha, k, True, kl, kl_full, frac * expected, actual,
                                actual / (frac * expected) if expected else float("nan"))
        set_flat(params, theta_old)
        return searched(0.0, self.tries, False, 0.0, kl_full, expected, 0.0, 0.0)


class AdamStep:
    """A first-order baseline: Adam (Kingma & Ba 2015) ascending along d, one step per update.

    With the identity curvature (d = g) this is vanilla policy gradient with Adam, as in Spinning Up's
    VPG. Moments persist across updates; the direction's norm is first clipped to ``max_norm`` (0: off).
    """

    def __init__(self, alpha: float, max_norm: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.alpha, self.max_norm, self.betas, self.eps = alpha, max_norm, betas, eps
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.t = 0

    def apply(self, params, d: torch.Tensor, g: torch.Tensor, curvature: Curvature, evaluate: Evaluate) -> dict:
        if not finite(d):
            return skipped("non-finite direction")
        norm = float(d.norm())
        if self.max_norm and norm > self.max_norm:
            d = d * (self.max_norm / norm)
        b1, b2 = self.betas
        if self.m is None or self.m.shape != d.shape:
            self.m, self.v, self.t = torch.zeros_like(d), torch.zeros_like(d), 0
        elif self.m.device != d.device:  # loaded from a checkpoint (on the CPU) for a GPU learner
            self.m, self.v = self.m.to(d.device), self.v.to(d.device)
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * d
        self.v = b2 * self.v + (1 - b2) * d * d
        m_hat, v_hat = self.m / (1 - b1**self.t), self.v / (1 - b2**self.t)
        add_flat(params, m_hat / (v_hat.sqrt() + self.eps), self.alpha)
        return {"step/size": self.alpha, "step/skipped": 0.0, "step/direction_norm": norm}

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v, "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.m, self.v, self.t = state["m"], state["v"], int(state["t"])


class KFACClip:
    """ACKTR (Wu et al. 2017): a momentum direction v and the trust-region length η = min(η_max, √(2δ / vᵀF̂v)).

    v ← μ·v + (1 − μ)·d, with v = d on the first update (and whenever gᵀv ≤ 0, i.e. the remembered
    direction no longer ascends this batch's surrogate); then θ ← θ + η·v.

    KL convention: δ is the quadratic model of KL(old‖new), ½ (ηv)ᵀF̂(ηv) ≤ δ, with equality whenever η <
    η_max — the same δ as the 'kl' and 'linesearch' rules, measured with the damped matrix F̂ that
    ``curvature.solve`` inverts (``curvature.mv``). The ACKTR paper writes the same formula; the
    baselines code clips η²·vᵀF̂v ≤ kfac_clip without the ½, so its kfac_clip = 0.001 is δ = 0.0005 here.
    Momentum is applied before the clip (baselines applies MomentumOptimizer(lr·(1 − μ), μ) after it), so
    the step that moves the parameters is the one that meets the KL budget; (1 − μ) keeps the
    steady-state length of v that of d, as in baselines.
    """

    def __init__(self, max_kl: float, eta_max: float, momentum: float = 0.9):
        self.max_kl, self.eta_max, self.momentum = max_kl, eta_max, momentum
        self.v: torch.Tensor | None = None

    def apply(self, params, d: torch.Tensor, g: torch.Tensor, curvature: Curvature, evaluate: Evaluate) -> dict:
        if not finite(d):
            return skipped("non-finite direction")
        fresh = self.v is None or self.v.shape != d.shape or self.momentum == 0.0
        if not fresh and self.v.device != d.device:  # loaded from a checkpoint (on the CPU) for a GPU learner
            self.v = self.v.to(d.device)
        v = d if fresh else self.momentum * self.v + (1.0 - self.momentum) * d
        reset = not fresh and float(torch.dot(g, v)) <= 0.0  # the remembered direction descends this batch
        if reset:
            v = d
        eta_kl, vFv, fault = quadratic_kl_step(v, curvature, self.max_kl)
        if fault:
            return skipped(fault)
        eta = min(self.eta_max, eta_kl)
        self.v = v.detach().clone()
        add_flat(params, v, eta)
        return {"step/size": eta, "step/dFd": vFv, "step/kl_bound_active": float(0.0 < eta_kl < self.eta_max),
                "step/quadratic_kl": 0.5 * eta * eta * vFv, "step/momentum_reset": float(reset),
                "step/skipped": 0.0}

    def state_dict(self) -> dict:
        return {"v": self.v}

    def load_state_dict(self, state: dict) -> None:
        self.v = state["v"]
