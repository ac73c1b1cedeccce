#!/usr/bin/env python3
"""Benchmark sparsek's dense attention against PyTorch SDPA (flash, cuDNN) and FlexAttention in one process.

Kernel time: median over CUDA-graph replays (20 calls captured per graph, 30 replays), so launch gaps vanish. The
backends of a shape are replayed interleaved (one replay of each in turn), so all of them see the same clocks and
power state: timed one after another, whichever ran first after a pause read up to 15% faster. Graphs under 2 ms get
an untimed replay before each timed one, so their first call does not find caches cold from another backend's
kernels. With ``--rounds N`` this happens N times (new graphs each round) and the table takes the median of the
rounds' medians.
Eager time: wall time per call of the Python function in a loop (includes launch and Python overhead).
Writes a Markdown table (and a PNG plot when matplotlib is present) to --out.

    python tools/bench_attention.py --out bench_out --rounds 3
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import sparsek
import torch
import torch.nn.functional as F
from sparsek.testing import capture_cuda_graph, compiled_flex_attention, interleaved_graph_times_us
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [  # dtype, B, H, S, D, causal  (the anchor shapes of docs/benchmarks.md)
    ("fp16", 1, 8, 512, 64, False),
    ("fp16", 16, 8, 512, 64, False),
    ("fp16", 1, 96, 512, 64, False),
    ("fp16", 4, 16, 2048, 64, False),
    ("fp16", 4, 16, 2048, 128, False),
    ("fp16", 2, 16, 8192, 64, False),
    ("fp16", 2, 16, 8192, 128, False),
    ("fp16", 2, 16, 8192, 128, True),
    ("fp16", 1, 32, 16384, 128, True),
    ("bf16", 4, 16, 2048, 128, False),
    ("bf16", 2, 16, 8192, 128, False),
    ("bf16", 2, 16, 8192, 128, True),
    ("bf16", 1, 32, 16384, 128, True),
]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def eager_time_us(fn, iters: int = 200) -> float:
    """Median wall time per call over batches of eager calls (synchronizing per batch)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    res = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        res.append((time.perf_counter() - t0) * 1e6 / iters)
    return statistics.median(res)


