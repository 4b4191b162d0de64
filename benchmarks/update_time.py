"""Update time per iteration, CPU against GPU: NPG's actor update (g, CG 10 on exact Fisher products, KL step)
plus the critic's Adam regression (10 epochs of minibatch 256), on a synthetic HalfCheetah-sized batch
(17-dim observations, 6-dim Gaussian actions), for policies from 64×64 to ~10M actor parameters and batches
from 1k to 100k states. Environments are not involved: this is the learner alone. Not part of the test run::

    python benchmarks/update_time.py                         # CPU, and CUDA when available
    python benchmarks/update_time.py --devices cuda --hidden 64 256 1024 2236 --batches 1000 10000 100000

Prints a markdown table: seconds per update (median of ``--repeats`` after one warm-up) per device, the actor
and critic parts, and the CPU/GPU ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from natpg.algorithms import Batch, make_actor_update, make_critic
from natpg.policies import GaussianMLP
from natpg.presets import default_config

OBS_DIM, ACT_DIM = 17, 6


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_update(device: torch.device, hidden: int, B: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = default_config("npg", "mujoco").override(hidden=(hidden, hidden), critic_hidden=(64, 64))
    policy = GaussianMLP(OBS_DIM, ACT_DIM, (hidden, hidden)).to(device)
    critic = make_critic(cfg, OBS_DIM).to(device)
    update = make_actor_update(cfg, torch.Generator().manual_seed(0))
    gen = torch.Generator(device=device).manual_seed(0)
    obs = torch.randn(B, OBS_DIM, device=device, generator=gen)
    with torch.no_grad():
        eta = policy(obs)
        act = policy.sample(eta, generator=gen)
        logp = policy.head.dist(eta).log_prob(act)
    adv = torch.randn(B, device=device, generator=gen)
    batch = Batch(obs=obs, act=act, adv=adv, ret=torch.randn(B, device=device, generator=gen), logp_old=logp,
                  eta_old=eta)
    actor, crit = [], []
    for i in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        update.update(policy, batch)
        sync(device)
        t1 = time.perf_counter()
        critic.fit(batch.obs, batch.ret, torch.Generator().manual_seed(i))
        sync(device)
        t2 = time.perf_counter()
        if i:  # the first call is the warm-up
            actor.append(t1 - t0)
            crit.append(t2 - t1)
    P = sum(p.numel() for p in policy.actor_parameters())
    return {"P": P, "actor": statistics.median(actor), "critic": statistics.median(crit)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    ap.add_argument("--hidden", type=int, nargs="+", default=[64, 256, 1024, 2236])
    ap.add_argument("--batches", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--max-work", type=float, default=1e11, help="skip hidden² × batch above this on the CPU")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} "
          f"gpu={torch.cuda.get_device_name() if torch.cuda.is_available() else '-'}\n")
    cols = " | ".join(f"{d} update (s) | {d} actor | {d} critic" for d in args.devices)
    print(f"| hidden | actor params | batch | {cols} |" + (" cpu/gpu |" if len(args.devices) > 1 else ""))
    print("|---:|---:|---:|" + "---:|" * (3 * len(args.devices) + (len(args.devices) > 1)))
    for h in args.hidden:
        for B in args.batches:
            cells, totals, P = [], {}, None
            for d in args.devices:
                device = torch.device(d)
                if device.type == "cpu" and h * h * B > args.max_work:
                    cells += ["–"] * 3
                    continue
                r = one_update(device, h, B, args.repeats)
                P, totals[d] = r["P"], r["actor"] + r["critic"]
                cells += [f"{totals[d]:.4f}", f"{r['actor']:.4f}", f"{r['critic']:.4f}"]
            ratio = f" {totals['cpu'] / totals['cuda']:.1f}× |" if {"cpu", "cuda"} <= set(totals) else \
                (" – |" if len(args.devices) > 1 else "")
            print(f"| {h} | {P or 0:,} | {B:,} | " + " | ".join(cells) + " |" + ratio, flush=True)


if __name__ == "__main__":
    main()
