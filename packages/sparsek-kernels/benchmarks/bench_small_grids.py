#!/usr/bin/env python3
"""Small-grid shapes (the Hopper split-keys kernel): CUDA-graph kernel time (µs) per call and an output digest.

Times the latency shape and its neighbours (graph of 20 back-to-back calls, best of 3 medians) and prints one line
per run with a digest of the outputs, so two builds can be compared by running the script once per build, in
alternating processes (the build is chosen by ``SPARSEK_CACHE_DIR`` and the source on ``PYTHONPATH``):

    python bench_small_grids.py base; python bench_small_grids.py new; python bench_small_grids.py base; ...

Equal digests mean bit-identical outputs on the same random inputs (seeded).
"""

from __future__ import annotations

import hashlib
import sys

import sparsek
import torch
from sparsek.testing import cuda_graph_time_us

SHAPES = [  # name, dtype, B, H, Sq, Sk, D, causal
    ("fp16 1,8,512,64", torch.float16, 1, 8, 512, 512, 64, False),
    ("bf16 1,8,512,64", torch.bfloat16, 1, 8, 512, 512, 64, False),
    ("fp16 1,8,512,64 causal", torch.float16, 1, 8, 512, 512, 64, True),
    ("fp16 1,16,384,64", torch.float16, 1, 16, 384, 384, 64, False),
    ("fp16 1,16,512,64", torch.float16, 1, 16, 512, 512, 64, False),
    ("fp16 1,4,300,64", torch.float16, 1, 4, 300, 300, 64, False),
    ("fp16 1,8,128q,512k,64", torch.float16, 1, 8, 128, 512, 64, False),
    ("fp16 16,8,512,64", torch.float16, 16, 8, 512, 512, 64, False),
    ("bf16 1,8,512,128", torch.bfloat16, 1, 8, 512, 512, 128, False),
    ("bf16 1,4,896,128", torch.bfloat16, 1, 4, 896, 896, 128, False),
    ("fp16 1,16,256,64", torch.float16, 1, 16, 256, 256, 64, False),
]


def main() -> None:
    tag = sys.argv[1] if len(sys.argv) > 1 else "run"
    gen = torch.Generator(device="cuda").manual_seed(1)
    times: dict[str, float] = {}
    digest = hashlib.sha1()
    for name, dtype, b, h, sq, sk, d, causal in SHAPES:
        q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype, generator=gen)
        k, v = (torch.randn(b, sk, h, d, device="cuda", dtype=dtype, generator=gen) for _ in range(2))

        def call(q=q, k=k, v=v, causal=causal):
            return sparsek.attention(q, k, v, causal=causal)

        times[name] = round(min(cuda_graph_time_us(call) for _ in range(3)), 2)
        digest.update(call().float().cpu().numpy().tobytes())
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; graph of 20 calls, µs per call")
    print(tag, times, digest.hexdigest()[:12], flush=True)


if __name__ == "__main__":
    main()
