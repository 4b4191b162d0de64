"""Evaluation of a trained agent: episodes in seeded copies of an environment, with frozen normalisation.

``evaluate`` (natpg.evaluate) averages ``evaluation_episodes``; ``natpg.video.record_video`` plays the same episodes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch

from .config import EVAL_MAX_EPISODE_STEPS, MAX_SEED, check_flag, env_kwargs_problem, is_integer, plain_json
from .envs import make_vec_env, probe_spaces
from .errors import warn
from .rollout import NonFiniteEnvError, describe_unstorable, storable

if TYPE_CHECKING:
    from .agent import Agent


def evaluation_env_kwargs(agent: Agent, env_id: str, env_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``env_kwargs`` an evaluation on ``env_id`` makes its copies with: those given, else the agent's own on
    the id it was trained on and none on another id (whose constructor need not take them)."""
    if env_kwargs is not None:
        if problem := env_kwargs_problem(env_kwargs):
            raise ValueError(f"env_kwargs {problem}")
        return plain_json(env_kwargs)
    return agent.config.env.env_kwargs if env_id == agent.env_id else {}


def check_evaluation(agent: Agent, env: str | None, episodes: int, seed: int,
                     max_episode_steps: int = EVAL_MAX_EPISODE_STEPS, env_kwargs: dict[str, Any] | None = None,
                     deterministic: bool = True) -> str:
    """The environment id to evaluate ``agent`` on (default: its own), after checking the arguments and, for
    another environment, that its spaces match the agent's; a ValueError that says what is wrong otherwise."""
    from .agent import Agent  # here: the agent module imports this one

    if not isinstance(agent, Agent):
        raise ValueError(f"evaluate takes an agent, got {agent!r}: natpg.evaluate(natpg.load(path)) for a saved run")
    env_id = env or agent.env_id
    if not is_integer(episodes) or episodes < 1:
        raise ValueError(f"episodes must be an integer ≥ 1, got {episodes!r}")
    if not is_integer(max_episode_steps) or max_episode_steps < 1:
        raise ValueError(f"max_episode_steps must be an integer ≥ 1, got {max_episode_steps!r}")
    if not is_integer(seed) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be a non-negative integer below 2**62, got {seed!r}")
    check_flag("deterministic", deterministic)
    if env is not None or env_kwargs is not None:  # another environment, or the same made otherwise
        obs_space, act_space = probe_spaces(env_id, agent.config.env.action_mask,
                                            evaluation_env_kwargs(agent, env_id, env_kwargs))
        # A Box of the same shape with other bounds is fine (the policy reads the values); any other space must match.
        same_obs = same_space(obs_space, agent.observation_space) or (
            isinstance(obs_space, gym.spaces.Box) and obs_space.shape == agent.observation_space.shape)
        if not same_obs or not same_space(act_space, agent.action_space):
            raise ValueError(f"environment {env_id!r} (observations {obs_space}, actions {act_space}) does not "
                             f"match the agent trained on {agent.env_id!r} (observations "
                             f"{agent.observation_space}, actions {agent.action_space})")
    return env_id


def same_space(a: gym.Space, b: gym.Space) -> bool:
    """``a == b``, minding a Dict's key order too, which gymnasium's == ignores and flattening follows: the same
    keys in another order would reach the policy as shuffled inputs."""
    if a != b:
        return False
    if isinstance(a, gym.spaces.Dict):
        return list(a.spaces) == list(b.spaces) and all(same_space(a[k], b[k]) for k in a.spaces)
    if isinstance(a, gym.spaces.Tuple):
        return all(same_space(x, y) for x, y in zip(a.spaces, b.spaces))
    return True


def episode_generators(seed: int, episodes: int) -> list[torch.Generator]:
    """The CPU generators of evaluation episodes ``0 … episodes-1``: episode i's seeded ``seed + i``, as its copy."""
    return [torch.Generator().manual_seed(seed + i) for i in range(episodes)]


