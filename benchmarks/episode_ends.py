"""How a saved agent's deterministic evaluation episodes end: per episode the return, the length, whether the
environment terminated it or the time limit cut it, and the first entry of its last observation (the torso
height on Ant, Hopper and Walker2d, whose 'healthy' range ends an episode when left).

    python benchmarks/episode_ends.py runs/ant-npg --episodes 20 [--seed 123]

The episodes run as ``natpg.evaluate`` runs them (one vector env, copy i seeded ``seed + i``, frozen
normalisation, ``Agent.predict``), so the mean printed last equals ``natpg eval RUN --episodes N --seed S``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import natpg
from natpg.envs import make_vec_env


def episode_ends(run: str, episodes: int, seed: int) -> list[dict]:
    agent = natpg.load(run)
    envs = make_vec_env(agent.env_id, episodes, "sync")
    rows = [{} for _ in range(episodes)]
    try:
        obs, _ = envs.reset(seed=seed)
        ret, length = np.zeros(episodes), np.zeros(episodes, np.int64)
        done = np.zeros(episodes, bool)
        while not done.all():
            obs, rew, term, trunc, info = envs.step(agent.predict(obs))
            ret += np.where(done, 0.0, rew)
            length += ~done
            for i in np.flatnonzero((term | trunc) & ~done):
                last = np.asarray(info["final_obs"][i], np.float64).reshape(-1)
                rows[i] = {"episode": i, "return": float(ret[i]), "length": int(length[i]),
                           "ended_by": "terminated" if term[i] else "time limit", "last_obs0": float(last[0])}
            done |= term | trunc
    finally:
        envs.close()
        agent.close()
    return rows


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
