"""Summarise benchmarks/returns.py's OUT/returns.csv: learning curves, summary.csv and summary.md.

    python benchmarks/aggregate.py runs/bench [--reps 10000] [--norm-ref tianshou|sb3]

Writes into the same folder:

- ``learning_curves_<env>.png`` (``/`` and ``:`` of the id written as ``-``): per algorithm the mean
  evaluation return across seeds against env steps, with a shaded band from the minimum to the maximum over
  seeds (the spread, not a confidence interval).
- ``summary.csv`` / ``summary.md``: per (env, algo) the number of seeds, the final env-step count, the
  mean ± sample standard deviation (ddof = 1) across seeds of the final evaluation return, and the
  interquartile mean (IQM) across seeds with a 95% percentile bootstrap confidence interval; beside them the
  published numbers of BENCHMARKING.md (their own metric, MuJoCo v3 environments). With more than one
  environment also, per algorithm, the IQM of normalised scores over all (env, seed) runs with a 95%
  stratified bootstrap CI (seeds resampled within each environment). The normalised score is
  return / published TRPO return for that environment (Tianshou's 10-seed number by default,
  ``--norm-ref sb3`` for sb3-contrib's), i.e. 1.0 = the published TRPO; no random-policy offset.

IQM and the bootstrap are implemented here with numpy, following rliable's definitions (Agarwal et al.
2021, "Deep RL at the edge of the statistical precipice"): IQM = scipy.stats.trim_mean(x, 0.25), i.e. the
mean after dropping ⌊n/4⌋ runs from each end; CI = percentile interval of the statistic over bootstrap
resamples of runs, stratified by task. tests/test_benchmarks.py checks both against rliable 1.2 itself
(the same IQM; the same CI up to Monte-Carlo error). They are kept here rather than called from rliable
because rliable needs a rectangular runs × tasks matrix, and a sweep's environments may hold different
numbers of finished seeds. With 5 seeds IQM is the mean of the middle 3, and its CI is wide: read it as such.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py
from common import file_safe, positive_int  # noqa: E402

# BENCHMARKING.md, "Published numbers at 1M env steps (MuJoCo v3 era)": (mean, std).
PUBLISHED = {
    "HalfCheetah": {"tianshou-npg": (3485, 717), "tianshou-trpo": (4471, 805), "sb3-trpo": (1803, 46)},
    "Hopper": {"tianshou-npg": (1915, 551), "tianshou-trpo": (2046, 1038), "sb3-trpo": (3372, 215)},
    "Walker2d": {"tianshou-npg": (2503, 963), "tianshou-trpo": (3827, 783), "sb3-trpo": (4502, 234)},
    "Ant": {"tianshou-npg": (2358, 518), "tianshou-trpo": (2867, 708), "sb3-trpo": (3554, 591)},
    "Swimmer": {"tianshou-npg": (31.5, 8.0), "tianshou-trpo": (40.9, 19.6), "sb3-trpo": (359, 2)},
}
PUBLISHED_LABEL = {"tianshou-npg": "Tianshou NPG (best ckpt, 10 seeds)",
                   "tianshou-trpo": "Tianshou TRPO (best ckpt, 10 seeds)",
                   "sb3-trpo": "sb3-contrib TRPO (at 1M, 3 seeds)"}
# Which published numbers stand beside each measured algorithm (the same algorithm's).
COMPARE = {"natpg-npg": ["tianshou-npg"], "natpg-trpo": ["tianshou-trpo", "sb3-trpo"],
           "tianshou-npg": ["tianshou-npg"], "tianshou-trpo": ["tianshou-trpo"], "sb3-trpo": ["sb3-trpo"]}
COMPARE |= {f"{algo}-procs": peers for algo, peers in list(COMPARE.items()) if algo.startswith("natpg-")}
NORM_REF = {"tianshou": "tianshou-trpo", "sb3": "sb3-trpo"}
NEEDED = ["library", "algo", "env", "seed", "env_steps", "eval_return_mean", "budget", "final"]


class BadInput(Exception):
    """returns.csv missing or unreadable: reported in one line, exit status 2."""


def env_family(env_id: str) -> str:
    return env_id.split("-v")[0]


def published(algo: str, env_id: str) -> str:
    table = PUBLISHED.get(env_family(env_id), {})
    parts = []
    # A tuning run (returns.run_label: natpg-npg[max_kl=0.05]) stands beside its algorithm's peers.
    for peer in COMPARE.get(algo.split("[")[0], []):
        if peer in table:
            m, s = table[peer]
            note = " (γ = 0.9999)" if peer == "sb3-trpo" and env_family(env_id) == "Swimmer" else ""
            parts.append(f"{PUBLISHED_LABEL[peer]}: {m:g} ± {s:g}{note}")
    return "; ".join(parts)


def iqm(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean: sort, drop ⌊n/4⌋ from each end, average (scipy.stats.trim_mean(x, 0.25))."""
    x = np.sort(np.asarray(x, np.float64), axis=axis)
    n = x.shape[axis]
    k = int(0.25 * n)
    return np.take(x, np.arange(k, n - k), axis=axis).mean(axis=axis)


