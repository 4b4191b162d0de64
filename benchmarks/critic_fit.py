"""Wall time of one critic fit (``ValueCritic.fit``): 10 shuffled passes of minibatch 256 over a batch, Adam.

The fit the throughput table's equal-work setting runs each update (2048 samples of HalfCheetah-v5's 17
observation dimensions, [64, 64] tanh), on random data: its cost does not depend on the values. One torch
thread; median and minimum over ``--repeats`` fits after 3 warm-up fits, in milliseconds.

    python benchmarks/critic_fit.py --batch 2048 --obs-dim 17 --repeats 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from natpg.critics import ValueCritic


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--obs-dim", type=int, default=17)
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    p.add_argument("--activation", default="tanh")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    critic = ValueCritic(args.obs_dim, tuple(args.hidden), args.activation)
    obs, returns = torch.randn(args.batch, args.obs_dim), torch.randn(args.batch)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        critic.fit(obs, returns, generator)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        critic.fit(obs, returns, generator)
        times.append((time.perf_counter() - start) * 1e3)
    print(json.dumps({"batch": args.batch, "obs_dim": args.obs_dim, "hidden": args.hidden,
                      "activation": args.activation, "hand_backward": critic.fitter._mlp is not None,
                      "fit_ms_median": round(statistics.median(times), 1), "fit_ms_min": round(min(times), 1)}))


if __name__ == "__main__":
    main()
