"""Finite discounted MDPs and their exact evaluation.

Notation (Agarwal et al. 2021, "On the theory of policy gradient methods"):

- ``P[s, a, s']`` transition probabilities, ``R[s, a]`` expected rewards, ``gamma`` in [0, 1),
  ``rho[s]`` the start distribution; a policy is a row-stochastic array ``pi[s, a]``.
- ``P_pi[s, s'] = sum_a pi(a|s) P(s'|s, a)`` and ``r_pi[s] = sum_a pi(a|s) R(s, a)``.
- ``V^pi = (I - gamma P_pi)^{-1} r_pi``, ``Q^pi = R + gamma P V^pi``, ``A^pi = Q^pi - V^pi``.
- ``d^pi_rho = (1 - gamma) rho^T (I - gamma P_pi)^{-1}``: the normalised discounted state
  distribution, a probability vector.

Everything is dense numpy in float64 and vectorised over states: one evaluation is one
``np.linalg.solve`` of an S x S system, so problems with thousands of states stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "MDP",
    "policy_transition",
    "policy_reward",
    "values",
    "q_values",
    "advantages",
    "state_distribution",
    "start_value",
    "greedy_policy",
    "value_iteration",
    "optimal_values",
    "optimal_policy",
]

# Tolerance for "rows sum to one" / "is a distribution"; loose enough for tables built by summing
# float probabilities (gymnasium's FrozenLake uses 1/3 + 1/3 + 1/3).
_SUM_TOL = 1e-8


@dataclass(frozen=True, eq=False)
class MDP:
    """A finite discounted MDP ``(P, R, gamma, rho)``.

    Args:
        P: ``[S, A, S]`` transition probabilities, ``P[s, a, s'] = Pr(s' | s, a)``.
        R: ``[S, A]`` expected immediate rewards.
        gamma: discount in ``[0, 1)``; ``gamma = 0`` is a contextual bandit with context law ``rho``.
        rho: ``[S]`` start-state distribution.

    The arrays are copied to float64 and made read-only. Invalid inputs raise ``ValueError``
    naming the offending argument.
    """

    P: np.ndarray
    R: np.ndarray
    gamma: float
    rho: np.ndarray

    def __post_init__(self) -> None:
        P = _as_float_array(self.P, "P")
        R = _as_float_array(self.R, "R")
        rho = _as_float_array(self.rho, "rho")
        if P.ndim != 3 or P.shape[0] != P.shape[2]:
            raise ValueError(f"P must have shape [S, A, S], got {P.shape}")
        S, A, _ = P.shape
        if S == 0 or A == 0:
            raise ValueError(f"P must have at least one state and one action, got shape {P.shape}")
        if R.shape != (S, A):
            raise ValueError(f"R must have shape [S, A] = {(S, A)} to match P, got {R.shape}")
        if rho.shape != (S,):
            raise ValueError(f"rho must have shape [S] = {(S,)} to match P, got {rho.shape}")
        if (P < 0).any():
            s, a, t = np.argwhere(P < 0)[0]
            raise ValueError(f"P must be non-negative, P[{s}, {a}, {t}] = {P[s, a, t]}")
        row_err = np.abs(P.sum(axis=2) - 1.0)
        if (row_err > _SUM_TOL).any():
            s, a = np.unravel_index(np.argmax(row_err), row_err.shape)
            raise ValueError(
                f"P rows must sum to 1 over s', P[{s}, {a}, :] sums to {P[s, a].sum():.12g}"
            )
        if (rho < 0).any():
            raise ValueError(f"rho must be non-negative, rho[{int(np.argmin(rho))}] = {rho.min()}")
        if abs(rho.sum() - 1.0) > _SUM_TOL:
            raise ValueError(f"rho must sum to 1, sums to {rho.sum():.12g}")
        try:
            gamma = float(self.gamma)
        except (TypeError, ValueError):
            raise ValueError(f"gamma must be a number in [0, 1), got {self.gamma!r}") from None
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        for arr in (P, R, rho):
            arr.flags.writeable = False
        # frozen dataclass: bypass __setattr__ to store the validated copies.
        object.__setattr__(self, "P", P)
        object.__setattr__(self, "R", R)
        object.__setattr__(self, "rho", rho)
        object.__setattr__(self, "gamma", gamma)

    @property
    def n_states(self) -> int:
        return self.P.shape[0]

    @property
    def n_actions(self) -> int:
        return self.P.shape[1]

    # Thin method wrappers so `mdp.values(pi)` reads naturally; the maths lives in the functions.
    def values(self, pi: np.ndarray) -> np.ndarray:
        """``V^pi[S]``."""
        return values(self, pi)

    def q_values(self, pi: np.ndarray) -> np.ndarray:
        """``Q^pi[S, A]``."""
        return q_values(self, pi)

    def advantages(self, pi: np.ndarray) -> np.ndarray:
        """``A^pi[S, A]``."""
        return advantages(self, pi)

    def state_distribution(self, pi: np.ndarray, rho: np.ndarray | None = None) -> np.ndarray:
        """``d^pi_rho[S]``, the normalised discounted state distribution."""
        return state_distribution(self, pi, rho)

    def start_value(self, pi: np.ndarray, rho: np.ndarray | None = None) -> float:
        """``V^pi(rho) = rho^T V^pi``."""
        return start_value(self, pi, rho)

    def optimal_values(self, tol: float = 1e-8) -> np.ndarray:
        """``V*[S]`` by value iteration (see :func:`optimal_values`)."""
        return optimal_values(self, tol)

    def optimal_policy(self, tol: float = 1e-8) -> np.ndarray:
        """A deterministic optimal policy ``pi*[S, A]`` (one-hot rows)."""
        return optimal_policy(self, tol)

    def optimal_value(self, rho: np.ndarray | None = None, tol: float = 1e-8) -> float:
        """``V*(rho)``."""
        return float(self._rho(rho) @ optimal_values(self, tol))

    def _rho(self, rho: np.ndarray | None) -> np.ndarray:
        return self.rho if rho is None else np.asarray(rho, dtype=np.float64)

    def __repr__(self) -> str:
        return f"MDP(S={self.n_states}, A={self.n_actions}, gamma={self.gamma})"


def _as_float_array(x: object, name: str) -> np.ndarray:
    try:
        arr = np.array(x, dtype=np.float64)  # a copy: the MDP must not alias caller arrays
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array: {exc}") from None
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return arr


def _check_policy(mdp: MDP, pi: np.ndarray) -> np.ndarray:
    pi = np.asarray(pi, dtype=np.float64)
    if pi.shape != (mdp.n_states, mdp.n_actions):
        raise ValueError(f"pi must have shape [S, A] = {(mdp.n_states, mdp.n_actions)}, got {pi.shape}")
    return pi


def policy_transition(mdp: MDP, pi: np.ndarray) -> np.ndarray:
    """``P_pi[S, S] = sum_a pi(a|s) P(s'|s, a)``."""
    return np.einsum("sa,sat->st", _check_policy(mdp, pi), mdp.P)


def policy_reward(mdp: MDP, pi: np.ndarray) -> np.ndarray:
    """``r_pi[S] = sum_a pi(a|s) R(s, a)``."""
    return np.einsum("sa,sa->s", _check_policy(mdp, pi), mdp.R)


def values(mdp: MDP, pi: np.ndarray, reward: np.ndarray | None = None) -> np.ndarray:
    """``V^pi[S] = (I - gamma P_pi)^{-1} r_pi``.

    Args:
        pi: ``[S, A]`` policy.
        reward: optional ``[S, A]`` reward replacing ``mdp.R`` (used for entropy-regularised values).
    """
    pi = _check_policy(mdp, pi)
    R = mdp.R if reward is None else reward
    r_pi = np.einsum("sa,sa->s", pi, R)
    M = np.eye(mdp.n_states) - mdp.gamma * policy_transition(mdp, pi)
    return np.linalg.solve(M, r_pi)


def q_values(mdp: MDP, pi: np.ndarray, V: np.ndarray | None = None) -> np.ndarray:
    """``Q^pi[S, A] = R + gamma P V^pi`` (pass ``V`` to reuse an evaluation)."""
    if V is None:
        V = values(mdp, pi)
    return mdp.R + mdp.gamma * (mdp.P @ V)


def advantages(mdp: MDP, pi: np.ndarray) -> np.ndarray:
    """``A^pi[S, A] = Q^pi - V^pi``; note ``sum_a pi(a|s) A(s, a) = 0``."""
    V = values(mdp, pi)
    return q_values(mdp, pi, V) - V[:, None]


def state_distribution(mdp: MDP, pi: np.ndarray, rho: np.ndarray | None = None) -> np.ndarray:
    """``d^pi_rho[S] = (1 - gamma) rho^T (I - gamma P_pi)^{-1}``.

    Solved as the transposed system so no inverse is formed; sums to one. For ``gamma = 0``
    it is ``rho`` itself.
    """
    rho = mdp._rho(rho)
    M = np.eye(mdp.n_states) - mdp.gamma * policy_transition(mdp, pi)
    return (1.0 - mdp.gamma) * np.linalg.solve(M.T, rho)


def start_value(mdp: MDP, pi: np.ndarray, rho: np.ndarray | None = None) -> float:
    """``V^pi(rho) = sum_s rho(s) V^pi(s)``."""
    return float(mdp._rho(rho) @ values(mdp, pi))


def greedy_policy(Q: np.ndarray) -> np.ndarray:
    """One-hot ``[S, A]`` policy on ``argmax_a Q[s, a]`` (lowest index on ties)."""
    S, A = Q.shape
    pi = np.zeros((S, A))
    pi[np.arange(S), np.argmax(Q, axis=1)] = 1.0
    return pi


def value_iteration(
    mdp: MDP, tol: float = 1e-8, max_iterations: int = 1_000_000
) -> tuple[np.ndarray, np.ndarray, int]:
    """Value iteration ``V <- max_a (R + gamma P V)`` followed by an exact polish.

    Value iteration stops once ``||V_{k+1} - V_k||_inf <= tol (1 - gamma) / (2 gamma)``, which
    guarantees the greedy policy is ``tol``-optimal. Its value is then computed exactly with one
    linear solve, and policy-improvement steps are applied until the greedy policy is stable
    (normally zero or one step), so the returned ``V*`` is exact to solver precision rather than
    to ``tol``.

    Returns:
        ``(V*[S], pi*[S, A] one-hot, number of value-iteration sweeps)``.
    """
    S, A = mdp.n_states, mdp.n_actions
    P2 = mdp.P.reshape(S * A, S)  # one matrix-vector product per sweep
    V = np.zeros(S)
    threshold = tol * (1.0 - mdp.gamma) / (2.0 * mdp.gamma) if mdp.gamma > 0 else np.inf
    sweeps = 0
    for sweeps in range(1, max_iterations + 1):
        V_new = (mdp.R + mdp.gamma * (P2 @ V).reshape(S, A)).max(axis=1)
        delta = np.max(np.abs(V_new - V))
        V = V_new
        if delta <= threshold:
            break
    # Policy-iteration polish: exact values of the greedy policy, improved until stable.
    pi = greedy_policy(mdp.R + mdp.gamma * (P2 @ V).reshape(S, A))
    for _ in range(S * A + 1):
        V = values(mdp, pi)
        Q = q_values(mdp, pi, V)
        # Only switch action where it is a strict improvement, so ties cannot cycle.
        current = np.einsum("sa,sa->s", pi, Q)
        better = Q.max(axis=1) > current + 1e-12 * (1.0 + np.abs(current))
        if not better.any():
            break
        new = greedy_policy(Q)
        pi[better] = new[better]
    return V, pi, sweeps


def optimal_values(mdp: MDP, tol: float = 1e-8) -> np.ndarray:
    """``V*[S]`` by value iteration (exactly polished; see :func:`value_iteration`)."""
    return value_iteration(mdp, tol)[0]


def optimal_policy(mdp: MDP, tol: float = 1e-8) -> np.ndarray:
    """A deterministic optimal policy ``pi*[S, A]`` (one-hot rows)."""
    return value_iteration(mdp, tol)[1]
