#!/usr/bin/env python3
"""Paged decode benchmark: sparsek's GQA paged-decode kernel vs sparsek's paged FMHA vs PyTorch SDPA.

One query token per request over a paged KV cache (vLLM layout, randomly permuted blocks), every request with the
same context length. SDPA runs on K/V gathered into dense ``[batch, heads_kv, context, head_dim]`` tensors beforehand
(the gather is not timed) with ``enable_gqa=True``; it is the "no paged kernel" baseline.

Kernel time: median of CUDA-event timed CUDA-graph replays (``--calls`` calls captured per graph), so launch gaps and
Python overhead vanish. Bandwidth: K/V bytes read by the decode kernel divided by its time.

    python packages/sparsek-kernels/benchmarks/bench_decode.py --out decode.md
    python packages/sparsek-kernels/benchmarks/bench_decode.py --batch 1 64 --context 4096 --gqa 32:8 64:8
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import sparsek.paged  # noqa: F401  (registers torch.ops.sparsek.paged_attention_out)
import torch
import torch.nn.functional as F
from sparsek.testing import cuda_graph_time_us, rel_error

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def make_case(batch: int, context: int, hq: int, hk: int, d: int, block_size: int, dtype: torch.dtype, seed: int = 0):
    """Paged cache (NHD packed like vLLM's LBNHC layout), permuted block table, one query per request."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    blocks_per_req = (context + block_size - 1) // block_size
    num_blocks = batch * blocks_per_req + 1
    packed = torch.empty(num_blocks, block_size, hk, 2 * d, device=dev, dtype=dtype)
    packed.normal_(generator=g)
    key_cache, value_cache = packed.split(d, dim=-1)
    perm = torch.randperm(num_blocks - 1, device=dev, generator=g) + 1
    block_table = perm[: batch * blocks_per_req].view(batch, blocks_per_req).to(torch.int32)
    q = torch.randn(batch, hq, d, device=dev, dtype=dtype, generator=g)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    return q, key_cache, value_cache, block_table, seq_lens, cu


def gather_dense(key_cache, value_cache, block_table, context):
    """Dense ``[batch, heads_kv, context, head_dim]`` copies of every request's K/V."""
    bs = key_cache.shape[1]
    pos = torch.arange(context, device=key_cache.device)
    blocks = block_table[:, pos // bs].long()  # [B, ctx]
    rows = (pos % bs).expand_as(blocks)
    k = key_cache[blocks, rows].permute(0, 2, 1, 3).contiguous()
    v = value_cache[blocks, rows].permute(0, 2, 1, 3).contiguous()
    return k, v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    ap.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    ap.add_argument("--gqa", nargs="+", default=["32:8"], help="query_heads:kv_heads pairs (default 32:8, Llama-3-8B)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--calls", type=int, default=20, help="calls captured per CUDA graph")
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--max-gb", type=float, default=60.0, help="skip cases whose tensors would exceed this (GiB)")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown table to this file")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        raise SystemExit("bench_decode.py needs a CUDA GPU")
    dtype = DTYPES[args.dtype]
    d, bs = args.head_dim, args.block_size
    scale = d**-0.5
    esize = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for pair in args.gqa:
        hq, hk = (int(x) for x in pair.split(":"))
        for batch in args.batch:
            for context in args.context:
                kv_bytes = 2 * batch * context * hk * d * esize
                if kv_bytes / 2**30 > args.max_gb:
                    rows.append((hq, hk, batch, context, None, None, None, None, None, "skipped: memory"))
                    continue
                q, kc, vc, bt, seq_lens, cu = make_case(batch, context, hq, hk, d, bs, dtype)
                out = torch.empty_like(q)
                lse = torch.empty(0, device="cuda", dtype=torch.float32)

                def decode(num_decodes=batch, q=q, kc=kc, vc=vc, bt=bt, seq_lens=seq_lens, cu=cu, out=out, lse=lse):
                    torch.ops.sparsek.paged_attention_out(
                        q, kc, vc, bt, cu, seq_lens, 1, context, scale, -1, 0, num_decodes, out, lse
                    )

                def fmha(q=q, kc=kc, vc=vc, bt=bt, seq_lens=seq_lens, cu=cu, out=out, lse=lse):
                    # max_seqlen_q=2 with num_decodes=0 forces the paged FMHA kernel for the same batch
                    torch.ops.sparsek.paged_attention_out(
                        q, kc, vc, bt, cu, seq_lens, 2, context, scale, -1, 0, 0, out, lse
                    )

                t_dec = cuda_graph_time_us(decode, args.calls, args.replays)
                decode()
                ours = out.clone()
                t_fmha = cuda_graph_time_us(fmha, args.calls, args.replays)
                t_sdpa = err = None
                if not args.no_sdpa and 2 * kv_bytes / 2**30 <= args.max_gb:
                    k, v = gather_dense(kc, vc, bt, context)
                    qd = q.unsqueeze(2)  # [B, Hq, 1, D]

                    def sdpa(qd=qd, k=k, v=v):
                        return F.scaled_dot_product_attention(qd, k, v, scale=scale, enable_gqa=hq != hk)

                    t_sdpa = cuda_graph_time_us(sdpa, args.calls, args.replays)
                    err = rel_error(ours, sdpa().squeeze(2))
                    del k, v
                gbps = kv_bytes / (t_dec * 1e-6) / 1e9
                rows.append((hq, hk, batch, context, t_dec, t_fmha, t_sdpa, gbps, err, ""))
                print(_row(rows[-1]), flush=True)
                del q, kc, vc, bt, out
                torch.cuda.empty_cache()

    head = (
        f"# sparsek paged decode benchmark\n\n"
        f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
        f"date {datetime.date.today().isoformat()}; {args.dtype}, head_dim {d}, block_size {bs}; "
        f"kernel time = median of CUDA-graph replays ({args.calls} calls per graph), microseconds per call.\n\n"
        "| Hq:Hkv | batch | context | sparsek decode | sparsek paged FMHA | SDPA (gathered K/V) | "
        "decode vs SDPA | decode K/V GB/s | rel. err vs SDPA | note |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    table = head + "\n".join(_row(r) for r in rows) + "\n"
    print()
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


def _fmt(x, spec=".1f"):
    return "" if x is None else format(x, spec)


def _row(r) -> str:
    hq, hk, batch, context, t_dec, t_fmha, t_sdpa, gbps, err, note = r
    speed = f"{t_sdpa / t_dec:.2f}x" if t_dec and t_sdpa else ""
    return (
        f"| {hq}:{hk} | {batch} | {context} | {_fmt(t_dec)} | {_fmt(t_fmha)} | {_fmt(t_sdpa)} | {speed} | "
        f"{_fmt(gbps, '.0f')} | {_fmt(err, '.1e')} | {note} |"
    )


if __name__ == "__main__":
    main()
