"""Exact policy gradient and natural policy gradient for tabular softmax policies.

The policy is ``pi_theta(a|s) = exp theta[s, a] / sum_b exp theta[s, b]`` with ``theta[S, A]``;
flattened parameter vectors use row-major order, index ``s * A + a``.

Key identities (Kakade 2001; Agarwal et al. 2021):

- policy gradient theorem for the softmax:
  ``dV(rho)/dtheta[s, a] = 1/(1 - gamma) d^pi_rho(s) pi(a|s) A^pi(s, a)``;
- Fisher under ``d^pi_rho``: ``F = sum_s d(s) sum_a pi(a|s) score score^T`` with
  ``score = d log pi(a|s) / dtheta``; it is block diagonal with blocks
  ``d(s) (diag pi(.|s) - pi(.|s) pi(.|s)^T)``;
- natural gradient: ``F^+ grad V(rho) = A^pi / (1 - gamma)`` up to a constant per state (the null
  space of each block is the all-ones vector, which does not change ``pi``). Hence NPG is
  ``theta <- theta + eta / (1 - gamma) A^pi``, i.e. ``pi_{t+1} propto pi_t exp(eta A^pi_t / (1 - gamma))``,
  which needs one policy evaluation and no state distribution at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np

from .mdp import MDP, policy_transition, q_values, state_distribution, values

__all__ = [
    "softmax_policy",
    "log_softmax_policy",
    "policy_gradient",
    "fisher",
    "fisher_blocks",
    "natural_gradient",
    "natural_gradient_closed_form",
    "policy_kl",
    "soft_values",
    "soft_policy_gradient",
    "soft_optimal_policy",
    "npg_step",
    "npg",
    "pg",
    "History",
    "step_sizes",
    "npg_bound",
]

Schedule = Union[None, Literal["geometric"], Callable[[int], float], Sequence[float], np.ndarray]


# --------------------------------------------------------------------------------------- policies
def log_softmax_policy(theta: np.ndarray) -> np.ndarray:
    """``log pi_theta[S, A]``, computed stably (finite even when ``exp`` would underflow)."""
    theta = np.asarray(theta, dtype=np.float64)
    z = theta - theta.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax_policy(theta: np.ndarray) -> np.ndarray:
    """``pi_theta[S, A]`` with ``pi(a|s) propto exp theta[s, a]`` (works on any leading shape)."""
    return np.exp(log_softmax_policy(theta))


def _check_theta(mdp: MDP, theta: np.ndarray) -> np.ndarray:
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape != (mdp.n_states, mdp.n_actions):
        raise ValueError(
            f"theta must have shape [S, A] = {(mdp.n_states, mdp.n_actions)}, got {theta.shape}"
        )
    if not np.isfinite(theta).all():
        raise ValueError("theta must be finite")
    return theta


def _evaluate(mdp: MDP, pi: np.ndarray, with_distribution: bool) -> tuple[np.ndarray, ...]:
    """``V[S]``, ``A[S, A]`` and optionally ``d^pi_rho[S]``, sharing one matrix ``I - gamma P_pi``."""
    M = np.eye(mdp.n_states) - mdp.gamma * policy_transition(mdp, pi)
    V = np.linalg.solve(M, np.einsum("sa,sa->s", pi, mdp.R))
    A = mdp.R + mdp.gamma * (mdp.P @ V) - V[:, None]
    if not with_distribution:
        return V, A
    d = (1.0 - mdp.gamma) * np.linalg.solve(M.T, mdp.rho)
    return V, A, d


# ----------------------------------------------------------------------------- gradient and Fisher
def policy_gradient(mdp: MDP, theta: np.ndarray) -> np.ndarray:
    """Exact ``grad_theta V^{pi_theta}(rho)[S, A] = d(s) pi(a|s) A(s, a) / (1 - gamma)``."""
    pi = softmax_policy(_check_theta(mdp, theta))
    _, A, d = _evaluate(mdp, pi, with_distribution=True)
    return d[:, None] * pi * A / (1.0 - mdp.gamma)


def fisher_blocks(mdp: MDP, theta: np.ndarray) -> np.ndarray:
    """The diagonal blocks ``[S, A, A]`` of the Fisher: ``d(s) (diag pi_s - pi_s pi_s^T)``.

    ``sum_a pi(a|s) score score^T`` with ``score = e_a - pi_s`` is the covariance of the one-hot
    action under ``pi_s``; off-diagonal blocks vanish because the score at ``s`` only involves
    ``theta[s]``.
    """
    pi = softmax_policy(_check_theta(mdp, theta))
    d = _evaluate(mdp, pi, with_distribution=True)[2]
    cov = np.einsum("sa,ab->sab", pi, np.eye(mdp.n_actions)) - pi[:, :, None] * pi[:, None, :]
    return d[:, None, None] * cov


def fisher(mdp: MDP, theta: np.ndarray) -> np.ndarray:
    """Dense Fisher ``F[S*A, S*A] = E_{s~d^pi_rho, a~pi}[score score^T]`` (block diagonal).

    Memory is ``(S A)^2`` floats: meant for tests and small problems; NPG itself uses the closed
    form and never builds it.
    """
    blocks = fisher_blocks(mdp, theta)
    S, A, _ = blocks.shape
    F = np.zeros((S * A, S * A))
    rows = (np.arange(S)[:, None, None] * A + np.arange(A)[None, :, None]).repeat(A, axis=2)
    cols = (np.arange(S)[:, None, None] * A + np.arange(A)[None, None, :]).repeat(A, axis=1)
    F[rows, cols] = blocks
    return F


def natural_gradient(mdp: MDP, theta: np.ndarray, rcond: float = 1e-12) -> np.ndarray:
    """``F(theta)^+ grad V(rho)`` through a dense Moore-Penrose pseudo-inverse, shape ``[S, A]``.

    The minimum-norm solution of ``F w = grad V``: it equals the closed form
    ``A / (1 - gamma)`` minus its per-state mean, wherever ``d(s) > 0``; at states with
    ``d(s) = 0`` both F and the gradient vanish and it returns 0. ``rcond`` is relative to the
    largest eigenvalue of F; blocks with tiny ``d(s) pi`` can fall below it.
    """
    theta = _check_theta(mdp, theta)
    g = policy_gradient(mdp, theta).ravel()
    w = np.linalg.pinv(fisher(mdp, theta), rcond=rcond, hermitian=True) @ g
    return w.reshape(theta.shape)


def natural_gradient_closed_form(mdp: MDP, theta: np.ndarray) -> np.ndarray:
    """``A^pi / (1 - gamma)`` ``[S, A]``: a solution of ``F w = grad V(rho)`` for the softmax."""
    pi = softmax_policy(_check_theta(mdp, theta))
    return _evaluate(mdp, pi, with_distribution=False)[1] / (1.0 - mdp.gamma)


def policy_kl(theta: np.ndarray, theta_new: np.ndarray, d: np.ndarray) -> float:
    """``sum_s d(s) KL(pi_theta(.|s) || pi_theta_new(.|s))``; its Hessian in ``theta_new`` at
    ``theta_new = theta`` is the Fisher (the old policy is held fixed)."""
    logp, logq = log_softmax_policy(theta), log_softmax_policy(theta_new)
    return float(np.sum(np.asarray(d)[:, None] * np.exp(logp) * (logp - logq)))


# ------------------------------------------------------------------------ entropy regularisation
def soft_values(mdp: MDP, theta: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Entropy-regularised ``V_tau[S]`` and ``Q_tau[S, A]`` (Cen et al. 2021).

    ``V_tau(s) = E[sum_t gamma^t (r_t - tau log pi(a_t|s_t)) | s_0 = s]`` and
    ``Q_tau(s, a) = R(s, a) + gamma sum_s' P(s'|s, a) V_tau(s')`` (no entropy at the first step),
    so ``V_tau(s) = sum_a pi(a|s) (Q_tau(s, a) - tau log pi(a|s))``.
    """
    theta = _check_theta(mdp, theta)
    logp = log_softmax_policy(theta)
    pi = np.exp(logp)
    V = values(mdp, pi, reward=mdp.R - tau * logp)
    return V, q_values(mdp, pi, V)


