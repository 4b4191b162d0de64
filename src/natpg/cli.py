"""Command line: ``natpg train | eval | plot | bench``. Errors are one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from typing import Any

from .config import Config


def parse_setting(text: str) -> tuple[str, Any]:
    """'key=value' with value read as a Python literal when it is one (numbers, tuples, booleans), else a string."""
    if "=" not in text:
        raise ValueError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(value, list):
        value = tuple(value)
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    from .agent import ALGORITHM_CLASSES

    p = argparse.ArgumentParser(prog="natpg", description="Natural policy gradient methods for Gymnasium.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an agent and write config.json, progress.csv, TensorBoard events "
                                     "and checkpoints to --out",
                       description="Train ALGO on ENV_ID. Any setting of natpg.Config can be given with --set "
                                   f"key=value; valid keys: {', '.join(sorted(Config.field_index()))}.")
    t.add_argument("algo", type=str.lower, help=f"algorithm: {', '.join(sorted(ALGORITHM_CLASSES))}")
    t.add_argument("env_id", help="Gymnasium environment id, e.g. CartPole-v1 or HalfCheetah-v5")
    t.add_argument("--steps", type=int, default=1_000_000, help="environment steps to train for (default 1e6)")
    t.add_argument("--seed", type=int, default=0, help="random seed of networks, sampling and environments")
    t.add_argument("--out", default=None, help="output directory (default runs/ALGO-ENV-sSEED)")
    t.add_argument("--fisher", default=None, help="how F⁻¹g is applied: cg, dense, kfac, diagonal, empirical")
    t.add_argument("--n-envs", type=int, default=None, help="environment copies per vector env")
    t.add_argument("--device", default=None, help="update device: cpu or cuda")
    t.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set max_kl=0.02 --set hidden=[64,64]")
    t.add_argument("--no-progress", action="store_true", help="no live progress bar")

    e = sub.add_parser("eval", help="evaluate a saved agent with deterministic actions")
    e.add_argument("run_dir", help="run directory or checkpoint file written by natpg train / agent.save")
    e.add_argument("--episodes", type=int, default=10, help="evaluation episodes (default 10)")
    e.add_argument("--seed", type=int, default=123, help="seed of the evaluation environments (default 123)")
    e.add_argument("--env", default=None, help="environment id (default: the one trained on)")
    e.add_argument("--stochastic", action="store_true", help="sample actions instead of the mode")
    e.add_argument("--json", action="store_true", help="print the result as JSON")

    pl = sub.add_parser("plot", help="plot learning curves of one or more runs into a PNG")
    pl.add_argument("run_dirs", nargs="+", help="run directories containing progress.csv")
    pl.add_argument("-o", "--output", default="curve.png", help="output PNG (default curve.png)")
    pl.add_argument("--x", default="env_steps", help="x column (default env_steps)")
    pl.add_argument("--y", default="ep_return_mean", help="y column (default ep_return_mean)")

    b = sub.add_parser("bench", help="throughput of natpg against the raw environment stepping rate")
    b.add_argument("algo", type=str.lower, help="algorithm")
    b.add_argument("env_id", help="environment id")
    b.add_argument("--batch", type=int, default=2048, help="env steps per update (default 2048)")
    b.add_argument("--updates", type=int, default=5, help="timed updates after one warm-up (default 5)")
    b.add_argument("--n-envs", type=int, default=None, help="environment copies")
    b.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from .agent import ALGORITHM_CLASSES

    if args.algo not in ALGORITHM_CLASSES:
        raise ValueError(f"unknown algorithm {args.algo!r}; valid: {', '.join(sorted(ALGORITHM_CLASSES))}")
    overrides = dict(parse_setting(s) for s in args.settings)
    for key, value in (("fisher", args.fisher), ("n_envs", args.n_envs), ("device", args.device)):
        if value is not None:
            overrides[key] = value
    out = args.out or os.path.join("runs", f"{args.algo}-{args.env_id}-s{args.seed}")
    agent = ALGORITHM_CLASSES[args.algo](args.env_id, seed=args.seed, **overrides)
    agent.save(out)  # config.json and an initial checkpoint before any work
    agent.learn(args.steps, out_dir=out, progress_bar=not args.no_progress)
    print(f"trained {args.algo} on {args.env_id} for {agent.env_steps} steps; recent return "
          f"{agent.recent_return():.1f}; saved to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .agent import evaluate, load

    agent = load(args.run_dir)
    mean, std = evaluate(agent, args.env, episodes=args.episodes, seed=args.seed, deterministic=not args.stochastic)
    result = {"env_id": args.env or agent.env_id, "algorithm": agent.algorithm, "episodes": args.episodes,
              "seed": args.seed, "return_mean": mean, "return_std": std, "env_steps_trained": agent.env_steps}
    print(json.dumps(result) if args.json else f"{result['env_id']}: return {mean:.2f} ± {std:.2f} over "
          f"{args.episodes} episodes ({agent.algorithm}, {agent.env_steps} training steps)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plotting import plot_runs

    plot_runs(args.run_dirs, args.output, args.x, args.y)
    print(f"wrote {args.output}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import throughput

    overrides = dict(parse_setting(s) for s in args.settings)
    if args.n_envs is not None:
        overrides["n_envs"] = args.n_envs
    result = throughput(args.algo, args.env_id, args.batch, args.updates, **overrides)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"train": cmd_train, "eval": cmd_eval, "plot": cmd_plot, "bench": cmd_bench}[args.command]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"natpg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"natpg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