def backends(q, k, v, causal):
    """name -> zero-argument callable for every backend available here ([B, H, S, D] inputs)."""
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # bshd for sparsek
    fns = {"sparsek": lambda: sparsek.attention(qs, ks, vs, causal=causal)}

    def sdpa(backend, q=q, k=k, v=v):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return run

    fns["sdpa-flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
    fns["sdpa-cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
    # cuDNN on the [B, S, H, D] memory sparsek reads (transposed views); not in the default --backends
    fns["sdpa-cudnn-bshd"] = sdpa(SDPBackend.CUDNN_ATTENTION, *(t.transpose(1, 2) for t in (qs, ks, vs)))
    try:
        from torch.nn.attention.flex_attention import create_block_mask

        flex = compiled_flex_attention()  # one recompile per shape: past Dynamo's default limit it would run eager
        bm = None
        if causal:
            bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, q.shape[2], k.shape[2], device="cuda")
        fns["flex"] = lambda: flex(q, k, v, block_mask=bm)
    except Exception as e:  # pragma: no cover - depends on the installed torch
        print(f"flex attention unavailable: {e}")
    return fns


def flops(b, h, s, d, causal):
    f = 4 * b * h * s * s * d
    return f / 2 if causal else f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--quick", action="store_true", help="only the small latency shapes")
    ap.add_argument(
        "--backends",
        default="sparsek,sdpa-flash,sdpa-cudnn,flex",
        help="comma-separated subset; also sdpa-cudnn-bshd (cuDNN on transposed views of the [B, S, H, D] inputs)",
    )
    ap.add_argument("--head-dim", type=int, default=None, help="only the shapes with this head dimension")
    ap.add_argument(
        "--rounds", type=int, default=1, help="time the backends of a shape this often (interleaved each time)"
    )
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    header = (
        f"GPU: {gpu}; torch {torch.__version__}; sparsek {sparsek.__version__}; "
        f"{datetime.date.today().isoformat()}. Kernel time = median of CUDA-graph replays (20 calls per graph, 30 "
        "replays, the backends' replays interleaved; graphs under 2 ms replayed once untimed before each timed replay)"
        + (f", median of {args.rounds} rounds" if args.rounds > 1 else "")
        + "; "
        "eager = wall time per Python call. TFLOP/s = 4·B·H·S²·D (halved for causal) / kernel time.\n"
    )
    rows = []
    for name, b, h, s, d, causal in SHAPES if not args.quick else SHAPES[:3]:
        if args.head_dim is not None and d != args.head_dim:
            continue
        dtype = DTYPES[name]
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype) for _ in range(3))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        fns, errs = {}, {}
        for bname, fn in backends(q, k, v, causal).items():
            if bname not in args.backends.split(","):
                continue
            try:
                out = fn()
                if bname == "sparsek":
                    out = out.transpose(1, 2)
                errs[bname] = ((out.float() - ref).norm() / ref.norm()).item()
                capture_cuda_graph(fn)  # compiles, and drops a backend that cannot be captured, before the rounds
                fns[bname] = fn
            except Exception as e:  # a backend that cannot run this shape
                print(f"{bname} failed on {name} {b},{h},{s},{d} causal={causal}: {type(e).__name__}: {e}")
        times = {bname: [] for bname in fns}
        for _ in range(args.rounds):
            for bname, replays in interleaved_graph_times_us(fns).items():
                times[bname].append(statistics.median(replays))
        for bname, fn in fns.items():
            us, err = statistics.median(times[bname]), errs[bname]
            eager = eager_time_us(fn) if s <= 512 else float("nan")
            if args.rounds > 1:
                print(
                    f"{name} B={b} H={h} S={s} D={d} causal={causal} {bname}: rounds {[round(t, 2) for t in times[bname]]}"
                )
            tf = flops(b, h, s, d, causal) / us / 1e6
            rows.append((name, b, h, s, d, causal, bname, us, eager, tf, err))
            print(
                f"{name} B={b} H={h} S={s} D={d} causal={causal} {bname:11s} {us:9.2f} us {tf:7.1f} TFLOP/s "
                f"eager {eager:8.2f} us err {err:.1e}",
                flush=True,
            )
        del q, k, v, ref
    lines = [
        header,
        "| dtype | B,H,S,D | causal | backend | kernel us | TFLOP/s | eager us | rel err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, b, h, s, d, causal, bname, us, eager, tf, err in rows:
        eager_s = "" if eager != eager else f"{eager:.1f}"
        lines.append(
            f"| {name} | {b},{h},{s},{d} | {'yes' if causal else 'no'} | {bname} | {us:.2f} | {tf:.0f} | "
            f"{eager_s} | {err:.1e} |"
        )
    table = "\n".join(lines) + "\n"
    (args.out / "bench_attention.md").write_text(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = sorted({(n, b, h, s, d, c) for n, b, h, s, d, c, *_ in rows}, key=lambda x: SHAPES.index(x))
        names = ["sparsek", "sdpa-flash", "sdpa-cudnn", "flex"]
        fig, ax = plt.subplots(figsize=(14, 5))
        width = 0.2
        for i, bn in enumerate(names):
            vals = [next((r[9] for r in rows if tuple(r[:6]) == lab and r[6] == bn), 0) for lab in labels]
            ax.bar([x + i * width for x in range(len(labels))], vals, width, label=bn)
        ax.set_xticks([x + 1.5 * width for x in range(len(labels))])
        ax.set_xticklabels(
            [f"{n}\n{b},{h},{s},{d}\n{'causal' if c else ''}" for n, b, h, s, d, c in labels], fontsize=7
        )
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"Attention forward on {gpu}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "bench_attention.png", dpi=110)
    except ImportError:
        pass
    print(table)


if __name__ == "__main__":
    main()
