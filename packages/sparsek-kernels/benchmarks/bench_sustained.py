#!/usr/bin/env python3
"""Burst and sustained throughput of low-density block-sparse attention against dense attention on one GPU.

A GPU under a board power limit runs a short burst of work faster than the same work sustained: the clocks drop once
the board reaches its limit. Low-density sparse attention moves far more HBM bytes per FLOP than dense attention
(each kept K/V block is read for a few query blocks only), so it reaches the limit at lower clocks. This script
times every workload twice in the same process, in the same way:

- **burst**: after ``--idle`` seconds with the GPU idle, the median of the first calls (about 5 ms of work);
- **sustained**: after ``--sustain`` seconds of the same call back to back, the median of the next calls;

and reads the SM clock and board power (``nvidia-smi``, when present) right after the sustained timing.

Workloads (B=1, H=16, D=128 by default, S=32768): our dense kernel on S×S (the base of the "80% of dense"
target) and SDPA cuDNN on S×S; and for each density, random 128×128 block lists ("block runs", the kernel of
``bench_sparse.py``) next to the same amount of work with the same shape of work items done densely: all S queries
against ``keep × 128`` contiguous keys (every 128-query item then has ``keep`` key tiles), by our dense kernel and
by SDPA cuDNN. The dense rows on few keys bound what a kernel with a given per-item cost can reach on the sparse job
(their K/V stay in L2, so they also draw less power).

    python packages/sparsek-kernels/benchmarks/bench_sustained.py --out bench_sustained.md
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import sparsek
import torch
import torch.nn.functional as F
from sparsek.testing import board_reading, cuda_event_time_us
from torch.nn.attention import SDPBackend, sdpa_kernel


def time_burst_and_sustained(fn, idle_s: float, sustain_s: float) -> tuple[float, float, str]:
    """(burst µs, sustained µs, board reading) of ``fn`` timed as the module docstring says."""
    once = cuda_event_time_us(fn, 3, 1)  # its warm-up call also builds or compiles what the first call needs
    calls = max(3, min(30, round(5000.0 / max(once, 1.0))))  # about 5 ms of work per timing
    time.sleep(idle_s)
    burst = cuda_event_time_us(fn, calls, 0)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < sustain_s:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    sustained = cuda_event_time_us(fn, calls, 0)
    return burst, sustained, board_reading()


def workloads(args: argparse.Namespace):
    """Yields (name, key tiles per 128-query item, FLOPs, callable)."""
    b, h, d, s, bs = 1, args.heads, args.d, args.seqlen, 128
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=args.dtype, generator=gen) for _ in range(3))
    qt = q.transpose(1, 2)

    def cudnn(kt, vt):
        def run():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt)

        return run

    nb = s // bs
    dense_flops = 4.0 * b * h * d * s * s
    yield "sparsek dense", nb, dense_flops, lambda: sparsek.attention(q, k, v)
    yield "SDPA cuDNN dense", nb, dense_flops, cudnn(k.transpose(1, 2), v.transpose(1, 2))
    for density in args.densities:
        keep = max(1, round(density * nb))
        blocks = torch.rand(b, h, nb, nb, device="cuda", generator=gen).argsort(-1)[..., :keep]
        starts = (blocks.sort(-1).values.to(torch.int32) * bs).contiguous()
        counts = torch.full((b, h, nb), keep, dtype=torch.int32, device="cuda")
        flops = 4.0 * b * h * d * s * keep * bs
        yield (
            f"block runs {density:.0%}",
            keep,
            flops,
            lambda starts=starts, counts=counts: torch.ops.sparsek.block_attn_fwd(
                q, k, v, starts, counts, bs, bs, d**-0.5, -1, -1, False
            ),
        )
        ks, vs = k[:, : keep * bs].contiguous(), v[:, : keep * bs].contiguous()
        yield f"sparsek dense, {keep * bs} keys", keep, flops, lambda ks=ks, vs=vs: sparsek.attention(q, ks, vs)
        yield f"SDPA cuDNN dense, {keep * bs} keys", keep, flops, cudnn(ks.transpose(1, 2), vs.transpose(1, 2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    p.add_argument("--seqlen", type=int, default=32768)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--densities", default="0.01,0.02,0.05", help="comma-separated fractions of kept blocks")
    p.add_argument("--idle", type=float, default=3.0, help="seconds idle before each burst timing")
    p.add_argument(
        "--sustain", type=float, default=1.5, help="seconds of back-to-back calls before each sustained timing"
    )
    args = p.parse_args()
    args.dtype = getattr(torch, args.dtype)
    args.densities = [float(x) for x in args.densities.split(",")]
    if args.seqlen % 128:
        p.error("--seqlen must be a multiple of 128")
    if not all(0.0 < x <= 1.0 for x in args.densities):
        p.error("--densities must lie in (0, 1]")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")

    rows = []
    for name, tiles, flops, fn in workloads(args):
        burst, sustained, board = time_burst_and_sustained(fn, args.idle, args.sustain)
        tf = (flops / burst / 1e6, flops / sustained / 1e6)
        rows.append((name, tiles, burst, tf[0], sustained, tf[1], board))
        print(
            f"{name:34s} {tiles:4d} tiles  burst {burst:10.1f} us {tf[0]:6.1f} TF  "
            f"sustained {sustained:10.1f} us {tf[1]:6.1f} TF  {board}",
            flush=True,
        )

    lines = [
        "# Burst and sustained throughput",
        "",
        f"- GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
        f"sparsek {sparsek.__version__}; {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- B=1, H={args.heads}, S={args.seqlen}, D={args.d}, {str(args.dtype).removeprefix('torch.')}, not causal; "
        f"burst: median of the first calls (~5 ms of work) after {args.idle:g} s idle; sustained: median of the next "
        f"calls after {args.sustain:g} s of the same call back to back (CUDA events per call)",
        "- % of dense: TFLOP/s against our dense kernel on S×S in the same regime; board reading after the sustained "
        "timing",
        "",
        "| workload | key tiles per item | burst us | burst TFLOP/s | % of dense | sustained us | sustained TFLOP/s "
        "| % of dense | board |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base_burst, base_sustained = rows[0][3], rows[0][5]  # the first workload: our dense kernel on S×S
    for name, tiles, b_us, b_tf, s_us, s_tf, board in rows:
        lines.append(
            f"| {name} | {tiles} | {b_us:.1f} | {b_tf:.1f} | {100 * b_tf / base_burst:.0f}% | {s_us:.1f} | "
            f"{s_tf:.1f} | {100 * s_tf / base_sustained:.0f}% | {board} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
