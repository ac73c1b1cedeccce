#!/usr/bin/env python3
"""Host-side cost of one eager ``sparsek.attention`` call, without a GPU.

Runs the CUDA code path of the call (argument checks, output allocation, kernel-parameter packing) on CPU tensors
with the kernel launch replaced by a no-op, so what is timed is the Python and PyTorch overhead that a real call
adds before its kernel starts. Median of repeated batches, microseconds per call:

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
    from sparsek import _lib

    class _NoLaunch:  # stands in for the CUDA library: accepts the packed parameters, launches nothing
        def sk_fmha_fwd(self, params, stream):
            return 0

    lib = _NoLaunch()
    _lib.load = lambda device: lib
    _lib.current_stream = lambda device: ctypes.c_void_p(0)
    importlib.import_module("sparsek.attention")._eager_cuda = lambda q, k, v: True  # take the CUDA path on CPU
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float16) for _ in range(3))

    def batch() -> float:
        t = time.perf_counter()
        for _ in range(args.calls):
            sparsek.attention(q, k, v)
        return (time.perf_counter() - t) / args.calls * 1e6

    batch()  # warm-up
    us = statistics.median(batch() for _ in range(7))
    print(
        f"sparsek {sparsek.__version__}, torch {torch.__version__}: {us:.2f} us per sparsek.attention call "
        f"(host side only, shape {b},{s},{h},{d})"
    )


if __name__ == "__main__":
    main()
