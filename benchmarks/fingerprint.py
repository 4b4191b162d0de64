"""Fingerprints of short training runs: a refactor that should leave the numerics alone must leave these alone.

    python benchmarks/fingerprint.py > before.txt     # at the old commit
    python benchmarks/fingerprint.py | diff before.txt -   # at the new one: no output means no change

Each line trains one algorithm and curvature setting for a few updates from seed 0 (one process, one thread,
float32 as in training) and prints a SHA-256 of the policy's and the critic's parameters afterwards. The hash is
of the bytes, so it catches a change in the last bit; it is only comparable on the same machine, torch and
library versions (a different BLAS may round differently).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import warnings

import torch

import natpg

# (algorithm, environment, env steps, settings): every algorithm, every Fisher, each action head.
RUNS = [
    ("npg", "CartPole-v1", 4096, {}),
    ("npg", "Pendulum-v1", 4096, {}),
    ("npg", "CartPole-v1", 4096, {"fisher": "dense"}),
    ("npg", "CartPole-v1", 4096, {"fisher": "kfac"}),
    ("npg", "CartPole-v1", 4096, {"fisher": "diagonal"}),
    ("npg", "CartPole-v1", 4096, {"fisher": "empirical"}),
    ("npg", "Pendulum-v1", 4096, {"fisher": "cg", "cg_preconditioner": "kfac"}),
    ("trpo", "CartPole-v1", 4096, {}),
    ("trpo", "Pendulum-v1", 4096, {}),
    ("ppo", "CartPole-v1", 4096, {}),
    ("ppo", "Pendulum-v1", 4096, {"value_clip": 0.2, "target_kl": 0.01}),
    ("nac", "CartPole-v1", 4096, {}),
    ("vpg", "CartPole-v1", 4096, {}),
    ("acktr", "CartPole-v1", 4096, {}),
    ("acktr", "Pendulum-v1", 4096, {}),
]
MUJOCO_RUNS = [
    ("npg", "Hopper-v5", 4096, {}),
    ("acktr", "Hopper-v5", 4096, {}),
    ("trpo", "HalfCheetah-v5", 4096, {}),
]


ALGORITHMS = {"npg": natpg.NPG, "trpo": natpg.TRPO, "acktr": natpg.ACKTR, "nac": natpg.NAC, "ppo": natpg.PPO,
              "vpg": natpg.VPG}


def fingerprint(algo: str, env: str, steps: int, settings: dict) -> str:
    # 2 copies × 512 steps: a few updates within the budget, on vector-environment batches.
    agent = ALGORITHMS[algo](env, seed=0, **{"n_envs": 2, "n_steps": 512, **settings})
    agent.learn(steps)
    digest = hashlib.sha256()
    for net in (agent.policy, agent.critic):
        for name, tensor in sorted(net.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    agent.close()
    return digest.hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-mujoco", action="store_true", help="leave out the MuJoCo runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    runs = RUNS + ([] if args.no_mujoco else MUJOCO_RUNS)
    for algo, env, steps, settings in runs:
        label = " ".join(f"{k}={v}" for k, v in settings.items()) or "-"
        print(f"{algo} {env} {steps} {label} {fingerprint(algo, env, steps, settings)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
