"""Time sparsek's xFormers operator against xFormers' default dispatch on a few inference shapes.

Usage (needs a CUDA GPU)::

    python packages/sparsek-xformers/benchmarks/bench_xformers.py --out bench_xformers.md [--iters 50] [--warmup 10]

Each case runs ``xformers.ops.memory_efficient_attention`` twice: with ``op=(sparsek_xformers.FwOp, None)`` and with
no ``op`` (xFormers picks its operator; its name is shown). Times are CUDA-event medians over ``--iters`` runs after
``--warmup`` runs, in microseconds, and include each operator's Python-side work (for sparsek: the bias mapping
and, for padded/paged keys, the key gather). "rel. diff" is ``‖sparsek − xFormers‖ / ‖xFormers‖`` of the outputs.
The Markdown table is printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
from dataclasses import dataclass
from typing import Any

import torch
from sparsek.testing import cuda_event_time_us


@dataclass
class Case:
    name: str
    shape: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: Any


def _gqa(b: int, mq: int, mk: int, hkv: int, rep: int, d: int, dtype: torch.dtype, gen: torch.Generator):
    dev = "cuda"
    q = torch.randn(b, mq, hkv, rep, d, generator=gen, device=dev, dtype=dtype)
    k = torch.randn(b, mk, hkv, 1, d, generator=gen, device=dev, dtype=dtype).expand(b, mk, hkv, rep, d)
    v = torch.randn(b, mk, hkv, 1, d, generator=gen, device=dev, dtype=dtype).expand(b, mk, hkv, rep, d)
    return q, k, v


def build_cases(dtype: torch.dtype, seed: int = 0) -> list[Case]:
    from xformers.ops.fmha import attn_bias as xab

    rng = random.Random(seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev = torch.device("cuda")
    cases: list[Case] = []

    # 1. dense causal prefill, MHA
    b, m, h, d = 4, 2048, 32, 128
    q, k, v = (torch.randn(b, m, h, d, generator=gen, device="cuda", dtype=dtype) for _ in range(3))
    cases.append(Case("dense causal prefill", f"B={b} M={m} H={h} D={d}", q, k, v, xab.LowerTriangularMask()))

    # 2. varlen causal prefill batch, GQA 32/8
    lens = [rng.randint(256, 4096) for _ in range(8)]
    hkv, rep = 8, 4
    q, k, v = _gqa(1, sum(lens), sum(lens), hkv, rep, d, dtype, gen)
    bias = xab.BlockDiagonalCausalMask.from_seqlens(lens, device=dev)
    cases.append(Case("varlen causal prefill", f"{len(lens)} seqs, {sum(lens)} tok, Hq=32 Hkv=8 D={d}", q, k, v, bias))

    # 3. decode over padded keys (one query per sequence), GQA 32/8
    bsz, max_len = 64, 4096
    kv_lens = [rng.randint(1024, max_len) for _ in range(bsz)]
    q, k, v = _gqa(1, bsz, bsz * max_len, hkv, rep, d, dtype, gen)
    bias = xab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1] * bsz, max_len, kv_lens, device=dev)
    cases.append(Case("padded-keys decode", f"B={bsz} kv<={max_len} Hq=32 Hkv=8 D={d}", q, k, v, bias))

    # 4. paged decode (vLLM-like), page 16, shuffled pages
    page = 16
    pages_per_row = max_len // page
    block_tables = torch.randperm(bsz * pages_per_row, device="cuda", generator=gen).view(bsz, pages_per_row).int()
    pool = bsz * pages_per_row * page
    q, k, v = _gqa(1, bsz, pool, hkv, rep, d, dtype, gen)
    bias = xab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        [1] * bsz, kv_lens, block_tables, page, device=dev
    )
    cases.append(Case("paged decode", f"B={bsz} kv<={max_len} page={page} Hq=32 Hkv=8 D={d}", q, k, v, bias))
    return cases


def _enable_pytorch_backed_xformers_ops() -> str | None:
    """xFormers wheels built for another torch cannot load their C++ extension, and then refuse CUDA in every op,
    although 0.0.35's cutlass/flash ops run on PyTorch's own kernels. Let those ops be considered again."""
    from xformers import _cpp_lib
    from xformers.ops.fmha import common

    if _cpp_lib._built_with_cuda:
        return None
    common._built_with_cuda = True
    return "xFormers' C++ extension did not load; its PyTorch-backed operators were enabled for the comparison."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="write the Markdown table to this file")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_xformers.py needs a CUDA GPU", file=sys.stderr)
        return 2

    import sparsek
    import sparsek_xformers
    import xformers
    import xformers.ops as xops
    from sparsek.testing import rel_error
    from xformers.ops import fmha
    from xformers.ops.fmha.common import Inputs

    note = _enable_pytorch_backed_xformers_ops()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    rows = []
    for case in build_cases(dtype):

        def run_sparsek(case: Case = case) -> torch.Tensor:
            return xops.memory_efficient_attention(case.q, case.k, case.v, case.bias, op=(sparsek_xformers.FwOp, None))

        def run_xformers(case: Case = case) -> torch.Tensor:
            return xops.memory_efficient_attention(case.q, case.k, case.v, case.bias)

        with torch.inference_mode():
            t_sk = cuda_event_time_us(run_sparsek, args.iters, args.warmup)
            op_name = None
            try:
                inp = Inputs(case.q, case.k, case.v, case.bias)
                op_name = fmha._dispatch_fw(inp, False).NAME
                t_xf = cuda_event_time_us(run_xformers, args.iters, args.warmup)
                xf, speedup = f"{t_xf:.1f}", f"{t_xf / t_sk:.2f}x"
                err = f"{rel_error(run_sparsek(), run_xformers()):.1e}"
            except Exception as e:  # no (working) xFormers operator for these inputs here
                op_name = f"{op_name or 'none'} (failed: {type(e).__name__})"
                xf, speedup, err = "n/a", "n/a", "n/a"
        rows.append(
            f"| {case.name} | {case.shape} | {args.dtype} | {t_sk:.1f} | {op_name} | {xf} | {speedup} | {err} |"
        )
        print(rows[-1], flush=True)

    header = [
        f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
        f"xformers {xformers.__version__} | sparsek {sparsek.__version__} | sparsek-xformers "
        f"{sparsek_xformers.__version__} | Python {platform.python_version()}",
        f"Median of {args.iters} runs after {args.warmup} warm-up runs (CUDA events), microseconds.",
    ]
    if note:
        header.append(note)
    table = [
        "| case | shape | dtype | sparsek FwOp (us) | xFormers default op | xFormers (us) | speedup | rel. diff |",
        "|---|---|---|---:|---|---:|---:|---:|",
        *rows,
    ]
    text = "\n".join(header) + "\n\n" + "\n".join(table) + "\n"
    print("\n" + text)
    with open(args.out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
