"""Exact tabular PG / NPG: every claim checked against an independent reference.

References used here never call the code under test for the quantity being checked: plain-loop
iterative policy evaluation, power series for the state distribution, central finite
differences, brute force over deterministic policies, an explicit policy-iteration loop, soft
value iteration, closed-form bandit solutions, and known shortest-path returns.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from natpg.tabular import (
    MDP,
    advantages,
    chain,
    cliff_walking,
    fisher,
    frozen_lake,
    gridworld,
    kakade_bad_start,
    kakade_two_state,
    natural_gradient,
    natural_gradient_closed_form,
    npg,
    npg_bound,
    npg_step,
    optimal_policy,
    optimal_values,
    pg,
    policy_gradient,
    policy_kl,
    q_values,
    random_mdp,
    soft_optimal_policy,
    soft_policy_gradient,
    softmax_policy,
    state_distribution,
    step_sizes,
    taxi,
    value_iteration,
    values,
)


# ------------------------------------------------------------------------------ references
def ref_evaluate_loop(mdp: MDP, pi: np.ndarray, tol: float = 1e-13) -> tuple[np.ndarray, np.ndarray]:
    """Iterative policy evaluation written with plain loops: ``(V[S], Q[S, A])``."""
    S, A = pi.shape
    V = np.zeros(S)
    while True:
        Q = np.zeros((S, A))
        for s in range(S):
            for a in range(A):
                Q[s, a] = mdp.R[s, a] + mdp.gamma * sum(mdp.P[s, a, t] * V[t] for t in range(S))
        V_new = np.array([sum(pi[s, a] * Q[s, a] for a in range(A)) for s in range(S)])
        if np.max(np.abs(V_new - V)) < tol:
            return V_new, Q
        V = V_new


def ref_value_rho(mdp: MDP, pi: np.ndarray, tol: float = 1e-15) -> float:
    """``V^pi(rho)`` by (vectorised) fixed-point iteration ``V <- r_pi + gamma P_pi V``, no solve."""
    P_pi = (pi[:, :, None] * mdp.P).sum(axis=1)
    r_pi = (pi * mdp.R).sum(axis=1)
    V = np.zeros(len(r_pi))
    for _ in range(100_000):
        V_new = r_pi + mdp.gamma * P_pi @ V
        if np.max(np.abs(V_new - V)) < tol:
            break
        V = V_new
    return float(mdp.rho @ V_new)


def ref_state_distribution(mdp: MDP, pi: np.ndarray) -> np.ndarray:
    """``(1 - gamma) sum_t gamma^t rho^T P_pi^t`` by summing the series."""
    P_pi = (pi[:, :, None] * mdp.P).sum(axis=1)
    term, d = mdp.rho.copy(), np.zeros_like(mdp.rho)
    for _ in range(100_000):
        d += term
        term = mdp.gamma * term @ P_pi
        if term.sum() < 1e-17:
            break
    return (1.0 - mdp.gamma) * d


def ref_softmax(theta: np.ndarray) -> np.ndarray:
    e = np.exp(theta - theta.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ref_score(pi: np.ndarray, s: int, a: int) -> np.ndarray:
    """``d log pi(a|s) / d theta`` of the tabular softmax, ``[S * A]``: e_{s,a} - pi(.|s) on state s's block."""
    S, A = pi.shape
    score = np.zeros(S * A)
    score[s * A + a] += 1.0
    score[s * A : (s + 1) * A] -= pi[s]
    return score


def ref_solve_values(mdp: MDP, pi: np.ndarray) -> np.ndarray:
    """``V^pi`` via an explicit inverse (a different route from the library's solve)."""
    P_pi = (pi[:, :, None] * mdp.P).sum(axis=1)
    return np.linalg.inv(np.eye(mdp.n_states) - mdp.gamma * P_pi) @ (pi * mdp.R).sum(axis=1)


def ref_policy_iteration(mdp: MDP, iterations: int) -> list[float]:
    """``V^{pi_k}(rho)`` for ``k = 0..iterations`` of policy iteration from the uniform policy."""
    S, A = mdp.R.shape
    pi = np.full((S, A), 1.0 / A)
    out = []
    for _ in range(iterations + 1):
        V = ref_solve_values(mdp, pi)
        out.append(float(mdp.rho @ V))
        Q = mdp.R + mdp.gamma * np.einsum("sat,t->sa", mdp.P, V)
        current = (pi * Q).sum(axis=1)
        keep = Q.max(axis=1) <= current + 1e-12  # keep the action unless strictly improvable
        new = np.eye(A)[Q.argmax(axis=1)]
        pi = np.where(keep[:, None], pi, new)
    return out


def tiny_mdp(seed: int = 0, S: int = 4, A: int = 3, gamma: float = 0.9) -> MDP:
    return random_mdp(S, A, gamma, seed=seed, rho="dirichlet")


