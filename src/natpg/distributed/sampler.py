"""Samplers that split the environment copies over rollout workers: in-process (the reference) or on Ray.

Both present the interface of ``natpg.rollout.Sampler`` that training uses (``collect(policy, n_steps)``,
``recent_returns``, ``recent_lengths``, ``episodes``, ``total_steps``, ``close``). One iteration:

1. the learner sends every worker the policy weights (``state_dict`` as CPU tensors) and the statistics
   of the observation normaliser and the reward scaler;
2. each worker steps its copies ``n_steps`` times with its own policy copy and its own generator, the
   statistics frozen for the whole rollout;
3. the rollouts come back and are concatenated along the copy axis in worker order (worker 0's copies
   first), so copy i of the batch is the global copy i, seeded ``seed + i`` as in the local sampler;
4. the learner updates the statistics from the raw observations (and discounted returns) the workers
   saw, one sampler step at a time over all copies, and keeps the episode statistics.

Unlike the local sampler, which updates the observation statistics before every step, the statistics
change once per iteration here; with the same seed and number of workers, ``sampler='ray'`` and
``sampler='workers'`` give identical batches (docs/distributed.md).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import warnings
from collections import deque
from typing import Any

import numpy as np
import torch

from ..envs import ObsNormalizer, RewardScaler
from ..errors import first_line
from ..rollout import Rollout, episode_counters, restore_episode_counters
from ..vector import split_copies
from .workers import RolloutWorker, WorkerResult, WorkerSpec, generator_seed

RAY_INSTALL_HINT = "pip install 'natpg[ray]'"


def require_ray():
    """Import Ray, or raise an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"sampler='ray' needs Ray, an optional dependency of natpg: {RAY_INSTALL_HINT} "
                          f"(or pip install 'ray>=2.9')") from exc
    return ray


