"""Where each F⁻¹ sends the step, on the batches of a real training run (not part of the test run).

Trains one agent with its preset (default: NPG on Ant-v5, seed 0) and, before every ``--every``-th update,
takes that update's batch (``n_envs`` copies × ``n_steps``, flattened t·N + n) apart by copy into halves A
(copies 0 … N/2−1) and B (the rest): independent trajectories of the same policy. For each direction below,
solved from A's gradient on A's states, the step θ + αd is scaled by bisection so that the realised mean KL
on A is ``--kl`` (the same in-sample KL for every direction), and the row records

* ``gain_A`` / ``gain_B``: the surrogate's gain on A (in sample) and on B (held out),
* ``kl_B``: the realised mean KL on B's states (how far the step moves the policy where it was not fitted),
* ``cos_exact``: the cosine with CG's solution after 100 iterations at damping 1e−4 (``cg_near_exact``),
* ``gTd_norm``: the cosine with the gradient,
* ``share0`` …: the fraction of ‖d‖² in each actor parameter tensor (W₁, b₁, W₂, b₂, W₃, b₃, log σ for
  a two-hidden-layer Gaussian MLP);

then A and B swap. The policy is restored bit for bit after each measurement (the preset's own run goes on
as without the study), and K-FAC's "preset" direction folds A into a copy of the run's own moving averages.

    python benchmarks/direction_study.py --out benchmarks/results/ant_npg_kfac_directions.csv
"""

from __future__ import annotations

import argparse
import copy
import csv

import torch

import natpg
from natpg.algorithms import Batch, surrogate, surrogate_and_kl
from natpg.fisher import CG, KFAC
from natpg.params import flatten


def halves(batch: Batch, n_envs: int) -> tuple[Batch, Batch]:
    copy_of_row = torch.arange(batch.obs.shape[0]) % n_envs
    first = copy_of_row < n_envs // 2
    fields = (batch.obs, batch.act, batch.adv, batch.ret, batch.logp_old, batch.eta_old)
    return Batch(*(t[first] for t in fields)), Batch(*(t[~first] for t in fields))


def set_flat(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    with torch.no_grad():
        i = 0
        for p in params:
            p.copy_(flat[i:i + p.numel()].view_as(p))
            i += p.numel()


def directions(run_curvature, seed: int) -> dict:
    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    preset = copy.deepcopy(run_curvature)  # the run's K-FAC with its moving averages (keyed to the policy's modules)
    preset.generator = gen()
    damped = copy.deepcopy(run_curvature)
    damped.generator, damped.damping = gen(), 0.1
    return {"kfac_preset": preset,
            "kfac_ema0": KFAC(damping=0.01, ema_decay=0.0, generator=gen()),
            "kfac_damp0.1": damped,
            "cg_damp0.1": CG(damping=0.1, iters=10), "cg_damp0.01": CG(damping=0.01, iters=10),
            "cg_damp0.1_iters30": CG(damping=0.1, iters=30), "cg_damp0.1_iters100": CG(damping=0.1, iters=100),
            "cg_near_exact": CG(damping=1e-4, iters=100, tol=1e-12),
            "cg_damp0.01_kfac_preconditioned": CG(damping=0.01, iters=10, preconditioner="kfac", generator=gen())}


def study(agent, policy, batch: Batch, kl_target: float, index: int) -> list[dict]:
    rows = []
    params = list(policy.actor_parameters())
    theta = flatten([p.detach() for p in params]).clone()
    first, second = halves(batch, agent.config.env.n_envs)
    for fit_half, (A, B) in enumerate(((first, second), (second, first))):
        g = flatten(torch.autograd.grad(surrogate(policy, A), params)).detach()
        dirs = {}
        for name, solver in directions(agent.actor_update.curvature, 1000 + index).items():
            solver.fit(policy, A.obs, A.act)
            dirs[name] = solver.solve(g)
        dirs["gradient"] = g
        s0A, _ = surrogate_and_kl(policy, A)
        s0B, _ = surrogate_and_kl(policy, B)
        ref = dirs["cg_near_exact"]
        for name, d in dirs.items():
            def at(alpha: float, on: Batch) -> tuple[float, float]:
                set_flat(params, theta + alpha * d)
                return surrogate_and_kl(policy, on)

            lo, hi = 0.0, 1.0
            while at(hi, A)[1] < kl_target and hi < 1e8:
                hi *= 2
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if at(mid, A)[1] < kl_target else (lo, mid)
            sA, klA = at(lo, A)
            sB, klB = at(lo, B)
            set_flat(params, theta)
            norm = d.norm()
            shares, i = [], 0
            for p in params:
                shares.append(float((d[i:i + p.numel()] ** 2).sum() / norm ** 2))
                i += p.numel()
            rows.append({"update": agent.updates, "fit_half": fit_half, "method": name, "alpha": lo, "kl_A": klA,
                         "kl_B": klB, "gain_A": sA - s0A, "gain_B": sB - s0B,
                         "cos_exact": float(d @ ref / (norm * ref.norm())), "gTd_norm": float(g @ d / (norm * g.norm())),
                         **{f"share{j}": s for j, s in enumerate(shares)}})
    assert torch.equal(flatten([p.detach() for p in params]), theta)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algo", default="npg")
    ap.add_argument("--env", default="Ant-v5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--every", type=int, default=10, help="study every this many updates")
    ap.add_argument("--kl", type=float, default=0.04, help="realised in-sample KL every direction is scaled to")
    ap.add_argument("--out", required=True, help="CSV file for the rows")
    args = ap.parse_args()
    agent = natpg.agent.ALGORITHM_CLASSES[args.algo](args.env, seed=args.seed, torch_threads=1)
    if not isinstance(agent.actor_update.curvature, KFAC):
        raise SystemExit(f"{args.algo} on {args.env} does not solve with K-FAC; its preset is the study's reference")
    rows: list[dict] = []
    update = agent.actor_update.update

    def studied(policy, batch):
        if agent.updates % args.every == 0:
            rows.extend(study(agent, policy, batch, args.kl, agent.updates // args.every))
        return update(policy, batch)

    agent.actor_update.update = studied
    agent.learn(args.steps)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} rows in {args.out}")


if __name__ == "__main__":
    main()
