"""Cost of one natural-gradient solve (fit + solve) relative to one policy-gradient evaluation.

For Gaussian MLP policies from ~10k to ~10M actor parameters and batches of 1k to 100k states, time

* ``grad``: one forward + backward of the surrogate −mean(log π(a|s)·A) w.r.t. the actor parameters;
* for every curvature in ``natpg.fisher``: ``fit(policy, obs, act)`` followed by ``solve(g)``,

and print a markdown table of seconds for ``grad`` and of each solver as a multiple of ``grad``.
``cg+kfac`` is CG preconditioned by K-FAC (its fit, and a K-FAC solve per iteration). K-FAC is timed twice: refreshing its factors' Cholesky inverses every fit (``kfac``), and amortised over
``refresh_every=10`` fits (``kfac/10``: nine fits without a refresh and one with, per ten solves).
Combinations whose work (batch × parameters) exceeds ``--max-work``, or whose dense/empirical
matrices would not fit in memory, are shown as "–". Not part of the test run::

    python benchmarks/bench_curvature.py                      # CPU, the full sweep
    python benchmarks/bench_curvature.py --device cuda --max-work 1e13
    python benchmarks/bench_curvature.py --params 1e4 1e5 --batches 1000
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import torch

from natpg.fisher import CG, KFAC, Dense, Diagonal, Empirical
from natpg.params import flatten
from natpg.policies import GaussianMLP

OBS_DIM, ACT_DIM = 64, 8


def width_for(params: float) -> int:
    """Hidden width h of a (h, h) torso with ≈ ``params`` actor parameters: h² + (obs+act+2)h + … = params."""
    b = OBS_DIM + ACT_DIM + 2
    return max(8, int((-b + math.sqrt(b * b + 4 * params)) / 2))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Minimum wall time of ``fn`` over ``repeats`` calls after one warm-up call (the minimum is the
    estimate least disturbed by other processes on a shared machine)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def bench_one(P_target: float, B: int, device: torch.device, max_work: float, max_bytes: float,
              repeats: int) -> dict[str, float | None]:
    torch.manual_seed(0)
    policy = GaussianMLP(OBS_DIM, ACT_DIM, hidden=(width_for(P_target),) * 2).to(device)
    params = policy.actor_parameters()
    P = sum(p.numel() for p in params)
    row: dict[str, float | None] = {"P": P, "B": B}
    if B * P > max_work:
        return row
    gen = torch.Generator(device=device).manual_seed(0)
    obs = torch.randn(B, OBS_DIM, device=device, generator=gen)
    with torch.no_grad():
        act = policy.sample(policy(obs), generator=gen)
    adv = torch.randn(B, device=device, generator=gen)
    reps = repeats if B * P <= 1e9 else 2

    def gradient() -> torch.Tensor:
        surr = (policy.dist(obs).log_prob(act) * adv).mean()
        return flatten(torch.autograd.grad(surr, params))

    t_grad = timeit(gradient, device, reps)
    g = gradient().detach()

    def fit_solve(solver) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            solver.fit(policy, obs, act)
            return solver.solve(g)
        return run

    itemsize = obs.element_size()
    solvers = {
        "cg": lambda: CG(damping=0.1, iters=10, tol=0.0),  # tol 0: always the full 10 products
        "cg+kfac": lambda: CG(damping=0.1, iters=10, tol=0.0, preconditioner="kfac"),  # + a K-FAC fit, 10 K-FAC solves
        "kfac": lambda: KFAC(damping=0.1),
        "diagonal": lambda: Diagonal(damping=0.1),
        "empirical": lambda: Empirical(damping=0.1, max_bytes=int(max_bytes)) if B * P * itemsize <= max_bytes
        else None,
        # the dense Fisher costs P²·B·K to form and P³/3 to factor: only the smallest case, timed once
        "dense": lambda: Dense(damping=0.1) if P <= 12_000 and B <= 1_000 else None,
    }
    for name, make in solvers.items():
        solver = make()
        if solver is None:
            row[name] = None
        elif name == "dense":
            sync(device)
            t = time.perf_counter()
            fit_solve(solver)()
            sync(device)
            row[name] = (time.perf_counter() - t) / t_grad
        else:
            row[name] = timeit(fit_solve(solver), device, reps) / t_grad
    # K-FAC amortised over refresh_every=10: a fit with a refresh, a fit without, a solve.
    k = KFAC(damping=0.1, refresh_every=10)
    t_refresh = timeit(lambda: (setattr(k, "fits", 0), k.fit(policy, obs, act)), device, reps)
    t_plain = timeit(lambda: (setattr(k, "fits", 1), k.fit(policy, obs, act)), device, reps)
    t_solve = timeit(lambda: k.solve(g), device, reps)
    row["kfac/10"] = ((t_refresh + 9 * t_plain) / 10 + t_solve) / t_grad
    # the gradient once more at the end: the smaller of the two is the reference (less disturbed)
    row["grad_s"] = t_end = min(t_grad, timeit(gradient, device, reps))
    for name in ("cg", "cg+kfac", "kfac", "kfac/10", "diagonal", "empirical", "dense"):
        if row.get(name) is not None:
            row[name] *= t_grad / t_end
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--params", type=float, nargs="+", default=[1e4, 1e5, 1e6, 1e7])
    ap.add_argument("--batches", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--max-work", type=float, default=1e10, help="skip combinations with batch × params above this")
    ap.add_argument("--max-bytes", type=float, default=2 * 2**30, help="memory cap for the empirical score matrix")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (2 for the largest)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cols = ["cg", "cg+kfac", "kfac", "kfac/10", "diagonal", "empirical", "dense"]
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"policy=GaussianMLP({OBS_DIM}, {ACT_DIM}, (h, h)) float32; solver columns are (fit + solve) / grad\n",
          flush=True)
    print("| params | batch | grad (s) | " + " | ".join(cols) + " |")
    print("|---:|---:|---:|" + "---:|" * len(cols), flush=True)
    for P in args.params:
        for B in args.batches:
            try:
                row = bench_one(P, B, device, args.max_work, args.max_bytes, args.repeats)
            except torch.cuda.OutOfMemoryError:  # the rows before it are printed already; go on with the next
                torch.cuda.empty_cache()
                print(f"| ≈{P:,.0f} | {B:,} | out of memory |" + " |" * len(cols), flush=True)
                continue
            if "grad_s" not in row:
                print(f"| {row['P']:,} | {B:,} | – |" + " – |" * len(cols), flush=True)
                continue
            cells = ["–" if row[c] is None else f"{row[c]:.2f}×" for c in cols]
            print(f"| {row['P']:,} | {B:,} | {row['grad_s']:.4f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
