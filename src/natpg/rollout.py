"""Sampling: step a vector environment with one batched policy forward per step.

Per step the policy computes only the action; the old distribution parameters, log-probabilities and
values are computed afterwards in one batched forward over the whole rollout, so per-step work is a
single small forward pass whatever the number of environment copies.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from .config import NONFINITE_MODES
from .envs import EnvStateError, ObsNormalizer, RewardScaler, set_vector_env_state, vector_env_state
from .errors import warn
from .policies import env_action


@dataclass
class Rollout:
    """T steps from N copies. obs [T, N, D] (normalised, as the policy saw them), act [T, N, ...],
    rew [T, N] (scaled), terminated/truncated [T, N] bool, next_obs [T, N, D]: the observation after the
    step (the episode's final one where it ended; zeros after a termination, where it is never used).
    valid [T, N] bool (None: all valid): False marks a transition dropped for a non-finite observation or
    reward (``nonfinite_env='drop'``); it must be left out of the batch, and the transition before it is
    marked truncated so that nothing is bootstrapped across it."""

    obs: torch.Tensor
    act: torch.Tensor
    rew: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    next_obs: torch.Tensor
    valid: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return self.rew.numel()


FLOAT32_MAX = float(np.finfo(np.float32).max)


def storable(x: np.ndarray) -> np.ndarray:
    """Elementwise: the values natpg can store in its float32 buffers and tensors: finite, and within float32's
    range (NaN fails the comparison). A larger finite value (1e39) would turn into inf there, and one past about
    1e154 would overflow the normalisers' float64 variance: both count as non-finite."""
    return np.abs(x) <= FLOAT32_MAX


def all_storable(x: np.ndarray) -> bool:
    """``storable(x).all()`` by two reductions, without the elementwise arrays (the per-step check)."""
    return x.size == 0 or bool(x.max() <= FLOAT32_MAX and x.min() >= -FLOAT32_MAX)


def describe_unstorable(noun: str, x: np.ndarray) -> str:
    """``noun`` named as what ``storable`` refuses in ``x``, with its article: 'a non-finite reward', 'an
    observation beyond float32's range (|x| > 3.4e+38)'."""
    if not np.isfinite(x).all():
        return f"a non-finite {noun}"
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun} beyond float32's range (|x| > {FLOAT32_MAX:.3g})"


class NonFiniteEnvError(RuntimeError):
    """The environment produced a NaN, infinite or float32-overflowing observation or reward (``storable``;
    ``nonfinite_env='raise'``)."""


