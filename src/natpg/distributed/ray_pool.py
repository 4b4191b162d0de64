"""Rollout workers as Ray actors (``sampler='ray'``): one CPU each, on this machine or a Ray cluster.

Ray is an optional dependency, imported only when a ``RayPool`` is built (natpg's ``[ray]`` extra).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any

from ..errors import first_line, install_hint
from .workers import RolloutWorker, WorkerFailure, WorkerPlan, WorkerResult, warn_replaced

RAY_INSTALL_HINT = install_hint("ray")


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


def init_ray(ray, address: str | None, n_workers: int) -> None:
    """``ray.init``: a local instance (``address`` None) or a running cluster ('auto', 'HOST:PORT', 'ray://…').

    Keeps this process's SIGINT and SIGTERM handlers: ray.init installs a SIGTERM handler that exits at once,
    which would skip natpg train's graceful stop and its final checkpoint. A HOST:PORT nobody listens on is a
    ValueError within seconds (Ray itself retries for minutes), and so is any address Ray cannot connect to."""
    if address is not None and address != "auto" and "://" not in address:
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()  # [::1]:6379 too
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


class RayPool:
    """Each worker is a Ray actor (one CPU each) holding its share of the copies.

    ``address``: None connects to the Ray instance already initialised in this process, or starts a
    local one; 'auto' or 'HOST:PORT' joins a running cluster. A worker that dies, does not start within
    ``start_timeout`` seconds or does not return its rollout within ``timeout`` seconds is killed and
    replaced by a fresh actor (fresh episodes, see ``WorkerPlan.spec``) and its share of the iteration is
    run again on the replacement; a second failure of the same share in one iteration raises
    ``WorkerFailure``. Errors raised inside the worker (a non-finite observation, a bug in the environment)
    are not faults of the worker and propagate as they are.
    """

    retries = 1  # re-runs of a failed worker's share per iteration

    def __init__(self, plan: WorkerPlan, address: str | None = None, timeout: float = 300.0,
                 start_timeout: float = 600.0):
        ray = self.ray = require_ray()
        self.plan = plan
        self.timeout, self.start_timeout = float(timeout), float(start_timeout)
        if not ray.is_initialized():
            init_ray(ray, address, plan.n_workers)
        self._actor_class = ray.remote(num_cpus=1, max_restarts=0)(RolloutWorker)
        self.actors = [self._actor_class.remote(plan.spec(w), w) for w in range(plan.n_workers)]
        self._starting: set[int] = set()  # replacements not yet seen to have started
        self._wait_started(list(range(plan.n_workers)))

    def _registration_hint(self, error: str) -> str:
        """Ray workers know only the environments their own imports register (docs/distributed.md)."""
        env_id = self.plan.env_id
        if "unknown environment id" not in error or ":" in env_id:
            return ""
        return (f"; a Ray worker knows only the environments its imports register: use a 'module:{env_id}' id "
                f"whose module registers it (docs/distributed.md, custom environments)")

    def _wait_started(self, which: list[int]) -> None:
        refs = {self.actors[w].ready.remote(): w for w in which}
        ready, pending = self.ray.wait(list(refs), num_returns=len(refs), timeout=self.start_timeout)
        try:
            self.ray.get(ready)
        except self.ray.exceptions.RayTaskError as exc:
            self.close()
            raise remote_cause(exc, "a rollout worker, while starting") from None
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
        self.actors[w] = self._actor_class.remote(self.plan.replace(w), w)
        self._starting.add(w)

    def submit(self, weights, obs_stats, reward_stats, n_steps: int):
        """Ask every worker for its share of one rollout; returns what ``gather`` waits for."""
        args = (self.ray.put(weights), obs_stats, reward_stats, n_steps)
        # ref → (worker, attempt, deadline, phase): a replacement is first waited for ('start', within
        # start_timeout), then asked for the rollout ('collect', within timeout).
        pending: dict[Any, tuple[int, int, float, str]] = {}
        for w in range(self.plan.n_workers):
            self._submit_one(args, pending, w, 0, "start" if w in self._starting else "collect")
        return args, pending

    def _submit_one(self, args, pending, w: int, attempt: int, phase: str) -> None:
        actor = self.actors[w]
        ref = actor.ready.remote() if phase == "start" else actor.collect.remote(*args)
        limit = self.start_timeout if phase == "start" else self.timeout
        pending[ref] = (w, attempt, time.monotonic() + limit, phase)

    def gather(self, handle) -> list[WorkerResult]:
        """The workers' answers to the request ``submit`` made, replacing and re-asking a worker that fails."""
        ray = self.ray
        args, pending = handle

        def failed(w: int, attempt: int, why: str) -> None:
            self._replace(w)
            if attempt >= self.retries:
                self._settle(pending)
                raise WorkerFailure(f"rollout worker {w} failed ({why}) and its share of this iteration was "
                                    f"already retried {attempt} time(s); giving up (the worker has been replaced)"
                                    f"{self._registration_hint(why)}")
            warn_replaced(w, why)
            self._submit_one(args, pending, w, attempt + 1, "start")

        results: list[WorkerResult] = []
        while pending:
            wait_s = max(0.0, min(d for _, _, d, _ in pending.values()) - time.monotonic())
            # in slices: Python runs a signal's handler between them, so two quick Ctrl-Cs count as two
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(wait_s, SIGNAL_SLICE_S))
            for ref in ready:
                w, attempt, _, phase = pending.pop(ref)
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # raised by the environment or natpg code
                    # its copies stopped mid-step are never stepped on: a fresh worker, as a worker process's end
                    self._replace(w)
                    self._settle(pending)
                    raise remote_cause(exc, f"rollout worker {w}") from None
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
        and drop them, as the process pool drains its pipes: once the caller sees the failure, no share of
        the failed iteration may still be stepping environments (and consuming what the next one should see)."""
        if pending:
            timeout = max(0.0, max(d for _, _, d, _ in pending.values()) - time.monotonic())
            self.ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
        pending.clear()

    def close(self) -> None:
        """Kill the actors (one still stepping a rollout too)."""
        for actor in getattr(self, "actors", []):
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors = []


SIGNAL_SLICE_S = 0.1  # how long ray.wait blocks before the learner's signal handlers may run


def remote_cause(exc, where: str) -> BaseException:
    """The exception a Ray actor raised, as the process pool gives it: the original one (whose message the CLI
    prints as one line), the remote traceback as a note; not Ray's wrapper, whose message is that whole traceback."""
    cause = getattr(exc, "cause", None)
    if not isinstance(cause, BaseException):
        return exc.as_instanceof_cause()
    cause.add_note(f"raised in {where}:\n{getattr(exc, 'traceback_str', None) or exc}")  # ray.get's: str is it
    return cause
