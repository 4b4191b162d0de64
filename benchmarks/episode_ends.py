"""How a saved agent's deterministic evaluation episodes end: per episode the return, the length, whether the
environment terminated it or the time limit cut it, and the first entry of its last observation (the torso
height on Ant, Hopper and Walker2d, whose 'healthy' range ends an episode when left).

    python benchmarks/episode_ends.py runs/ant-npg --episodes 20 [--seed 123]

The episodes are ``natpg.evaluation.evaluation_episodes``, the ones ``natpg.evaluate`` averages, so the mean printed
last equals ``natpg eval RUN --episodes N --seed S``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import natpg
from natpg.evaluation import evaluation_episodes


def episode_ends(run: str, episodes: int, seed: int) -> list[dict]:
    agent = natpg.load(run)
    try:
        ep = evaluation_episodes(agent, episodes=episodes, seed=seed)
    finally:
        agent.close()
    return [{"episode": i, "return": float(ep["return"][i]), "length": int(ep["length"][i]),
             "ended_by": "terminated" if ep["terminated"][i] else "time limit",
             "last_obs0": float(ep["last_obs"][i, 0])}
            for i in range(episodes)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run directory or checkpoint written by natpg train / Agent.save")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=123, help="seed of the evaluation environments (natpg eval's default)")
    a = p.parse_args(argv)
    if a.episodes < 1:
        p.error(f"--episodes must be at least 1, got {a.episodes}")
    try:
        rows = episode_ends(a.run, a.episodes, a.seed)
    except (OSError, ValueError) as exc:
        print(f"episode_ends: {exc}", file=sys.stderr)
        return 2
    print("episode  return  length  ended by    last obs[0]")
    for r in rows:
        print(f"{r['episode']:7d} {r['return']:7.0f} {r['length']:7d}  {r['ended_by']:<10} {r['last_obs0']:8.3f}")
    ret = np.array([r["return"] for r in rows])
    cut = np.array([r["ended_by"] == "time limit" for r in rows])
    print(f"mean {ret.mean():.1f} ± {ret.std():.1f}; terminated {int((~cut).sum())} of {len(rows)}; "
          f"mean of the episodes the time limit cut {ret[cut].mean() if cut.any() else float('nan'):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