class Sampler:
    """Owns the vector env, the running normalisers and episode statistics across updates.

    ``nonfinite='raise'`` stops at the first NaN/inf (or beyond float32) observation or reward with the sampler
    step and the env copy; ``'drop'`` ends that copy's episode as truncated at its last finite observation, leaves the
    offending transition out of the batch (``Rollout.valid``), resets the copy and counts it in
    ``dropped``. ``state_dict``/``load_state_dict`` capture everything needed to continue bit-exactly.
    """

    def __init__(self, envs: gym.vector.VectorEnv, obs_normalizer: ObsNormalizer, reward_scaler: RewardScaler,
                 seed: int, device: torch.device, generator: torch.Generator, nonfinite: str = "raise",
                 info_keys: tuple[str, ...] = ()):
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {list(NONFINITE_MODES)}, got {nonfinite!r}")
        self.envs, self.obs_norm, self.rew_scale = envs, obs_normalizer, reward_scaler
        self.device, self.generator, self.nonfinite = device, generator, nonfinite
        self.info_keys = tuple(info_keys)
        self.n_envs = envs.num_envs
        self.first_copy = getattr(envs, "first_copy", 0)  # a rollout worker's slice: messages name the run's copies
        self.action_space = envs.single_action_space
        self.steps = 0  # vector steps taken (each is n_envs transitions)
        self.half_restored = False  # a snapshot failed part-way: build the environments afresh (load_state_dict)
        raw, _ = envs.reset(seed=seed)
        self.obs = self._flat(raw)
        bad = ~storable(self.obs).all(1)
        if bad.any():
            what = describe_unstorable("observation", self.obs[bad])
            raise NonFiniteEnvError(f"environment returned {what} at reset (env copies "
                                    f"{(self.first_copy + np.flatnonzero(bad)).tolist()}): {self.obs[bad][0].tolist()}")
        self.ep_return = np.zeros(self.n_envs)
        self.ep_length = np.zeros(self.n_envs, np.int64)
        self.recent_returns: deque[float] = deque(maxlen=100)
        self.recent_lengths: deque[int] = deque(maxlen=100)
        self.recent_infos: deque[tuple[float, ...]] = deque(maxlen=100)  # the info_keys' values, as episode_info
        self.episodes = 0
        # (return, length, info_keys' values) of each episode the last collect ended
        self.last_episodes: list[tuple[float, int, tuple[float, ...]]] = []
        self.last_episode_steps: list[int] = []  # the step of the last collect each of them ended in
        self._collect_start = 0
        self.total_steps = 0
        self.dropped = 0  # episodes ended early because of a non-finite observation or reward
        self._cpu_actor: torch.nn.Module | None = None  # the acting copy of a policy that lives on a GPU

    def prefetch(self, policy: torch.nn.Module, n_steps: int) -> None:
        """Nothing: the environments step in this process, in ``collect`` (a worker sampler starts them early)."""

    def log_stats(self) -> dict[str, Any]:
        """Columns for the progress log: none of its own."""
        return {}

    def _flat(self, obs: np.ndarray) -> np.ndarray:
        return np.asarray(obs, np.float64).reshape(self.n_envs, -1)

    def _nonfinite_message(self, bad: np.ndarray, rew: np.ndarray, after: np.ndarray, next_obs: np.ndarray) -> str:
        i = int(np.flatnonzero(bad)[0])
        if not storable(rew[i]):
            what = describe_unstorable(f"reward {float(rew[i])!r}", rew[i])
        else:
            o = after[i] if not storable(after[i]).all() else next_obs[i]
            what = describe_unstorable(f"observation {np.array2string(o, precision=4, threshold=8)}", o)
        return (f"environment returned {what} at sampler step {self.steps} (env copy {self.first_copy + i}, step "
                f"{int(self.ep_length[i]) + 1} of its episode; affected copies "
                f"{(self.first_copy + np.flatnonzero(bad)).tolist()}). "
                f"Set nonfinite_env='drop' to end such episodes and leave the transition out instead.")

    def collect(self, policy: torch.nn.Module, n_steps: int) -> Rollout:
        # inference_mode is the cheapest way to run the per-step forward; the rollout's tensors are made
        # after it, so that they are ordinary tensors the updates can differentiate through.
        self.last_episodes, self.last_episode_steps, self._collect_start = [], [], self.steps
        with torch.inference_mode():
            buffers = self._steps(self._actor(policy), n_steps)
        obs_buf, act_buf, rew_buf, term_buf, trunc_buf, next_buf, valid = buffers
        to = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        return Rollout(obs=to(obs_buf), act=to(act_buf), rew=to(rew_buf), terminated=to(term_buf),
                       truncated=to(trunc_buf), next_obs=to(next_buf), valid=None if valid.all() else to(valid))

    def _actor(self, policy: torch.nn.Module) -> torch.nn.Module:
        """The policy that acts: ``policy`` itself when it is on the CPU; otherwise (a GPU learner) a CPU copy
        given its current weights once per rollout, so that no step moves observations to the GPU and
        actions back. The sampler's generator is then a CPU generator too (``Agent``)."""
        param = next(policy.parameters(), None)
        if param is None or param.device.type == "cpu":
            return policy
        if self._cpu_actor is None or type(self._cpu_actor) is not type(policy):
            self._cpu_actor = copy.deepcopy(policy).to("cpu")
        else:
            self._cpu_actor.load_state_dict(policy.state_dict())
        return self._cpu_actor

    def _steps(self, policy: torch.nn.Module, n_steps: int) -> tuple[np.ndarray, ...]:
        T, N = n_steps, self.n_envs
        D = self.obs.shape[1]
        obs_buf = np.zeros((T, N, D), np.float32)
        next_buf = np.zeros((T, N, D), np.float32)
        rew_buf = np.zeros((T, N), np.float32)
        term_buf = np.zeros((T, N), bool)
        trunc_buf = np.zeros((T, N), bool)
        valid = np.ones((T, N), bool)
        act_buf = None
        squash = getattr(policy, "squash", False)
        actor = policy.rollout_actor()
        for t in range(T):
            obs_n = self.obs_norm(self.obs)
            obs_buf[t] = obs_n
            act = actor(torch.from_numpy(obs_n), self.generator).numpy()
            if act_buf is None:
                act_buf = np.zeros((T, *act.shape), act.dtype)
            act_buf[t] = act
            env_act = env_action(act, self.action_space, squash)
            raw_next, rew, term, trunc, info = self.envs.step(env_act)
            rew = np.asarray(rew, np.float64)
            term, trunc = np.asarray(term, bool), np.asarray(trunc, bool)
            next_obs = self._flat(raw_next)
            done = term | trunc
            # The observation after this step: the next one, or the final one of a finished episode.
            after = next_obs.copy()
            any_done = done.any()
            if any_done:
                for i in np.flatnonzero(done):
                    after[i] = np.asarray(info["final_obs"][i], np.float64).reshape(-1)
            # one check of everything first (next_obs differs from after only where an episode ended); the
            # per-copy masks only when something is not finite
            finite = all_storable(rew) and all_storable(after)
            all_valid = True  # valid[t].all(), which only a non-finite step changes
            if not (finite and (not any_done or all_storable(next_obs))):
                next_ok = storable(next_obs).all(1)
                bad = ~storable(rew) | ~storable(after).all(1) | ~next_ok
                if self.nonfinite == "raise":
                    raise NonFiniteEnvError(self._nonfinite_message(bad, rew, after, next_obs))
                next_obs = self._drop(bad, done, next_ok, next_obs)
                valid[t, bad] = False
                if t > 0:
                    trunc_buf[t - 1, bad] |= ~term_buf[t - 1, bad]
                rew = np.where(bad, 0.0, rew)
                after[bad] = self.obs[bad]  # a finite placeholder; the transition is not used
                term, trunc = term & ~bad, trunc | bad
                done = term | trunc
                any_done, all_valid = done.any(), bool(valid[t].all())
            self.ep_return += rew
            self.ep_length += 1
            rew_buf[t] = self.rew_scale(rew, done, None if all_valid else valid[t])
            term_buf[t], trunc_buf[t] = term, trunc
            if any_done:
                finished = done if all_valid else done & valid[t]
                if finished.any():
                    self._record_episodes(finished, info)
                self.ep_return[done] = 0.0
                self.ep_length[done] = 0
            next_buf[t] = self.obs_norm.normalize(after)
            self.obs = next_obs
            self.total_steps += N
            self.steps += 1
        return obs_buf, act_buf, rew_buf, term_buf, trunc_buf, next_buf, valid

    def _record_episodes(self, finished: np.ndarray, info: dict) -> None:
        """The statistics of the episodes the copies in ``finished`` ended (their return, length, info_keys)."""
        for i in np.flatnonzero(finished):
            values = episode_info(info, i, self.info_keys)
            self.recent_returns.append(float(self.ep_return[i]))
            self.recent_lengths.append(int(self.ep_length[i]))
            self.recent_infos.append(values)
            self.last_episodes.append((float(self.ep_return[i]), int(self.ep_length[i]), values))
            self.last_episode_steps.append(self.steps - self._collect_start)
        self.episodes += int(finished.sum())

    def _drop(self, bad: np.ndarray, done: np.ndarray, next_ok: np.ndarray, next_obs: np.ndarray) -> np.ndarray:
        """End the bad copies' episodes and reset those the vector env has not already reset cleanly."""
        self.dropped += int(bad.sum())
        need = bad & ~(done & next_ok)
        if need.any():
            raw, _ = self.envs.reset(options={"reset_mask": need.copy()})
            fresh = self._flat(raw)
            next_obs = next_obs.copy()
            next_obs[need] = fresh[need]
            if not storable(next_obs[need]).all():
                what = describe_unstorable("observation", next_obs[need])
                raise NonFiniteEnvError(f"environment returned {what} again right after resetting env copies "
                                        f"{np.flatnonzero(need).tolist()} at sampler step {self.steps}; cannot drop "
                                        f"the episode")
        return next_obs

    # --- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: current observations, episode accumulators, statistics, counters and the
        simulator state of every copy (``None`` with the reason when the environment cannot be snapshot)."""
        try:
            env_states, reason = vector_env_state(self.envs), None
        except EnvStateError as exc:
            env_states, reason = None, str(exc)
        return {**episode_counters(self), "obs": self.obs.tolist(), "ep_return": self.ep_return.tolist(),
                "ep_length": self.ep_length.tolist(), "env_states": env_states, "env_state_error": reason}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Continue from ``state_dict()``; returns True when the environments were restored exactly.

        Without a usable environment snapshot the environments keep their fresh reset (the run continues,
        but not bit-exactly: a warning says so) and only the statistics and counters are restored. A snapshot that
        failed part-way sets ``half_restored``: some copy may hold part of it (a wrapper's state, restored before
        the environment's own failed, survives a reset), so the caller builds the environments afresh (Agent does).
        """
        restore_episode_counters(self, state)
        reason = state.get("env_state_error")
        if state["n_envs"] != self.n_envs:
            reason = f"the run was saved with {state['n_envs']} environment copies and goes on with {self.n_envs}"
        elif state.get("env_states") is not None:
            try:
                set_vector_env_state(self.envs, state["env_states"])
                obs = np.asarray(state["obs"], np.float64)
                if obs.shape != self.obs.shape:
                    raise EnvStateError(f"saved observations have shape {obs.shape}, the environments {self.obs.shape}")
                self.obs = obs
                self.ep_return = np.asarray(state["ep_return"], np.float64)
                self.ep_length = np.asarray(state["ep_length"], np.int64)
                return True
            except EnvStateError as exc:
                reason = str(exc)
                self.half_restored = True
        warn(f"resuming with freshly reset environments, so the continuation is not bit-exact: {reason}",
             RuntimeWarning)
        return False

    def close(self) -> None:
        self.envs.close()


