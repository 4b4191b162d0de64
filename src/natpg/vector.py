"""natpg's vector environments: all copies in this process, or several copies per worker process.

``SerialVectorEnv`` steps its copies one after the other in this process and resets a finished copy in
the same step, like Gymnasium's ``SyncVectorEnv`` with same-step autoreset, but without merging every
copy's info dict into batched arrays each step (natpg reads only the final observations): on HalfCheetah
that merge cost a quarter of the raw stepping time.

Gymnasium's ``AsyncVectorEnv`` gives every copy its own process and pays one pipe round trip per copy
per step; on a machine with few cores that costs more than it saves. ``MultiprocVectorEnv`` instead
gives each of ``n_workers`` processes a slice of the copies as a ``SerialVectorEnv`` and answers one
message per step for the whole slice, so the simulators of different slices run in parallel while the
main process does the policy forward. Copy i is seeded ``seed + i`` in both, exactly as in Gymnasium's
vector envs, so with the same seed all of them produce the same trajectories.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import traceback
from typing import Any

import gymnasium as gym
import numpy as np

from .envs import MaskError, OffSpace, off_space
from .errors import first_line


def split_copies(n_envs: int, workers: int, name: str) -> list[int]:
    """Environment copies per worker process: as even as possible, the first ``n_envs % workers`` one more."""
    if not 1 <= workers <= n_envs:
        raise ValueError(f"{name} must be between 1 and n_envs={n_envs}, got {workers}")
    return [n_envs // workers + (1 if w < n_envs % workers else 0) for w in range(workers)]


def first_copies(sizes: list[int]) -> list[int]:
    """The global index of each worker's first copy, for the shares ``split_copies`` gives (worker 0's first)."""
    return np.cumsum([0, *sizes[:-1]]).tolist()


def process_context():
    """How worker processes start: forkserver where the platform has it (a fork of the learner, which runs
    threads, could inherit a held lock), else spawn."""
    return mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")


def observation_checked(obs: Any, space) -> Any:
    """``obs`` if it is a point of the Box ``space`` natpg reads as it is (``envs.off_space``): numpy would
    broadcast a wrong shape into a buffer (a scalar, or shape (1,), filling every entry) and wrap an image's 300 to
    44. Runs for every copy at every step: the usual case (an array of the space's shape and dtype) takes the
    first two tests only."""
    shape, dtype = space.shape, space.dtype
    if type(obs) is np.ndarray and obs.shape == shape and (obs.dtype == dtype or dtype.kind not in "ui"):
        return obs
    if why := off_space(obs, space):
        raise OffSpace(why, space)
    return obs


def reset_checked(result: Any, space) -> tuple[Any, dict]:
    """(observation, info) from what reset() returned; an observation alone (the old Gym API) is an error, also
    where its length, 2, would unpack."""
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
        raise TypeError("not an (observation, info dict) pair")
    return observation_checked(result[0], space), result[1]


NUMBER_TYPES = frozenset({float, int, bool, np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_})


def reward_checked(reward: Any) -> Any:
    """``reward`` if it is one number: numpy would read "1.0" or None silently, or fail on an array."""
    if type(reward) in NUMBER_TYPES:  # the usual case, at every step of every copy
        return reward
    if reward is None or isinstance(reward, (str, bytes)) or np.ndim(reward):
        raise TypeError(f"the reward {reward!r} is not a number")
    return reward


def env_name(env: gym.Env) -> str:
    """The environment's registered id, or its class for one made without ``gym.make``."""
    return env.spec.id if env.spec is not None else type(env.unwrapped).__name__


def api_error(env, i: int, call: str, result: Any, exc: Exception, observation_space) -> str:
    """What environment copy ``i`` returned that natpg cannot read, against what Gymnasium's API asks."""
    observation_space = getattr(exc, "space", None) or observation_space  # OffSpace knows the space it missed
    got = "" if result is None else f"{len(result)}-tuple: " if isinstance(result, tuple) else \
        f"{type(result).__name__}: "
    return (f"environment {env_name(env)!r} (copy {i}) returned from {call}() what natpg cannot read ({got}"
            f"{first_line(exc)}). Gymnasium's API: reset() returns (observation, info), step() returns "
            f"(observation, reward, terminated, truncated, info), with each observation in "
            f"{observation_space} and a number for the reward")


def mask_error(env, i: int, call: str, exc: MaskError) -> str:
    return f"environment {env_name(env)!r} (copy {i}), {call}(): {exc}"


def checked_reset(env: gym.Env, copy: int, space, **kwargs) -> tuple[Any, dict]:
    """``env.reset(**kwargs)`` of copy ``copy``, what it returned checked against Gymnasium's API and the Box
    ``space`` (a ValueError naming the copy otherwise); the environment's own errors pass as they are."""
    try:
        result = env.reset(**kwargs)
    except OffSpace as exc:  # natpg's own input wrappers' check (envs.CheckedFlatten)
        raise ValueError(api_error(env, copy, "reset", None, exc, space)) from None
    except MaskError as exc:
        raise ValueError(mask_error(env, copy, "reset", exc)) from None
    try:
        return reset_checked(result, space)
    except (ValueError, TypeError) as exc:
        raise ValueError(api_error(env, copy, "reset", result, exc, space)) from None


def checked_step(env: gym.Env, copy: int, space, action) -> tuple[Any, float, bool, bool, dict]:
    """``env.step(action)`` of copy ``copy``, checked as ``checked_reset``'s result is (a number for the reward)."""
    try:
        result = env.step(action)
    except OffSpace as exc:
        raise ValueError(api_error(env, copy, "step", None, exc, space)) from None
    except MaskError as exc:
        raise ValueError(mask_error(env, copy, "step", exc)) from None
    except ValueError as exc:  # a wrapper (Gymnasium's time limit, say) unpacking what the env returned
        if "values to unpack" not in str(exc):
            raise
        raise ValueError(api_error(env, copy, "step", None, exc, space)) from None
    try:
        obs, reward, term, trunc, info = result
        return observation_checked(obs, space), float(reward_checked(reward)), bool(term), bool(trunc), info
    except (ValueError, TypeError) as exc:
        raise ValueError(api_error(env, copy, "step", result, exc, space)) from None


class ApiChecked(gym.Wrapper):
    """The checks of ``SerialVectorEnv`` on one copy, for Gymnasium's ``AsyncVectorEnv``: its workers would
    broadcast a wrong-shaped observation too, or fail deep inside on the others; the error reaches the learner."""

    def __init__(self, env: gym.Env, copy: int):
        super().__init__(env)
        self.copy = copy

    def reset(self, **kwargs):
        return checked_reset(self.env, self.copy, self.env.observation_space, **kwargs)

    def step(self, action):
        return checked_step(self.env, self.copy, self.env.observation_space, action)


class TimedAsyncVectorEnv(gym.vector.AsyncVectorEnv):
    """Gymnasium's ``AsyncVectorEnv`` (vectorization='async'), whose step and reset wait at most ``timeout``
    seconds for the copies' answers (its own wait for ever on a hanging environment): then every copy's process is
    killed and ``EnvWorkerDied`` names the setting."""

    def __init__(self, env_fns, timeout: float | None, **kwargs):
        super().__init__(env_fns, **kwargs)
        self.timeout = timeout

    def reset(self, *, seed=None, options=None):
        self.reset_async(seed=seed, options=options)
        return self._answer(self.reset_wait, "resetting")

    def step(self, actions):
        self.step_async(actions)
        return self._answer(self.step_wait, "stepping")

    def _answer(self, wait, doing: str):
        try:
            return wait(timeout=self.timeout)
        except mp.TimeoutError:
            for process in self.processes:  # SIGKILL: a copy hung in C code may never act on SIGTERM
                if process.is_alive():
                    process.kill()
            self.close(terminate=True)
            raise EnvWorkerDied(f"an environment copy's process (vectorization='async') gave no answer within "
                                f"worker_timeout={self.timeout:g} s while {doing} its environment: an environment "
                                f"hangs; every copy's process is ended") from None


class SerialVectorEnv:
    """Copies built by ``env_fns`` stepped in turn in this process, a finished copy reset in the same step.

    ``step(actions)`` returns (obs [N, ...], rewards, terminated, truncated, {'final_obs': object array,
    'final_info': object array}) where the observation of a copy whose episode just ended is already the first
    of its next episode and the last one is ``info['final_obs'][i]``, the last step's info
    ``info['final_info'][i]`` (None for the others). ``reset(seed)`` seeds copy i with ``seed + i``;
    ``reset(options={'reset_mask': mask})`` resets only the masked copies. ``envs`` holds the copies.
    """

    def __init__(self, env_fns, first_copy: int = 0):
        self.first_copy = first_copy  # the index of copy 0 among all copies (a worker's slice), for messages
        self.envs = [fn() for fn in env_fns]
        if not self.envs:
            raise ValueError("SerialVectorEnv needs at least one environment copy")
        first = self.envs[0]
        self.num_envs = len(self.envs)
        self.single_observation_space, self.single_action_space = first.observation_space, first.action_space
        self.metadata = first.metadata
        self._obs = np.zeros((self.num_envs, *self.single_observation_space.shape),
                             self.single_observation_space.dtype)
        self.closed = False

    def reset(self, seed: int | None = None, options: dict | None = None):
        options = dict(options or {})
        mask = np.asarray(options.pop("reset_mask", np.ones(self.num_envs, bool)), bool)
        infos = [{} for _ in self.envs]
        for i in np.flatnonzero(mask).tolist():
            self._obs[i], infos[i] = checked_reset(self.envs[i], self.first_copy + i, self.single_observation_space,
                                                   seed=None if seed is None else seed + i, options=options or None)
        return self._obs.copy(), {"infos": infos}

    def step(self, actions):
        n = self.num_envs
        rew = np.zeros(n, np.float64)
        term, trunc = np.zeros(n, bool), np.zeros(n, bool)
        final, final_info = np.full(n, None, dtype=object), np.full(n, None, dtype=object)
        space = self.single_observation_space
        for i, env in enumerate(self.envs):
            obs, rew[i], term[i], trunc[i], info = checked_step(env, self.first_copy + i, space, actions[i])
            if term[i] or trunc[i]:
                final[i], final_info[i] = obs, info
                obs, _ = checked_reset(env, self.first_copy + i, space)
            self._obs[i] = obs
        return self._obs.copy(), rew, term, trunc, {"final_obs": final, "final_info": final_info}

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for env in self.envs:
                env.close()


class EnvWorkerDied(RuntimeError):
    """An environment worker process of ``vectorization='multiproc'`` ended without answering (killed from outside,
    the OOM killer), or gave no answer within its timeout (an environment that hangs; also 'async'): its copies
    are gone."""


def exit_when_gone(pid: int, poll_s: float = 2.0) -> None:
    """Exit this process once process ``pid`` (the learner) has gone: a worker stuck in a hanging environment
    never reads the pipe's EOF, and would otherwise outlive a learner killed with SIGKILL."""
    while True:
        time.sleep(poll_s)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:  # alive, another user's (the pid was reused): not ours to judge
            pass


def _worker(conn, env_id: str, n_envs: int, action_mask, env_kwargs: dict[str, Any], info_keys: tuple,
            first_copy: int = 0, learner_pid: int | None = None) -> None:
    # Ctrl-C goes to the whole process group: let the parent handle it (it saves a checkpoint, then closes us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if learner_pid is not None:
        threading.Thread(target=exit_when_gone, args=(learner_pid,), daemon=True).start()
    envs = None
    try:
        from .envs import make_env

        envs = SerialVectorEnv([lambda: make_env(env_id, action_mask, env_kwargs=env_kwargs) for _ in range(n_envs)],
                               first_copy)
        conn.send(("ok", (envs.single_observation_space, envs.single_action_space, envs.metadata)))
        while True:
            cmd, data = conn.recv()
            if cmd == "step":
                obs, rew, term, trunc, info = envs.step(data)
                done = term | trunc
                final = [(np.asarray(info["final_obs"][i]), {k: v for k, v in info["final_info"][i].items()
                                                             if k in info_keys})  # only what is asked for crosses
                         for i in np.flatnonzero(done)] if done.any() else []
                conn.send(("ok", (obs, rew, term, trunc, final)))
            elif cmd == "reset":
                obs, _ = envs.reset(seed=data)
                conn.send(("ok", obs))
            elif cmd == "close":
                break
    except (KeyboardInterrupt, EOFError):
        pass
    except Exception as exc:  # report to the parent instead of dying silently: the exception itself where it pickles
        conn.send(("error", (_picklable(exc), f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")))
    finally:
        if envs is not None:
            envs.close()
        conn.close()


def _picklable(exc: Exception) -> Exception | None:
    """``exc`` if it crosses a pipe intact (an exception class whose constructor wants more than its message does
    not), else None."""
    try:
        return exc if type(pickle.loads(pickle.dumps(exc))) is type(exc) else None
    except Exception:
        return None


class MultiprocVectorEnv:
    """``n_envs`` copies of ``env_id`` split over ``n_workers`` processes (the API subset natpg's sampler uses:
    ``reset(seed)``, ``step(actions)`` with ``info['final_obs']`` and ``info['final_info']`` (the ``info_keys``
    of each finished copy's last info), ``num_envs``, the single spaces, ``close``).

    A worker that gives no answer to a step or reset within ``timeout`` seconds (``start_timeout`` for building its
    environments) is an ``EnvWorkerDied`` naming its copies, and is ended at ``close``: an environment that hangs
    stops the run with a message instead of holding it forever (None: wait forever)."""

    def __init__(self, env_id: str, n_envs: int, n_workers: int, action_mask=None,
                 env_kwargs: dict[str, Any] | None = None, info_keys: tuple[str, ...] = (),
                 timeout: float | None = None, start_timeout: float | None = None):
        sizes = split_copies(n_envs, n_workers, "n_workers")
        self.timeout, self.start_timeout = timeout, start_timeout
        self.num_envs, self.env_id, self.sizes = n_envs, env_id, sizes
        self.offsets = first_copies(sizes)
        ctx = process_context()
        self.conns, self.procs = [], []
        for size, first in zip(sizes, self.offsets):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, daemon=True,
                               args=(child, env_id, size, action_mask, env_kwargs or {}, tuple(info_keys), first,
                                     os.getpid()))
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self._owed = [True] * len(self.conns)  # a step, reset or start whose answer is not read (an interrupt, a hang)
        self._broken: str | None = None  # why the copies cannot step on (a late answer would be the wrong step's)
        self.closed = False
        try:
            spaces = [self._receive(c, "starting") for c in self.conns]
        except BaseException:
            self.close()
            raise
        self.single_observation_space, self.single_action_space, self.metadata = spaces[0]

    def _died(self, conn) -> EnvWorkerDied:
        proc = self.procs[self.conns.index(conn)]
        proc.join(timeout=1.0)
        return EnvWorkerDied(f"an environment worker process died (exit code {proc.exitcode}; its copies "
                            f"{self._copies(conn)})")

    def _copies(self, conn) -> list[int]:
        i = self.conns.index(conn)
        return list(range(self.offsets[i], self.offsets[i] + self.sizes[i]))

    def _send(self, conn, message) -> None:
        if self._broken:
            raise EnvWorkerDied(f"these environments cannot step on: {self._broken}")
        try:
            conn.send(message)
        except (BrokenPipeError, ConnectionResetError):  # not natpg's own output: the worker is gone
            raise self._died(conn) from None
        self._owed[self.conns.index(conn)] = True

    def _receive(self, conn, doing: str = "stepping its environments") -> Any:
        timeout = self.start_timeout if doing == "starting" else self.timeout
        # poll waits out the timeout in one select (a signal's handler still runs: PEP 475 retries it after)
        if timeout is not None and not conn.poll(timeout):
            if not self.procs[self.conns.index(conn)].is_alive():
                raise self._died(conn)
            name = "worker_start_timeout" if doing == "starting" else "worker_timeout"
            self._broken = (f"an environment worker process gave no answer within {name}={timeout:g} s while "
                            f"{doing} (its copies {self._copies(conn)}): an environment hangs; the worker is ended "
                            f"when the environments are closed")
            raise EnvWorkerDied(self._broken)
        try:
            status, payload = conn.recv()
        except (EOFError, ConnectionResetError):
            raise self._died(conn) from None
        self._owed[self.conns.index(conn)] = False
        if status == "error":  # the worker's exception, as sync and async raise it, or its text
            from .envs import unknown_in_worker

            exc, text = payload
            if unknown := unknown_in_worker(self.env_id, text):
                raise ValueError(f"environment worker failed: {unknown}")
            if exc is None:
                raise RuntimeError(f"environment worker failed: {text}")
            exc.add_note(f"raised in an environment worker process:\n{text}")
            raise exc
        return payload

    def reset(self, seed: int | None = None, options: dict | None = None):
        if options:  # natpg resets every copy at once here (a copy's own reset happens inside its worker's step)
            raise ValueError(f"MultiprocVectorEnv.reset takes no options, got {sorted(options)}")
        for conn, off in zip(self.conns, self.offsets):
            self._send(conn, ("reset", None if seed is None else seed + off))
        return np.concatenate([self._receive(c, "resetting its environments") for c in self.conns]), {}

    def step(self, actions: np.ndarray):
        for conn, off, size in zip(self.conns, self.offsets, self.sizes):
            self._send(conn, ("step", actions[off : off + size]))
        parts = [self._receive(c) for c in self.conns]
        obs = np.concatenate([p[0] for p in parts])
        rew = np.concatenate([p[1] for p in parts])
        term = np.concatenate([p[2] for p in parts])
        trunc = np.concatenate([p[3] for p in parts])
        final_obs, final_info = np.empty(self.num_envs, dtype=object), np.empty(self.num_envs, dtype=object)
        done_idx = np.flatnonzero(term | trunc)
        finals = [f for p in parts for f in p[4]]
        for i, (f, info) in zip(done_idx, finals):  # workers list their finished copies in index order
            final_obs[i], final_info[i] = f, info
        return obs, rew, term, trunc, {"final_obs": final_obs, "final_info": final_info}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for conn in self.conns:
            try:
                conn.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        for proc, owed in zip(self.procs, self._owed):
            if not owed:  # it reads the close and ends; one that owes an answer may be stuck in its environment
                proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self.conns:  # the pipes' file descriptors go now, not whenever the object is collected
            conn.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
