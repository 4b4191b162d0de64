"""Fisher-vector product throughput against plain matrix-multiply throughput on the same device.

The curvature issue's GPU target: the FVP of a 10M-parameter policy at ≥ 30 % of the matmul throughput measured
on the same GPU. Both sides are counted the same way, in matrix-multiply FLOPs:

* ``matmul``: an n×n by n×n float32 product (2n³ FLOPs), the best of ``--repeats`` timed calls;
* ``fvp``: one product v ↦ (F + λI)v of ``natpg.fisher.fisher_vector_product`` for a Gaussian MLP with ≈ P actor
  parameters on a batch of B states, its FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` (the
  matmuls the product runs, elementwise work not counted), divided by the best of ``--repeats`` timed calls.

The products are built once per (P, B) (``fisher_vector_product`` linearises the policy at the batch), and only
the product itself is timed. TF32 stays at PyTorch's default (off for float32 matmuls) on both sides; with
``--tf32`` both use it. Prints one JSON line per (P, B) and a markdown table. Not part of the test run::

    python benchmarks/fvp_throughput.py --device cuda                       # 10M parameters, 10k and 100k states
    python benchmarks/fvp_throughput.py --params 1e5 --batches 1000 --matmul-n 1024   # a quick CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_curvature import ACT_DIM, OBS_DIM, timeit, width_for  # noqa: E402

from natpg.fisher import fisher_vector_product  # noqa: E402
from natpg.policies import GaussianMLP  # noqa: E402


def matmul_flops_per_s(n: int, device: torch.device, repeats: int) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return 2.0 * n**3 / timeit(lambda: a @ b, device, repeats)


def counted_flops(fn) -> int:
    """Matrix-multiply FLOPs of one call of ``fn``, as PyTorch's flop counter sees them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def fvp_row(params: float, batch: int, device: torch.device, repeats: int, damping: float = 0.1) -> dict:
    torch.manual_seed(0)
    policy = GaussianMLP(OBS_DIM, ACT_DIM, hidden=(width_for(params),) * 2).to(device)
    P = sum(p.numel() for p in policy.actor_parameters())
    obs = torch.randn(batch, OBS_DIM, device=device)
    fvp = fisher_vector_product(policy, obs, damping)
    v = torch.randn(P, device=device)
    flops = counted_flops(lambda: fvp(v))
    seconds = timeit(lambda: fvp(v), device, repeats)
    return {"params": P, "batch": batch, "fvp_flops": flops, "fvp_s": seconds, "fvp_flops_per_s": flops / seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--params", type=float, nargs="+", default=[1e7])
    ap.add_argument("--batches", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--matmul-n", type=int, default=8192, help="side of the square matmul that sets the reference")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tf32", action="store_true", help="allow TF32 for float32 matmuls (both sides)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.matmul_n < 1 or min(args.batches) < 1 or min(args.params) < 1:
        ap.error("--repeats, --matmul-n, --batches and --params must be positive")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    reference = matmul_flops_per_s(args.matmul_n, device, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device={name} torch={torch.__version__} tf32={args.tf32} matmul {args.matmul_n}² float32: "
          f"{reference / 1e12:.2f} TFLOP/s", flush=True)
    rows = []
    for params in args.params:
        for batch in args.batches:
            try:
                row = fvp_row(params, batch, device, args.repeats)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(json.dumps({"params": params, "batch": batch, "error": "out of memory"}), flush=True)
                continue
            row["of_matmul"] = row["fvp_flops_per_s"] / reference
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| params | batch | FVP GFLOP | FVP (s) | FVP TFLOP/s | of matmul |\n|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['params']:,} | {r['batch']:,} | {r['fvp_flops'] / 1e9:.1f} | {r['fvp_s']:.4f} | "
              f"{r['fvp_flops_per_s'] / 1e12:.2f} | {100 * r['of_matmul']:.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
