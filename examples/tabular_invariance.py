"""Parameterisation invariance: one NPG step gives the same policy under theta = M phi; PG does not.

With theta = M phi (M invertible), the chain rule gives grad_phi V = M^T g and the Fisher in phi
is M^T F M. The natural step in phi, mapped back, M (M^T F M)^+ M^T g, solves F x = g just like
F^+ g (up to per-state constants, which leave pi unchanged). The vanilla step M M^T g does not.

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


def steps(F: np.ndarray, g: np.ndarray, M: np.ndarray, eta: float, lr: float) -> tuple[np.ndarray, np.ndarray]:
    """Parameter changes in theta-space ``[n]`` of one natural and one vanilla step taken in phi."""
    natural_phi = np.linalg.pinv(M.T @ F @ M, rcond=1e-12, hermitian=True) @ (M.T @ g)
    vanilla_phi = M.T @ g
    return eta * M @ natural_phi, lr * M @ vanilla_phi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "tabular_invariance.png")
    args = parser.parse_args()

    mdp = tabular.random_mdp(6, 3, gamma=0.9, seed=3, rho="dirichlet")
    S, A = mdp.n_states, mdp.n_actions
    n = S * A
    rng = np.random.default_rng(0)
    theta = rng.normal(size=(S, A))
    F = tabular.fisher(mdp, theta)
    g = tabular.policy_gradient(mdp, theta).ravel()
    eta, lr = 0.5, 5.0

    reparams = {
        "identity": np.eye(n),
        "diag scale 0.1..10": np.diag(10.0 ** rng.uniform(-1, 1, n)),
        "random dense #1": np.eye(n) + 0.4 * rng.normal(size=(n, n)),
        "random dense #2": rng.normal(size=(n, n)),
    }
    base_nat, base_van = steps(F, g, np.eye(n), eta, lr)
    pi_nat = tabular.softmax_policy(theta + base_nat.reshape(S, A))
    pi_van = tabular.softmax_policy(theta + base_van.reshape(S, A))

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4.4))
    print(f"{'theta = M phi':22s} {'cond(M)':>9s} {'NPG max|Δπ|':>13s} {'PG max|Δπ|':>12s}")
    for (name, M), marker in zip(reparams.items(), "o^sD"):
        nat, van = steps(F, g, M, eta, lr)
        p_nat = tabular.softmax_policy(theta + nat.reshape(S, A))
        p_van = tabular.softmax_policy(theta + van.reshape(S, A))
        d_nat, d_van = np.abs(p_nat - pi_nat).max(), np.abs(p_van - pi_van).max()
        print(f"{name:22s} {np.linalg.cond(M):9.1f} {d_nat:13.2e} {d_van:12.2e}")
        ax0.scatter(pi_nat.ravel(), p_nat.ravel(), marker=marker, s=22, alpha=0.7, label=f"{name} ({d_nat:.0e})")
        ax1.scatter(pi_van.ravel(), p_van.ravel(), marker=marker, s=22, alpha=0.7, label=f"{name} ({d_van:.0e})")
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
