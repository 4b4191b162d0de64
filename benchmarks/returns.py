"""Returns of natpg against its peers on MuJoCo, by the rules of BENCHMARKING.md ("Returns").

Usage (from the repository root)::

    python benchmarks/returns.py --algos natpg-npg natpg-trpo natpg-acktr natpg-ppo sb3-trpo \\
        tianshou-npg tianshou-trpo --envs Hopper-v5 HalfCheetah-v5 --seeds 0 1 2 3 4 \\
        --steps 1000000 --eval-every 50000 --out runs/bench --tianshou-python /path/to/venv/bin/python
    python benchmarks/aggregate.py runs/bench      # curves, summary.csv, summary.md

Every (algo, env, seed) is its own subprocess, in the interpreter of its library (``--natpg-python``,
``--sb3-python``: default the one running this script; ``--tianshou-python``: default ``python``), one at
a time or ``--jobs N`` at once. Its evaluations go to ``OUT/partial/<run>.csv`` as they happen and, when
the run has finished, into ``OUT/returns.csv`` (long format, one row per evaluation): library, algo, env,
seed, env_steps, eval_return_mean, eval_return_std, wall_s, hardware, commit, command, plus ``budget``
(the ``--steps`` asked for) and ``final`` (1 on the run's last row). A run whose final row for the same
budget is already in returns.csv is skipped, so an interrupted benchmark resumes by rerunning the same
command. ``command`` is the one-line command that reproduces that run alone. Tuning runs override
natpg settings over the presets with ``--set KEY=VALUE`` (repeatable, natpg algorithms only; values as
``natpg train --set``); their ``algo`` column carries the overrides, e.g. ``natpg-npg[max_kl=0.05]``, so
they sit beside the preset's rows as a separate algorithm. The child's stdout/stderr go to
``OUT/logs/<run>_<steps>.log`` (a rerun at another budget keeps the first's log); a failed run (e.g. the peer library not importable in the interpreter used)
prints one line and the others go on; the exit status is 1 if any run failed. In file names ``<run>`` is
algo_env_seed[_KEY=VALUE...], with the characters a file name cannot hold (``/`` and ``:`` of ids like
ALE/Pong-v5) written as ``-``. A repeated algo, env or seed is run once. ``--set`` cannot change what a
``-procs`` engine fixes (n_envs, n_steps, sampler, workers).

Fairness rules followed (BENCHMARKING.md)
-----------------------------------------
- Budget: ``--steps`` counts environment transitions across all parallel envs. Training stops only at
  whole updates, so each library trains for the largest whole number of its updates not exceeding
  ``--steps`` (1M → 999,424 for all the algorithms here: their batches are 1024 or 2048 steps) and the CSV
  records the exact count (``env_steps``); nobody gets more than the budget.
- Evaluation: every ``--eval-every`` env steps (rounded down to a whole update in the same way) and at the
  end: the current policy, deterministic (mean) actions, observation-normaliser statistics frozen, raw
  (unnormalised) rewards, ``--eval-episodes`` (10) episodes in fresh environments, copy i reset with seed
  ``10_000 + seed + i`` — seeds the training envs (seeded ``seed + i``) never use, and the same episode
  seeds for every library (natpg.evaluate for natpg, the identical loop in peers.evaluate for the peers).
- ``wall_s`` is the training wall time so far (evaluation and start-up excluded).
- Every library runs with its own published/tuned settings, unmodified, each in its own interpreter;
  torch threads: natpg's own default (``torch_threads=1``), ``--torch-threads`` (default 1) for the peers;
  the ``hardware`` column states platform, CPU, core count and torch threads.

Settings of each library (and where they come from)
---------------------------------------------------
- natpg-npg / natpg-trpo / natpg-acktr / natpg-ppo: ``natpg.NPG/TRPO/ACKTR/PPO(env, seed=seed)`` with
  natpg's own MuJoCo presets, no overrides (src/natpg/presets.py ``FAMILY_DEFAULTS``; docs/algorithms.md
  cites their sources), trained by ``agent.learn(chunk, reset=False)`` between evaluations.
- natpg-npg-procs (and -trpo-, -acktr-, ...): the same presets and batch size, sampled by 16 copies over
  2 worker processes (``sampler='processes', workers=2, n_envs=16``; normaliser statistics updated once
  per iteration, docs/distributed.md).
- sb3-trpo: sb3-contrib TRPO with the RL Zoo's MuJoCo hyperparameters (rl-baselines3-zoo
  ``hyperparams/trpo.yml``, ``&mujoco-defaults``): 2 envs × 1024 steps, critic lr 1e-3 with 20 updates of
  minibatch 128, CG 25 iterations, damping 0.1, target KL 0.01 (HalfCheetah 0.04), γ 0.99, GAE λ 0.95,
  VecNormalize of observations and rewards, SB3 MlpPolicy defaults ([64, 64] Tanh actor and critic).
  Trained by ``model.learn(chunk, reset_num_timesteps=False)`` between evaluations.
- tianshou-npg / tianshou-trpo: Tianshou's ``examples/mujoco/mujoco_npg.py`` / ``mujoco_trpo.py``: 16 envs,
  1024 steps per update, critic Adam 1e-3 (linear decay to 0 over the run) with 20 iterations, GAE λ 0.95,
  observation / reward (return scaling) / advantage normalisation, CG 10, damping 0.1, NPG step 0.1, TRPO
  max KL 0.01, [64, 64] Tanh actor and critic. Low-level API: Collector + ``algorithm.update`` per batch,
  exactly what its OnPolicyTrainer does per training step.
  benchmarks/peers.py has the full list for both peers, and the deviations.

Published numbers (BENCHMARKING.md) use other metrics (Tianshou: best checkpoint, 10 seeds; sb3-contrib:
value at 1M, 3 seeds) and MuJoCo v3 environments; aggregate.py puts them beside the measured ones.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # peers.py, common.py

from common import file_safe  # noqa: E402

COLUMNS = ["library", "algo", "env", "seed", "env_steps", "eval_return_mean", "eval_return_std", "wall_s",
           "hardware", "commit", "command", "budget", "final"]
NATPG_ALGOS = {"natpg-npg": "NPG", "natpg-trpo": "TRPO", "natpg-acktr": "ACKTR", "natpg-ppo": "PPO",
               "natpg-vpg": "VPG", "natpg-nac": "NAC"}
# The same presets sampled by natpg's fast engine on a small machine: 16 copies over 2 worker processes
# (sampler='processes', the next rollout stepped during the critic fit), the preset's batch size kept.
PROCESS_ENGINE = {"sampler": "processes", "workers": 2, "n_envs": 16}
NATPG_ALGOS |= {f"{name}-procs": cls for name, cls in list(NATPG_ALGOS.items())}
PEER_LIBRARY = {"sb3-trpo": "sb3-contrib", "tianshou-npg": "tianshou", "tianshou-trpo": "tianshou"}
PEER_MODULE = {"sb3-contrib": "sb3_contrib", "tianshou": "tianshou"}
PYTHON_FLAG = {"natpg": "--natpg-python", "sb3-contrib": "--sb3-python", "tianshou": "--tianshou-python"}
ALGOS = list(NATPG_ALGOS) + list(PEER_LIBRARY)
EVAL_SEED_OFFSET = 10_000


def library_of(algo: str) -> str:
    return "natpg" if algo in NATPG_ALGOS else PEER_LIBRARY[algo]


def engine_for(algo: str, env_id: str) -> dict:
    """The settings a ``-procs`` algorithm fixes (PROCESS_ENGINE; n_steps keeps the preset's batch), else {}."""
    if not algo.endswith("-procs"):
        return {}
    from natpg.presets import config_for

    batch = config_for(NATPG_ALGOS[algo].lower(), env_id).batch_size
    return {**PROCESS_ENGINE, "n_steps": batch // PROCESS_ENGINE["n_envs"]}


# --- one run (the child process) -------------------------------------------------------------------------
class NatpgRunner:
    """natpg's agent with its own presets; ``evaluate`` is natpg.evaluate (frozen normalisation)."""

    def __init__(self, algo: str, env_id: str, seed: int, overrides: dict | None = None, budget: int | None = None):
        try:
            import natpg
        except ImportError as exc:
            from peers import PeerMissing

            raise PeerMissing(f"{algo} needs natpg, which is not importable in {sys.executable} ({exc}); "
                              f"pass --natpg-python") from None
        self.natpg = natpg
        self.agent = getattr(natpg, NATPG_ALGOS[algo])(env_id, seed=seed, **engine_for(algo, env_id),
                                                       **(overrides or {}))
        self.batch = self.agent.config.batch_size
        self.env_id = env_id
        # Trained in chunks between evaluations: a KL schedule decays towards the whole budget, not each chunk's end.
        self.schedule_end = budget // self.batch * self.batch if budget else None
        self._started = False

    @property
    def env_steps(self) -> int:
        return int(self.agent.env_steps)

    def train(self, n: int) -> None:
        self.agent.learn(n, reset=not self._started,  # later chunks continue the same episodes
                         schedule_end=self.schedule_end)
        self._started = True

    def evaluate(self, episodes: int, seed: int) -> tuple[float, float]:
        return self.natpg.evaluate(self.agent, self.env_id, episodes=episodes, seed=seed)

    def close(self) -> None:
        self.agent.close()


def run_label(algo: str, settings: list[str]) -> str:
    """The ``algo`` column: the algorithm, with a tuning run's ``--set`` overrides in brackets."""
    return f"{algo}[{','.join(settings)}]" if settings else algo


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        threads = "n/a"
    return f"{platform.platform()}; {cpu}; {os.cpu_count()} cpus; torch threads {threads}; python {platform.python_version()}"


def run_one(a: argparse.Namespace) -> int:
    """Train one (algo, env, seed), writing an evaluation row to ``a.partial`` after each chunk."""
    import peers

    t0 = time.perf_counter()
    try:
        if a.algo in NATPG_ALGOS:
            from natpg.cli import parse_setting

            runner = NatpgRunner(a.algo, a.env, a.seed, dict(map(parse_setting, a.settings)), a.steps)
        else:
            # The peer library before torch: an interpreter without it (often without torch either) is then
            # reported as lacking that library, with the flag that points at the interpreter that has it.
            lib = PEER_LIBRARY[a.algo]
            peers._require(PEER_MODULE[lib], a.algo, PYTHON_FLAG[lib])
            import torch

            torch.set_num_threads(a.torch_threads)
            runner = peers.PEERS[a.algo][1](a.env, a.seed, a.steps)
    except peers.PeerMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    points = peers.eval_points(a.steps, a.eval_every, runner.batch)
    hw = hardware()
    print(f"{a.algo} {a.env} seed {a.seed}: batch {runner.batch}, evaluations at {points}; "
          f"set-up {time.perf_counter() - t0:.1f} s; {hw}", flush=True)
    eval_seed = EVAL_SEED_OFFSET + a.seed
    wall = 0.0
    with open(a.partial, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        try:
            for p in points:
                start = time.perf_counter()
                runner.train(p - runner.env_steps)
                wall += time.perf_counter() - start
                if runner.env_steps != p:
                    raise RuntimeError(f"{a.algo} stopped at {runner.env_steps} env steps, expected {p}")
                if hasattr(runner, "evaluate"):
                    mean, std = runner.evaluate(a.eval_episodes, eval_seed)
                else:
                    mean, std = peers.evaluate(a.env, runner.act, a.eval_episodes, eval_seed)
                writer.writerow({"library": library_of(a.algo), "algo": run_label(a.algo, a.settings),
                                 "env": a.env, "seed": a.seed, "env_steps": runner.env_steps,
                                 "eval_return_mean": f"{mean:.3f}", "eval_return_std": f"{std:.3f}",
                                 "wall_s": f"{wall:.2f}", "hardware": hw,
                                 "commit": a.commit, "command": a.command, "budget": a.steps,
                                 "final": int(p == points[-1])})
                f.flush()
                print(f"  {runner.env_steps:>9} steps  return {mean:9.2f} ± {std:7.2f}  train {wall:8.1f} s  "
                      f"({runner.env_steps / max(wall, 1e-9):.0f} steps/s)", flush=True)
        finally:
            runner.close()
    return 0


# --- the orchestrator ------------------------------------------------------------------------------------
def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def finished_runs(path: str) -> set[tuple[str, str, int, int]]:
    done = set()
    if os.path.exists(path):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("final") == "1":
                    done.add((row["algo"], row["env"], int(row["seed"]), int(row["budget"])))
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+", choices=ALGOS, default=["natpg-npg"])
    p.add_argument("--envs", nargs="+", default=["Hopper-v5"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=1_000_000, help="env transitions per run, across all envs")
    p.add_argument("--eval-every", type=int, default=50_000, help="env steps between evaluations")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each is one process)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads of the peers' processes")
    p.add_argument("--natpg-python", default=sys.executable)
    p.add_argument("--sb3-python", default=sys.executable)
    p.add_argument("--tianshou-python", default="python")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="tuning runs: override a natpg setting over its preset (natpg algorithms only); the algo "
                        "column then reads e.g. natpg-npg[max_kl=0.05]")
    # Internal: one run, in the library's interpreter.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--algo", help=argparse.SUPPRESS)
    p.add_argument("--env", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--partial", help=argparse.SUPPRESS)
    p.add_argument("--commit", default="unknown", help=argparse.SUPPRESS)
    p.add_argument("--command", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return run_one(a)
    if a.steps < 1 or a.eval_every < 1 or a.eval_episodes < 1 or a.jobs < 1:
        p.error("--steps, --eval-every, --eval-episodes and --jobs must be positive")
    # A repeated seed (or algo, env) would run twice and, with --jobs > 1, two children would share one
    # partial file; each is run once, in the order given.
    for flag, attr in (("--algos", "algos"), ("--envs", "envs"), ("--seeds", "seeds")):
        given_values = getattr(a, attr)
        unique = list(dict.fromkeys(given_values))
        if len(unique) < len(given_values):
            dropped = [v for i, v in enumerate(given_values) if v in given_values[:i]]
            print(f"note: {flag}: dropped the repeated {' '.join(map(str, dropped))}; running "
                  f"{' '.join(map(str, unique))}")
            setattr(a, attr, unique)
    if a.settings:
        from natpg.presets import config_for
        from natpg.cli import parse_setting

        peers_asked = [algo for algo in a.algos if library_of(algo) != "natpg"]
        if peers_asked:
            p.error(f"--set overrides natpg settings only; drop {peers_asked} or run them without --set")
        try:  # names and values, checked against each run's presets (and engine) before any run starts
            overrides = dict(map(parse_setting, a.settings))
            procs = [algo for algo in a.algos if algo.endswith("-procs")]
            if procs and (fixed := sorted(overrides.keys() & {"n_envs", "n_steps", *PROCESS_ENGINE})):
                p.error(f"--set: {fixed} are fixed by the -procs engine ({', '.join(procs)}: "
                        f"{', '.join(f'{k}={v}' for k, v in PROCESS_ENGINE.items())}, n_steps = preset batch / "
                        f"{PROCESS_ENGINE['n_envs']}); drop them or run those algos without -procs")
            for algo in a.algos:
                for env_id in a.envs:
                    config_for(NATPG_ALGOS[algo].lower(), env_id, {**engine_for(algo, env_id), **overrides})
        except (TypeError, ValueError) as exc:
            p.error(f"--set: {exc}")

    runs = [(algo, env, seed) for env in a.envs for algo in a.algos for seed in a.seeds]

    def run_name(run) -> str:  # its logs/ and partial/ file names
        algo, env, seed = run
        return "_".join(file_safe(part) for part in [algo, env, str(seed), *a.settings])

    names: dict[str, tuple] = {}
    for run in runs:  # ids that differ only in the characters file_safe replaces would share files
        if (other := names.setdefault(run_name(run), run)) != run:
            p.error(f"--envs {other[1]!r} and {run[1]!r} would share the file name {run_name(run)!r}; "
                    f"run them into different --out folders")

    out = a.out
    os.makedirs(os.path.join(out, "partial"), exist_ok=True)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    csv_path = os.path.join(out, "returns.csv")
    done = finished_runs(csv_path)
    commit = git_commit()
    given = set(argv if argv is not None else sys.argv[1:])
    pythons = {"natpg": a.natpg_python, "sb3-contrib": a.sb3_python, "tianshou": a.tianshou_python}
    lock = threading.Lock()
    sets = [arg for kv in a.settings for arg in ("--set", kv)]  # passed on to every run and its command

    todo = [r for r in runs if (run_label(r[0], a.settings), r[1], r[2], a.steps) not in done]
    if len(todo) < len(runs):
        print(f"skipping {len(runs) - len(todo)} finished run(s) already in {csv_path}")

    def one(run) -> bool:
        algo, env, seed = run
        lib = library_of(algo)
        name = run_name(run)
        cmd = ["python", "benchmarks/returns.py", "--algos", algo, "--envs", env, "--seeds", str(seed),
               "--steps", str(a.steps), "--eval-every", str(a.eval_every), "--out", out, *sets]
        if a.eval_episodes != 10:
            cmd += ["--eval-episodes", str(a.eval_episodes)]
        if a.torch_threads != 1 and lib != "natpg":
            cmd += ["--torch-threads", str(a.torch_threads)]
        if lib == "tianshou" or PYTHON_FLAG[lib] in given:
            cmd += [PYTHON_FLAG[lib], pythons[lib]]
        partial = os.path.join(out, "partial", f"{name}_{a.steps}.csv")
        child = [pythons[lib], os.path.abspath(__file__), "--worker", "--algo", algo, "--env", env,
                 "--seed", str(seed), "--steps", str(a.steps), "--eval-every", str(a.eval_every),
                 "--eval-episodes", str(a.eval_episodes), "--torch-threads", str(a.torch_threads),
                 "--partial", partial, "--commit", commit, "--command", shlex.join(cmd), *sets]
        log = os.path.join(out, "logs", f"{name}_{a.steps}.log")  # one per budget, as its rows in returns.csv
        print(f"start {name}", flush=True)
        start = time.perf_counter()
        with open(log, "w") as f:
            try:
                rc = subprocess.run(child, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
            except OSError as exc:  # the interpreter itself is missing
                f.write(f"error: cannot start {pythons[lib]!r}: {exc}\n")
                rc = 127
        took = time.perf_counter() - start
        if rc != 0:
            with open(log) as f:
                lines = [l.strip() for l in f if l.strip()]
            last = next((l for l in reversed(lines) if l.startswith("error:")), lines[-1] if lines else "")
            print(f"FAILED {name} (exit {rc}, {took:.0f} s): {last}  [log: {log}]", flush=True)
            return False
        with open(partial, newline="") as f:
            rows = list(csv.DictReader(f))
        with lock:
            new = not os.path.exists(csv_path)
            with open(csv_path, "a", newline="") as f:
                writer = csv.DictWriter(f, COLUMNS)
                if new:
                    writer.writeheader()
                writer.writerows(rows)
        os.remove(partial)
        final = rows[-1]
        print(f"done  {name}: {final['env_steps']} steps, return {float(final['eval_return_mean']):.1f} "
              f"± {float(final['eval_return_std']):.1f}, train {float(final['wall_s']):.0f} s "
              f"({int(final['env_steps']) / max(float(final['wall_s']), 1e-9):.0f} steps/s), "
              f"process {took:.0f} s", flush=True)
        return True

    if a.jobs == 1:
        results = [one(r) for r in todo]
    else:
        with ThreadPoolExecutor(a.jobs) as pool:
            results = list(pool.map(one, todo))
    failed = results.count(False)
    print(f"{len(results) - failed} run(s) finished, {failed} failed; results in {csv_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
