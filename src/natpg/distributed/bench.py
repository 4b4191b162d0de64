"""Sampling throughput against the number of rollout workers (collect only, no updates).

    python -m natpg.distributed.bench HalfCheetah-v5 --workers 1 2 --n-envs 8 --n-steps 256 --iterations 5

prints one JSON line per configuration: the local sampler first (the baseline), then each of
``--samplers`` (default: ray; also processes) with each number of workers. Each configuration runs one
untimed warm-up collect (actor start-up, first-call costs), then ``--iterations`` timed collects with a
fixed policy; env-steps/s is n_envs × n_steps × iterations over their wall time.

``--n-envs N`` keeps the batch fixed while the workers split it (strong scaling); ``--envs-per-worker K``
gives each of N workers K copies, N·K in all (weak scaling: "N workers step N× as fast" reads this way),
and the local baseline then steps K copies, what one worker steps.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def measure(env_id: str, sampler: str, workers: int, n_envs: int, n_steps: int, iterations: int,
            seed: int = 0) -> dict:
    from ..agent import NPG

    agent = NPG(env_id, seed=seed, n_envs=n_envs, n_steps=n_steps, sampler=sampler, workers=workers,
                tensorboard=False)
    t0 = time.perf_counter()
    s = agent._make_sampler(seed)
    try:
        s.collect(agent.policy, n_steps)  # warm-up
        startup = time.perf_counter() - t0
        start = time.perf_counter()
        for _ in range(iterations):
            s.collect(agent.policy, n_steps)
        wall = time.perf_counter() - start
    finally:
        s.close()
    steps = n_envs * n_steps * iterations
    return {"env_id": env_id, "sampler": sampler, "workers": workers, "n_envs": n_envs, "n_steps": n_steps,
            "iterations": iterations, "env_steps_per_s": round(steps / wall, 1),
            "s_per_iteration": round(wall / iterations, 3), "startup_s": round(startup, 2),
            "cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m natpg.distributed.bench", description=__doc__.split("\n")[0])
    p.add_argument("env_id")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    p.add_argument("--samplers", nargs="+", default=["ray"], choices=("ray", "processes"),
                   help="worker samplers to measure (default: ray)")
    # --n-envs defaults to None, not 8: argparse lets an explicit value equal to the default pass the exclusion.
    size = p.add_mutually_exclusive_group()
    size.add_argument("--n-envs", type=int, default=None, help="environment copies in all (default 8)")
    size.add_argument("--envs-per-worker", type=int, default=None,
                      help="copies per worker instead: N workers step N × this many (weak scaling)")
    p.add_argument("--n-steps", type=int, default=256)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    p.add_argument("--no-local", action="store_true", help="skip the local-sampler baseline")
    args = p.parse_args(argv)
    for flag, value in (("--workers", min(args.workers)), ("--n-envs", args.n_envs),
                        ("--envs-per-worker", args.envs_per_worker), ("--n-steps", args.n_steps),
                        ("--iterations", args.iterations)):
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if args.ray_address is not None and "ray" not in args.samplers:  # it would be silently ignored
        p.error(f"--ray-address {args.ray_address!r} joins a Ray cluster for --samplers ray, which is not among "
                f"--samplers {' '.join(args.samplers)}")

    def n_envs(workers: int) -> int:
        return args.envs_per_worker * workers if args.envs_per_worker else (args.n_envs or 8)

    # Every configuration is checked before the first is measured (the local baseline included).
    from ..presets import config_for
    from ..errors import one_line
    from .ray_pool import check_ray_installed

    if "ray" in args.samplers:
        try:
            check_ray_installed()
        except ImportError as exc:
            p.error(f"{exc}; or measure --samplers processes, which needs no Ray")

    for sampler in ["local"] * (not args.no_local) + args.samplers:
        for w in [1] if sampler == "local" else args.workers:
            if w > n_envs(w):
                p.error(f"--workers {w} is more than --n-envs {n_envs(w)}: each worker steps at least one copy "
                        f"(lower --workers, raise --n-envs, or give --envs-per-worker)")
            try:
                config_for("npg", args.env_id, {"n_envs": n_envs(w), "n_steps": args.n_steps, "sampler": sampler,
                                                "workers": w, "tensorboard": False})
            except (TypeError, ValueError) as exc:
                p.error(f"{sampler} with {w} worker(s): {one_line(str(exc))}")

    if not args.no_local:
        print(json.dumps(measure(args.env_id, "local", 1, n_envs(1), args.n_steps, args.iterations)), flush=True)
    for sampler in args.samplers:
        if sampler == "ray":
            from .ray_pool import init_ray, require_ray

            ray = require_ray()
            if not ray.is_initialized():  # as the agent's does: the address checked, the signal handlers kept
                try:
                    init_ray(ray, args.ray_address, max(args.workers))
                except ValueError as exc:
                    p.error(one_line(str(exc)))
        for w in args.workers:
            print(json.dumps(measure(args.env_id, sampler, w, n_envs(w), args.n_steps, args.iterations)),
                  flush=True)


if __name__ == "__main__":
    main()
