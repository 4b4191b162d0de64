"""Conjugate gradient for F x = b with F symmetric positive (semi-)definite, given only v ↦ F v."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class CGInfo:
    iterations: int
    residual_norm: float  # ‖b − F x‖ at return (tracked by the recurrence)
    converged: bool


def conjugate_gradient(mv: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       x0: torch.Tensor | None = None, max_iters: int = 10,
                       tol: float = 1e-10,
                       precondition: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, CGInfo]:
    """Solve F x = b by conjugate gradient (Hestenes–Stiefel), deterministic.

    Starts from ``x0`` (zero when None) and stops after ``max_iters`` products or once
    ‖r‖ ≤ tol·‖b‖. A non-positive curvature pᵀFp stops the iteration early and returns the iterate
    reached so far (it is still a descent-consistent direction).

    ``precondition`` (r ↦ M⁻¹r for a symmetric positive definite M ≈ F) runs preconditioned CG: the same
    iterates as plain CG on M^{-1/2} F M^{-1/2}, so a few products go as far as M's eigenvalues are close to
    F's; still stopped on the unpreconditioned ‖r‖. A preconditioner that is not positive along the residual
    (rᵀM⁻¹r ≤ 0) stops the iteration as non-positive curvature does.
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - mv(x) if x0 is not None else b.clone()
    z = r if precondition is None else precondition(r)
    p = z.clone()
    rz = torch.dot(r, z)

    def residual_norm() -> float:  # rᵀr is rz itself without a preconditioner
        return float(rz.sqrt()) if precondition is None else float(torch.linalg.vector_norm(r))

    threshold = tol * float(torch.linalg.vector_norm(b))
    res = residual_norm()
    it = 0
    for it in range(1, max_iters + 1):
        if res <= threshold or not bool(rz > 0):
            it -= 1
            break
        Fp = mv(p)
        pFp = torch.dot(p, Fp)
        if not bool(pFp > 0):
            it -= 1
            break
        alpha = rz / pFp
        x = x + alpha * p
        r = r - alpha * Fp
        z = r if precondition is None else precondition(r)
        rz_new = torch.dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
        res = residual_norm()
    return x, CGInfo(iterations=it, residual_norm=res, converged=res <= threshold)
