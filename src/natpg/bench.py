"""Throughput: natpg's env-steps/s (updates included) against the raw stepping rate of the same env."""

from __future__ import annotations

import time
from typing import Any

import torch


def raw_env_rate(env_id: str, steps: int = 20_000, seed: int = 0, env_kwargs: dict[str, Any] | None = None) -> float:
    """Steps/s of one environment copy with random actions in this process (the ceiling): the environment as
    natpg makes it (Atari's preprocessing included), without natpg's observation wrappers."""
    from .envs import make_env

    env = make_env(env_id, wrap=False, env_kwargs=env_kwargs)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    actions = [env.action_space.sample() for _ in range(1000)]
    start = time.perf_counter()
    for i in range(steps):
        _, _, term, trunc, _ = env.step(actions[i % 1000])
        if term or trunc:
            env.reset()
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def throughput(algo: str, env_id: str, batch: int = 2048, updates: int = 5, **overrides: Any) -> dict[str, Any]:
    """One measurement, no repeats: one warm-up update, then ``updates`` timed updates."""
    from .agent import ALGORITHM_CLASSES
    from .config import is_integer

    if algo not in ALGORITHM_CLASSES:
        raise ValueError(f"unknown algorithm {algo!r}; valid: {sorted(ALGORITHM_CLASSES)}")
    # bench derives these from its own arguments; a setting for them would collide with (or silently undo) that
    fixed = {"n_steps": "bench sets it to --batch / --n-envs: change --batch instead",
             "total_steps": "bench runs one warm-up update, then --updates updates of --batch steps: set those",
             "seed": "bench always uses seed 0"}
    clashes = sorted(set(overrides) & set(fixed))
    if clashes:
        raise ValueError("not available in bench: " + "; ".join(f"{k}={overrides[k]!r} ({fixed[k]})" for k in clashes))
    n_envs = overrides.pop("n_envs", 8)
    for name, value in (("--batch", batch), ("--updates", updates), ("--n-envs (n_envs)", n_envs)):
        if not is_integer(value) or value < 1:
            raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    batch, updates, n_envs = int(batch), int(updates), int(n_envs)
    if batch % n_envs:
        raise ValueError(f"--batch {batch} must be a multiple of --n-envs {n_envs} (each update steps every copy "
                         f"batch / n_envs times)")
    t0 = time.perf_counter()
    agent = ALGORITHM_CLASSES[algo](env_id, seed=0, n_envs=n_envs, n_steps=batch // n_envs, **overrides)
    agent.learn(batch)  # warm-up
    startup = time.perf_counter() - t0
    start = time.perf_counter()
    agent.learn(updates * batch, reset=False)
    train_rate = updates * batch / (time.perf_counter() - start)
    agent.close()
    raw = raw_env_rate(env_id, env_kwargs=agent.config.env.env_kwargs)
    return {"algo": algo, "env_id": env_id, "batch": batch, "n_envs": n_envs, "torch_threads": torch.get_num_threads(),
            "natpg_steps_per_s": round(train_rate, 1), "raw_env_steps_per_s": round(raw, 1),
            "fraction_of_raw": round(train_rate / raw, 3), "startup_s": round(startup, 2)}
