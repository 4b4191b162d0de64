"""natpg's own work per sampler step, without the simulator: what the throughput table calls per-step work.

The sampler's vector env is built as in training (one NPG update first, so the normalisers hold statistics),
then its ``step`` is replaced by a replay of one real step's result (no episode ends), so that timing
``Sampler.collect`` measures only natpg: the policy's per-step forward and sampling, the normalisers, the
action mapping, the finiteness checks and the buffers. The environment's own step is timed on the same
vector env before the replacement, for scale. Median over repeats, µs per vector step of ``--n-envs`` copies.

    python benchmarks/sampler_overhead.py --env HalfCheetah-v5 --n-envs 8 --steps 128 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def per_step_us(fn, steps: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) / steps * 1e6)
    return statistics.median(times)


def main() -> None:
    import natpg

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="HalfCheetah-v5")
    ap.add_argument("--n-envs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=128, help="vector steps per timed collect")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    agent = natpg.NPG(args.env, seed=0, n_envs=args.n_envs, n_steps=args.steps, tensorboard=False)
    agent.learn(args.n_envs * args.steps)
    sampler, policy = agent._sampler, agent.policy
    envs = sampler.envs
    actions = np.stack([envs.single_action_space.sample() for _ in range(args.n_envs)])

    def env_steps():
        for _ in range(args.steps):
            envs.step(actions)

    env_us = per_step_us(env_steps, args.steps, args.repeats)
    envs.reset(seed=0)
    obs, rew, term, trunc, info = envs.step(actions)
    replay = (obs, rew, np.zeros_like(term), np.zeros_like(trunc), info)
    envs.step = lambda _: replay
    natpg_us = per_step_us(lambda: sampler.collect(policy, args.steps), args.steps, args.repeats)
    obs_t = torch.from_numpy(sampler.obs_norm.normalize(sampler.obs))
    with torch.inference_mode():
        actor = policy.rollout_actor()
        act_us = per_step_us(lambda: [actor(obs_t, sampler.generator) for _ in range(args.steps)],
                             args.steps, args.repeats)
    print(json.dumps({"env": args.env, "n_envs": args.n_envs, "env_step_us": round(env_us, 1),
                      "natpg_step_us": round(natpg_us, 1), "of_which_policy_act_us": round(act_us, 1)}))


if __name__ == "__main__":
    main()
