#!/usr/bin/env python3
"""Host-side cost of sparsek's launches, without a GPU.

Runs the CUDA code path (argument checks, output allocation, kernel-parameter packing) on CPU tensors with the
kernel launches replaced by no-ops (the compiled fast path, when it builds here, calls a C function that does
nothing), so what is timed is the Python and PyTorch overhead a real call adds before its kernel starts: an eager
``sparsek.attention`` call, and the paged-KV decode and cache-write launchers that the vLLM backend runs once per
layer and step (32 decode requests, 32 query heads, 8 KV heads, head dim 128). Median of repeated batches,
microseconds per call:

    python tools/bench_host_overhead.py [--shape B,S,H,D] [--calls 20000]

With ``--cuda`` (on a CUDA machine) the calls launch their kernels for real and the wall time per call of a batch of
eager calls (synchronized once at its end) is split: ``sparsek.attention`` as users call it (a cached launch plan
after the first call, run by the compiled fast path when it is in use), the same through the Python plan path and
with every call checked and packed anew, the library's launch alone with packed parameters, and PyTorch SDPA's eager
calls on the same data. A batch that outruns the GPU measures the kernel instead (the latency shape's kernel takes
about 5 us).
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
    ap.add_argument("--cuda", action="store_true", help="launch the kernels on the GPU (see the module docstring)")
    args = ap.parse_args()
    b, s, h, d = (int(x) for x in args.shape.split(","))
    if args.cuda:
        cuda_split(b, s, h, d, min(args.calls, 2000))
        return

    import sparsek
    from sparsek import _dense_plans, _lib, paged

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
    compiled = _dense_plans.enable_compiled(cpu_for_tests=True)  # the compiled fast path launches a no-op function
    if compiled:
        noop = _dense_plans._compiled.noop_launch_address()
        lib.address_of = lambda name: noop if name == "sk_fmha_fwd" else None
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
        **attention_paths(q, k, v, f"sparsek.attention {b},{s},{h},{d}"),
        "  checked and packed on every call": unplanned(q, k, v),
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
    report(cases, batch)


def report(cases: dict, batch) -> None:
    """Print the median of seven timed batches per case (after one warm-up batch)."""
    for name, fn in cases.items():
        batch(fn)
        print(f"{name:40s} {statistics.median(batch(fn) for _ in range(7)):7.2f}")


def attention_paths(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str) -> dict:
    """``sparsek.attention`` as users call it (the compiled fast path when it is in use) and through the Python plan
    path (the compiled one turned off for that batch; both cases pay the same switch)."""
    import sparsek
    from sparsek import _dense_plans

    sparsek.attention(q, k, v)  # makes the plan (the first plan on a GPU loads the compiled fast path)
    fast = _dense_plans.compiled_call

    def as_users_call() -> None:
        _dense_plans.compiled_call = fast
        sparsek.attention(q, k, v)

    def python_plan_path() -> None:
        _dense_plans.compiled_call = None
        sparsek.attention(q, k, v)

    cases = {name + (" (compiled)" if fast is not None else ""): as_users_call}
    if fast is not None:
        cases["  Python plan path"] = python_plan_path
    return cases


def unplanned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """A call of ``sparsek.attention`` with the cached launch plans forgotten first: checked and packed (and its
    plan made) every time."""
    import sparsek
    from sparsek import _dense_plans

    def call() -> None:
        _dense_plans.clear()
        sparsek.attention(q, k, v)

    return call


def cuda_split(b: int, s: int, h: int, d: int, calls: int) -> None:
    """Wall time per eager call on the GPU, with and without the cached launch plan, next to the bare launch."""
    import sparsek
    import torch.nn.functional as F
    from sparsek import _lib
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float16, device="cuda") for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = torch.empty_like(q)
    lib = _lib.load(q.device)
    params = _lib.fmha_fwd(
        q, k, v, out, None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, block_table=None,
        max_seqlen_q=s, max_seqlen_k=s, scale=d**-0.5, window_left=-1, window_right=-1,
    )  # fmt: skip
    stream = _lib.current_stream(q.device)

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(qt, kt, vt)

        return run

    cases = {
        **attention_paths(q, k, v, f"sparsek.attention {b},{s},{h},{d}"),
        "  checked and packed on every call": unplanned(q, k, v),
        "  torch.empty_like(q) alone": lambda: torch.empty_like(q),
        "  library launch, packed parameters": lambda: _lib.launch_fmha(lib, q.device, params),
        "  bare ctypes call (stream given)": lambda: lib.sk_fmha_fwd(params, stream),
        "SDPA cuDNN, eager": sdpa(SDPBackend.CUDNN_ATTENTION),
        "SDPA flash, eager": sdpa(SDPBackend.FLASH_ATTENTION),
    }

    def batch(fn) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / calls * 1e6

    print(f"sparsek {sparsek.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}; fp16 bshd")
    print(f"wall time per eager call (batches of {calls}, synchronized at the end), median of 7, us")
    report(cases, batch)


if __name__ == "__main__":
    main()