def check_ray_installed() -> None:
    """Raise the install hint if Ray cannot be imported (without importing it)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ImportError(f"sampler='ray' needs Ray, an optional dependency of natpg: {RAY_INSTALL_HINT}")


class WorkerFailure(RuntimeError):
    """A rollout worker died (or did not answer in time) again after being replaced."""


class DistributedSampler:
    """Common part of the worker samplers: the specs of the workers, the merge, the statistics.

    ``obs_normalizer`` and ``reward_scaler`` are the learner's (saved with the model); the workers only
    ever normalise with a frozen copy of their statistics. ``seed`` seeds the copies (global copy i gets
    ``seed + i``); worker w samples actions with a generator seeded from ``(seed, w)``.
    """

    def __init__(self, env_id: str, config, seed: int, obs_normalizer: ObsNormalizer,
                 reward_scaler: RewardScaler, device: torch.device, action_mask=None):
        e, p = config.env, config.policy
        self.env_id, self.seed, self.device = env_id, seed, torch.device(device)
        self.obs_norm, self.rew_scale = obs_normalizer, reward_scaler
        self.n_envs = e.n_envs
        self.n_workers = config.distributed.workers
        self.sizes = split_copies(self.n_envs, self.n_workers, "workers")
        self.offsets = np.cumsum([0, *self.sizes[:-1]]).tolist()
        self._spec_args = dict(env_id=env_id, hidden=tuple(p.hidden), activation=p.activation,
                               log_std_init=float(p.log_std_init), obs_clip=e.obs_clip,
                               normalize_obs=e.normalize_obs, gamma=config.advantage.gamma,
                               reward_clip=e.reward_clip, normalize_reward=e.normalize_reward,
                               nonfinite=e.nonfinite_env, torch_threads=config.run.torch_threads,
                               action_squash=p.action_squash, action_mask=action_mask,
                               env_kwargs=dict(e.env_kwargs), info_keys=tuple(e.info_keys))
        self.info_keys = tuple(e.info_keys)
        self.restarts = [0] * self.n_workers  # replacements per worker
        self.recent_returns: deque[float] = deque(maxlen=100)
        self.recent_lengths: deque[int] = deque(maxlen=100)
        self.recent_infos: deque[tuple[float, ...]] = deque(maxlen=100)
        self.episodes = 0
        # (return, length, info_keys' values) of each episode the last collect ended
        self.last_episodes: list[tuple[float, int, tuple[float, ...]]] = []
        self.total_steps = 0
        self.steps = 0
        self.dropped = 0
        self._pending = None  # (weights, n_steps, handle) of a rollout started by prefetch

    def spec(self, w: int) -> WorkerSpec:
        """The spec of worker w; its r-th replacement seeds its copies ``seed + i + r·n_envs`` (fresh
        episodes, no seed shared with any other copy) and its generator from ``(seed, w, r)``."""
        r = self.restarts[w]
        return WorkerSpec(offset=self.offsets[w], n_envs=self.sizes[w],
                          reset_seed=self.seed + self.offsets[w] + r * self.n_envs,
                          generator_seed=generator_seed(self.seed, w, r), **self._spec_args)

    @property
    def worker_restarts(self) -> int:
        return sum(self.restarts)

    def log_stats(self) -> dict[str, Any]:
        """Columns for the progress log."""
        return {"sampler/workers": self.n_workers, "sampler/worker_restarts": self.worker_restarts}

    # --- one iteration ----------------------------------------------------------------------------
    def collect(self, policy: torch.nn.Module, n_steps: int) -> Rollout:
        """The next rollout of ``policy``: the one ``prefetch`` started, if it was started with these weights
        and ``n_steps`` (otherwise it is discarded with a warning), or a fresh one."""
        if self._pending is not None:
            weights, steps, handle = self._pending
            self._pending = None
            results = self._gather(handle)
            if steps == n_steps and _same_weights(policy, weights):
                return self._merge(results, n_steps)
            warnings.warn("the policy changed after its next rollout was started (prefetch); that rollout is "
                          "discarded and a new one collected", RuntimeWarning, stacklevel=2)
        return self._merge(self._gather(self._submit(*self._request(policy), n_steps)), n_steps)

    def prefetch(self, policy: torch.nn.Module, n_steps: int) -> None:
        """Start the next rollout now with the current weights and statistics, so that the workers step their
        environments while the learner fits the critic; ``collect`` then only waits for it. The batch is the
        same as without prefetching: the rollout needs only the policy and the normaliser statistics, both
        final once the actor has stepped."""
        if self._pending is None:
            weights, obs_stats, reward_stats = self._request(policy)
            self._pending = (weights, n_steps, self._submit(weights, obs_stats, reward_stats, n_steps))

    def _request(self, policy: torch.nn.Module):
        weights = {k: v.detach().to("cpu", copy=True) for k, v in policy.state_dict().items()}
        obs_stats = self.obs_norm.rms.state_dict() if self.obs_norm.enabled else None
        reward_stats = self.rew_scale.rms.state_dict() if self.rew_scale.enabled else None
        return weights, obs_stats, reward_stats

    def _submit(self, weights, obs_stats, reward_stats, n_steps: int):
        """Ask every worker for its share of one rollout; returns what ``_gather`` needs to wait for them."""
        raise NotImplementedError

    def _gather(self, handle) -> list[WorkerResult]:
        raise NotImplementedError

    def _merge(self, results: list[WorkerResult], n_steps: int) -> Rollout:
        results = sorted(results, key=lambda r: r.worker)
        rolls = [r.rollout for r in results]
        cat = lambda name: torch.cat([getattr(x, name) for x in rolls], dim=1).to(self.device)  # noqa: E731
        valid = None
        if any(x.valid is not None for x in rolls):
            valid = torch.cat([x.valid if x.valid is not None else torch.ones_like(x.rew, dtype=torch.bool)
                               for x in rolls], dim=1).to(self.device)
        rollout = Rollout(obs=cat("obs"), act=cat("act"), rew=cat("rew"), terminated=cat("terminated"),
                          truncated=cat("truncated"), next_obs=cat("next_obs"), valid=valid)
        # Statistics: step by step over all copies, as one sampler updating once per step would.
        if self.obs_norm.enabled and not self.obs_norm.frozen:
            raw = np.concatenate([r.raw_obs for r in results], axis=1)
            for t in range(raw.shape[0]):
                self.obs_norm.rms.update(raw[t])
        if self.rew_scale.enabled:
            ret = np.concatenate([r.returns for r in results], axis=1)
            ok = np.concatenate([r.returns_valid for r in results], axis=1)
            for t in range(ret.shape[0]):
                if ok[t].any():
                    self.rew_scale.rms.update(ret[t][ok[t]])
        finished = sorted(((t, r.worker, k, ret, length, values) for r in results
                           for k, (t, ret, length, values) in enumerate(r.episodes)), key=lambda e: e[:3])
        self.last_episodes = [(float(ret), int(length), values) for _, _, _, ret, length, values in finished]
        for ret, length, values in self.last_episodes:
            self.recent_returns.append(ret)
            self.recent_lengths.append(length)
            self.recent_infos.append(values)
        self.episodes += len(finished)
        self.dropped += sum(r.dropped for r in results)
        self.total_steps += rollout.num_steps
        self.steps += n_steps
        return rollout

    # --- resume (statistics only: remote environments are not snapshot) ----------------------------
    def state_dict(self) -> dict[str, Any]:
        reason = f"the environments of sampler {type(self).__name__} live in its workers and are not snapshot"
        return {**episode_counters(self), "env_states": None, "env_state_error": reason}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        restore_episode_counters(self, state)
        warnings.warn("resuming with freshly reset environments in the rollout workers, so the continuation "
                      "is not bit-exact", RuntimeWarning, stacklevel=2)
        return False

    def close(self) -> None:
        self._pending = None


class WorkerSampler(DistributedSampler):
    """The reference: the same ``RolloutWorker`` code as the Ray sampler, run one worker after the other
    in this process (``sampler='workers'``)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.workers = [RolloutWorker(self.spec(w), w) for w in range(self.n_workers)]

    def _submit(self, weights, obs_stats, reward_stats, n_steps: int) -> list[WorkerResult]:
        return [w.collect(weights, obs_stats, reward_stats, n_steps) for w in self.workers]

    def _gather(self, results: list[WorkerResult]) -> list[WorkerResult]:
        return results

    def close(self) -> None:
        self._pending = None
        for w in self.workers:
            w.close()
        self.workers = []