def bootstrap_ci(groups: list[np.ndarray], stat=iqm, reps: int = 10_000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile CI of ``stat`` over the pooled runs, resampling runs with replacement within each group
    (stratified bootstrap; one group = a plain bootstrap over seeds)."""
    rng = np.random.default_rng(seed)
    samples = [g[rng.integers(0, len(g), size=(reps, len(g)))] for g in groups]
    values = stat(np.concatenate(samples, axis=1), axis=1)
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def read(path: str) -> list[dict]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror or exc} (give the --out folder of benchmarks/returns.py)")
    if rows and (missing := [c for c in NEEDED if c not in columns]):
        raise BadInput(f"{path} lacks the column(s) {missing}: not a returns.csv of benchmarks/returns.py")
    for line, r in enumerate(rows, start=2):  # line 1 is the header
        try:
            r["seed"], r["env_steps"], r["budget"] = int(r["seed"]), int(r["env_steps"]), int(r["budget"])
            r["final"] = r["final"] == "1"
            r["eval_return_mean"] = float(r["eval_return_mean"])
        except (TypeError, ValueError) as exc:
            raise BadInput(f"{path}, line {line}: {exc}") from None
    return rows


def select(rows: list[dict]) -> dict[tuple[str, str], dict[int, list[dict]]]:
    """(env, algo) -> seed -> that run's rows by env_steps, for the largest budget with finished runs
    (later rows win over duplicates)."""
    by_run: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        by_run[(r["env"], r["algo"], r["budget"], r["seed"])][r["env_steps"]] = r
    finished = {k for k, v in by_run.items() if any(r["final"] for r in v.values())}
    out: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for env, algo in sorted({(k[0], k[1]) for k in finished}):
        budgets = sorted({k[2] for k in finished if k[:2] == (env, algo)})
        if len(budgets) > 1:
            print(f"note: {algo} on {env} has runs for budgets {budgets}; using {budgets[-1]}")
        b = budgets[-1]
        out[(env, algo)] = {k[3]: [v[s] for s in sorted(v)] for k, v in by_run.items()
                            if k[:3] == (env, algo, b) and k in finished}
    return out


def plot(env: str, runs: dict[str, dict[int, list[dict]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for algo, seeds in sorted(runs.items()):
        steps = sorted({r["env_steps"] for rows in seeds.values() for r in rows})
        curves = np.full((len(seeds), len(steps)), np.nan)
        for i, rows in enumerate(seeds.values()):
            for r in rows:
                curves[i, steps.index(r["env_steps"])] = r["eval_return_mean"]
        mean = np.nanmean(curves, axis=0)
        (line,) = ax.plot(steps, mean, label=f"{algo} ({len(seeds)} seeds)", marker="o", markersize=2.5)
        ax.fill_between(steps, np.nanmin(curves, axis=0), np.nanmax(curves, axis=0), color=line.get_color(),
                        alpha=0.2, linewidth=0)
    ax.set_xlabel("env steps (transitions, all envs)")
    ax.set_ylabel("evaluation return (10 episodes, deterministic)")
    ax.set_title(f"{env}: mean over seeds, band = min–max over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the --out folder of benchmarks/returns.py")
    p.add_argument("--reps", type=positive_int, default=10_000, help="bootstrap resamples (≥ 1)")
    p.add_argument("--norm-ref", choices=sorted(NORM_REF), default="tianshou",
                   help="published TRPO number the normalised score divides by")
    a = p.parse_args(argv)
    try:
        data = select(read(os.path.join(a.out, "returns.csv")))
    except BadInput as exc:
        print(f"aggregate.py: error: {exc}", file=sys.stderr)
        return 2
    if not data:
        raise SystemExit(f"no finished runs in {os.path.join(a.out, 'returns.csv')}")

    envs = sorted({env for env, _ in data})
    for env in envs:
        path = os.path.join(a.out, f"learning_curves_{file_safe(env)}.png")
        plot(env, {algo: seeds for (e, algo), seeds in data.items() if e == env}, path)
        print(f"wrote {path}")

    summary = []
    finals: dict[tuple[str, str], np.ndarray] = {}
    for (env, algo), seeds in sorted(data.items()):
        x = np.array([rows[-1]["eval_return_mean"] for rows in seeds.values()])
        finals[(env, algo)] = x
        steps = sorted({rows[-1]["env_steps"] for rows in seeds.values()})
        lo, hi = bootstrap_ci([x], reps=a.reps)
        summary.append({"env": env, "algo": algo, "library": next(iter(seeds.values()))[-1]["library"],
                        "seeds": len(x), "env_steps": "/".join(map(str, steps)),
                        "final_mean": float(x.mean()), "final_std": float(x.std(ddof=1)) if len(x) > 1 else float("nan"),
                        "iqm": float(iqm(x)), "iqm_ci_low": lo, "iqm_ci_high": hi,
                        "published": published(algo, env)})

    aggregate = []
    ref_algo = NORM_REF[a.norm_ref]
    if len(envs) > 1:
        for algo in sorted({algo for _, algo in data}):
            groups = []
            for env in envs:
                ref = PUBLISHED.get(env_family(env), {}).get(ref_algo)
                if (env, algo) in finals and ref:
                    groups.append(finals[(env, algo)] / ref[0])
            if len(groups) != len(envs):
                print(f"note: {algo} lacks runs (or a reference number) on some env; left out of the aggregate")
                continue
            lo, hi = bootstrap_ci(groups, reps=a.reps)
            aggregate.append({"algo": algo, "envs": len(groups), "runs": sum(map(len, groups)),
                              "iqm_normalised": float(iqm(np.concatenate(groups))), "ci_low": lo, "ci_high": hi})

    with open(os.path.join(a.out, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, list(summary[0]))
        w.writeheader()
        w.writerows(summary)
        if aggregate:  # the aggregate rows, in the same file, env = "ALL (normalised)"
            for g in aggregate:
                w.writerow({"env": f"ALL (IQM of return / published {ref_algo})", "algo": g["algo"],
                            "seeds": g["runs"], "iqm": g["iqm_normalised"], "iqm_ci_low": g["ci_low"],
                            "iqm_ci_high": g["ci_high"]})

    def fmt(v: float) -> str:
        return "n/a" if v != v else f"{v:.1f}"

    lines = ["# Returns: natpg and its peers", "",
             "Final policy, deterministic actions, frozen observation normalisation, 10 evaluation episodes on "
             "separately seeded environments; statistics across training seeds. Mean ± sample std (ddof 1); "
             "IQM with a 95% percentile bootstrap CI over seeds (numpy, rliable's definitions; "
             f"{a.reps} resamples). Published numbers are quoted from BENCHMARKING.md with their own metric "
             "(MuJoCo v3 environments; Tianshou: best checkpoint; sb3-contrib: value at 1M).", "",
             "| env | algo | seeds | env steps | final mean ± std | IQM [95% CI] | published (1M steps, v3) |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['env']} | {s['algo']} | {s['seeds']} | {s['env_steps']} | {fmt(s['final_mean'])} ± "
                     f"{fmt(s['final_std'])} | {fmt(s['iqm'])} [{fmt(s['iqm_ci_low'])}, {fmt(s['iqm_ci_high'])}] | "
                     f"{s['published'] or '—'} |")
    if aggregate:
        lines += ["", f"## Across {len(envs)} environments ({', '.join(envs)})", "",
                  f"Normalised score = final return / published {PUBLISHED_LABEL[ref_algo]} return on that "
                  "environment (1.0 = the published TRPO). IQM over all (env, seed) runs; 95% stratified "
                  "bootstrap CI (seeds resampled within each environment).", "",
                  "| algo | envs | runs | IQM normalised score [95% CI] |", "|---|---|---|---|"]
        for g in aggregate:
            lines.append(f"| {g['algo']} | {g['envs']} | {g['runs']} | {g['iqm_normalised']:.3f} "
                         f"[{g['ci_low']:.3f}, {g['ci_high']:.3f}] |")
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(a.out, 'summary.csv')} and summary.md")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
