"""The curvature interface: every way of applying F⁻¹ behind the same three methods.

``fit(policy, obs, act)`` looks at one batch (``act`` = the actions taken, used only by estimators
that need them, e.g. the empirical Fisher); ``solve(g)`` returns ≈ (F + λI)⁻¹ g; ``mv(v)`` returns the
product with the (damped) matrix that ``solve`` inverts, so that step rules measure dᵀFd with the
same matrix the direction came from — except where the solver works on a subsample of the batch and
``step_length="batch"``: then ``mv`` is the exact Fisher of the whole batch (damped as the solver's), so that the KL step's δ
bounds the quadratic KL over every state of the batch rather than over the subsample, whose dᵀFd is as
noisy as the direction. ``stats`` holds what the last fit/solve wants logged.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..config import CG_PRECONDITIONERS, STEP_LENGTHS
from .cg import conjugate_gradient
from .dense import dense_fisher
from .diagonal import Diagonal
from .fvp import fisher_vector_product
from .kfac import KFAC


class Curvature(Protocol):
    damping: float
    stats: dict[str, float]

    def fit(self, policy: nn.Module, obs: torch.Tensor, act: torch.Tensor | None = None) -> None: ...

    def solve(self, g: torch.Tensor) -> torch.Tensor: ...

    def mv(self, v: torch.Tensor) -> torch.Tensor: ...


def fixed_subsample(fraction: float, generator: torch.Generator | None, *rows: torch.Tensor
                    ) -> tuple[torch.Tensor, ...]:
    """The same random ``fraction`` of the rows of each tensor (observations, actions), drawn once and kept for
    the whole update; the tensors themselves when the fraction is 1."""
    if fraction >= 1.0:
        return rows
    n = max(1, int(round(fraction * rows[0].shape[0])))
    idx = torch.randperm(rows[0].shape[0], generator=generator)[:n].to(rows[0].device)
    return tuple(t[idx] for t in rows)


def psd_solve(A: torch.Tensor, b: torch.Tensor, cholesky: bool, formed_in: torch.dtype | None = None
              ) -> torch.Tensor:
    """A⁻¹b for a symmetric PSD A [n, n], b [n]: by Cholesky where ``cholesky`` (A damped, so safely positive
    definite) and it succeeds; otherwise the pseudo-inverse (the minimum-norm solution), so that the result stays
    in the range of A — a Cholesky of a numerically singular matrix "succeeds" and returns huge components along
    its null space, which change the policy at second order."""
    if cholesky:
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            return torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
    evals, evecs = torch.linalg.eigh(A)
    # Eigenvalues below the rounding of the precision A was computed in (``formed_in``, e.g. a float32 product
    # factorised in float64) are noise: inverting them is what the pseudo-inverse is there to avoid.
    cutoff = evals.abs().max() * evals.shape[0] * torch.finfo(formed_in or evals.dtype).eps
    inv = torch.where(evals > cutoff, 1.0 / evals, torch.zeros_like(evals))
    return evecs @ (inv * (evecs.T @ b))


def checked_step_length(step_length: str) -> str:
    if step_length not in STEP_LENGTHS:
        raise ValueError(f"step_length must be one of {STEP_LENGTHS}, got {step_length!r}")
    return step_length


def step_length_products(policy: nn.Module, obs: torch.Tensor, solver_obs: torch.Tensor, step_length: str,
                         owner):
    """The whole batch's Fisher-vector product for the step rule's dᵀFd, damped as ``owner`` is (``damped``), or
    None when the solver's own matrix serves (no subsample, or ``step_length="subsample"``). Built now, at the
    parameters of the fit."""
    if solver_obs is obs or step_length == "subsample":
        return None
    return damped(fisher_vector_product(policy, obs), owner)


def damped(fvp, owner):
    """``v ↦ fvp(v) + owner.damping·v``, reading the damping at each product: a damping changed between fit and
    solve (a Levenberg–Marquardt adaptation, say) acts at once, as K-FAC's and the diagonal's do."""

    def mv(v: torch.Tensor) -> torch.Tensor:
        Fv = fvp(v)
        return Fv + owner.damping * v if owner.damping else Fv

    return mv


class CG:
    """Conjugate gradient on exact Fisher-vector products (Gauss–Newton form), from x0 = 0 or a warm start.

    ``preconditioner`` = ``"kfac"`` or ``"diagonal"`` runs preconditioned CG with that approximation of the same
    damped Fisher (``KFAC(damping, ema_decay=kfac_ema_decay)`` or ``Diagonal(damping)``, fitted on the solver's
    states): the exact Fisher is still the matrix solved, and the approximation only sets which directions the
    few iterations reach first. Plain CG reaches the large-eigenvalue directions first, which for a Gaussian
    policy with a small σ are the output layer's (its block scales as 1/σ²): on Ant-v5 with σ e^−2, ten plain
    iterations put 61 % of ‖d‖² in the output layer's weights, where the converged solution puts 0.6 %, and ten
    K-FAC-preconditioned ones reach a cosine of 0.90 with it against plain CG's 0.40 (docs/curvature.md)."""

    def __init__(self, damping: float = 0.1, iters: int = 10, tol: float = 1e-10, subsample: float = 1.0,
                 warm_start: bool = False, generator: torch.Generator | None = None, step_length: str = "batch",
                 preconditioner: str | None = None, kfac_ema_decay: float = 0.95):
        self.damping, self.iters, self.tol = damping, iters, tol
        self.subsample, self.warm_start, self.generator = subsample, warm_start, generator
        self.step_length = checked_step_length(step_length)
        self.preconditioner = _preconditioner(preconditioner, damping, kfac_ema_decay, generator)
        self._fvp = self._step_fvp = None
        self._last: torch.Tensor | None = None
        self.stats: dict[str, float] = {}

    def __getstate__(self) -> dict:
        """Without the last batch's Fisher products (closures over the policy and that batch, built again by the
        next fit): an agent pickles after it has learned, as the other curvatures' agents do."""
        return {**self.__dict__, "_fvp": None, "_step_fvp": None}

    def fit(self, policy: nn.Module, obs: torch.Tensor, act: torch.Tensor | None = None) -> None:
        solver_obs, = fixed_subsample(self.subsample, self.generator, obs)
        self._fvp = damped(fisher_vector_product(policy, solver_obs), self)
        self._step_fvp = step_length_products(policy, obs, solver_obs, self.step_length, self) or self._fvp
        if self.preconditioner is not None:
            self.preconditioner.damping = self.damping
            self.preconditioner.fit(policy, solver_obs)  # its estimator samples its own actions (solver_obs' rows)

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        return self._step_fvp(v)

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        x0 = None
        if self.warm_start and self._last is not None:
            x0 = self._last.to(device=g.device, dtype=g.dtype)  # a loaded one comes on the CPU
        if self.preconditioner is not None:
            self.preconditioner.damping = self.damping
        pre = None if self.preconditioner is None else self.preconditioner.solve
        x, info = conjugate_gradient(self._fvp, g, x0=x0, max_iters=self.iters, tol=self.tol, precondition=pre)
        self._last = x.detach()
        self.stats = {"fisher/cg_iters": info.iterations, "fisher/cg_residual": info.residual_norm}
        if self.preconditioner is not None:
            self.stats |= {f"fisher/cg_preconditioner/{k.removeprefix('fisher/')}": v
                           for k, v in self.preconditioner.stats.items()}
        return x

    def state_dict(self) -> dict:
        """What a resumed run needs: a K-FAC preconditioner's moving averages, and with ``warm_start`` the last
        solution, which the next solve starts from."""
        state = {}
        if hasattr(self.preconditioner, "state_dict"):
            state["preconditioner"] = self.preconditioner.state_dict()
        if self.warm_start and self._last is not None:
            state["last"] = self._last
        return state

    def load_state_dict(self, state: dict) -> None:
        if "preconditioner" in state and hasattr(self.preconditioner, "load_state_dict"):
            self.preconditioner.load_state_dict(state["preconditioner"])
        self._last = state.get("last")


