#!/usr/bin/env python3
"""What a single-kernel call costs at the latency shape (B=1, H=8, S=512, D=64, fp16), CUDA-graph time per call.

Puts sparsek and SDPA next to two floors measured the same way (graph of 20 back-to-back calls, best of 3 medians):

* ``empty``: a one-element in-place add — launch and completion of a kernel that does nothing;
* ``touch q,k,v,o``: one elementwise kernel that reads Q, K, V and writes O (``torch.addcmul``) — the same bytes
  as attention with no arithmetic to speak of;
* sparsek with one 128-key tile per query block (``Sk=128``) — the fixed cost of one attention work item.

    python bench_latency_floor.py
"""

from __future__ import annotations

import sparsek
import torch
import torch.nn.functional as F
from sparsek.testing import cuda_graph_time_us
from torch.nn.attention import SDPBackend, sdpa_kernel


def best(fn) -> float:
    return min(cuda_graph_time_us(fn, calls=20, replays=50) for _ in range(3))


def main() -> None:
    b, h, s, d, dtype = 1, 8, 512, 64, torch.float16
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype) for _ in range(3))
    o = torch.empty_like(q)
    k1, v1 = k[:, :128].contiguous(), v[:, :128].contiguous()
    one = torch.zeros(1, device="cuda")
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt)

        return run

    rows = [
        ("empty kernel (1-element add_)", lambda: one.add_(1)),
        ("touch q,k,v,o (one addcmul kernel)", lambda: torch.addcmul(q, k, v, out=o)),
        ("sparsek.attention", lambda: sparsek.attention(q, k, v)),
        ("sparsek.attention, Sk=128 (one key tile)", lambda: sparsek.attention(q, k1, v1)),
        ("SDPA cuDNN", sdpa(SDPBackend.CUDNN_ATTENTION)),
        ("SDPA flash (FA2)", sdpa(SDPBackend.FLASH_ATTENTION)),
    ]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; B,H,S,D = {b},{h},{s},{d} fp16")
    print("| call | us per call (graph of 20) |\n|---|---|")
    for name, fn in rows:
        print(f"| {name} | {best(fn):.2f} |", flush=True)


if __name__ == "__main__":
    main()
