"""Command line: ``natpg train | config | eval | plot | bench``. Errors are one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import re
import signal
import statistics
import sys
import warnings
from typing import Any

from .config import EVAL_MAX_EPISODE_STEPS, SAMPLERS, SECTIONS, Config
from .errors import one_line


DEFAULT_STEPS = 1_000_000


def parse_setting(text: str) -> tuple[str, Any]:
    """'key=value' with value read as a Python literal when it is one (numbers, tuples, booleans), else a string."""
    if "=" not in text:
        raise ValueError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        try:  # JSON's spelling (true, null), as config.json and --config files have it
            value = json.loads(raw)
        except ValueError:
            value = raw
    if isinstance(value, list):
        value = tuple(value)
    return key.strip(), value


def read_settings_file(path: str, algo: str) -> tuple[dict[str, Any], int | None]:
    """The settings in a JSON or TOML file, and its seed if it has one: flat ({"max_kl": 0.02, "hidden": [64, 64]})
    or by section, as a run's config.json records them (its algorithm must be ``algo``; its env_id is not read)."""
    toml = path.lower().endswith(".toml")
    try:
        if toml:
            import tomllib

            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            with open(path) as f:
                data = json.load(f)
    except OSError as exc:
        raise ValueError(f"--config {path!r}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:  # json.JSONDecodeError, tomllib.TOMLDecodeError
        kind = "TOML" if toml else "JSON (or a .toml file)"
        raise ValueError(f"--config {path!r}: not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path!r}: expected settings by name, such as {{\"max_kl\": 0.02}}, "
                         f"got {type(data).__name__}")
    data = dict(data)
    recorded = data.pop("algorithm", algo)
    if not isinstance(recorded, str) or recorded.lower() != algo:
        raise ValueError(f"--config {path!r} holds the settings of a run of {recorded!r}, not {algo!r} (they "
                         f"set its composition: train that algorithm with it)")
    data.pop("env_id", None)
    seed = data.pop("seed", None)
    settings: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict) and "seed" in value:
            raise ValueError(f"--config {path!r}: seed goes at the top level of the file, as in a run's config.json "
                             f"(it is the run's, not a setting of [{key}])")
        for name, v in (value.items() if key in SECTIONS and isinstance(value, dict) else [(key, value)]):
            if name in settings and settings[name] != v:
                raise ValueError(f"--config {path!r} sets {name} twice, to {settings[name]!r} and {v!r}")
            settings[name] = v
    try:
        Config().override(**settings)  # names only: values are checked with the rest of the run's settings
    except ValueError as exc:
        raise ValueError(f"--config {path!r}: {exc}") from None
    return settings, seed


@contextlib.contextmanager
def naming_settings_file(path: str | None, keys: set[str]):
    """A settings error about one of ``keys`` (those the file ``path`` gave, not overridden) says it came from there."""
    try:
        yield
    except ValueError as exc:
        lines = str(exc).split("\n")
        named = [f"{line} (from --config {path})" if (m := re.match(r"\s*(\w+)", line)) and m[1] in keys else line
                 for line in lines]
        if not path or named == lines:
            raise
        raise ValueError("\n".join(named)) from None


