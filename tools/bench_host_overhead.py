#!/usr/bin/env python3
"""Host-side cost of sparsek's launches, without a GPU.

Runs the CUDA code path (argument checks, output allocation, kernel-parameter packing) on CPU tensors with the
kernel launches replaced by no-ops, so what is timed is the Python and PyTorch overhead a real call adds before its
kernel starts: an eager ``sparsek.attention`` call, and the paged-KV decode and cache-write launchers that the vLLM
backend runs once per layer and step (32 decode requests, 32 query heads, 8 KV heads, head dim 128). Median of
repeated batches, microseconds per call:

    python tools/bench_host_overhead.py [--shape B,S,H,D] [--calls 20000]
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1,512,8,64", help="B,S,H,D of q, k and v (bshd)")
    ap.add_argument("--calls", type=int, default=20000, help="calls per timed batch")
    args = ap.parse_args()
    b, s, h, d = (int(x) for x in args.shape.split(","))

    import sparsek
    from sparsek import _lib, paged

    class _NoLaunch:  # stands in for the CUDA library: accepts the packed parameters, launches nothing
        def sk_fmha_fwd(self, params, stream):
            return 0

        def sk_paged_decode_num_splits(self, batch, heads_q, heads_kv, max_k):
            return 1

        def sk_paged_decode_workspace_floats(self, batch, heads_q, head_dim, splits):
            return 0

        def sk_paged_decode(self, params, stream):
            return 0

        def sk_reshape_and_cache(self, params, stream):
            return 0

    lib = _NoLaunch()
    _lib.load = lambda device: lib
    _lib.current_stream = lambda device: ctypes.c_void_p(0)
    paged._load = lambda device: lib
    importlib.import_module("sparsek.attention")._eager_cuda = lambda q, k, v: True  # take the CUDA path on CPU
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float16) for _ in range(3))

    nreq, hq, hk, hd, page = 32, 32, 8, 128, 16
    qd = torch.randn(nreq, hq, hd, dtype=torch.bfloat16)
    kc, vc = (torch.randn(512, page, hk, hd, dtype=torch.bfloat16) for _ in range(2))
    table = torch.randint(0, 512, (nreq, 64), dtype=torch.int32)
    cu_q = torch.arange(nreq + 1, dtype=torch.int32)
    lens = torch.randint(100, 1000, (nreq,), dtype=torch.int32)
    out, no_lse = torch.empty_like(qd), torch.empty(0)
    new_k = torch.randn(nreq, hk, hd, dtype=torch.bfloat16)
    slots = torch.randint(0, 512 * page, (nreq,))
    cases = {
        f"sparsek.attention {b},{s},{h},{d}": lambda: sparsek.attention(q, k, v),
        "paged decode launch (32 requests)": lambda: paged._paged_attention_cuda_impl(
            qd, kc, vc, table, cu_q, lens, 1, 1000, hd**-0.5, -1, 0, nreq, out, no_lse
        ),
        "paged cache write launch (32 tokens)": lambda: paged._launch_reshape_and_cache(new_k, new_k, kc, vc, slots),
    }

    def batch(fn) -> float:
        t = time.perf_counter()
        for _ in range(args.calls):
            fn()
        return (time.perf_counter() - t) / args.calls * 1e6

    print(f"sparsek {sparsek.__version__}, torch {torch.__version__}; host side only, us per call")
    for name, fn in cases.items():
        batch(fn)  # warm-up
        print(f"{name:40s} {statistics.median(batch(fn) for _ in range(7)):7.2f}")


if __name__ == "__main__":
    main()
