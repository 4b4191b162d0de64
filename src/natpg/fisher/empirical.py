"""The empirical Fisher: outer products of the scores of the actions actually taken."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import grad, vmap

from ..params import num_params
from .cg import conjugate_gradient
from .curvature import fixed_subsample
from .dense import DEFAULT_MAX_BYTES
from .fvp import checked_states, functional_policy


def per_sample_scores(policy: nn.Module, obs: torch.Tensor, act: torch.Tensor, chunk: int | None = 256
                      ) -> torch.Tensor:
    """s_b = ∇_θ log π(a_b|s_b) for every sample, in ``actor_parameters()`` order: obs [N, obs_dim], act [N, …] → [N, P]."""
    obs = checked_states(policy, obs)
    f, theta = functional_policy(policy)
    head = policy.head

    def logp(th: tuple[torch.Tensor, ...], o: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return head.dist(f(th, o.unsqueeze(0))).log_prob(a.unsqueeze(0)).sum()

    parts = vmap(grad(logp), in_dims=(None, 0, 0), chunk_size=chunk)(theta, obs, act)
    return torch.cat([p.reshape(obs.shape[0], -1) for p in parts], dim=1).detach()


def check_score_size(N: int, P: int, dtype: torch.dtype, max_bytes: int = DEFAULT_MAX_BYTES,
                     how_to_lower: str = "lower subsample or use another fisher", gram: int | None = None) -> None:
    """Refuse, before any is formed, a score matrix S [N, P] in ``dtype`` and a float64 Gram matrix [gram, gram]
    that together need more than ``max_bytes``; ``gram`` defaults to the empirical Fisher's own (N×N for its
    Woodbury solve when N < P, none for its conjugate gradient otherwise)."""
    gram = (N if N < P else 0) if gram is None else gram
    nbytes = N * P * torch.empty((), dtype=dtype).element_size() + gram * gram * 8
    if nbytes > max_bytes:
        also = f" and its {gram}x{gram} Gram matrix" if gram else ""
        raise ValueError(f"the empirical Fisher's {N}x{P} score matrix{also} need{'' if gram else 's'} "
                         f"{nbytes / 2**30:.2f} GiB, more than max_bytes={max_bytes / 2**30:.2f} GiB; {how_to_lower}")


class Empirical:
    """F_emp = (1/N) Σ_b s_b s_bᵀ with s_b = ∇_θ log π(a_b|s_b) for the TAKEN actions a_b; solves (F_emp + λI) x = g.

    How it differs from the true Fisher F = E_s E_{a~π}[s sᵀ]: the inner expectation over the policy's own
    actions is replaced by the one action in the data, so F_emp is the (uncentred) second moment of the
    data's score vectors rather than the curvature of the policy's distribution. When the actions were drawn
    from the current π itself — natpg's use: each update fits it on the batch π just collected, before the
    step — a taken action is one sample of π, as the sampled estimator's fresh draw is, so E[F_emp] = F with
    the same variance as the one-sample Monte-Carlo Fisher (more than the exact Fisher, which integrates the
    actions out). Two differences remain: the same actions enter g and F_emp, so the solve's noise is
    correlated with the gradient's; and with N < P samples F_emp has rank ≤ N, so λ sets the step along the
    other P − N directions. Off the policy's distribution (a second step on the same batch, off-policy or
    replayed data) it is biased and dominated by the large scores of actions π finds unlikely: that is the
    empirical Fisher of Kunstner, Balles & Hennig (2019, "Limitations of the empirical Fisher approximation
    for natural gradient descent"), whose labels come from the data, not the model, and which can fail to be
    a natural gradient at all.

    Solve: with N < P samples, the Woodbury identity turns the P×P solve into an N×N one,
    ``(λI + SᵀS/N)⁻¹ g = (g − Sᵀ (SSᵀ + NλI)⁻¹ S g)/λ`` for the score matrix S [N, P] (Cholesky of the
    Gram matrix in float64, formed once per fit; λ = 0 uses the pseudo-inverse); with N ≥ P, conjugate
    gradient (``cg_iters``, ``cg_tol``, from zero) on the matrix-free ``v ↦ Sᵀ(Sv)/N + λv``.
    Cost per fit: N per-sample gradients (``torch.func.vmap(grad)``) and, for N < P, the N×N Gram matrix;
    memory N·P for S and, for N < P, N² for the Gram matrix (refused above ``max_bytes``: lower ``subsample``, or,
    in an agent, the batch, which it refuses when it is built).
    """

    def __init__(self, damping: float = 0.01, cg_iters: int = 10, cg_tol: float = 1e-10, subsample: float = 1.0,
                 chunk: int | None = 256, max_bytes: int = DEFAULT_MAX_BYTES,
                 generator: torch.Generator | None = None):
        self.damping, self.cg_iters, self.cg_tol = damping, cg_iters, cg_tol
        self.subsample, self.chunk, self.max_bytes, self.generator = subsample, chunk, max_bytes, generator
        self.scores: torch.Tensor | None = None  # S [N, P]
        self._gram: torch.Tensor | None = None  # SSᵀ [N, N] in float64, only when N < P (Woodbury)
        self._factor_cache: tuple[float, tuple[str, torch.Tensor]] | None = None
        self.stats: dict[str, float] = {}

    def fit(self, policy: nn.Module, obs: torch.Tensor, act: torch.Tensor | None = None) -> None:
        if act is None:
            raise ValueError("the empirical Fisher needs the taken actions: fit(policy, obs, act)")
        obs = checked_states(policy, obs)
        obs, act = fixed_subsample(self.subsample, self.generator, obs, act)
        N, P = obs.shape[0], num_params(list(policy.actor_parameters()))
        check_score_size(N, P, obs.dtype, self.max_bytes)
        S = per_sample_scores(policy, obs, act, self.chunk)
        woodbury = N < P
        self.scores, self._gram, self._factor_cache = S, (S @ S.T).double() if woodbury else None, None
        self.stats = {"fisher/emp_samples": float(N), "fisher/emp_woodbury": float(woodbury)}

    def _factor(self) -> tuple[str, torch.Tensor]:
        """Factorisation of the N×N system for the current damping (cached): Cholesky of SSᵀ + NλI, or,
        for λ = 0 (or a numerically indefinite matrix), the pseudo-inverse (SSᵀ)⁺."""
        if self._factor_cache is not None and self._factor_cache[0] == self.damping:
            return self._factor_cache[1]
        N = self._gram.shape[0]
        if self.damping > 0:
            M = self._gram + N * self.damping * torch.eye(N, dtype=self._gram.dtype, device=self._gram.device)
            L, info = torch.linalg.cholesky_ex(M)
            out = ("chol", L) if int(info) == 0 else ("pinv_damped", torch.linalg.pinv(M, hermitian=True))
        else:
            out = ("pinv", torch.linalg.pinv(self._gram, hermitian=True))
        self._factor_cache = (self.damping, out)
        return out

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        """(F_emp + λI) v = Sᵀ(S v)/N + λ v."""
        S = self._need()
        return S.T @ (S @ v) / S.shape[0] + self.damping * v

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        """≈ (F_emp + λI)⁻¹ g [P] → [P]: Woodbury when N < P, CG otherwise."""
        S = self._need()
        N = S.shape[0]
        if self._gram is None:
            x, info = conjugate_gradient(self.mv, g, max_iters=self.cg_iters, tol=self.cg_tol)
            self.stats.update({"fisher/cg_iters": float(info.iterations), "fisher/cg_residual": info.residual_norm})
            return x
        kind, M = self._factor()
        Sg = (S @ g).double().unsqueeze(-1)
        if kind == "chol":  # (λI + SᵀS/N)⁻¹ g = (g − Sᵀ (SSᵀ + NλI)⁻¹ S g) / λ
            y = torch.cholesky_solve(Sg, M).squeeze(-1).to(g.dtype)
            return (g - S.T @ y) / self.damping
        if kind == "pinv_damped":  # Cholesky failed in floating point: the same identity, pseudo-inverse
            return (g - S.T @ (M @ Sg).squeeze(-1).to(g.dtype)) / self.damping
        # λ = 0: the minimum-norm x = (SᵀS/N)⁺ g = N Sᵀ (SSᵀ)⁺² S g (exact when g lies in the span of the scores)
        y = (M @ (M @ Sg)).squeeze(-1).to(g.dtype)
        return N * (S.T @ y)

    def _need(self) -> torch.Tensor:
        if self.scores is None:
            raise RuntimeError("call fit(policy, obs, act) before solve/mv")
        return self.scores