class _Parser(argparse.ArgumentParser):
    """Usage errors in the same one-line form as every other error: 'natpg CMD: error: ...', exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def step_count(text: str) -> int:
    """An env-step count as argparse reads it: 1000000, 1_000_000 or 1e6 (a whole number)."""
    try:
        return int(text)
    except ValueError:
        value = float(text)  # a ValueError here is argparse's "invalid step_count value"
        if not value.is_integer():
            raise
        return int(value)


def build_parser() -> argparse.ArgumentParser:
    from .agent import ALGORITHM_CLASSES

    from . import __version__

    p = _Parser(prog="natpg", description="Natural policy gradient methods for Gymnasium.")
    p.add_argument("--version", action="version", version=f"natpg {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an agent and write config.json, progress.csv, TensorBoard events "
                                     "and checkpoints to --out",
                       description="Train ALGO on ENV_ID. Any setting of natpg.Config can be given with --set "
                                   f"key=value; valid keys: {', '.join(sorted(Config.field_index()))}. "
                                   "`natpg config ALGO ENV_ID` shows what a run gets from the presets.")
    t.add_argument("algo", type=str.lower, help=f"algorithm: {', '.join(sorted(ALGORITHM_CLASSES))}")
    t.add_argument("env_id", help="Gymnasium environment id, e.g. CartPole-v1 or HalfCheetah-v5")
    t.add_argument("--steps", type=step_count, default=None,
                   help="environment steps to train for (default 1e6; with --resume, the run's own --steps)")
    t.add_argument("--seed", type=int, default=None, help="random seed of networks, sampling and environments "
                                                          "(default 0)")
    t.add_argument("--out", default=None, help="output directory (default runs/ALGO-ENV-sSEED); one that holds "
                                                "another run is refused unless --overwrite")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (deletes natpg's outputs there: model.pt, config.json, "
                        "progress.csv, episodes.csv, events.log, tb/, best/; never files of those names beside no "
                        "natpg checkpoint or config.json)")
    t.add_argument("--fisher", default=None,
                   help="how F⁻¹g is applied: cg, dense, kfac, diagonal, empirical, identity")
    t.add_argument("--n-envs", type=int, default=None, help="environment copies per vector env")
    t.add_argument("--device", default=None, help="update device: cpu, cuda[:N] or auto (the GPU where there is one)")
    t.add_argument("--config", default=None, metavar="FILE",
                   help="settings from a JSON or TOML file, flat ({\"max_kl\": 0.02}) or a run's config.json (its "
                        "seed too, unless --seed); --set and the flags override it")
    t.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set max_kl=0.02 --set hidden=[64,64]")
    t.add_argument("--eval-every", type=step_count, default=None, metavar="STEPS",
                   help="evaluate the deterministic policy every STEPS env steps (eval/* columns of progress.csv; "
                        "the best policy kept in OUT/best, for natpg eval OUT/best)")
    t.add_argument("--no-progress", action="store_true", help="no live progress bar")
    t.add_argument("--workers", type=int, default=None, metavar="N",
                   help="split the environment copies over N rollout workers; N > 1 samples on Ray "
                        "(sampler=ray, unless --sampler says otherwise; docs/distributed.md)")
    t.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help="who steps the environments: local (this process, the default), processes (--workers "
                        "local worker processes, overlapped with the critic fit), ray (Ray actors), workers "
                        "(the worker code in this process, a reference)")
    t.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to sample on: 'auto' (after `ray start`) or HOST:PORT (default: a local "
                        "Ray instance); implies sampler=ray")
    t.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR (its recorded config, checkpoint, generators and environment "
                        "state) until it has --steps steps in all; bit-exact for classic-control and MuJoCo tasks. "
                        "With --out NEW, the run (logs and best policy too) is copied to NEW and goes on there; "
                        "DIR stays as it was")

    c = sub.add_parser("config", help="print the settings ALGO gets on ENV_ID and which preset set each",
                       description="Print every setting a `natpg train ALGO ENV_ID` run would get, with the layer "
                                   "that set it: default (natpg.Config), the algorithm's preset, its environment "
                                   "family's, the environment's own, or user (--set). Nothing is trained.")
    c.add_argument("algo", type=str.lower, help=f"algorithm: {', '.join(sorted(ALGORITHM_CLASSES))}")
    c.add_argument("env_id", help="Gymnasium environment id")
    c.add_argument("--config", default=None, metavar="FILE", help="a settings file, as in natpg train")
    c.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="an override, as in natpg train")
    c.add_argument("--json", action="store_true", help="print {setting: {value, source}} as JSON")

    e = sub.add_parser("eval", help="evaluate a saved agent: mean and std of its return over episodes",
                       description="Run --episodes episodes of the saved agent (deterministic actions unless "
                                   "--stochastic) with frozen observation normalisation, episode i seeded SEED + i, "
                                   "and print the mean and std of the undiscounted return; --video records them.")
    e.add_argument("run_dir", help="run directory or checkpoint file written by natpg train / agent.save")
    e.add_argument("--episodes", type=int, default=10, help="evaluation episodes (default 10)")
    e.add_argument("--seed", type=int, default=123,
                   help="seed of the evaluation episodes: episode i's environment (and, with --stochastic, its "
                        "actions) seeded SEED + i (default 123)")
    e.add_argument("--max-episode-steps", type=step_count, default=EVAL_MAX_EPISODE_STEPS, metavar="STEPS",
                   help="cut an episode the environment has not ended after STEPS steps, with a warning "
                        f"(default {EVAL_MAX_EPISODE_STEPS:,}; for environments without a time limit)")
    e.add_argument("--env", default=None, help="environment id (default: the one trained on)")
    e.add_argument("--stochastic", action="store_true",
                   help="sample actions instead of the mode (on the CPU, the same on any device)")
    e.add_argument("--env-kwargs", default=None, metavar="DICT",
                   help="how to make the environment, e.g. \"{'g': 10.0}\" (default: the run's own env_kwargs on "
                        "its own id, none on another id)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--video", default=None, metavar="FILE",
                   help="also record the episodes, back to back, to FILE (.mp4 and other ffmpeg formats with "
                        "the [video] extra: pip install -e \".[video]\"; .gif too needs it); the returns are the same")

    x = sub.add_parser("export", help="write a saved agent's deterministic policy as a torch.export program",
                       description="Write the saved agent's deterministic policy (frozen normalisation, greedy "
                                   "action, clipping or tanh into the bounds) as a torch.export program with a "
                                   "dynamic batch dimension: torch.export.load(FILE).module()(obs) gives the actions "
                                   "natpg eval takes, without natpg installed (natpg.export in Python).")
    x.add_argument("run_dir", help="run directory or checkpoint file written by natpg train / agent.save")
    x.add_argument("-o", "--output", default=None, help="the program file (default RUN_DIR/policy.pt2)")

    pl = sub.add_parser("plot", help="plot learning curves of one or more runs into a PNG",
                        description="Draw one column of progress.csv (--y) against another (--x) for each run "
                                    "directory, or with --seeds one mean line and min–max band per group of seeds. "
                                    "Needs matplotlib (the [plot] extra); the output's suffix sets its format.")
    pl.add_argument("run_dirs", nargs="+", help="run directories containing progress.csv")
    pl.add_argument("-o", "--output", default="curve.png", help="output PNG (default curve.png)")
    pl.add_argument("--x", default="env_steps", help="x column (default env_steps)")
    pl.add_argument("--y", default="ep_return_mean", help="y column (default ep_return_mean)")
    pl.add_argument("--seeds", action="store_true",
                    help="one line per group of runs that differ only in their seed (config.json): the mean "
                         "across them, over a band from their min to their max, where all of them have points")

    b = sub.add_parser("bench", help="throughput of natpg against the raw environment stepping rate",
                       description="Time --updates training updates of ALGO on ENV_ID (after one warm-up) and the "
                                   "raw stepping rate of one copy of the environment with random actions (the "
                                   "ceiling), and print env steps per second of both and their ratio (one "
                                   "measurement, seed 0). benchmarks/ and docs/BENCHMARKS.md compare natpg with its "
                                   "peers.")
    b.add_argument("algo", type=str.lower, help=f"algorithm: {', '.join(sorted(ALGORITHM_CLASSES))}")
    b.add_argument("env_id", help="Gymnasium environment id")
    b.add_argument("--batch", type=int, default=2048, help="env steps per update (default 2048)")
    b.add_argument("--updates", type=int, default=5, help="timed updates after one warm-up (default 5)")
    b.add_argument("--n-envs", type=int, default=None, help="environment copies (default 8)")
    b.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting, as for natpg train (repeatable)")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def algorithm_class(name: str):
    from .agent import ALGORITHM_CLASSES

    if name not in ALGORITHM_CLASSES:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(sorted(ALGORITHM_CLASSES))}")
    return ALGORITHM_CLASSES[name]


def cmd_train(args: argparse.Namespace) -> int:
    from .rundir import check_out_dir, claim_run_dir, copy_run
    from .checkpoint import is_file_path, run_dir_lock

    agent_class = algorithm_class(args.algo)
    file_settings, file_seed = read_settings_file(args.config, args.algo) if args.config else ({}, None)
    if args.seed is None:  # a run's config.json reproduces that run, seed included (--resume checks it)
        args.seed = file_seed
    given = dict(parse_setting(s) for s in args.settings)
    if "seed" in given:  # not a setting: the run's identity, with its own flag
        raise ValueError(f"the seed is not a --set setting: use --seed {given['seed']}")
    for key, value in (("fisher", args.fisher), ("n_envs", args.n_envs), ("device", args.device),
                       ("eval_every", args.eval_every),
                       ("workers", args.workers), ("ray_address", args.ray_address), ("sampler", args.sampler)):
        if value is not None:
            given[key] = value
    overrides = file_settings | given
    if "sampler" not in overrides and ((args.workers or 1) > 1 or args.ray_address is not None):
        overrides["sampler"] = "ray"
    with contextlib.ExitStack() as lock:
        if args.resume is not None:
            out = args.resume if args.out is None else args.out  # '' (an unset $OUT) is refused, not read as none
            elsewhere = os.path.realpath(out) != os.path.realpath(args.resume)
            if args.overwrite and not elsewhere:
                raise ValueError("--resume continues the run in DIR; --overwrite would replace it: give one of them "
                                 "(with --out NEW, --overwrite replaces another run in NEW)")
            run_dir = not is_file_path(_resumable(args.resume))  # else one checkpoint file, not a run directory
            if not run_dir and args.out is None:
                raise ValueError(f"--resume {args.resume!r} is one checkpoint file, not a run directory: give --out "
                                 f"DIR for the continued run's logs and checkpoints")
            # no other writer while DIR is read (and copied); a run going on in NEW leaves DIR free after that
            with contextlib.ExitStack() as reading:
                if run_dir:
                    if elsewhere:  # read only: other readers (fine-tunes from the same run) may read beside
                        reading.enter_context(run_dir_lock(args.resume, shared=True))
                    else:
                        lock.enter_context(run_dir_lock(args.resume))
                agent, changed = _resume(args, overrides, elsewhere)
                target = args.steps if args.steps is not None else agent.target_steps or DEFAULT_STEPS
                steps, reset = target - agent.env_steps, False
                if steps < agent.config.batch_size:
                    left = (f"; the {steps} left are less than one batch ({agent.config.batch_size})" if steps > 0
                            else "")
                    print(f"the run in {args.resume} already has {agent.env_steps} of --steps {target} environment "
                          f"steps{left}; nothing to do")
                    return 0
                if elsewhere:
                    lock.enter_context(run_dir_lock(check_out_dir(out)))
                    # NEW goes on with the run's logs, or with other settings from its own first row
                    if not claim_run_dir(agent, out, args.overwrite, by="resume") and run_dir and not changed:
                        copy_run(args.resume, out)
        else:
            seed = 0 if args.seed is None else args.seed
            # An id such as ALE/Pong-v5 or module:Env-v0 names one directory, not a nested one.
            out = args.out if args.out is not None else os.path.join(
                "runs", f"{args.algo}-{re.sub(r'[^A-Za-z0-9._-]+', '-', args.env_id)}-s{seed}")
            with naming_settings_file(args.config, set(file_settings) - set(given)):
                agent = agent_class(args.env_id, seed=seed, **overrides)
            steps, reset = (DEFAULT_STEPS if args.steps is None else args.steps), True
            if not isinstance(steps, int) or steps < agent.config.batch_size:
                agent.learn(steps)  # the step-budget error, before writing anything
            lock.enter_context(run_dir_lock(check_out_dir(out)))  # held through training: one writer per directory
            claim_run_dir(agent, out, overwrite=args.overwrite)  # another run in --out: an error, before writing
            agent.target_steps = steps  # a run killed before its first checkpoint resumes towards it too
            agent.save(out)  # config.json and an initial checkpoint before any work
        stop = _StopOnSignal()
        try:
            agent.learn(steps, out_dir=out, progress_bar=not args.no_progress, reset=reset, callback=stop.callback)
            recent = agent.recent_return()  # from the sampler's episodes: before it closes
            # Its workers end now, not terminated at the interpreter's exit; after an exception they are (a close
            # would wait for an environment that may be the one that hung).
            agent.close()
        finally:
            stop.restore()
        if stop.signum is not None:
            name = signal.Signals(stop.signum).name
            print(f"natpg train: stopped by {name} after {agent.env_steps} environment steps; checkpoint saved to "
                  f"{out} (continue with --resume {out})", file=sys.stderr)
            _shut_ray_down_through_ctrl_c()
            return 128 + stop.signum
        print(f"trained {args.algo} on {args.env_id} for {agent.env_steps} steps; "
              f"{'no episode finished yet' if math.isnan(recent) else f'recent return {recent:.1f}'}; saved to {out}")
        return 0


def _shut_ray_down_through_ctrl_c() -> None:
    """After a stop by signal, with Ray running: shut it down now, Ctrl-C ignored meanwhile. Its exit hook would do
    it after main returns, where the second of two quick Ctrl-Cs broke it with a traceback and left Ray's agent
    processes behind; the run is saved, so nothing is left for a Ctrl-C to interrupt."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ray.shutdown()
    finally:
        signal.signal(signal.SIGINT, previous)