def init_ray(ray, address: str | None, n_workers: int) -> None:
    """``ray.init``: a local instance (``address`` None) or a running cluster ('auto', 'HOST:PORT', 'ray://…').

    Keeps this process's SIGINT and SIGTERM handlers: ray.init installs a SIGTERM handler that exits at once,
    which would skip natpg train's graceful stop and its final checkpoint. A HOST:PORT nobody listens on is a
    ValueError within seconds (Ray itself retries for minutes), and so is any address Ray cannot connect to."""
    if address is not None and address != "auto" and "://" not in address:
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except (OSError, ValueError) as exc:
            raise ValueError(f"ray_address={address!r}: no Ray cluster answers there ({type(exc).__name__}: {exc}); "
                             f"give the address `ray start --head` printed (HOST:PORT), 'auto' on a node of a "
                             f"running cluster, or leave ray_address unset for a local instance") from None
    main = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        if address is None:
            ray.init(num_cpus=max(os.cpu_count() or 1, n_workers), include_dashboard=False)
        else:
            ray.init(address=address)
    except (ConnectionError, ValueError) as exc:  # 'auto' without a cluster; an address Ray cannot parse
        raise ValueError(f"ray_address={address!r}: cannot connect to a Ray cluster "
                         f"({first_line(exc) or type(exc).__name__}); start one with "
                         f"`ray start --head`, or leave ray_address unset for a local instance") from None
    finally:
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)


