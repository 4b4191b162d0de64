"""Parameterisation invariance: one NPG step gives the same policy under theta = M phi; PG does not.

With theta = G(phi), phi's own Fisher comes from the phi-policy's scores, psi_phi = J_G(phi)^T psi_theta,
weighted by d(s) pi(a|s): for a linear G = M phi it is M^T F M, and the natural step in phi, mapped back,
solves F x = g just like F^+ g (up to per-state constants, which leave pi unchanged): the same policy at
any step size. The vanilla step M M^T g does not. For a nonlinear G the natural gradient flow is invariant,
one step to first order: the policies after a step in phi and in theta differ by O(eta^2), PG's by O(eta).

Run:  python examples/tabular_invariance.py   (writes docs/img/tabular_invariance.png)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
try:
    from natpg import tabular
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
    from natpg import tabular


def phi_directions(mdp: tabular.MDP, G, jacobian, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The natural and the vanilla direction in phi ``[n]`` for the policy softmax(G(phi)), from that policy's own
    scores psi_phi(s, a) = J_G(phi)^T psi_theta(s, a), weighted by d(s) pi(a|s): F_phi = E[psi_phi psi_phi^T] and
    grad_phi V(rho) = E[psi_phi A(s, a)] / (1 - gamma) (the policy gradient theorem)."""
    S, A = mdp.n_states, mdp.n_actions
    pi = tabular.softmax_policy(G(phi).reshape(S, A))
    d, adv, J = tabular.state_distribution(mdp, pi), tabular.advantages(mdp, pi), jacobian(phi)
    F_phi, g_phi = np.zeros((len(phi), len(phi))), np.zeros(len(phi))
    for s in range(S):
        for a in range(A):
            score = np.zeros((S, A))  # d log pi(a|s) / d theta: e_(s, a) - pi(.|s) on state s's block
            score[s] = -pi[s]
            score[s, a] += 1.0
            psi = J.T @ score.ravel()
            F_phi += d[s] * pi[s, a] * np.outer(psi, psi)
            g_phi += d[s] * pi[s, a] * psi * adv[s, a] / (1 - mdp.gamma)
    return np.linalg.pinv(F_phi, rcond=1e-12, hermitian=True) @ g_phi, g_phi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "tabular_invariance.png")
    args = parser.parse_args()

    mdp = tabular.random_mdp(6, 3, gamma=0.9, seed=3, rho="dirichlet")
    S, A = mdp.n_states, mdp.n_actions
    n = S * A
    rng = np.random.default_rng(0)
    theta = rng.normal(size=(S, A))
    # natpg's natural step in theta, the reference each step taken in phi is mapped back to
    natural_theta, vanilla_theta = tabular.natural_gradient(mdp, theta), tabular.policy_gradient(mdp, theta)
    eta, lr = 0.5, 5.0

    reparams = {
        "identity": np.eye(n),
        "diag scale 0.1..10": np.diag(10.0 ** rng.uniform(-1, 1, n)),
        "random dense #1": np.eye(n) + 0.4 * rng.normal(size=(n, n)),
        "random dense #2": rng.normal(size=(n, n)),
    }
    pi_nat = tabular.softmax_policy(theta + eta * natural_theta)
    pi_van = tabular.softmax_policy(theta + lr * vanilla_theta)

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4.4))
    print(f"{'theta = M phi':22s} {'cond(M)':>9s} {'NPG max|Δπ|':>13s} {'PG max|Δπ|':>12s}")
    for (name, M), marker in zip(reparams.items(), "o^sD"):
        phi = np.linalg.solve(M, theta.ravel())
        nat, van = phi_directions(mdp, lambda p: M @ p, lambda p: M, phi)
        p_nat = tabular.softmax_policy((M @ (phi + eta * nat)).reshape(S, A))
        p_van = tabular.softmax_policy((M @ (phi + lr * van)).reshape(S, A))
        d_nat, d_van = np.abs(p_nat - pi_nat).max(), np.abs(p_van - pi_van).max()
        print(f"{name:22s} {np.linalg.cond(M):9.1f} {d_nat:13.2e} {d_van:12.2e}")
        ax0.scatter(pi_nat.ravel(), p_nat.ravel(), marker=marker, s=22, alpha=0.7, label=f"{name} ({d_nat:.0e})")
        ax1.scatter(pi_van.ravel(), p_van.ravel(), marker=marker, s=22, alpha=0.7, label=f"{name} ({d_van:.0e})")

    # A nonlinear G: the step in phi and natpg's step in theta agree to O(eta^2) (NPG), O(eta) (PG).
    B = rng.normal(size=(n, n)) / np.sqrt(n)
    phi = rng.normal(size=n)
    G = lambda p: p + 0.6 * np.tanh(B @ p) + 0.2 * p**3 / 3  # noqa: E731
    J_G = lambda p: np.eye(n) + 0.6 * (1 - np.tanh(B @ p) ** 2)[:, None] * B + 0.2 * np.diag(p**2)  # noqa: E731
    theta_g = G(phi).reshape(S, A)
    nat, van = phi_directions(mdp, G, J_G, phi)
    nat_theta, van_theta = tabular.natural_gradient(mdp, theta_g), tabular.policy_gradient(mdp, theta_g)
    print(f"\ntheta = phi + 0.6 tanh(B phi) + 0.2 phi^3 / 3 (cond J_G = {np.linalg.cond(J_G(phi)):.1f}), "
          f"one step of size eta in phi and in theta:")
    print(f"{'eta':>8s} {'NPG max|Δπ|':>13s} {'PG max|Δπ|':>12s}")
    for step in 0.2 / 2.0 ** np.arange(5):
        gaps = [np.abs(tabular.softmax_policy(G(phi + step * in_phi).reshape(S, A))
                       - tabular.softmax_policy(theta_g + step * in_theta)).max()
                for in_phi, in_theta in ((nat, nat_theta), (van, van_theta))]
        print(f"{step:8.4f} {gaps[0]:13.2e} {gaps[1]:12.2e}")
    titles = (f"NPG step (η={eta:g}): identical policies", f"vanilla PG step (lr={lr:g}): not invariant")
    for ax, title in zip((ax0, ax1), titles):
        ax.plot([0, 1], [0, 1], "k-", lw=0.6)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("π(a|s) after the step in θ")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7.5, title="θ = Mφ  (max |Δπ|)", title_fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    ax0.set_ylabel("π(a|s) after the step in φ")
    fig.suptitle(f"One step from the same policy, random MDP S={S}, A={A}, γ={mdp.gamma:g}", fontsize=11)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