def _resumable(run_dir: str) -> str:
    from .checkpoint import checkpoint_file

    file = checkpoint_file(run_dir)
    if not os.path.isfile(file):
        raise ValueError(f"--resume {run_dir!r}: not a natpg run (no checkpoint {file!r}); start one with "
                         f"natpg train ALGO ENV_ID --out DIR")
    return run_dir


def _resume(args: argparse.Namespace, overrides: dict[str, Any], elsewhere: bool):
    """The agent --resume continues, and the settings --set changes in it beyond how it is logged, checkpointed and
    evaluated (``BOOKKEEPING``): those continue the run into a new --out only (``elsewhere``: --out is not DIR), as
    natpg.load(DIR, key=value) does."""
    from .agent import load
    from .rundir import BOOKKEEPING

    agent = load(args.resume, **{k: v for k, v in overrides.items() if k in BOOKKEEPING})  # logging, evaluation
    if (agent.algorithm, agent.env_id) != (args.algo, args.env_id):
        raise ValueError(f"--resume {args.resume!r}: that run is {agent.algorithm} on {agent.env_id}, not "
                         f"{args.algo} on {args.env_id}")
    if args.seed is not None and args.seed != agent.seed:
        raise ValueError(f"--resume {args.resume!r}: that run has seed {agent.seed}, not {args.seed}")
    changed = sorted(k for k, v in overrides.items() if agent.config.override(**{k: v}) != agent.config)
    if changed:  # repeating the original command line with --resume is fine
        if not elsewhere:  # --out is DIR itself
            raise ValueError(f"--resume DIR keeps the run's recorded config in DIR, but for the settings of logging "
                             f"and evaluation ({', '.join(BOOKKEEPING)}); to go on with other {changed}, give --out "
                             f"NEW: the run continues there from its last checkpoint with the new settings, its logs "
                             f"starting at that step, and DIR stays as it was")
        agent.close()
        agent = load(args.resume, **{k: v for k, v in overrides.items() if k in changed or k in BOOKKEEPING})
    return agent, changed


