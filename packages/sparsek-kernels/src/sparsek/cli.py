"""The ``sparsek`` command: ``sparsek`` (run + check + time), ``sparsek info`` and ``sparsek build``."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _time_us(fn, device: str, iters: int) -> float:
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e6 / iters)
    return statistics.median(samples)


def cmd_run(args: argparse.Namespace) -> int:
    """Run attention on the best device, check it against the reference, print a latency table next to SDPA."""
    import torch.nn.functional as F

    import sparsek
    from sparsek.reference import attention_ref
    from sparsek.testing import rel_error, tolerance

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if device == "cpu":
        print("No CUDA GPU in use: sparsek runs its pure-PyTorch reference path on the CPU (slow by design).")
    dtype = torch.float16 if device == "cuda" else torch.float32
    b, h, d = 1, 8, 64
    rows, ok = [], True
    for s in args.seqlens:
        for causal in (False, True):
            q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype) for _ in range(3))
            out = sparsek.attention(q, k, v, causal=causal)
            err = rel_error(out, attention_ref(q.double(), k.double(), v.double(), causal=causal))
            ok &= err < tolerance(dtype)
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            ours = _time_us(lambda: sparsek.attention(q, k, v, causal=causal), device, args.iters)
            sdpa = _time_us(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal), device, args.iters)
            rows.append((s, causal, err, ours, sdpa))
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; dtype {dtype}; B={b} H={h} D={d}")
    print(f"{'seqlen':>7} {'causal':>6} {'rel err':>9} {'sparsek us':>11} {'SDPA us':>9}")
    for s, causal, err, ours, sdpa in rows:
        print(f"{s:>7} {causal!s:>6} {err:>9.1e} {ours:>11.1f} {sdpa:>9.1f}")
    print("check against reference:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def cmd_info(args: argparse.Namespace) -> int:
    """Print the GPU, the kernel chosen per op, the cache directory and the built libraries."""
    from sparsek import __version__, build
    from sparsek.arch import device_choice

    print(f"sparsek {__version__}, torch {torch.__version__}")
    if torch.cuda.is_available():
        choice = device_choice()
        print(f"GPU: {torch.cuda.get_device_name()} (compute capability {choice.capability[0]}.{choice.capability[1]})")
        print(f"build target: {choice.target}")
        print(f"kernel family: {choice.family} — {choice.note}")
        dense = (
            "sm90 wgmma/TMA kernel (head dims 64/128), mma.sync otherwise"
            if choice.family == "hopper-wgmma"
            else ("portable mma.sync kernel")
        )
        for op, kernel in (
            ("attention / varlen_attention", dense),
            ("paged_attention (prefill)", "portable mma.sync kernel through a block table"),
            ("paged_decode", "split-KV GQA decode kernel"),
            ("reshape_and_cache", "KV-cache write kernel"),
            (
                "topk_attention / block_sparse_attention",
                "FMHA index-list mode (sm90 wgmma kernel for 128-query blocks on Hopper, mma.sync otherwise), "
                "or the per-query gather kernel",
            ),
            ("sparsek_select", "radix top-k selection kernel"),
        ):
            print(f"  {op}: {kernel}")
    else:
        print("GPU: none (every op runs its pure-PyTorch reference on the CPU)")
    nvcc = build.find_nvcc()
    print(f"nvcc: {nvcc or 'not found'}")
    print(f"cache directory: {build.cache_root()}")
    built = build.built_targets()
    print(
        "built: " + (", ".join(built) if built else "nothing yet (kernels build on first use or with `sparsek build`)")
    )
    from sparsek import _dense_plans

    eager = build.eager_fastpath_path()
    print(
        "eager fast path (compiled plan path of eager dense calls): "
        + (
            f"built, {eager}"
            if eager.exists()
            else "not built yet (builds with the first eager dense call on a GPU, or `sparsek build`)"
        )
        + ("; off (SPARSEK_EAGER_FASTPATH=0)" if _dense_plans.compiled_turned_off() else "")
    )
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """Compile the CUDA library ahead of time for each requested architecture, and the compiled eager fast path."""
    from sparsek import build

    status = 0
    for target in [a.strip() for a in args.arch.split(",") if a.strip()]:
        try:
            lib = build.build(target, verbose=args.verbose, force=args.force)
            print(f"{target}: {lib}")
        except build.BuildError as e:
            print(f"{target}: FAILED\n{e}", file=sys.stderr)
            status = 1
    if not args.no_eager:
        try:
            print(f"eager fast path: {build.build_eager_fastpath(verbose=args.verbose, force=args.force)}")
        except build.BuildError as e:
            print(f"eager fast path: FAILED (eager calls will use the Python plan path)\n{e}", file=sys.stderr)
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sparsek`` command."""
    ap = argparse.ArgumentParser(prog="sparsek", description="sparsek attention kernels")
    ap.add_argument("--cpu", action="store_true", help="use the CPU reference path even if a GPU is present")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[128, 512], help="sequence lengths to run")
    ap.add_argument("--iters", type=int, default=20, help="timed calls per sample")
    sub = ap.add_subparsers(dest="cmd")
    sub.add_parser("info", help="GPU, chosen kernels, cache directory, built libraries")
    b = sub.add_parser("build", help="compile the kernels ahead of time")
    b.add_argument("--arch", default="sm90a,sm100a", help="comma-separated targets, e.g. sm90a,sm100a,sm86")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--verbose", action="store_true", help="print the compiler output (register/spill report)")
    b.add_argument(
        "--no-eager", action="store_true", help="skip the compiled eager fast path (built for the running PyTorch)"
    )
    args = ap.parse_args(argv)
    return {"info": cmd_info, "build": cmd_build}.get(args.cmd, cmd_run)(args)


if __name__ == "__main__":
    sys.exit(main())