def episode_info(info: dict[str, Any], i: int, keys: tuple[str, ...]) -> tuple[float, ...]:
    """The values of ``keys`` in the last step's info of copy ``i``'s finished episode (NaN where it has no such
    key), from natpg's vector envs (``final_info``: one dict per copy) or Gymnasium's (a dict of arrays, with
    ``_KEY`` marking the copies that have KEY)."""
    if not keys:
        return ()
    final = info.get("final_info")
    if isinstance(final, dict):
        last = {k: final[k][i] for k in keys if k in final and final.get(f"_{k}", np.ones(i + 1, bool))[i]}
    else:
        last = final[i] if final is not None and final[i] is not None else {}
    values = []
    for key in keys:
        value = last.get(key, np.nan)
        try:
            values.append(float(np.asarray(value).item()))
        except (TypeError, ValueError):
            raise ValueError(f"info_keys: info[{key!r}] at the end of an episode must be a number or boolean, got "
                             f"{value!r}") from None
    return tuple(values)


def episode_counters(sampler) -> dict[str, Any]:
    """The part of a sampler's resume state every sampler has: copy count, episode statistics, counters."""
    return {"n_envs": sampler.n_envs, "recent_returns": list(sampler.recent_returns),
            "recent_lengths": list(sampler.recent_lengths), "info_keys": list(sampler.info_keys),
            "recent_infos": [list(v) for v in sampler.recent_infos], "episodes": sampler.episodes,
            "total_steps": sampler.total_steps, "steps": sampler.steps, "dropped": sampler.dropped}


def state_without_envs(counters: dict[str, Any], reason: str) -> dict[str, Any]:
    """A resume state of ``episode_counters`` alone: resuming from it restores the statistics and counters and
    starts the environments afresh, with a warning giving ``reason``."""
    return {**counters, "env_states": None, "env_state_error": reason}


def restore_episode_counters(sampler, state: dict[str, Any]) -> None:
    """Inverse of ``episode_counters`` (also into a sampler of another number of copies: natpg.load with n_envs)."""
    for window in (sampler.recent_returns, sampler.recent_lengths, sampler.recent_infos):
        window.clear()
    sampler.recent_returns.extend(float(x) for x in state["recent_returns"])
    sampler.recent_lengths.extend(int(x) for x in state["recent_lengths"])
    if state.get("info_keys", []) == list(sampler.info_keys):  # other keys (load with changes): a new window
        sampler.recent_infos.extend(tuple(float(x) for x in v) for v in state.get("recent_infos", []))
    sampler.episodes, sampler.total_steps = int(state["episodes"]), int(state["total_steps"])
    sampler.steps, sampler.dropped = int(state["steps"]), int(state["dropped"])