class _StopOnSignal:
    """SIGINT/SIGTERM end training at the next iteration boundary, where the state is consistent: learn then
    writes its final checkpoint and returns. A second signal interrupts at once (the last completed update is
    saved)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        self._pid = os.getpid()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked env worker (vectorization='async') inherited this handler
            if signum == signal.SIGTERM:  # its end, as by default; a SIGINT is the learner's to act on
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"natpg train: {signal.Signals(signum).name}: stopping after this update and saving it (again to stop "
              f"now; the last completed update is saved)", file=sys.stderr, flush=True)

    def callback(self, agent, row) -> bool:
        return self.signum is None

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


def cmd_config(args: argparse.Namespace) -> int:
    from .presets import config_for, default_config, inert_preset_values, setting_sources, warn_unread
    from .envs import env_family, probe_spaces

    algorithm_class(args.algo)
    file_settings = read_settings_file(args.config, args.algo)[0] if args.config else {}
    given = dict(parse_setting(s) for s in args.settings)
    overrides = file_settings | given
    family = env_family(args.env_id)
    with naming_settings_file(args.config, set(file_settings) - set(given)):
        config = config_for(args.algo, args.env_id, overrides, warn=False)
    # what train checks against the environment itself (its spaces, env_kwargs), without training
    observation_space, action_space = probe_spaces(args.env_id, config.env.action_mask, config.env.env_kwargs)
    if refusal := config.refusal("action_squash", type(action_space).__name__):
        raise ValueError(refusal)
    warn_unread(config, args.env_id, overrides, (observation_space, action_space))
    sources = setting_sources(args.algo, family, args.env_id, given, {args.config: file_settings} if args.config else {})
    preset = default_config(args.algo, family, args.env_id)
    for key in inert_preset_values(preset, preset.override(**overrides), overrides):
        sources[key] = "default (the preset's value is not read by this run)"
    rows = [(section, key, value, sources[key]) for section, values in config.to_dict().items()
            if isinstance(values, dict) for key, value in values.items()]
    if args.json:
        print(json.dumps({key: {"value": value, "source": source} for _, key, value, source in rows}, default=str))
        return 0
    print(f"{args.algo} on {args.env_id} (environment family: {family})")
    width = max(len(f"{section}.{key} = {value!r}") for section, key, value, _ in rows)
    for section, key, value, source in rows:
        print(f"  {f'{section}.{key} = {value!r}':<{width}}  [{source}]")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .agent import load
    from .checkpoint import is_file_path
    from .deployment import write_program

    # a callable mask is not saved, and the exported policy takes the mask as an input: all actions stand in for it
    # (load reads the callable only for a run trained with one)
    agent = load(args.run_dir, action_mask=_all_actions)
    output = args.output
    if output is None:
        output = os.path.join(os.path.dirname(args.run_dir) if is_file_path(args.run_dir) else args.run_dir,
                              "policy.pt2")
    takes = write_program(agent, output)
    print(f"wrote {output}: torch.export.load({output!r}).module() takes {takes} and returns the actions")
    return 0


def _all_actions(env) -> Any:
    """An action mask allowing every action: the stand-in for a run's callable mask where no episode is played."""
    import numpy as np

    return np.ones(int(env.action_space.n), np.int8)


