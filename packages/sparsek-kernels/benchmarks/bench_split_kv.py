#!/usr/bin/env python3
"""Benchmark small grids (few query blocks, many keys), where Hopper splits the keys of each query block over CTAs.

Times sparsek with its default split-KV choice and with ``SPARSEK_SM90_SPLITS=1`` (one CTA per query block; a fresh
process, since the knob is read once), side by side with PyTorch SDPA's flash and cuDNN backends. Kernel time is the
median of CUDA-graph replays. Writes a Markdown table to --out.

    python packages/sparsek-kernels/benchmarks/bench_split_kv.py --out bench_split_kv.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

SHAPES = [  # dtype, B, H, SQ, SK, D, causal
    ("fp16", 1, 8, 512, 512, 64, False),
    ("bf16", 1, 8, 512, 512, 128, False),
    ("bf16", 1, 8, 1024, 1024, 128, True),
    ("bf16", 1, 16, 128, 8192, 128, False),
    ("bf16", 1, 32, 1, 8192, 128, False),
    ("bf16", 4, 8, 1, 16384, 128, False),
    ("fp16", 1, 8, 256, 32768, 64, False),
]


def measure(backends: list[str]) -> list[dict]:
    """Times every shape in this process; returns one record per (shape, backend)."""
    import sparsek
    import torch
    import torch.nn.functional as F
    from sparsek.reference import attention_ref
    from sparsek.testing import cuda_graph_time_us
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    rows = []
    for name, b, h, sq, sk, d, causal in SHAPES:
        dt = dtypes[name]
        q = torch.randn(b, h, sq, d, device="cuda", dtype=dt)
        k, v = (torch.randn(b, h, sk, d, device="cuda", dtype=dt) for _ in range(2))
        qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        ref = attention_ref(qs.float(), ks.float(), vs.float(), causal=causal)

        def sdpa(backend):
            def run():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            return run

        fns = {
            "sparsek": lambda: sparsek.attention(qs, ks, vs, causal=causal),
            "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
            "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        }
        for bname, fn in fns.items():
            if bname not in backends:
                continue
            try:
                out = fn()
                out = out if bname == "sparsek" else out.transpose(1, 2)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                us = cuda_graph_time_us(fn)
            except Exception as e:  # a backend that cannot run this shape
                print(f"{bname} failed on {name} {b},{h},{sq},{sk},{d}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            rows.append(dict(shape=[name, b, h, sq, sk, d, causal], backend=bname, us=us, err=err))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench_split_kv.md"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker.split(","))))
        return

    def run(env_extra: dict, backends: str) -> list[dict]:
        env = dict(os.environ, **env_extra)
        res = subprocess.run(
            [sys.executable, __file__, "--worker", backends], env=env, capture_output=True, text=True, check=True
        )
        return json.loads(res.stdout.strip().splitlines()[-1])

    split = run({}, "sparsek,sdpa-flash,sdpa-cudnn")
    nosplit = run({"SPARSEK_SM90_SPLITS": "1"}, "sparsek")
    import torch

    lines = [
        f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; {datetime.date.today().isoformat()}. "
        "Kernel time in µs (median of CUDA-graph replays); TFLOP/s = 4·B·H·SQ·SK·D (about halved for causal).\n",
        "| dtype | B,H,SQ,SK,D | causal | sparsek | sparsek, no split | SDPA flash | SDPA cuDNN | sparsek TFLOP/s | "
        "vs cuDNN | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, b, h, sq, sk, d, causal in SHAPES:
        key = [name, b, h, sq, sk, d, causal]
        get = lambda rows, bn: next((r for r in rows if r["shape"] == key and r["backend"] == bn), None)  # noqa: E731
        ours, flat, fl, cu = (
            get(split, "sparsek"),
            get(nosplit, "sparsek"),
            get(split, "sdpa-flash"),
            get(split, "sdpa-cudnn"),
        )
        if ours is None:
            continue
        # bottom-right causal: query i sees min(Sk, max(0, i + Sk - Sq + 1)) keys
        seen = sum(min(sk, max(0, i + sk - sq + 1)) for i in range(sq)) if causal else sq * sk
        pairs = b * h * seen
        tf = 4 * pairs * d / ours["us"] / 1e6
        fmt = lambda r: f"{r['us']:.2f}" if r else "-"  # noqa: E731
        ratio = f"{cu['us'] / ours['us']:.2f}x" if cu else "-"
        lines.append(
            f"| {name} | {b},{h},{sq},{sk},{d} | {'yes' if causal else 'no'} | {fmt(ours)} | {fmt(flat)} | {fmt(fl)} | "
            f"{fmt(cu)} | {tf:.0f} | {ratio} | {ours['err']:.1e} |"
        )
    table = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