def soft_policy_gradient(mdp: MDP, theta: np.ndarray, tau: float) -> np.ndarray:
    """``grad_theta V_tau(rho)[S, A] = d(s) pi(a|s) (Q_tau - tau log pi - V_tau)(s, a) / (1 - gamma)``.

    The softmax policy gradient theorem applied to the reward ``R - tau log pi``; the direct
    derivative of ``-tau log pi(a|s)`` averages to zero under ``pi`` (``sum_a grad pi(a|s) = 0``),
    and ``V_tau(s)`` enters only as a baseline (Mei et al. 2020).
    """
    theta = _check_theta(mdp, theta)
    logp = log_softmax_policy(theta)
    pi = np.exp(logp)
    V, Q = soft_values(mdp, theta, tau)
    d = state_distribution(mdp, pi)
    return d[:, None] * pi * (Q - tau * logp - V[:, None]) / (1.0 - mdp.gamma)


def soft_optimal_policy(
    mdp: MDP, tau: float, tol: float = 1e-12, max_iterations: int = 1_000_000
) -> tuple[np.ndarray, np.ndarray]:
    """Regularised optimum by soft value iteration: ``(pi*_tau[S, A], Q*_tau[S, A])``.

    ``V(s) <- tau log sum_a exp(Q(s, a) / tau)`` with ``Q = R + gamma P V``; a ``gamma``-contraction.
    ``pi*_tau propto exp(Q*_tau / tau)``.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    V = np.zeros(mdp.n_states)
    for _ in range(max_iterations):
        Q = mdp.R + mdp.gamma * (mdp.P @ V)
        m = Q.max(axis=1)
        V_new = m + tau * np.log(np.exp((Q - m[:, None]) / tau).sum(axis=1))
        if np.max(np.abs(V_new - V)) <= tol:
            V = V_new
            break
        V = V_new
    Q = mdp.R + mdp.gamma * (mdp.P @ V)
    return softmax_policy(Q / tau), Q


# ------------------------------------------------------------------------------------ algorithms
@dataclass(frozen=True)
class History:
    """The trajectory of an exact PG / NPG run.

    Attributes:
        values: ``[T+1]`` unregularised ``V^(t)(rho)``; index 0 is the start.
        theta: ``[S, A]`` final parameters.
        thetas: ``[T+1, S, A]`` all iterates (None when ``keep_thetas=False``).
        step_sizes: ``[T]`` the step size used at each iteration.
        entropy: the entropy weight ``tau`` (0 for plain NPG / PG).
        regularized_values: ``[T+1]`` ``V_tau^(t)(rho)`` when ``entropy > 0``, else None.
    """

    values: np.ndarray
    theta: np.ndarray
    thetas: np.ndarray | None
    step_sizes: np.ndarray
    entropy: float = 0.0
    regularized_values: np.ndarray | None = None

    @property
    def policy(self) -> np.ndarray:
        """Final ``pi[S, A]``."""
        return softmax_policy(self.theta)

    @property
    def policies(self) -> np.ndarray:
        """``[T+1, S, A]`` all policies (needs ``keep_thetas=True``)."""
        if self.thetas is None:
            raise ValueError("run with keep_thetas=True to keep the iterates")
        return softmax_policy(self.thetas)

    @property
    def iterations(self) -> int:
        return len(self.values) - 1

    def suboptimality(self, mdp: MDP) -> np.ndarray:
        """``[T+1]`` ``V*(rho) - V^(t)(rho)``."""
        return mdp.optimal_value() - self.values


def step_sizes(eta: float, iterations: int, schedule: Schedule = None, gamma: float | None = None) -> np.ndarray:
    """The ``[T]`` step sizes ``eta_t``.

    ``schedule`` is None (constant ``eta``), ``"geometric"`` (``eta_t = eta / gamma^t``, the
    increasing steps of Lan 2021 / Xiao 2022 that make NPG converge linearly), a callable
    ``t -> eta_t``, or a sequence of at least ``iterations`` values.
    """
    if schedule is None:
        etas = np.full(iterations, float(eta))
    elif isinstance(schedule, str):
        if schedule != "geometric":
            raise ValueError(f"schedule must be None, 'geometric', a callable or a sequence, got {schedule!r}")
        if gamma is None or not 0.0 < gamma < 1.0:
            raise ValueError(f"the geometric schedule eta / gamma^t needs 0 < gamma < 1, got {gamma}")
        etas = float(eta) * gamma ** -np.arange(iterations, dtype=np.float64)
    elif callable(schedule):
        etas = np.array([float(schedule(t)) for t in range(iterations)])
    else:
        etas = np.asarray(schedule, dtype=np.float64)
        if etas.ndim != 1 or len(etas) < iterations:
            raise ValueError(f"a step-size sequence needs at least {iterations} values, got shape {etas.shape}")
        etas = etas[:iterations].copy()
    if not (np.isfinite(etas).all() and (etas > 0).all()):
        raise ValueError("step sizes must be finite and > 0")
    return etas


def _start(mdp: MDP, theta0: np.ndarray | None) -> np.ndarray:
    if theta0 is None:
        return np.zeros((mdp.n_states, mdp.n_actions))  # the uniform policy
    return _check_theta(mdp, theta0).copy()


def _check_iterations(iterations: int) -> int:
    if int(iterations) != iterations or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    return int(iterations)


def npg_step(
    mdp: MDP,
    theta: np.ndarray,
    eta: float,
    entropy: float = 0.0,
    direction: Literal["closed_form", "fisher_pinv"] = "closed_form",
) -> np.ndarray:
    """One NPG step ``theta + eta F^+ grad V(rho)``, returned as new ``theta[S, A]``.

    ``direction="closed_form"`` uses ``A / (1 - gamma)`` (or, with ``entropy = tau > 0``, the soft
    update ``(1 - eta tau / (1 - gamma)) theta + eta Q_tau / (1 - gamma)``); ``"fisher_pinv"``
    builds the dense Fisher and applies its pseudo-inverse to the exact (soft) gradient. The two
    differ by a constant per state, which leaves ``pi`` unchanged.
    """
    theta = _check_theta(mdp, theta)
    if direction == "fisher_pinv":
        g = soft_policy_gradient(mdp, theta, entropy) if entropy > 0 else policy_gradient(mdp, theta)
        F = fisher(mdp, theta)
        return theta + eta * (np.linalg.pinv(F, rcond=1e-12, hermitian=True) @ g.ravel()).reshape(theta.shape)
    if direction != "closed_form":
        raise ValueError(f"direction must be 'closed_form' or 'fisher_pinv', got {direction!r}")
    if entropy > 0:
        _, Q = soft_values(mdp, theta, entropy)
        return (1.0 - eta * entropy / (1.0 - mdp.gamma)) * theta + eta * Q / (1.0 - mdp.gamma)
    return theta + eta * natural_gradient_closed_form(mdp, theta)


def npg(
    mdp: MDP,
    eta: float,
    iterations: int,
    theta0: np.ndarray | None = None,
    entropy: float = 0.0,
    schedule: Schedule = None,
    *,
    direction: Literal["closed_form", "fisher_pinv"] = "closed_form",
    keep_thetas: bool = True,
) -> History:
    """Exact natural policy gradient ``theta <- theta + eta_t F(theta)^+ grad V(rho)``.

    Args:
        mdp: the MDP; ``rho`` is the objective's start distribution, and the Fisher is weighted by ``d^pi_rho``.
        eta: step size (the base ``eta_0`` when a schedule is given).
        iterations: number of updates ``T``.
        theta0: ``[S, A]`` start; default zeros (the uniform policy, as in Agarwal et al.).
        entropy: ``tau >= 0``. With ``tau > 0`` this is entropy-regularised NPG in the convention
            of Cen et al. (2021): ``pi_{t+1} propto pi_t^{1 - eta tau / (1 - gamma)}
            exp(eta Q_tau^{(t)} / (1 - gamma))``, i.e. NPG on ``V_tau(rho)``; it needs
            ``eta_t tau <= 1 - gamma`` (equality is soft policy iteration) and converges linearly
            to the regularised optimum ``pi*_tau``.
        schedule: step-size schedule, see :func:`step_sizes`; ``"geometric"`` is
            ``eta_t = eta / gamma^t``.
        direction: ``"closed_form"`` (default, one linear solve per iteration) or
            ``"fisher_pinv"`` (dense Fisher pseudo-inverse; small problems only).
        keep_thetas: store every iterate in ``History.thetas``.

    Returns:
        :class:`History` with ``values[t] = V^(t)(rho)`` (unregularised) for ``t = 0..T``.
    """
    T = _check_iterations(iterations)
    if direction not in ("closed_form", "fisher_pinv"):
        raise ValueError(f"direction must be 'closed_form' or 'fisher_pinv', got {direction!r}")
    if entropy < 0:
        raise ValueError(f"entropy must be >= 0, got {entropy}")
    etas = step_sizes(eta, T, schedule, mdp.gamma)
    if entropy > 0 and (etas * entropy > (1.0 - mdp.gamma) * (1 + 1e-12)).any():
        raise ValueError(
            f"entropy-regularised NPG needs eta_t * entropy <= 1 - gamma = {1 - mdp.gamma:.6g}; "
            f"got max eta_t * entropy = {etas.max() * entropy:.6g}"
        )
    theta = _start(mdp, theta0)
    c = 1.0 / (1.0 - mdp.gamma)
    vals = np.empty(T + 1)
    reg_vals = np.empty(T + 1) if entropy > 0 else None
    thetas = np.empty((T + 1, *theta.shape)) if keep_thetas else None
    S = mdp.n_states
    for t in range(T + 1):
        if thetas is not None:
            thetas[t] = theta
        logp = log_softmax_policy(theta)
        pi = np.exp(logp)
        M = np.eye(S) - mdp.gamma * policy_transition(mdp, pi)
        r = np.einsum("sa,sa->s", pi, mdp.R)
        if entropy > 0:
            # One factorisation, two right-hand sides: plain and regularised rewards.
            r_tau = r - entropy * np.einsum("sa,sa->s", pi, logp)
            V, V_tau = np.linalg.solve(M, np.stack([r, r_tau], axis=1)).T
            reg_vals[t] = mdp.rho @ V_tau
        else:
            V = np.linalg.solve(M, r)
        vals[t] = mdp.rho @ V
        if t == T:
            break
        eta_t = etas[t]
        if direction == "fisher_pinv":
            theta = npg_step(mdp, theta, eta_t, entropy, direction)
        elif entropy > 0:
            Q_tau = mdp.R + mdp.gamma * (mdp.P @ V_tau)
            theta = (1.0 - eta_t * entropy * c) * theta + eta_t * c * Q_tau
        else:
            A = mdp.R + mdp.gamma * (mdp.P @ V) - V[:, None]
            theta = theta + eta_t * c * A
    return History(vals, theta, thetas, etas, float(entropy), reg_vals)


def pg(
    mdp: MDP,
    lr: float,
    iterations: int,
    theta0: np.ndarray | None = None,
    *,
    keep_thetas: bool = True,
) -> History:
    """Exact vanilla policy gradient ascent ``theta <- theta + lr grad V(rho)`` on the softmax.

    ``V(rho)`` is ``8 / (1 - gamma)^3``-smooth for the softmax (Mei et al. 2020), so
    ``lr = (1 - gamma)^3 / 8`` is always a safe step.

    Returns:
        :class:`History` with ``values[t] = V^(t)(rho)`` for ``t = 0..T``.
    """
    T = _check_iterations(iterations)
    etas = step_sizes(lr, T)
    theta = _start(mdp, theta0)
    vals = np.empty(T + 1)
    thetas = np.empty((T + 1, *theta.shape)) if keep_thetas else None
    for t in range(T + 1):
        if thetas is not None:
            thetas[t] = theta
        pi = softmax_policy(theta)
        V, A, d = _evaluate(mdp, pi, with_distribution=True)
        vals[t] = mdp.rho @ V
        if t == T:
            break
        theta = theta + lr * d[:, None] * pi * A / (1.0 - mdp.gamma)
    return History(vals, theta, thetas, etas)


def npg_bound(eta: float, T: int | np.ndarray, gamma: float, n_actions: int) -> np.ndarray | float:
    """Agarwal et al. (2021) global-convergence bound for NPG from ``theta = 0`` with rewards in [0, 1]:

    ``V*(rho) - V^(T)(rho) <= log|A| / (eta T) + 1 / ((1 - gamma)^2 T)``.
    """
    T = np.asarray(T, dtype=np.float64)
    return np.log(n_actions) / (eta * T) + 1.0 / ((1.0 - gamma) ** 2 * T)