def _preconditioner(name: str | None, damping: float, kfac_ema_decay: float, generator: torch.Generator | None):
    if name is None:
        return None
    if name == "kfac":
        return KFAC(damping=damping, ema_decay=kfac_ema_decay, generator=generator)
    if name == "diagonal":
        return Diagonal(damping=damping, generator=generator)
    raise ValueError(f"preconditioner must be one of {list(CG_PRECONDITIONERS)}, got {name!r}")


class Dense:
    """The exact Fisher formed as a P×P matrix and solved directly (small policies, tests, reference)."""

    def __init__(self, damping: float = 0.1, subsample: float = 1.0, generator: torch.Generator | None = None,
                 step_length: str = "batch"):
        self.damping, self.subsample, self.generator = damping, subsample, generator
        self.step_length = checked_step_length(step_length)
        self.matrix: torch.Tensor | None = None  # F + λI
        self._damping_in_matrix = damping
        self._step_fvp = None
        self.stats: dict[str, float] = {}

    def fit(self, policy: nn.Module, obs: torch.Tensor, act: torch.Tensor | None = None) -> None:
        solver_obs, = fixed_subsample(self.subsample, self.generator, obs)
        F = dense_fisher(policy, solver_obs)
        self.matrix = F + self.damping * torch.eye(F.shape[0], dtype=F.dtype, device=F.device)
        self._damping_in_matrix = self.damping
        self._step_fvp = step_length_products(policy, obs, solver_obs, self.step_length, self)

    def _damped_matrix(self) -> torch.Tensor:
        """F + λI for the damping as it is now (one changed since fit is moved onto the diagonal in place)."""
        if self.damping != self._damping_in_matrix:
            self.matrix.diagonal().add_(self.damping - self._damping_in_matrix)
            self._damping_in_matrix = self.damping
        return self.matrix

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        return self._damped_matrix() @ v if self._step_fvp is None else self._step_fvp(v)

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        return psd_solve(self._damped_matrix(), g, cholesky=self.damping > 0)


class Identity:
    """F ≈ I: the standard (vanilla) gradient, the seed's "standard gradient" column."""

    damping = 0.0

    def __init__(self) -> None:
        self.stats: dict[str, float] = {}

    def fit(self, policy: nn.Module, obs: torch.Tensor, act: torch.Tensor | None = None) -> None:
        pass

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        return v

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        return g