class RaySampler(DistributedSampler):
    """Each worker is a Ray actor (one CPU each) holding its share of the copies (``sampler='ray'``).

    ``address``: None connects to the Ray instance already initialised in this process, or starts a
    local one; 'auto' or 'HOST:PORT' joins a running cluster. A worker that dies, does not start within
    ``start_timeout`` seconds or does not return its rollout within ``timeout`` seconds is killed and
    replaced by a fresh actor (fresh episodes, see ``spec``) and its share of the iteration is run again
    on the replacement; a second failure of the same share in one iteration raises ``WorkerFailure``.
    Errors raised inside the worker (a non-finite observation, a bug in the environment) are not faults
    of the worker and propagate as they are.
    """

    retries = 1  # re-runs of a failed worker's share per iteration

    def __init__(self, *args: Any, address: str | None = None, timeout: float = 300.0,
                 start_timeout: float = 600.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        ray = self.ray = require_ray()
        self.timeout, self.start_timeout = float(timeout), float(start_timeout)
        if not ray.is_initialized():
            init_ray(ray, address, self.n_workers)
        self._actor_class = ray.remote(num_cpus=1, max_restarts=0)(RolloutWorker)
        self.actors = [self._start(w) for w in range(self.n_workers)]
        self._starting: set[int] = set()  # replacements not yet seen to have started
        self._wait_started(list(range(self.n_workers)))

    def _start(self, w: int):
        return self._actor_class.remote(self.spec(w), w)

    def _registration_hint(self, error: str) -> str:
        """Ray workers know only the environments their own imports register (docs/distributed.md)."""
        if "unknown environment id" not in error or ":" in self.env_id:
            return ""
        return (f"; a Ray worker knows only the environments its imports register: use a 'module:{self.env_id}' id "
                f"whose module registers it (docs/distributed.md, custom environments)")

    def _wait_started(self, which: list[int]) -> None:
        refs = {self.actors[w].ready.remote(): w for w in which}
        ready, pending = self.ray.wait(list(refs), num_returns=len(refs), timeout=self.start_timeout)
        try:
            self.ray.get(ready)
        except self.ray.exceptions.RayTaskError as exc:
            self.close()
            raise exc.as_instanceof_cause() from None
        except self.ray.exceptions.RayActorError as exc:
            self.close()
            raise WorkerFailure(f"a rollout worker died while starting: {exc}{self._registration_hint(str(exc))}"
                                ) from None
        if pending:
            cpus = self.ray.available_resources().get("CPU", 0)
            self.close()
            raise WorkerFailure(f"rollout workers {sorted(refs[r] for r in pending)} did not start within "
                                f"worker_start_timeout={self.start_timeout:g} s (each needs 1 CPU; the cluster "
                                f"has {cpus:g} CPUs free)")

    def _replace(self, w: int) -> None:
        try:
            self.ray.kill(self.actors[w], no_restart=True)
        except Exception:  # already gone
            pass
        self.restarts[w] += 1
        self.actors[w] = self._start(w)
        self._starting.add(w)

    def _submit(self, weights, obs_stats, reward_stats, n_steps: int):
        args = (self.ray.put(weights), obs_stats, reward_stats, n_steps)
        # ref → (worker, attempt, deadline, phase): a replacement is first waited for ('start', within
        # start_timeout), then asked for the rollout ('collect', within timeout).
        pending: dict[Any, tuple[int, int, float, str]] = {}
        for w in range(self.n_workers):
            self._submit_one(args, pending, w, 0, "start" if w in self._starting else "collect")
        return args, pending

    def _submit_one(self, args, pending, w: int, attempt: int, phase: str) -> None:
        actor = self.actors[w]
        ref = actor.ready.remote() if phase == "start" else actor.collect.remote(*args)
        limit = self.start_timeout if phase == "start" else self.timeout
        pending[ref] = (w, attempt, time.monotonic() + limit, phase)

    def _gather(self, handle) -> list[WorkerResult]:
        ray = self.ray
        args, pending = handle

        def failed(w: int, attempt: int, why: str) -> None:
            self._replace(w)
            if attempt >= self.retries:
                self._settle(pending)
                raise WorkerFailure(f"rollout worker {w} failed ({why}) and its share of this iteration was "
                                    f"already retried {attempt} time(s); giving up (the worker has been replaced)"
                                    f"{self._registration_hint(why)}")
            self._submit_one(args, pending, w, attempt + 1, "start")

        results: list[WorkerResult] = []
        while pending:
            wait_s = max(0.0, min(d for _, _, d, _ in pending.values()) - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
            for ref in ready:
                w, attempt, _, phase = pending.pop(ref)
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # raised by the environment or natpg code
                    raise exc.as_instanceof_cause() from None
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                        ray.exceptions.WorkerCrashedError) as exc:
                    failed(w, attempt, f"{type(exc).__name__} while {phase}ing: {first_line(exc)}"[:300])
                    continue
                if phase == "start":
                    self._starting.discard(w)
                    self._submit_one(args, pending, w, attempt, "collect")
                else:
                    results.append(value)
            now = time.monotonic()
            for ref, (w, attempt, deadline, phase) in list(pending.items()):
                if deadline <= now:
                    del pending[ref]
                    limit = (f"worker_start_timeout={self.start_timeout:g}" if phase == "start"
                             else f"worker_timeout={self.timeout:g}")
                    failed(w, attempt, f"no answer within {limit} s while {phase}ing")
        return results

    def _settle(self, pending: dict) -> None:
        """Before giving up on an iteration, wait (within their deadlines) for the other workers' answers to it
        and drop them, as the process sampler drains its pipes: once the caller sees the failure, no share of
        the failed iteration may still be stepping environments (and consuming what the next one should see)."""
        if pending:
            timeout = max(0.0, max(d for _, _, d, _ in pending.values()) - time.monotonic())
            self.ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
        pending.clear()

    def close(self) -> None:
        self._pending = None
        for actor in getattr(self, "actors", []):
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors = []


def _same_weights(policy: torch.nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    state = policy.state_dict()
    return state.keys() == weights.keys() and all(torch.equal(v.detach().cpu(), weights[k]) for k, v in state.items())


def make_sampler(kind: str, env_id: str, config, seed: int, obs_normalizer: ObsNormalizer,
                 reward_scaler: RewardScaler, device: torch.device, action_mask=None):
    """The ``sampler='workers'``, ``'processes'`` or ``'ray'`` sampler for a run (``config.distributed``); ``action_mask``:
    None, an info key or a callable (``Agent.action_mask_source``)."""
    d = config.distributed
    if kind == "workers":
        return WorkerSampler(env_id, config, seed, obs_normalizer, reward_scaler, device, action_mask)
    if kind == "ray":
        return RaySampler(env_id, config, seed, obs_normalizer, reward_scaler, device, action_mask,
                          address=d.ray_address, timeout=d.worker_timeout, start_timeout=d.worker_start_timeout)
    if kind == "processes":
        from .processes import ProcessSampler

        return ProcessSampler(env_id, config, seed, obs_normalizer, reward_scaler, device, action_mask,
                              timeout=d.worker_timeout, start_timeout=d.worker_start_timeout)
    raise ValueError(f"unknown sampler {kind!r}; valid: 'local', 'processes', 'workers', 'ray'")