# ------------------------------------------------------------------------------ validation
def _ok():
    P = np.zeros((2, 2, 2))
    P[:, :, 0] = 1.0
    return P, np.zeros((2, 2)), 0.9, np.array([0.5, 0.5])


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda P, R, g, rho: (P[0], R, g, rho), r"P must have shape \[S, A, S\]"),
        (lambda P, R, g, rho: (P[:, :, :1], R, g, rho), r"P must have shape \[S, A, S\]"),
        (lambda P, R, g, rho: (P * 0.5, R, g, rho), r"P rows must sum to 1.*P\[0, 0, :\] sums to 0.5"),
        (lambda P, R, g, rho: (P - 2.0 * (P == 0) + 2.0 * np.eye(2)[None], R, g, rho), "P must be non-negative"),
        (lambda P, R, g, rho: (P, R[:1], g, rho), r"R must have shape \[S, A\]"),
        (lambda P, R, g, rho: (P, R * np.nan, g, rho), "R must be finite"),
        (lambda P, R, g, rho: (P, R, g, np.ones(3) / 3), r"rho must have shape \[S\]"),
        (lambda P, R, g, rho: (P, R, g, np.array([0.5, 0.6])), "rho must sum to 1"),
        (lambda P, R, g, rho: (P, R, g, np.array([1.5, -0.5])), "rho must be non-negative"),
        (lambda P, R, g, rho: (P, R, 1.0, rho), r"gamma must be in \[0, 1\), got 1.0"),
        (lambda P, R, g, rho: (P, R, -0.1, rho), r"gamma must be in \[0, 1\)"),
        (lambda P, R, g, rho: (P, R, "x", rho), "gamma must be a number"),
    ],
)
def test_mdp_validation_messages(change, match):
    with pytest.raises(ValueError, match=match):
        MDP(*change(*_ok()))


def test_algorithm_argument_validation():
    m = tiny_mdp()
    with pytest.raises(ValueError, match=r"theta must have shape \[S, A\]"):
        npg(m, 1.0, 3, theta0=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="entropy must be >= 0"):
        npg(m, 1.0, 3, entropy=-1.0)
    with pytest.raises(ValueError, match=r"eta_t \* entropy <= 1 - gamma"):
        npg(m, 1.0, 3, entropy=1.0)
    with pytest.raises(ValueError, match="direction must be"):
        npg(m, 1.0, 3, direction="cg")
    with pytest.raises(ValueError, match="iterations must be a non-negative integer"):
        pg(m, 1.0, -1)
    with pytest.raises(ValueError, match="needs 0 < gamma < 1"):
        step_sizes(1.0, 3, "geometric", 0.0)
    with pytest.raises(ValueError, match="at least 5 values"):
        step_sizes(1.0, 5, [1.0, 2.0])
    with pytest.raises(ValueError, match="finite and > 0"):
        step_sizes(-1.0, 2)


# ------------------------------------------------------------------------------ evaluation
def test_evaluation_matches_iterative_policy_evaluation():
    m = tiny_mdp(seed=1)
    pi = ref_softmax(np.random.default_rng(1).normal(size=(4, 3)))
    V_ref, Q_ref = ref_evaluate_loop(m, pi)
    np.testing.assert_allclose(values(m, pi), V_ref, atol=1e-11)
    np.testing.assert_allclose(q_values(m, pi), Q_ref, atol=1e-11)
    np.testing.assert_allclose(advantages(m, pi), Q_ref - V_ref[:, None], atol=1e-11)
    np.testing.assert_allclose((pi * advantages(m, pi)).sum(axis=1), 0.0, atol=1e-12)
    d = state_distribution(m, pi)
    np.testing.assert_allclose(d, ref_state_distribution(m, pi), atol=1e-13)
    assert d.sum() == pytest.approx(1.0, abs=1e-13)
    assert m.start_value(pi) == pytest.approx(m.rho @ V_ref, abs=1e-11)


def test_value_iteration_matches_brute_force_over_deterministic_policies():
    for seed, gamma in [(0, 0.9), (1, 0.5), (2, 0.0)]:
        m = tiny_mdp(seed=seed, gamma=gamma)
        S, A = 4, 3
        best = np.full(S, -np.inf)
        for actions in itertools.product(range(A), repeat=S):  # all 81 deterministic policies
            best = np.maximum(best, ref_solve_values(m, np.eye(A)[list(actions)]))
        np.testing.assert_allclose(optimal_values(m), best, atol=1e-12)
        np.testing.assert_allclose(ref_solve_values(m, optimal_policy(m)), best, atol=1e-12)


# ------------------------------------------------------------------------------ gradient
def test_policy_gradient_matches_finite_differences():
    m = tiny_mdp(seed=2)
    theta = np.random.default_rng(2).normal(size=(4, 3))
    h = 1e-5
    fd = np.zeros_like(theta)
    for idx in np.ndindex(theta.shape):
        e = np.zeros_like(theta)
        e[idx] = h
        fd[idx] = (ref_value_rho(m, ref_softmax(theta + e)) - ref_value_rho(m, ref_softmax(theta - e))) / (2 * h)
    np.testing.assert_allclose(policy_gradient(m, theta), fd, atol=1e-8)


