#!/usr/bin/env python3
"""Programmatic dependent launch on/off: sparsek vs SDPA cuDNN, CUDA-graph kernel time (µs) per call.

"g20" = a graph of 20 back-to-back calls (each call may overlap the previous one's tail with PDL); "g1" = a graph of
one call. Run once per setting, each in its own process (the knob is read once):

    SPARSEK_PDL=1 python bench_pdl_ab.py; SPARSEK_PDL=0 python bench_pdl_ab.py
"""

from __future__ import annotations

import os

import sparsek
import torch
import torch.nn.functional as F
from sparsek.testing import cuda_graph_time_us
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [  # dtype, B, H, Sq, Sk, D, causal
    ("fp16", 1, 8, 512, 512, 64, False),
    ("fp16", 16, 8, 512, 512, 64, False),
    ("fp16", 1, 96, 512, 512, 64, False),
    ("fp16", 4, 16, 2048, 2048, 64, False),
    ("bf16", 4, 16, 2048, 2048, 128, False),
    ("bf16", 2, 16, 8192, 8192, 128, True),
    ("fp16", 2, 16, 8192, 8192, 128, False),
    ("bf16", 1, 16, 128, 8192, 128, False),
]


def best(fn, calls: int, replays: int) -> float:
    return min(cuda_graph_time_us(fn, calls=calls, replays=replays) for _ in range(3))


def main() -> None:
    tag = os.environ.get("SPARSEK_PDL", "1")
    for dt, b, h, sq, sk, d, causal in SHAPES:
        dtype = torch.float16 if dt == "fp16" else torch.bfloat16
        q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
        k, v = (torch.randn(b, sk, h, d, device="cuda", dtype=dtype) for _ in range(2))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

        def ours():
            return sparsek.attention(q, k, v, causal=causal)

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

        r = [best(fn, calls, reps) for fn in (ours, cudnn) for calls, reps in ((20, 50), (1, 200))]
        print(
            f"PDL={tag} {dt} {b},{h},{sq},{sk},{d} causal={int(causal)} | sparsek g20 {r[0]:8.2f} g1 {r[1]:8.2f}"
            f" | cudnn g20 {r[2]:8.2f} g1 {r[3]:8.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
