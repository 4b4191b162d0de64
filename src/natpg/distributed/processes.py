"""Rollout workers as local processes (``sampler='processes'``): Ray's scale-out without Ray, on one machine.

Each worker process runs the same ``RolloutWorker`` as the Ray actors and the in-process reference, so
with the same seed and number of workers the batches equal those of ``sampler='workers'`` bit for bit.
Messages are pickled whole (``pickle`` protocol 5, tensors as bytes) over one pipe per worker: one
request (weights and normaliser statistics) and one answer (the worker's rollout) per iteration, so the
cost of talking to a worker does not grow with the number of steps. With ``prefetch`` the workers step
the next rollout while the learner fits the critic, which on a two-core machine keeps both cores busy.

A worker that dies or does not answer in time is killed and replaced by a fresh process (fresh episodes,
as in ``WorkerPlan.spec``) and its share of the iteration runs again on the replacement; a second
failure of the same share raises ``WorkerFailure``. An exception raised inside the worker (a non-finite
observation, a bug in the environment) is not a fault of the worker and is raised here as it is, with
the worker's traceback in its notes.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
import traceback
from typing import Any

from ..envs import unknown_in_worker
from ..vector import exit_when_gone, process_context
from .workers import RolloutWorker, WorkerFailure, WorkerPlan, WorkerResult, WorkerSpec, warn_replaced


def _send(conn, message: Any) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=5))


def _process_main(conn, spec: WorkerSpec, worker: int, learner_pid: int | None = None) -> None:
    # Ctrl-C goes to the whole process group: let the learner handle it (it saves a checkpoint, then closes us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if learner_pid is not None:
        threading.Thread(target=exit_when_gone, args=(learner_pid,), daemon=True).start()
    rollout_worker = None
    try:
        rollout_worker = RolloutWorker(spec, worker)
        _send(conn, ("ready", worker))
        while True:
            cmd, args = pickle.loads(conn.recv_bytes())
            if cmd == "close":
                break
            _send(conn, ("result", rollout_worker.collect(*args)))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass
    except Exception as exc:  # report it to the learner instead of dying silently
        remote = traceback.format_exc()
        try:
            pickle.dumps(exc)
        except Exception:
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        try:
            _send(conn, ("error", (exc, remote)))
        except (BrokenPipeError, OSError):
            pass
    finally:
        if rollout_worker is not None:
            rollout_worker.close()
        conn.close()


def _check_picklable_mask(mask: Any) -> None:
    """A callable action mask travels to the worker processes pickled, i.e. by reference to its module and name:
    say so before starting any, rather than a PicklingError from inside multiprocessing."""
    if not callable(mask):
        return
    try:
        pickle.dumps(mask, protocol=5)
    except Exception as exc:
        raise ValueError(f"sampler='processes' sends the action mask to its worker processes with pickle, and "
                         f"{mask!r} cannot be pickled ({type(exc).__name__}: {exc}): use a function defined at "
                         f"module level (`def mask(env): ...`), not a lambda or a nested function") from None


class _Died(Exception):
    """A worker process ended or its pipe broke."""


class ProcessPool:
    """``plan.n_workers`` local processes, each stepping its share of the copies with its own policy copy."""

    retries = 1  # re-runs of a failed worker's share per iteration
    poll_s = 0.5  # how often a waiting learner checks that the workers are alive

    def __init__(self, plan: WorkerPlan, timeout: float = 300.0, start_timeout: float = 600.0):
        _check_picklable_mask(plan.action_mask)
        self.plan = plan
        self.timeout, self.start_timeout = float(timeout), float(start_timeout)
        self._ctx = process_context()
        self.procs: list[Any] = [None] * self.plan.n_workers
        self.conns: list[Any] = [None] * self.plan.n_workers
        # 1 while worker w owes the answer to a request: a request whose answer was never read (its handle
        # lost to an interrupt) is drained before the next, so that no stale rollout passes for a new one.
        self._owed = [0] * self.plan.n_workers
        try:
            for w in range(self.plan.n_workers):
                self._start(w, plan.spec(w))
            for w in range(self.plan.n_workers):
                self._expect(w, "ready", self.start_timeout, "starting")
        except _Died as exc:
            self.close()
            raise WorkerFailure(f"a rollout worker process failed while starting: {exc}. Worker processes import "
                                f"the main script again: in a script, start training under "
                                f"`if __name__ == '__main__':`, and define what the workers need (a custom "
                                f"environment, an action-mask function) at module level, outside that block") from None
        except BaseException:
            self.close()
            raise

    def _start(self, w: int, spec: WorkerSpec) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_process_main, args=(child, spec, w, os.getpid()), daemon=True,
                                 name=f"natpg-rollout-worker-{w}")
        proc.start()
        child.close()
        self.procs[w], self.conns[w], self._owed[w] = proc, parent, 0

    def _expect(self, w: int, kind: str, limit: float, doing: str) -> Any:
        """The next message of worker w, which must be ``kind``; raises _Died if it dies or stays silent for
        ``limit`` seconds, and re-raises an exception the worker reported."""
        conn, proc = self.conns[w], self.procs[w]
        deadline = time.monotonic() + limit
        while True:
            try:
                if conn.poll(min(self.poll_s, max(0.0, deadline - time.monotonic()))):
                    tag, payload = pickle.loads(conn.recv_bytes())
                    break
            except (EOFError, OSError) as exc:
                proc.join(0.5)  # reaped, its exit code is known
                raise _Died(f"its pipe closed ({type(exc).__name__}) while {doing}; exit code "
                            f"{proc.exitcode}") from None
            if not proc.is_alive() and not conn.poll(0):
                raise _Died(f"exited with code {proc.exitcode} while {doing}")
            if time.monotonic() >= deadline:
                raise _Died(f"gave no answer within {limit:g} s while {doing}")
        if tag in ("result", "error"):
            self._owed[w] = 0
        if tag == "error":
            exc, remote = payload
            if unknown := unknown_in_worker(self.plan.env_id, str(exc)):
                raise ValueError(f"rollout worker {w}: {unknown}") from None
            exc.add_note(f"raised in rollout worker {w}:\n{remote}")
            raise exc
        assert tag == kind, (tag, kind)
        return payload

    def _replace(self, w: int) -> None:
        self._kill(w)
        self._start(w, self.plan.replace(w))
        self._expect(w, "ready", self.start_timeout, "starting as a replacement")

    def submit(self, weights, obs_stats, reward_stats, n_steps: int):
        """Send every worker the request for its share of one rollout; returns what ``gather`` waits for."""
        message = pickle.dumps(("collect", (weights, obs_stats, reward_stats, n_steps)), protocol=5)
        self._drain([w for w in range(self.plan.n_workers) if self._owed[w]])
        failed = []
        for w, conn in enumerate(self.conns):
            try:
                conn.send_bytes(message)
                self._owed[w] = 1
            except (BrokenPipeError, OSError):
                failed.append(w)  # gather replaces it
        return message, failed

    def gather(self, handle) -> list[WorkerResult]:
        """The workers' answers to the request ``submit`` sent, replacing and re-asking a worker that fails."""
        message, failed = handle
        results: list[WorkerResult] = []
        for w in range(self.plan.n_workers):
            attempt, why = 0, None
            if w in failed:
                why = "its pipe was closed when the rollout was requested"
            while True:
                if why is None:
                    try:
                        results.append(self._expect(w, "result", self.timeout, "collecting"))
                        break
                    except _Died as exc:
                        why = str(exc)
                if attempt >= self.retries:
                    self._replace_quietly(w)
                    self._drain(range(w + 1, self.plan.n_workers))
                    raise WorkerFailure(f"rollout worker {w} failed ({why}) and its share of this iteration was "
                                        f"already retried {attempt} time(s); giving up (the worker has been "
                                        f"replaced)")
                attempt += 1
                warn_replaced(w, why)
                try:
                    self._replace(w)
                    self.conns[w].send_bytes(message)
                    self._owed[w] = 1
                    why = None
                except (_Died, BrokenPipeError, OSError) as exc:
                    why = f"its replacement failed too: {exc}"
        return results

    def _drain(self, workers) -> None:
        """Read and drop the answers of ``workers`` to a request given up on, so that none is taken for the
        answer to a later one (a worker that cannot answer is replaced)."""
        for w in workers:
            try:
                self._expect(w, "result", self.timeout, "collecting")
            except _Died:
                self._replace_quietly(w)
            except Exception:  # an error the worker reported: its answer to this request
                pass

    def _replace_quietly(self, w: int) -> None:
        try:
            self._replace(w)
        except _Died:
            pass

    def _kill(self, w: int) -> None:
        proc, conn = self.procs[w], self.conns[w]
        if conn is not None:
            conn.close()
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
        self.procs[w] = self.conns[w] = None

    def close(self) -> None:
        """Ask the idle workers to stop and wait for them; kill those still owing an answer (a prefetched rollout
        never gathered, an iteration interrupted), which would finish it first."""
        for w, conn in enumerate(self.conns):
            if conn is not None and not self._owed[w]:
                try:
                    _send(conn, ("close", None))
                except (BrokenPipeError, OSError):
                    pass
        for w, proc in enumerate(self.procs):
            if proc is not None and not self._owed[w]:
                proc.join(timeout=5)
            self._kill(w)