# ------------------------------------------------------------------------------ Fisher
def test_dense_fisher_matches_score_outer_product_loop():
    m = tiny_mdp(seed=3)
    S, A = 4, 3
    theta = np.random.default_rng(3).normal(size=(S, A))
    pi = ref_softmax(theta)
    d = ref_state_distribution(m, pi)
    F_ref = np.zeros((S * A, S * A))
    for s in range(S):
        for a in range(A):
            score = ref_score(pi, s, a)
            F_ref += d[s] * pi[s, a] * np.outer(score, score)
    np.testing.assert_allclose(fisher(m, theta), F_ref, atol=1e-14)


def test_fisher_is_hessian_of_kl():
    m = tiny_mdp(seed=4)
    S, A = 4, 3
    theta = np.random.default_rng(4).normal(size=(S, A))
    d = ref_state_distribution(m, ref_softmax(theta))
    n, h = S * A, 1e-4
    kl = lambda x: policy_kl(theta, theta + x.reshape(S, A), d)  # KL(old || new), old fixed
    H = np.zeros((n, n))
    E = np.eye(n) * h
    for i in range(n):
        for j in range(n):
            H[i, j] = (kl(E[i] + E[j]) - kl(E[i] - E[j]) - kl(-E[i] + E[j]) + kl(-E[i] - E[j])) / (4 * h * h)
    np.testing.assert_allclose(H, fisher(m, theta), atol=1e-8)  # measured error 1.3e-9


# ------------------------------------------------------------------------------ natural gradient
def test_npg_closed_form_matches_dense_fisher_pseudo_inverse():
    m = tiny_mdp(seed=5)
    theta = np.random.default_rng(5).normal(size=(4, 3))
    F, g = fisher(m, theta), policy_gradient(m, theta).ravel()
    w_pinv = natural_gradient(m, theta)
    w_closed = natural_gradient_closed_form(m, theta)
    # Both solve F w = grad V ...
    np.testing.assert_allclose(F @ w_closed.ravel(), g, atol=1e-12)
    np.testing.assert_allclose(F @ w_pinv.ravel(), g, atol=1e-12)
    # ... and differ by a constant per state (the null space of each Fisher block) ...
    diff = w_pinv - w_closed
    np.testing.assert_allclose(diff - diff.mean(axis=1, keepdims=True), 0.0, atol=1e-10)
    # ... which does not change the policy.
    for eta in (0.1, 1.0, 10.0):
        np.testing.assert_allclose(
            ref_softmax(theta + eta * w_pinv), ref_softmax(theta + eta * w_closed), atol=1e-10
        )
    # The closed form is A / (1 - gamma) with A from plain-loop evaluation.
    V, Q = ref_evaluate_loop(m, ref_softmax(theta))
    np.testing.assert_allclose(w_closed, (Q - V[:, None]) / (1 - m.gamma), atol=1e-10)


@pytest.mark.parametrize("entropy", [0.0, 0.05])
def test_npg_runs_pinv_and_closed_form_give_same_policies(entropy):
    """Step size 0.1 keeps every π(a|s) ≥ 4e-7 over the 15 iterations. With η = 0.5 (no entropy) some
    probabilities fall to 1e-32: the Fisher's positive spectrum then spans more than 1e11, and a dense float64
    pseudo-inverse can no longer resolve the direction to 1e-10 (measured 7e-10); the closed form still can."""
    m = tiny_mdp(seed=6)
    kw = dict(eta=0.1, iterations=15, entropy=entropy)
    a = npg(m, direction="closed_form", **kw)
    b = npg(m, direction="fisher_pinv", **kw)
    np.testing.assert_allclose(a.policies, b.policies, atol=1e-10)
    np.testing.assert_allclose(a.values, b.values, atol=1e-10)
    assert not np.allclose(a.thetas[1:], b.thetas[1:])  # the parameters do differ (per-state shifts)


def test_compatible_function_approximation_gives_natural_gradient():
    """Kakade (2001) Thm 1: the weights w* of the best compatible approximation
    Q_w(s, a) = score(s, a)^T w fitted to Q under d(s) pi(a|s) solve F w* = (1 - gamma) grad V."""
    m = tiny_mdp(seed=7)
    S, A = 4, 3
    theta = np.random.default_rng(7).normal(size=(S, A))
    pi = ref_softmax(theta)
    d = ref_state_distribution(m, pi)
    _, Q = ref_evaluate_loop(m, pi)
    Psi = np.zeros((S * A, S * A))  # row (s, a): the compatible feature score(s, a)
    for s in range(S):
        for a in range(A):
            Psi[s * A + a] = ref_score(pi, s, a)
    sw = np.sqrt((d[:, None] * pi).ravel())
    w_star = np.linalg.lstsq(sw[:, None] * Psi, sw * Q.ravel(), rcond=None)[0]
    np.testing.assert_allclose(
        fisher(m, theta) @ w_star, (1 - m.gamma) * policy_gradient(m, theta).ravel(), atol=1e-11
    )
    eta = 0.7
    np.testing.assert_allclose(
        ref_softmax(theta + eta * w_star.reshape(S, A) / (1 - m.gamma)),
        softmax_policy(npg_step(m, theta, eta)),
        atol=1e-10,
    )


