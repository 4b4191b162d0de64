"""Throughput of natpg NPG against sb3-contrib TRPO and the raw env stepping rate, in one run.

Same machine, same run, alternating (BENCHMARKING.md): for each repeat, measure the raw env rate, then
each natpg engine, then sb3-contrib, each after one warm-up update; report the median and spread over
repeats. Equal work per update: the same batch (env steps per update), [64, 64] tanh actor and critic,
CG 10 iterations, 10 critic epochs with minibatch 256... as far as each library's knobs allow. natpg's
engines differ only in who steps the environments (the update is the same):

- natpg: ``--n-envs`` copies in this process (the default sampler);
- natpg_16: 16 copies in this process (the same batch in fewer, wider steps);
- natpg_processes: 16 copies over 2 worker processes (``sampler='processes'``), which step the next rollout
  while the learner fits the critic;
- natpg_multiproc: ``--n-envs`` copies whose simulators step in 2 processes, one message per step.

    python benchmarks/throughput.py --env HalfCheetah-v5 --batch 2048 --updates 5 --repeats 3

``--set KEY=VALUE`` changes a natpg setting in every natpg row (not one the rows fix for equal work; a
profiling before/after, e.g. ``--set fvp_subsample=0.2``: Fisher-vector products on a fifth of the batch,
drawn once per update); the sb3-contrib row keeps its settings (its ``sub_sampling_factor`` thins the whole
actor update, gradient and line search included, so it is not the same knob).

Needs sb3-contrib (pip install -e ".[bench]"); without it only natpg and the raw rate are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from natpg.bench import raw_env_rate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py
from common import positive_int  # noqa: E402


# natpg's rows: (copies, None = --n-envs; sampler settings)
ENGINES = {"natpg": (None, {}), "natpg_16": (16, {}),
           "natpg_processes": (16, {"sampler": "processes", "workers": 2}),
           "natpg_multiproc": (None, {"vectorization": "multiproc"})}
# The equal-work settings every natpg row fixes (with n_envs and n_steps from --batch and the row).
EQUAL_WORK = {"critic_epochs": 10, "critic_minibatch": 256, "cg_iters": 10, "tensorboard": False}
FIXED_BY_ROWS = {"n_envs", "n_steps", *EQUAL_WORK, *(key for _, engine in ENGINES.values() for key in engine)}


def natpg_rate(env_id: str, batch: int, updates: int, n_envs: int, settings: dict, **engine) -> float:
    import natpg

    if batch % n_envs:  # the rate counts updates × batch steps: only true when each update steps all of them
        raise ValueError(f"batch {batch} must be a multiple of n_envs {n_envs}")
    agent = natpg.NPG(env_id, seed=0, n_envs=n_envs, n_steps=batch // n_envs, **EQUAL_WORK, **settings, **engine)
    agent.learn(batch)
    start = time.perf_counter()
    agent.learn(updates * batch, reset=False)
    rate = updates * batch / (time.perf_counter() - start)
    agent.close()
    return rate


def sb3_rate(env_id: str, batch: int, updates: int) -> float:
    from sb3_contrib import TRPO

    # sb3-contrib's own defaults for the critic: n_critic_updates=10 passes with batch_size 128 minibatches.
    model = TRPO("MlpPolicy", env_id, n_steps=batch, batch_size=256, n_critic_updates=10, cg_max_steps=10,
                 policy_kwargs={"net_arch": [64, 64], "activation_fn": torch.nn.Tanh}, seed=0, device="cpu")
    model.learn(batch)
    start = time.perf_counter()
    model.learn(updates * batch, reset_num_timesteps=False)
    rate = updates * batch / (time.perf_counter() - start)
    model.env.close()
    return rate


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="HalfCheetah-v5")
    p.add_argument("--batch", type=positive_int, default=2048,
                   help="env steps per update: a multiple of every natpg row's copies")
    p.add_argument("--updates", type=positive_int, default=5)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--n-envs", type=positive_int, default=8)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--engines", nargs="+", choices=[*ENGINES, "sb3"], default=[*ENGINES, "sb3"],
                   help="which rows to measure beside the raw rate (default: all); with PYTHONPATH=OTHER/src "
                        "the natpg rows of another checkout, for an A/B")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a natpg setting for every natpg row (repeatable; values as `natpg train --set`), "
                        "e.g. fvp_subsample=0.2; the sb3-contrib row is left as it is")
    args = p.parse_args(argv)
    from natpg.presets import config_for
    from natpg.cli import parse_setting

    try:  # refused here, before any measurement
        settings = dict(parse_setting(s) for s in args.settings)
        config_for("npg", args.env, settings)
    except (TypeError, ValueError) as exc:
        p.error(f"--set: {exc}")
    if fixed := sorted(FIXED_BY_ROWS & set(settings)):
        p.error(f"--set: {fixed} are fixed by the rows (equal work per update; --batch, --n-envs, --engines set "
                f"the batch and who steps it)")
    engines = {name: (args.n_envs if n_envs is None else n_envs, engine)
               for name, (n_envs, engine) in ENGINES.items() if name in args.engines}
    # Each update steps every copy batch / copies times: a remainder would be dropped from natpg's updates
    # but still counted in its rate, and sb3 would step more per update (not equal work). As `natpg bench`.
    if uneven := [f"{name} ({n_envs} copies)" for name, (n_envs, _) in engines.items() if args.batch % n_envs]:
        p.error(f"--batch {args.batch} must be a multiple of each natpg row's env copies, and is not for "
                f"{', '.join(uneven)}; natpg and natpg_multiproc step --n-envs copies, the others 16")
    torch.set_num_threads(args.threads)
    try:
        import sb3_contrib  # noqa: F401
        have_sb3 = True
    except ImportError:
        have_sb3 = False
    have_sb3 = have_sb3 and "sb3" in args.engines
    rows: dict[str, list[float]] = {"raw": [], **{name: [] for name in engines}, "sb3": []}
    for _ in range(args.repeats):
        rows["raw"].append(raw_env_rate(args.env))
        for name, (n_envs, engine) in engines.items():
            rows[name].append(natpg_rate(args.env, args.batch, args.updates, n_envs, settings, **engine))
            torch.set_num_threads(args.threads)
        if have_sb3:
            rows["sb3"].append(sb3_rate(args.env, args.batch, args.updates))
            torch.set_num_threads(args.threads)
    summary = {k: {"median": round(statistics.median(v), 1), "min": round(min(v), 1), "max": round(max(v), 1)}
               for k, v in rows.items() if v}
    med = {k: v["median"] for k, v in summary.items()}
    for name in engines:
        summary[f"{name}_over_raw"] = round(med[name] / med["raw"], 3)
        if "sb3" in med:
            summary[f"{name}_over_sb3"] = round(med[name] / med["sb3"], 2)
    summary["settings"] = vars(args)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
