#!/usr/bin/env python3
"""A/B two source trees of sparsek-kernels on one GPU: processes alternate A, B, A, B, ...

Each process imports sparsek from one tree (its kernels come from that tree's build in the cache: the source hash
differs, so both builds live side by side) and times a fixed set of workloads, each next to SDPA cuDNN on the same
clock (``interleaved_graph_times_us``): the dense table's S=2048 and S=8192 rows, the latency shape, and block runs
at 1% / 2% density (S=32768) next to cuDNN on the same 128-query items done densely. The summary gives, per
workload, A's and B's per-process medians, cuDNN's in the same processes, and B / A.

    git worktree add /tmp/sparsek-base main   # tree A: e.g. main, tree B: this checkout
    python packages/sparsek-kernels/benchmarks/bench_src_ab.py \
        --a /tmp/sparsek-base/packages/sparsek-kernels/src --b packages/sparsek-kernels/src

Every process checks its kernels' output against a float32 reference before timing. The per-process medians, not one
pooled number, are the result: which backend leads can differ by ~1% between processes (the board's clock depends on
the power both kernels draw), so a change counts when it moves every process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

DENSE = [  # dtype, B, H, S, D, causal
    ("fp16", 1, 8, 512, 64, False),
    ("fp16", 4, 16, 2048, 64, False),
    ("fp16", 4, 16, 2048, 128, False),
    ("bf16", 4, 16, 2048, 128, False),
    ("fp16", 2, 16, 8192, 64, False),
    ("bf16", 2, 16, 8192, 128, False),
    ("bf16", 2, 16, 8192, 128, True),
]
DENSITIES = (0.01, 0.02)


def worker(rounds: int) -> None:
    """Time every workload (run inside a process whose ``sparsek`` is the tree under test); JSON lines out."""
    import sparsek
    import torch
    import torch.nn.functional as F
    from sparsek.testing import interleaved_graph_times_us, rel_error, tolerance
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}

    def cudnn(q, k, v, causal):  # [B, H, S, D] views
        def run():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return run

    def emit(name, fns, calls=20):
        med = {n: [] for n in fns}
        for _ in range(rounds):
            for n, t in interleaved_graph_times_us(fns, calls=calls).items():
                med[n].append(statistics.median(t))
        print(json.dumps({"workload": name, **{n: statistics.median(v) for n, v in med.items()}}), flush=True)

    for dt, b, h, s, d, causal in DENSE:
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtypes[dt]) for _ in range(3))
        ref = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)), is_causal=causal)
        err = rel_error(sparsek.attention(q, k, v, causal=causal).transpose(1, 2), ref)
        if not err < tolerance(dtypes[dt]):
            raise SystemExit(f"{dt} {b},{h},{s},{d}: relative error {err:.2e}")
        name = f"{dt} {b},{h},{s},{d}{' causal' if causal else ''}"
        emit(
            name,
            {
                "sparsek": lambda q=q, k=k, v=v, c=causal: sparsek.attention(q, k, v, causal=c),
                "cudnn": cudnn(*(t.transpose(1, 2) for t in (q, k, v)), causal),
            },
        )
    # The block-runs workloads and their dense cuDNN twins as bench_sustained.py builds them: per density, "block runs
    # N%" and then "SDPA cuDNN dense, <keep x 128> keys" (the same 128-query items done densely).
    from bench_sustained import workloads as sustained_workloads

    shape = argparse.Namespace(heads=16, d=128, seqlen=32768, dtype=torch.bfloat16, densities=list(DENSITIES))
    block_runs = None
    for name, _tiles, _flops, fn in sustained_workloads(shape):
        if name.startswith("block runs"):
            block_runs = (name, fn)
        elif block_runs and name.startswith("SDPA cuDNN dense, "):
            emit(f"{block_runs[0]} (S=32768)", {"sparsek": block_runs[1], "cudnn": fn}, calls=5)
            block_runs = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", help="source tree A (the directory holding the sparsek package)")
    ap.add_argument("--b", help="source tree B")
    ap.add_argument("--processes", type=int, default=3, help="processes per tree (alternating)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per workload and process")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.rounds)
        return
    if not (args.a and args.b):
        ap.error("--a and --b are required")
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for i in range(2 * args.processes):
        tag, src = ("A", args.a) if i % 2 == 0 else ("B", args.b)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        cmd = [sys.executable, __file__, "--worker", "--rounds", str(args.rounds)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"process {i} ({tag}) failed:\n{out.stderr[-4000:]}")
        for line in out.stdout.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                results.setdefault(row["workload"], {"A": [], "B": []})[tag].append((row["sparsek"], row["cudnn"]))
        print(f"process {i} ({tag}) done", flush=True)
    print("| workload | A µs (per process) | B µs (per process) | cuDNN µs in A / B processes | B / A |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        a = [x[0] for x in r["A"]]
        b = [x[0] for x in r["B"]]
        ca = [x[1] for x in r["A"]]
        cb = [x[1] for x in r["B"]]
        fmt = lambda xs: " / ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        ratio = statistics.median(b) / statistics.median(a)
        print(f"| {name} | {fmt(a)} | {fmt(b)} | {fmt(ca)} ; {fmt(cb)} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
