"""Empirical Fisher vs true Fisher: where they agree (on-policy, in expectation) and where they do not.

A small categorical MLP policy π (3 inputs, 8 tanh units, 4 actions, P = 68 parameters), made peaked
as if trained (mean max-probability ≈ 0.7). On N sampled states s_b, with the same states for both:

* the true Fisher   F     = (1/N) Σ_b E_{a~π(·|s_b)}[ψψᵀ]   (actions integrated out: ``fisher.dense_fisher``);
* the empirical one F_emp = (1/N) Σ_b ψ(s_b, a_b) ψ(s_b, a_b)ᵀ for the actions a_b in the data
  (``fisher.Empirical``), ψ = ∇_θ log π(a|s).

Two sources of actions: on-policy (a_b ~ π, so E[F_emp] = F and the error shrinks like 1/√N) and
off-policy, from the same network at initialisation (near-uniform: exploration data, or a replayed
batch from early in training), for which F_emp converges to E_β[ψψᵀ] ≠ F. For a fixed exact gradient
g (a synthetic advantage, actions integrated out) the script compares the natural directions
d = (F + λI)⁻¹g and d_emp = (F_emp + λI)⁻¹g: the angle between them in the Fisher metric (the angle
between the policy changes they cause), and the exact KL(π‖π_new) of the step that each sizes with its
own quadratic model to the budget δ (what a KL step rule does when its metric is the matrix it
inverted).

Run:  python examples/empirical_vs_true_fisher.py     (writes docs/img/empirical_vs_true_fisher.png)
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributions import kl_divergence

ROOT = Path(__file__).resolve().parents[1]
try:
    import natpg  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
from natpg.fisher import Empirical, dense_fisher, per_sample_scores  # noqa: E402
from natpg.params import add_flat  # noqa: E402
from natpg.policies import CategoricalMLP  # noqa: E402

OBS_DIM, N_ACTIONS, HIDDEN = 3, 4, (8,)
DAMPING = 1e-3  # λ, about 0.1 % of the mean eigenvalue tr(F)/P ≈ 0.8 (and 20 % of the median, 5e-3)
MAX_KL = 0.01  # δ


@dataclass
class Scenario:
    policy: CategoricalMLP  # π: the "trained", peaked policy
    behaviour: CategoricalMLP  # β: the same network at initialisation (near-uniform)
    q_weights: torch.Tensor  # [OBS_DIM, N_ACTIONS], Q(s, a) = (s W)[a] for the synthetic advantage


def scenario(seed: int = 0, sharpness: float = 3.0) -> Scenario:
    """π and β share the torso; π's output layer is redrawn with std ``sharpness`` (β's is 0.01-scaled)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    behaviour = CategoricalMLP(OBS_DIM, N_ACTIONS, HIDDEN)
    policy = CategoricalMLP(OBS_DIM, N_ACTIONS, HIDDEN)
    policy.load_state_dict(behaviour.state_dict())
    with torch.no_grad():
        w = policy.logits_net[-1].weight
        w.copy_(sharpness * torch.randn(w.shape, generator=gen, dtype=w.dtype))
    return Scenario(policy, behaviour, torch.randn(OBS_DIM, N_ACTIONS, generator=gen))