def cmd_eval(args: argparse.Namespace) -> int:
    from .agent import load
    from .evaluation import evaluate

    if args.video:
        from .video import headless_linux

        if headless_linux():  # MuJoCo reads MUJOCO_GL when imported, by load below; record_video sets pygame's
            os.environ.setdefault("MUJOCO_GL", "egl")
    agent = load(args.run_dir)
    env_kwargs = None if args.env_kwargs is None else parse_setting(f"env_kwargs={args.env_kwargs}")[1]
    if args.video:
        from .video import record_video

        returns = record_video(agent, args.video, args.env, episodes=args.episodes, seed=args.seed,
                               deterministic=not args.stochastic, max_episode_steps=args.max_episode_steps,
                               env_kwargs=env_kwargs)
        mean, std = float(statistics.fmean(returns)), float(statistics.pstdev(returns))
    else:
        mean, std = evaluate(agent, args.env, episodes=args.episodes, seed=args.seed,
                             deterministic=not args.stochastic, max_episode_steps=args.max_episode_steps,
                             env_kwargs=env_kwargs)
    result = {"env_id": args.env or agent.env_id, "algorithm": agent.algorithm, "episodes": args.episodes,
              "seed": args.seed, "return_mean": mean, "return_std": std, "env_steps_trained": agent.env_steps}
    if args.video:
        result["video"] = args.video
    print(json.dumps(result) if args.json else f"{result['env_id']}: return {mean:.2f} ± {std:.2f} over "
          f"{args.episodes} episodes ({agent.algorithm}, {agent.env_steps} training steps)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plotting import plot_runs

    output = args.output if os.path.splitext(args.output)[1] else args.output + ".png"  # what matplotlib writes
    plot_runs(args.run_dirs, output, args.x, args.y, seeds=args.seeds)
    print(f"wrote {output}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import throughput

    overrides = dict(parse_setting(s) for s in args.settings)
    if args.n_envs is not None:
        overrides["n_envs"] = args.n_envs
    result = throughput(args.algo, args.env_id, args.batch, args.updates, **overrides)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


def _stdout_gone() -> bool:
    """Whether the reader of this process's standard output has gone (a pipe into ``head`` that exited): poll
    reports an error on a pipe's write end whose read end is closed (Linux, macOS; elsewhere: False)."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll(), or no file descriptor behind sys.stdout
        return False


def _natpg_notes(exc: BaseException) -> str:
    """natpg's notes on an exception (where the run was saved), each on its own line; not a worker's traceback."""
    return "".join(f"\n{note}" for note in getattr(exc, "__notes__", ()) if note.startswith("natpg:"))


def main(argv: list[str] | None = None) -> int:
    from .distributed import WorkerFailure  # does not import Ray
    from .rollout import NonFiniteEnvError
    from .train import TrainingFault
    from .vector import EnvWorkerDied
    from .video import RenderError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (already printed) and --help
        return exc.code if isinstance(exc.code, int) else 2
    handler = {"train": cmd_train, "config": cmd_config, "eval": cmd_eval, "export": cmd_export, "plot": cmd_plot,
               "bench": cmd_bench}[args.command]
    # natpg's warnings (a setting the run would not read, an evaluation episode cut) as one line each, like errors;
    # other libraries' keep their own form
    format_warning = warnings.formatwarning

    def warning_line(message, category, filename, lineno, line=None):
        if getattr(message, "from_natpg", False):  # errors.warn's
            return f"natpg {args.command}: warning: {message}\n"
        return format_warning(message, category, filename, lineno, line)

    warnings.formatwarning = warning_line
    try:
        return handler(args)
    except BrokenPipeError as exc:
        if not _stdout_gone():  # another pipe (a worker's): an error like any other
            print(f"natpg {args.command}: error: {one_line(str(exc))}{_natpg_notes(exc)}", file=sys.stderr)
            return 2
        # the reader went away (natpg config ... | head): stop as a pipeline expects
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        if notes := _natpg_notes(exc):
            print(f"natpg {args.command}: its output was closed (broken pipe){notes}", file=sys.stderr)
        return 141  # 128 + SIGPIPE, what a shell reports for a writer the pipe stopped
    # OSError: a full disk, a read-only directory, a file where a directory goes
    except (ValueError, OSError, MemoryError, ImportError, TrainingFault, NonFiniteEnvError, WorkerFailure,
            EnvWorkerDied, RenderError) as exc:
        print(f"natpg {args.command}: error: {one_line(str(exc))}{_natpg_notes(exc)}", file=sys.stderr)
        return 2
    except Warning as exc:  # python -W error: natpg's own warning as the one-line error it now is
        if not getattr(exc, "from_natpg", False):
            raise
        print(f"natpg {args.command}: error: {one_line(str(exc))} (a warning, made an error by -W error)"
              f"{_natpg_notes(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"natpg {args.command}: interrupted{_natpg_notes(exc)}", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = format_warning


if __name__ == "__main__":
    sys.exit(main())