def test_natural_gradient_is_steepest_ascent_under_fisher_constraint():
    """argmax g^T x s.t. x^T F x <= eps is x* = sqrt(eps / g^T F^+ g) F^+ g."""
    m = tiny_mdp(seed=8)
    theta = np.random.default_rng(8).normal(size=(4, 3))
    F, g = fisher(m, theta), policy_gradient(m, theta).ravel()
    w = natural_gradient(m, theta).ravel()
    eps = 1e-3
    x_star = np.sqrt(eps / (g @ w)) * w
    assert x_star @ F @ x_star == pytest.approx(eps, rel=1e-10)
    best = g @ x_star
    assert best == pytest.approx(np.sqrt(eps * g @ np.linalg.pinv(F) @ g), rel=1e-8)
    rng = np.random.default_rng(0)
    for x in rng.normal(size=(2000, g.size)):
        q = x @ F @ x
        if q > 1e-12:
            assert g @ (x * np.sqrt(eps / q)) <= best + 1e-12
    # The vanilla gradient direction, scaled to the same Fisher ball, is strictly worse.
    assert g @ (g * np.sqrt(eps / (g @ F @ g))) < best * (1 - 1e-3)


def ref_reparameterised_steps(mdp: MDP, G, jacobian, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The natural and the vanilla direction in phi for the policy softmax(G(phi)), from that policy's own scores
    psi_phi(s, a) = J_G(phi)^T psi_theta(s, a) by a plain loop: F_phi = sum_s d(s) sum_a pi psi_phi psi_phi^T and
    grad_phi V(rho) = sum_s d(s) sum_a pi psi_phi A(s, a) / (1 - gamma) (the policy gradient theorem); no natpg."""
    S, A = mdp.R.shape
    pi = ref_softmax(G(phi).reshape(S, A))
    d = ref_state_distribution(mdp, pi)
    V, Q = ref_evaluate_loop(mdp, pi)
    J = jacobian(phi)
    F_phi, g_phi = np.zeros((len(phi), len(phi))), np.zeros(len(phi))
    for s in range(S):
        for a in range(A):
            psi = J.T @ ref_score(pi, s, a)
            F_phi += d[s] * pi[s, a] * np.outer(psi, psi)
            g_phi += d[s] * pi[s, a] * psi * (Q[s, a] - V[s]) / (1 - mdp.gamma)
    return np.linalg.pinv(F_phi, rcond=1e-12, hermitian=True) @ g_phi, g_phi


def test_parameterisation_invariance():
    """A natural step in phi, for theta = G(phi), with phi's own Fisher (from the phi-policy's scores, not natpg's),
    moves the policy as natpg's natural step in theta: exactly for a linear G = M phi, and to O(eta^2) for a
    nonlinear G (the natural gradient flow is invariant; one step to first order). A vanilla step differs at O(eta).
    (Building phi's Fisher as M^T F M from natpg's F would pass for any symmetric F, the identity included.)"""
    m = tiny_mdp(seed=9)
    S, A = 4, 3
    n = S * A
    rng = np.random.default_rng(9)
    phi = rng.normal(size=n)
    M = np.eye(n) + 0.3 * rng.normal(size=(n, n))
    assert np.linalg.cond(M) < 1e3
    B = rng.normal(size=(n, n)) / np.sqrt(n)

    def G(p):
        return p + 0.6 * np.tanh(B @ p) + 0.2 * p**3 / 3

    def J_G(p):
        return np.eye(n) + 0.6 * (1 - np.tanh(B @ p) ** 2)[:, None] * B + 0.2 * np.diag(p**2)

    def policy_gaps(G, jacobian, etas):
        """max |pi after the step in phi - pi after the step in theta|, natural and vanilla, for each eta."""
        theta = G(phi).reshape(S, A)
        natural_theta, vanilla_theta = natural_gradient(m, theta), policy_gradient(m, theta)
        natural_phi, vanilla_phi = ref_reparameterised_steps(m, G, jacobian, phi)
        gap = lambda step_phi, step_theta, eta: np.abs(ref_softmax(G(phi + eta * step_phi).reshape(S, A))
                                                       - ref_softmax(theta + eta * step_theta)).max()
        return (np.array([gap(natural_phi, natural_theta, eta) for eta in etas]),
                np.array([gap(vanilla_phi, vanilla_theta, eta) for eta in etas]))

    natural, vanilla = policy_gaps(lambda p: M @ p, lambda p: M, [1.0])
    assert natural[0] < 1e-10 and vanilla[0] > 1e-3
    etas = 0.2 / 2.0 ** np.arange(4)
    natural, vanilla = policy_gaps(G, J_G, etas)
    assert (natural[:-1] / natural[1:] > 3.2).all()  # halving eta quarters the gap: O(eta^2)
    assert (vanilla[:-1] / vanilla[1:] < 2.5).all() and natural[-1] < 0.2 * vanilla[-1]  # halves it: O(eta)


# ------------------------------------------------------------------------------ algorithms
def test_history_layout():
    m = tiny_mdp(seed=10)
    h = npg(m, 1.0, 7)
    assert h.values.shape == (8,) and h.thetas.shape == (8, 4, 3) and h.step_sizes.shape == (7,)
    assert h.values[0] == pytest.approx(ref_value_rho(m, np.full((4, 3), 1 / 3)), abs=1e-12)
    np.testing.assert_allclose(h.policy, ref_softmax(h.thetas[-1]))
    assert h.values[-1] == pytest.approx(ref_value_rho(m, h.policy), abs=1e-12)
    h2 = pg(m, 0.5, 7, theta0=np.ones((4, 3)), keep_thetas=False)
    assert h2.thetas is None and h2.values.shape == (8,) and h2.policy.shape == (4, 3)
    # suboptimality against V* found by trying all 3^4 deterministic policies (an optimal one is deterministic)
    v_star = max(ref_value_rho(m, np.eye(3)[list(acts)]) for acts in itertools.product(range(3), repeat=4))
    np.testing.assert_allclose(h.suboptimality(m), v_star - h.values, rtol=0, atol=1e-12)
    assert (h.suboptimality(m) >= -1e-12).all()


@pytest.mark.parametrize("seed, gamma", [(0, 0.9), (1, 0.9), (2, 0.5), (3, 0.8)])
def test_npg_satisfies_agarwal_bound_and_improves_monotonically(seed, gamma):
    """Agarwal et al. (2021), NPG for softmax policies: from theta = 0, rewards in [0, 1], for every T >= 1,
    V*(rho) - V^(T)(rho) <= log|A| / (eta T) + 1 / ((1 - gamma)^2 T)."""
    m = random_mdp(12, 4, gamma, seed=seed, rho="dirichlet")
    v_star = m.optimal_value()
    for eta in (0.05, 1.0, 20.0):
        h = npg(m, eta, 200)
        T = np.arange(1, 201)
        gap = v_star - h.values[1:]
        assert (gap <= npg_bound(eta, T, gamma, 4)).all()
        assert (gap >= -1e-10).all()
        # Per-state monotone improvement V^(t+1)(s) >= V^(t)(s) (the improvement lemma of Agarwal et al.).
        Vs = np.array([ref_solve_values(m, p) for p in h.policies[:30]])
        assert (np.diff(Vs, axis=0) >= -1e-10).all()


def test_npg_with_huge_steps_is_policy_iteration():
    m = random_mdp(8, 3, 0.9, seed=11)
    # One step from any full-support policy tends to the greedy policy of policy iteration.
    theta = np.random.default_rng(11).normal(size=(8, 3))
    V, Q = ref_evaluate_loop(m, ref_softmax(theta))
    gaps = np.sort(Q, axis=1)
    assert (gaps[:, -1] - gaps[:, -2]).min() > 1e-3  # no near-ties, so the limit is sharp
    step = softmax_policy(npg_step(m, theta, eta=1e5))
    np.testing.assert_allclose(step, np.eye(3)[Q.argmax(axis=1)], atol=1e-12)
    # A run whose steps grow fast enough that each one dominates all earlier ones follows
    # policy iteration iterate by iterate, reaching V* in as many steps.
    K = 6
    pi_values = ref_policy_iteration(m, K)
    h = npg(m, 1e3, K, schedule=lambda t: 1e3 * 1e8**t)
    np.testing.assert_allclose(h.values, pi_values, atol=1e-9)
    assert h.values[-1] == pytest.approx(m.optimal_value(), abs=1e-9)


def test_kakade_plateau_pg_stalls_where_npg_escapes():
    """Two-state MDP, start that stays in i and leaves j (good actions at e^-8 ~ 0.03%)."""
    m = kakade_two_state(gamma=0.9, rho_i=0.8)
    theta0 = kakade_bad_start(8.0)
    v_star = m.optimal_value()  # 0.8 * 18 + 0.2 * 20, switch from i then stay in j forever
    assert v_star == pytest.approx(0.8 * 0.9 * 2 / 0.1 + 0.2 * 2 / 0.1)
    gap0 = v_star - ref_value_rho(m, ref_softmax(theta0))
    nat = npg(m, 0.1, 20, theta0)
    assert v_star - nat.values[20] < 1e-3
    for lr in (0.1, 1.0, 10.0):
        van = pg(m, lr, 200, theta0, keep_thetas=False)
        # After 10x more iterations, vanilla PG has recovered < 1% of the initial gap.
        assert v_star - van.values[200] > 0.99 * gap0 > 8.0


def test_bandit_gamma_zero():
    """gamma = 0: V(rho) = sum_s rho(s) pi(.|s)^T r(s); NPG from 0 is exponential weights
    pi_T(.|s) propto exp(eta T r(s, .)) and PG is rho(s) pi (r - pi^T r)."""
    rng = np.random.default_rng(12)
    S, A = 3, 5
    r = rng.random((S, A))
    rho = np.array([0.2, 0.3, 0.5])
    P = np.tile(np.eye(S)[:, None, :], (1, A, 1))  # irrelevant when gamma = 0
    m = MDP(P, r, 0.0, rho)
    np.testing.assert_allclose(state_distribution(m, np.full((S, A), 1 / A)), rho)
    eta, T = 0.3, 25
    h = npg(m, eta, T)
    np.testing.assert_allclose(h.policy, ref_softmax(eta * T * r), atol=1e-12)
    theta = rng.normal(size=(S, A))
    pi = ref_softmax(theta)
    np.testing.assert_allclose(
        policy_gradient(m, theta), rho[:, None] * pi * (r - (pi * r).sum(axis=1, keepdims=True)), atol=1e-14
    )
    assert h.values[-1] == pytest.approx(float(rho @ (h.policy * r).sum(axis=1)), abs=1e-14)
    np.testing.assert_allclose(optimal_values(m), r.max(axis=1))


# ------------------------------------------------------------------------------ entropy, schedules
def ref_soft_optimum(mdp: MDP, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Soft value iteration, written independently: (pi*_tau, Q*_tau)."""
    V = np.zeros(mdp.n_states)
    for _ in range(5000):
        Q = mdp.R + mdp.gamma * np.einsum("sat,t->sa", mdp.P, V)
        V = tau * np.log(np.exp(Q / tau).sum(axis=1))
    return ref_softmax(Q / tau), Q


def ref_soft_q(mdp: MDP, theta: np.ndarray, tau: float) -> np.ndarray:
    pi = ref_softmax(theta)
    logp = np.log(pi)
    P_pi = (pi[:, :, None] * mdp.P).sum(axis=1)
    V = np.linalg.inv(np.eye(mdp.n_states) - mdp.gamma * P_pi) @ (pi * (mdp.R - tau * logp)).sum(axis=1)
    return mdp.R + mdp.gamma * np.einsum("sat,t->sa", mdp.P, V)


def test_soft_policy_gradient_matches_finite_differences_and_soft_npg_is_its_natural_step():
    m = tiny_mdp(seed=13)
    tau = 0.3
    theta = np.random.default_rng(13).normal(size=(4, 3))

    def v_tau(th):
        pi = ref_softmax(th)
        reg = MDP(m.P, m.R - tau * np.log(pi), m.gamma, m.rho)  # reward r - tau log pi
        return ref_value_rho(reg, pi)

    h, fd = 1e-5, np.zeros_like(theta)
    for idx in np.ndindex(theta.shape):
        e = np.zeros_like(theta)
        e[idx] = h
        fd[idx] = (v_tau(theta + e) - v_tau(theta - e)) / (2 * h)
    g = soft_policy_gradient(m, theta, tau)
    np.testing.assert_allclose(g, fd, atol=1e-8)
    eta = 0.2  # <= (1 - gamma) / tau
    natural = theta + eta * (np.linalg.pinv(fisher(m, theta), rcond=1e-12, hermitian=True) @ g.ravel()).reshape(4, 3)
    # Cen et al. (2021): pi_{t+1} propto pi_t^{1 - eta tau / (1 - gamma)} exp(eta Q_tau / (1 - gamma))
    pi = ref_softmax(theta)
    cen = pi ** (1 - eta * tau / (1 - m.gamma)) * np.exp(eta * ref_soft_q(m, theta, tau) / (1 - m.gamma))
    cen /= cen.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(ref_softmax(natural), cen, atol=1e-10)
    np.testing.assert_allclose(softmax_policy(npg_step(m, theta, eta, entropy=tau)), cen, atol=1e-12)


def test_entropy_regularised_npg_converges_linearly_to_soft_optimum():
    """Cen et al. (2021, Thm 1): ||Q*_tau - Q_tau^(t+1)||_inf <= C1 gamma (1 - eta tau)^t with
    C1 = ||Q*_tau - Q_tau^(0)||_inf + 2 tau (1 - eta tau / (1 - gamma)) ||log pi*_tau - log pi^(0)||_inf."""
    m = random_mdp(10, 4, 0.9, seed=14)
    tau = 0.1
    pi_star, Q_star = ref_soft_optimum(m, tau)
    for eta in (0.2, 0.5, (1 - m.gamma) / tau):  # the last one is soft policy iteration
        T = 60
        h = npg(m, eta, T, entropy=tau)
        Q0 = ref_soft_q(m, h.thetas[0], tau)
        C1 = np.abs(Q_star - Q0).max() + 2 * tau * (1 - eta * tau / (1 - m.gamma)) * np.abs(
            np.log(pi_star) - np.log(ref_softmax(h.thetas[0]))
        ).max()
        for t in range(T):
            err = np.abs(Q_star - ref_soft_q(m, h.thetas[t + 1], tau)).max()
            assert err <= C1 * m.gamma * (1 - eta * tau) ** t + 1e-10
        np.testing.assert_allclose(h.policy, pi_star, atol=1e-6 if eta < 0.5 else 1e-10)
        assert h.regularized_values is not None and h.regularized_values.shape == (T + 1,)


def test_geometric_step_sizes_converge_linearly():
    """Increasing steps eta_t = eta_0 / gamma^t (Lan 2021; Xiao 2022) give linear convergence.
    Empirical envelope checked here: gap_t <= gamma^t (gap_0 + log|A| / eta_0) (measured ratio <= 0.18)."""
    for seed in range(3):
        m = random_mdp(15, 4, 0.9, seed=seed)
        v_star = m.optimal_value()
        eta0, T = 0.1, 150
        h = npg(m, eta0, T, schedule="geometric", keep_thetas=False)
        np.testing.assert_allclose(h.step_sizes, eta0 * 0.9 ** -np.arange(T))
        gap = v_star - h.values
        t = np.arange(T + 1)
        assert (gap <= 0.9**t * (gap[0] + np.log(4) / eta0) + 1e-12).all()
        assert gap[-1] < 1e-10
        const = npg(m, eta0, T, keep_thetas=False)
        assert v_star - const.values[-1] > 1e-6  # the constant step is still far behind


def test_soft_optimal_policy_matches_an_independent_soft_value_iteration():
    """Q*_tau is the fixed point of Q = R + gamma P (tau log sum_a exp(Q / tau)), pi*_tau propto exp(Q*_tau / tau)."""
    m = random_mdp(10, 4, 0.9, seed=14)
    for tau in (0.05, 0.3, 2.0):
        pi, Q = soft_optimal_policy(m, tau)
        pi_ref, Q_ref = ref_soft_optimum(m, tau)
        np.testing.assert_allclose(Q, Q_ref, rtol=0, atol=1e-9)
        np.testing.assert_allclose(pi, pi_ref, rtol=0, atol=1e-9)


def test_npg_iterates_are_theta_plus_eta_advantage_over_one_minus_gamma():
    """The softmax NPG update in closed form (Kakade 2001; Agarwal et al. 2021): theta_{t+1} = theta_t +
    eta A^{pi_t} / (1 - gamma), with A = Q - V from an explicit inverse — the iterates themselves, not only the
    policies (a per-state constant, Q for A, would leave the policies as they are)."""
    m = tiny_mdp(seed=3)
    h = npg(m, 0.7, 4)
    for t in range(4):
        pi = ref_softmax(h.thetas[t])
        V = ref_solve_values(m, pi)
        A = m.R + m.gamma * np.einsum("sat,t->sa", m.P, V) - V[:, None]
        np.testing.assert_allclose(h.thetas[t + 1], h.thetas[t] + 0.7 * A / (1 - m.gamma), rtol=1e-10, atol=1e-12)


def test_npg_bound_formula():
    """log|A| / (eta T) + 1 / ((1 - gamma)^2 T), worked by hand: log 4 / 20 + 1 / (0.01 * 10) = 10.0693147..."""
    assert npg_bound(2.0, 10, 0.9, 4) == pytest.approx(np.log(4) / 20 + 10.0, rel=1e-12)
    assert npg_bound(2.0, 10, 0.9, 4) == pytest.approx(10.069314718055995, rel=1e-12)


def test_value_iteration_stops_by_its_rule_and_polishes_to_the_exact_optimum():
    """Sweeps stop at the first ||V_k+1 - V_k|| <= tol (1 - gamma) / (2 gamma) (a plain loop counts them); however
    loose tol is, the returned V* and policy are exact: the polish improves the greedy policy until it is stable."""
    m = chain(8, gamma=0.95)  # staying pays at once, going right pays later: sweeps cut short are myopic
    exact = ref_policy_iteration_values(m)
    for tol in (1e-8, 1.0, 50.0):
        V, pi, sweeps = value_iteration(m, tol)
        threshold = tol * (1 - m.gamma) / (2 * m.gamma)
        W, k = np.zeros(m.n_states), 0
        while True:
            k += 1
            W_new = (m.R + m.gamma * np.einsum("sat,t->sa", m.P, W)).max(axis=1)
            if np.abs(W_new - W).max() <= threshold:
                break
            W = W_new
        assert sweeps == k
        np.testing.assert_allclose(V, exact, rtol=0, atol=1e-9)
        np.testing.assert_allclose(ref_solve_values(m, pi), exact, rtol=0, atol=1e-9)
    greedy = np.eye(m.n_actions)[(m.R + m.gamma * np.einsum("sat,t->sa", m.P, W_new)).argmax(axis=1)]
    assert sweeps == 1 and (ref_solve_values(m, greedy) < exact - 1e-6).any()  # at tol 50 the sweeps stop short


def ref_policy_iteration_values(mdp: MDP) -> np.ndarray:
    """V* by plain policy iteration from the first action everywhere, until no action changes."""
    S, A = mdp.R.shape
    pi = np.eye(A)[np.zeros(S, dtype=int)]
    while True:
        V = ref_solve_values(mdp, pi)
        Q = mdp.R + mdp.gamma * np.einsum("sat,t->sa", mdp.P, V)
        improve = Q.max(axis=1) > (pi * Q).sum(axis=1) + 1e-12
        if not improve.any():
            return V
        pi[improve] = np.eye(A)[Q.argmax(axis=1)][improve]


# ------------------------------------------------------------------------------ builders
def test_gridworld_slips_to_the_two_perpendicular_moves():
    """Open 3x3 grid, centre cell 4, slip 0.2: 'up' goes up with 0.8, left and right with 0.1 each, never down (and
    likewise for 'down' and 'left'); at the top-left corner 'up' stays put with 0.8 + 0.1 (the left slip is blocked
    too) and slips right with 0.1."""
    m = gridworld(["S..", "...", "..G"], gamma=0.9, slip=0.2)
    up, right, down, left = 0, 1, 2, 3
    expected = np.zeros(9)
    expected[[1, 3, 5]] = [0.8, 0.1, 0.1]
    np.testing.assert_allclose(m.P[4, up], expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(m.P[4, down], np.eye(9)[7] * 0.8 + np.eye(9)[3] * 0.1 + np.eye(9)[5] * 0.1, rtol=0,
                               atol=1e-15)
    np.testing.assert_allclose(m.P[0, up], np.eye(9)[0] * 0.9 + np.eye(9)[1] * 0.1, rtol=0, atol=1e-15)
    np.testing.assert_allclose(m.P[0, right], np.eye(9)[1] * 0.8 + np.eye(9)[0] * 0.1 + np.eye(9)[3] * 0.1,
                               rtol=0, atol=1e-15)
    np.testing.assert_allclose(m.P[4, left], np.eye(9)[3] * 0.8 + np.eye(9)[1] * 0.1 + np.eye(9)[7] * 0.1, rtol=0,
                               atol=1e-15)


def test_from_gymnasium_reward_is_the_expected_reward_of_the_table():
    """R[s, a] = sum over the table's outcomes of prob * reward: slippery FrozenLake pays 1/3 for 'right' next to
    the goal (one of its three slips arrives), a plain loop over env.unwrapped.P for every pair."""
    import gymnasium

    m = frozen_lake(is_slippery=True, gamma=0.9)
    env = gymnasium.make("FrozenLake-v1", is_slippery=True)
    table = env.unwrapped.P
    env.close()
    for s in range(16):
        for a in range(4):
            assert m.R[s, a] == pytest.approx(sum(p * r for p, _, r, _ in table[s][a]), abs=1e-15)
    assert m.R[14, 2] == pytest.approx(1 / 3)  # state 14, action 2 (right): the goal is state 15


# ------------------------------------------------------------------------------ builders
def test_builders_known_optimal_values():
    # CliffWalking: the optimal path hugs the cliff, 13 steps of -1.
    m = cliff_walking(gamma=0.99)
    assert m.n_states == 49 and m.n_actions == 4
    assert m.optimal_value() == pytest.approx(-sum(0.99**k for k in range(13)), abs=1e-10)
    # Deterministic FrozenLake 4x4: 6 steps to the goal, reward 1 on the last.
    fl = frozen_lake(is_slippery=False, gamma=0.9)
    assert fl.optimal_value() == pytest.approx(0.9**5, abs=1e-12)
    # Gridworld without slip: the goal is 6 moves away, reward 1 on entering it.
    g = gridworld(gamma=0.9)
    assert g.optimal_value() == pytest.approx(0.9**5, abs=1e-12)
    # Chain: always-right reaches the end after n-1 steps, then collects 1 per step.
    c = chain(5, gamma=0.9)
    assert c.optimal_value() == pytest.approx(max(0.1 / 0.1, 0.9**4 / 0.1), abs=1e-12)
    # Kakade: switch in i, stay in j.
    np.testing.assert_array_equal(kakade_two_state().optimal_policy(), [[0, 1], [1, 0]])


def test_taxi_npg_matches_value_iteration_and_env_rollouts():
    import gymnasium as gym

    m = taxi(gamma=0.99)
    assert (m.n_states, m.n_actions) == (501, 6)
    h = npg(m, 1.0, 10, keep_thetas=False)
    v_star = optimal_values(m)
    assert abs(m.rho @ v_star - h.values[-1]) < 1e-13  # V*(ρ) to rounding (reached at iteration 2)
    # Taxi is deterministic: one rollout of the greedy NPG policy gives the exact return.
    env = gym.make("Taxi-v4").unwrapped
    policy = h.policy.argmax(axis=1)
    for start in np.flatnonzero(m.rho)[::60]:
        env.reset(seed=0)
        env.s = int(start)
        s, ret, disc = int(start), 0.0, 1.0
        for _ in range(200):
            s, r, terminated, _, _ = env.step(int(policy[s]))
            ret += disc * r
            disc *= 0.99
            if terminated:
                break
        assert ret == pytest.approx(v_star[start], abs=1e-9)