def probs(policy: CategoricalMLP, obs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(policy(obs), dim=-1)


def exact_gradient(sc: Scenario, obs: torch.Tensor) -> torch.Tensor:
    """g = (1/N) Σ_b Σ_a π(a|s_b) ψ(s_b, a) A(s_b, a), A = Q − Σ_a π Q: ∇ of mean_b Σ_a π_θ(a|s_b) A(s_b, a)."""
    pi = probs(sc.policy, obs)
    q = obs @ sc.q_weights.to(obs.dtype)
    adv = q - (pi * q).sum(-1, keepdim=True)
    params = sc.policy.actor_parameters()
    objective = (torch.softmax(sc.policy(obs), dim=-1) * adv).sum(-1).mean()
    return torch.cat([t.reshape(-1) for t in torch.autograd.grad(objective, params)])


def expected_empirical_fisher(policy: CategoricalMLP, obs: torch.Tensor, action_probs: torch.Tensor) -> torch.Tensor:
    """E_{a_b ~ action_probs[b]}[F_emp] = (1/N) Σ_b Σ_a p(a|s_b) ψψᵀ, every action enumerated: [P, P].

    With action_probs = π this is the true Fisher (E[F_emp] = F on-policy); with a behaviour β it is the
    limit that off-policy F_emp converges to.
    """
    N, K = action_probs.shape
    act = torch.arange(K).repeat(N)
    S = per_sample_scores(policy, obs.repeat_interleave(K, dim=0), act)  # [N·K, P]
    weights = action_probs.reshape(-1, 1) / N
    return S.T @ (weights * S)


def sample_states(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, OBS_DIM, generator=gen, dtype=torch.get_default_dtype())


def sample_actions(policy: CategoricalMLP, obs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.multinomial(probs(policy, obs), 1, generator=gen).squeeze(-1)


def step_kl(policy: CategoricalMLP, obs: torch.Tensor, delta: torch.Tensor) -> float:
    """Exact mean_b KL(π_θ(·|s_b) ‖ π_{θ+Δ}(·|s_b)), old first, parameters restored afterwards."""
    params = policy.actor_parameters()
    with torch.no_grad():
        old = policy.dist(obs)
        add_flat(params, delta, 1.0)
        kl = float(kl_divergence(old, policy.dist(obs)).mean())
        add_flat(params, delta, -1.0)
    return kl


def measure(sc: Scenario, obs: torch.Tensor, act: torch.Tensor, damping: float = DAMPING,
            max_kl: float = MAX_KL) -> dict[str, float]:
    """Compare F_emp (from ``act``) with F on the states ``obs`` [N, OBS_DIM], and the steps they give.

    Returns: ``rel_error`` ‖F_emp − F‖_F / ‖F‖_F; ``angle_deg`` the Fisher-metric angle between d and
    d_emp, arccos(dᵀF d_emp / √(dᵀFd · d_empᵀF d_emp)); ``angle_euclid_deg`` the plain one; ``kl_emp``
    and ``kl_true`` the exact KL of the steps √(2δ / dᵀMd)·d sized by their own M = F_emp + λI and
    F + λI; ``gain_ratio`` gᵀd_emp / gᵀd at equal quadratic KL under F (how much first-order
    improvement the empirical direction keeps when its length is measured with the true Fisher, as
    natpg.NAC does).
    """
    policy = sc.policy
    F = dense_fisher(policy, obs)
    P = F.shape[0]
    eye = torch.eye(P, dtype=F.dtype)
    emp = Empirical(damping=damping)
    emp.fit(policy, obs, act)  # the score matrix S [N, P] of the taken actions
    F_emp = emp.scores.T @ emp.scores / obs.shape[0]
    g = exact_gradient(sc, obs)
    # Both by the same dense solve, so that only the matrices differ (Empirical.solve uses a capped CG when N ≥ P).
    d = torch.linalg.solve(F + damping * eye, g)
    d_emp = torch.linalg.solve(F_emp + damping * eye, g)

    def sized(v: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        return math.sqrt(2.0 * max_kl / float(v @ M @ v)) * v

    cos_f = float(d @ F @ d_emp) / math.sqrt(float(d @ F @ d) * float(d_emp @ F @ d_emp))
    cos_e = float(d @ d_emp) / float(d.norm() * d_emp.norm())
    return {
        "rel_error": float((F_emp - F).norm() / F.norm()),
        "angle_deg": math.degrees(math.acos(max(-1.0, min(1.0, cos_f)))),
        "angle_euclid_deg": math.degrees(math.acos(max(-1.0, min(1.0, cos_e)))),
        "kl_emp": step_kl(policy, obs, sized(d_emp, F_emp + damping * eye)),
        "kl_true": step_kl(policy, obs, sized(d, F + damping * eye)),
        "gain_ratio": float(g @ sized(d_emp, F)) / float(g @ sized(d, F)),
    }


def sweep(sizes: list[int], repeats: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """measure() for on- and off-policy actions at each N over ``repeats`` fresh draws of states and actions:
    {source: {metric: tensor [len(sizes), repeats]}}."""
    sc = scenario(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    out: dict[str, dict[str, list]] = {"on-policy": {}, "off-policy": {}}
    for n in sizes:
        for source in out:
            rows = []
            for _ in range(repeats):
                obs = sample_states(n, gen)
                act = sample_actions(sc.policy if source == "on-policy" else sc.behaviour, obs, gen)
                rows.append(measure(sc, obs, act))
            for k in rows[0]:
                out[source].setdefault(k, []).append([r[k] for r in rows])
    return {s: {k: torch.tensor(v) for k, v in m.items()} for s, m in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "empirical_vs_true_fisher.png")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-log2n", type=int, default=15)
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [2**k for k in range(5, args.max_log2n + 1)]
    res = sweep(sizes, args.repeats)
    sc = scenario(0)
    gen = torch.Generator().manual_seed(123)
    obs = sample_states(4096, gen)
    F = dense_fisher(sc.policy, obs)
    F_beta = expected_empirical_fisher(sc.policy, obs, probs(sc.behaviour, obs))
    bias = float((F_beta - F).norm() / F.norm())
    spectra = {"true F": (F, dict(color="k", lw=2)),
               "E_β[F_emp] (off-policy limit)": (F_beta, dict(color="C3", ls="--", lw=2))}
    for name, pol, color in (("F_emp on-policy", sc.policy, "C0"), ("F_emp off-policy", sc.behaviour, "C3")):
        S = per_sample_scores(sc.policy, obs[:256], sample_actions(pol, obs[:256], gen))
        spectra[f"{name}, N = 256"] = (S.T @ S / 256, dict(color=color))

    print(f"P = {F.shape[0]}, λ = {DAMPING}, δ = {MAX_KL}; off-policy bias ‖E_β[F_emp] − F‖/‖F‖ = {bias:.3f}")
    print(f"{'N':>6} | {'source':<10} | rel error | angle_F (°) | angle_euclid (°) | KL of F_emp-sized step | "
          f"KL of F-sized step | gain at equal KL")
    for i, n in enumerate(sizes):
        for source, m in res.items():
            med = {k: float(v[i].median()) for k, v in m.items()}
            print(f"{n:>6} | {source:<10} | {med['rel_error']:9.3f} | {med['angle_deg']:11.1f} | "
                  f"{med['angle_euclid_deg']:16.1f} | {med['kl_emp']:22.4f} | {med['kl_true']:18.4f} | "
                  f"{med['gain_ratio']:.3f}")

    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    n = torch.tensor(sizes, dtype=torch.float64)
    colors = {"on-policy": "C0", "off-policy": "C3"}

    def band(ax, key: str, source: str, label: str | None = None, color: str | None = None) -> None:
        v = res[source][key]
        ax.plot(sizes, v.median(1).values, "o-", color=color or colors[source], label=label or source)
        ax.fill_between(sizes, v.min(1).values, v.max(1).values, color=color or colors[source], alpha=0.2)

    ax = axes[0, 0]
    for source in res:
        band(ax, "rel_error", source)
    on0 = float(res["on-policy"]["rel_error"][0].median())
    ax.plot(sizes, on0 * (n[0] / n).sqrt(), "k:", label="∝ 1/√N")
    ax.axhline(bias, color="C3", ls="--", label="‖E_β[F_emp] − F‖/‖F‖")
    ax.set(xscale="log", yscale="log", xlabel="samples N", ylabel="‖F_emp − F‖_F / ‖F‖_F",
           title="Fisher error: on-policy → 0, off-policy → a bias")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    for source in res:
        band(ax, "angle_deg", source)
    ax.set(xscale="log", xlabel="samples N", ylabel="angle (degrees, Fisher metric)",
           title="Angle between (F_emp + λI)⁻¹g and (F + λI)⁻¹g")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    for source in res:
        band(ax, "kl_emp", source, f"{source}: step sized by F_emp")
    band(ax, "kl_true", "on-policy", "step sized by the true F", color="k")
    ax.axhline(MAX_KL, color="k", ls="--", label="budget δ")
    ax.set(xscale="log", yscale="log", xlabel="samples N", ylabel="exact KL(π ‖ π_new)",
           title="True KL of a step sized to δ by its own metric")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    for name, (M, style) in spectra.items():
        ev = torch.linalg.eigvalsh(M).flip(0).clamp_min(1e-12)
        ax.plot(range(1, len(ev) + 1), ev, label=name, **style)
    ax.set(yscale="log", ylim=(1e-8, None), xlabel="index", ylabel="eigenvalue",
           title=f"Spectra (P = {F.shape[0]}; N = 4096 states for F and E_β[F_emp])")
    ax.legend(fontsize=8)
    fig.suptitle(f"Empirical vs true Fisher, categorical MLP policy (λ = {DAMPING}, δ = {MAX_KL}; "
                 f"median and range over {args.repeats} draws)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