def evaluation_episodes(agent: Agent, env: str | None = None, episodes: int = 10, seed: int = 123,
                        deterministic: bool = True, max_episode_steps: int = EVAL_MAX_EPISODE_STEPS,
                        env_kwargs: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Each of ``episodes`` evaluation episodes, with frozen normalisation: ``return`` (undiscounted), ``length``,
    ``terminated`` (True where the environment ended it; False where its time limit or ``max_episode_steps`` cut
    it) and ``last_obs`` (its last observation as the policy reads it: flattened, any action mask appended).

    Episodes run in parallel copies of ``env`` (default: the agent's own; ``EVAL_CHUNK`` at a time), copy i seeded
    ``seed + i``; its stochastic actions (``deterministic=False``) draw from a CPU generator seeded ``seed + i`` too,
    so that an episode does not depend on how many run beside it or on the device (``record_video`` plays it). An
    episode the environment has not ended after ``max_episode_steps`` steps is cut there, with a warning (an
    environment registered without a time limit would otherwise never return). A NaN, infinite or beyond-float32
    observation or reward is a ``NonFiniteEnvError`` naming the episode and step, as in training.
    """
    env_id = check_evaluation(agent, env, episodes, seed, max_episode_steps, env_kwargs, deterministic)
    episodes, seed, max_episode_steps = int(episodes), int(seed), int(max_episode_steps)  # numpy's too
    env_kwargs = evaluation_env_kwargs(agent, env_id, env_kwargs)
    chunks = [_episode_chunk(agent, env_id, first, min(EVAL_CHUNK, episodes - first), seed, deterministic,
                             max_episode_steps, env_kwargs) for first in range(0, episodes, EVAL_CHUNK)]
    run = {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]}
    warn_cut_episodes(env_id, int((~run.pop("finished")).sum()), episodes, max_episode_steps)
    warn_dropped_episodes(env_id, int(run.pop("dropped").sum()), episodes)
    return run


# Episodes run side by side in at most this many environment copies at a time: a large evaluation
# (natpg eval --episodes 10000) runs in turns instead of building every copy at once, which could fill the memory.
EVAL_CHUNK = 100


def _episode_chunk(agent: Agent, env_id: str, first: int, episodes: int, seed: int, deterministic: bool,
                   max_episode_steps: int, env_kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Evaluation episodes ``first … first + episodes - 1``, side by side (copy i seeded ``seed + first + i``):
    ``evaluation_episodes``' arrays, with ``finished`` and ``dropped`` for its warnings."""
    generators = None if deterministic else episode_generators(seed + first, episodes)
    envs = make_vec_env(env_id, episodes, "sync", action_mask=agent.action_mask_source, env_kwargs=env_kwargs)
    try:
        obs, _ = envs.reset(seed=seed + first)
        flat = np.asarray(obs, np.float64).reshape(episodes, -1)  # flattened, with the mask appended: to the policy
        drop = agent.config.env.nonfinite_env == "drop"
        nonfinite_steps(env_id, flat, np.zeros(episodes), np.ones(episodes, bool), 0, drop=False,  # none to end yet
                        first_episode=first)
        returns, lengths = np.zeros(episodes), np.zeros(episodes, np.int64)
        terminated, finished = np.zeros(episodes, bool), np.zeros(episodes, bool)
        dropped = np.zeros(episodes, bool)
        last_obs = np.empty_like(flat)
        for t in range(max_episode_steps):
            obs, rew, term, trunc, info = envs.step(agent._act(flat, deterministic, generators))
            new = np.asarray(obs, np.float64).reshape(episodes, -1)
            bad = nonfinite_steps(env_id, new, rew, ~finished, t + 1, drop, first_episode=first)
            if bad.any():  # nonfinite_env='drop': the episode ends at its last finite observation, as in training
                last_obs[bad] = flat[bad]
                dropped |= bad
                finished |= bad
            new[~storable(new)] = 0.0  # ended copies go on stepping uncounted: keep their actions finite
            flat = new
            returns += np.where(finished, 0.0, rew)
            lengths += ~finished
            terminated |= term & ~finished
            for i in np.flatnonzero((term | trunc) & ~finished):  # the copy has reset: its last one is final_obs
                last_obs[i] = np.asarray(info["final_obs"][i], np.float64).reshape(-1)
            finished |= term | trunc
            if finished.all():
                break
        last_obs[~finished] = flat[~finished]  # episodes cut at max_episode_steps end where they stand
    finally:
        envs.close()
    return {"return": returns, "length": lengths, "terminated": terminated, "last_obs": last_obs,
            "finished": finished, "dropped": dropped}


def evaluate(agent: Agent, env: str | None = None, episodes: int = 10, seed: int = 123,
             deterministic: bool = True, max_episode_steps: int = EVAL_MAX_EPISODE_STEPS,
             env_kwargs: dict[str, Any] | None = None) -> tuple[float, float]:
    """Mean and std of the undiscounted return over ``episodes`` episodes run by ``evaluation_episodes`` (copy i
    seeded ``seed + i``, frozen normalisation, an episode not ended after ``max_episode_steps`` cut with a warning).
    ``env_kwargs``: how the environment is made (default: the run's own on its own id, none on another id), e.g.
    a policy trained with ``{"g": 3.0}`` evaluated under ``{"g": 10.0}``."""
    returns = evaluation_episodes(agent, env, episodes, seed, deterministic, max_episode_steps, env_kwargs)["return"]
    return float(returns.mean()), float(returns.std())


def nonfinite_steps(env_id: str, obs: np.ndarray, rew: np.ndarray, running: np.ndarray, step: int,
                    drop: bool, first_episode: int = 0) -> np.ndarray:
    """The running evaluation episodes whose observation [E, D] or reward [E] is NaN, infinite or beyond float32's
    range (``rollout.storable``): returned with
    ``drop`` (nonfinite_env='drop'), a ``NonFiniteEnvError`` naming them otherwise (row i is episode
    ``first_episode + i``)."""
    rew = np.asarray(rew, np.float64)
    bad = running & ~(storable(obs).all(axis=1) & storable(rew))
    if bad.any() and not drop:
        what = describe_unstorable("observation or reward", np.concatenate([obs[bad].reshape(-1), rew[bad]]))
        raise NonFiniteEnvError(f"evaluation on {env_id!r}: the environment returned {what} at step {step} of "
                                f"evaluation episode(s) {(first_episode + np.flatnonzero(bad)).tolist()} "
                                f"(nonfinite_env='drop' ends such episodes instead)")
    return bad


def warn_dropped_episodes(env_id: str, dropped: int, episodes: int) -> None:
    if dropped:
        warn(f"{dropped} of {episodes} evaluation episodes on {env_id!r} ended at a non-finite "
             f"observation or reward (nonfinite_env='drop'); their returns are those of the steps before it",
             RuntimeWarning)


def warn_cut_episodes(env_id: str, cut: int, episodes: int, max_episode_steps: int) -> None:
    if cut:
        warn(f"{cut} of {episodes} evaluation episodes on {env_id!r} had not ended after "
             f"max_episode_steps={max_episode_steps} steps; their returns are those of the first "
             f"{max_episode_steps} steps (give the environment a time limit, or a larger "
             f"max_episode_steps)", RuntimeWarning)
