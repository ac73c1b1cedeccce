"""Benchmark of sparsek's sparse attention against dense SDPA (cuDNN, flash) and FlexAttention on one GPU.

Two sweeps in one process, every row timed the same way: by default (``--timing events``) the median of ``--iters``
calls queued back to back after ``--warmup``, each between two CUDA events; with ``--timing graph``, the median over
``--iters`` replays of a CUDA graph of up to 20 calls (as ``tools/bench_attention.py`` times the dense table),
falling back to CUDA events for a call that cannot be captured (the row then says ``[events]``).

1. **SparseK layer** (causal, per-key scores ``[B, H, S]``): sequence length × budget ``k`` with a local window.
   Rows: selection kernel alone; per-query top-k attention (gather kernel, the paper's exact semantics);
   block-shared selection + attention (block 128, FMHA index-list mode); FlexAttention (``torch.compile``'d) on the
   identical block-shared token pattern; dense causal SDPA with the cuDNN and flash backends.
2. **Block-sparse** (non-causal, random kept 128x128 blocks): density 1%..50%; sparsek ``block_sparse_attention``
   (kernel only, token lists prebuilt, and the full call) vs FlexAttention with the identical BlockMask.

TFLOP/s count only the kept (query, key) pairs: ``4 * D * Hq * pairs``. Sizes that do not fit are skipped.

    python packages/sparsek-kernels/benchmarks/bench_sparse.py --out bench_out
    python packages/sparsek-kernels/benchmarks/bench_sparse.py --out bench_out --target   # the issue's target only

Writes ``DIR/bench_sparse.md`` (table + environment) and ``DIR/bench_sparse.png`` (if matplotlib is installed).
A sweep split over several processes (``--seqlens``) is joined into one report, without a GPU, by

    python packages/sparsek-kernels/benchmarks/bench_sparse.py --out bench_out --merge run1/bench_sparse.md run2/...
"""

from __future__ import annotations

import argparse
import datetime
import math
from pathlib import Path

import sparsek
import torch
from sparsek import sparse
from sparsek.reference.sparse import select_limits
from sparsek.testing import compiled_flex_attention, cuda_event_time_us, cuda_graph_time_us


def fits(nbytes: float, frac: float = 0.6) -> bool:
    free, _ = torch.cuda.mem_get_info()
    return nbytes < frac * free


def tflops(pairs: float, d: int, hq: int, us: float) -> float:
    return 4.0 * d * hq * pairs / (us * 1e-6) / 1e12


class EventTimed(float):
    """A time in microseconds measured with CUDA events because the call could not be captured in a CUDA graph."""


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[dict] = []
        self.flex = None

    def time(self, fn) -> float | None:
        try:
            if self.args.timing == "graph":
                try:
                    once = cuda_event_time_us(fn, 1, self.args.warmup)
                    calls = max(1, min(20, int(20000.0 / max(once, 1.0))))  # about 20 ms of work per replay
                    return cuda_graph_time_us(fn, calls=calls, replays=self.args.iters)
                except torch.OutOfMemoryError:
                    raise
                except Exception as e:  # host synchronization inside the call: time it with events
                    torch.cuda.synchronize()
                    print(f"  not capturable ({type(e).__name__}): timed with CUDA events")
                    return EventTimed(cuda_event_time_us(fn, self.args.iters, self.args.warmup))
            return cuda_event_time_us(fn, self.args.iters, self.args.warmup)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None
        except Exception as e:  # a backend missing on this machine: report, keep going
            print(f"  skipped: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            torch.cuda.empty_cache()
            return None

    def add(self, sweep: str, s: int, param: str, impl: str, us: float | None, pairs: float, dense_us: float | None):
        if us is None:
            return
        a = self.args
        if isinstance(us, EventTimed):  # graph mode, the call could not be captured
            impl += " [events]"
        row = dict(sweep=sweep, S=s, param=param, impl=impl, us=us, tflops=tflops(pairs, a.d, a.heads, us))
        row["speedup"] = (dense_us / us) if dense_us else float("nan")
        self.rows.append(row)
        print(f"  {sweep:12s} S={s:6d} {param:12s} {impl:38s} {us:12.1f} us  {row['tflops']:7.1f} TFLOP/s")

    def flex_fn(self):
        if self.flex is None:  # one compiled function; every S, budget and density recompiles it
            self.flex = compiled_flex_attention()
        return self.flex

    # ----------------------------------------------------------------------------------------------------------------

    def dense(self, q, k, v, s: int) -> dict[str, float | None]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        res = {}
        for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):

            def run(be=be):
                with sdpa_kernel(be):
                    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

            res[name] = self.time(run)
        return res

    def sparsek_sweep(self, s: int, budget: int) -> None:
        a = self.args
        b, h, d, w, bs = 1, a.heads, a.d, a.window, 128
        if budget >= s:
            return
        if not fits(4 * b * s * h * d * 2):
            print(f"skip S={s}: does not fit")
            return
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=a.dtype, generator=gen) for _ in range(3))
        u = torch.randn(b, h, s, device="cuda", generator=gen)
        param = f"k={budget}"
        dense = self.dense(q, k, v, s)
        dense_pairs = s * (s + 1) / 2
        self.add("sparsek", s, param, "dense SDPA cuDNN (causal)", dense["cudnn"], dense_pairs, dense["cudnn"])
        self.add("sparsek", s, param, "dense SDPA flash (causal)", dense["flash"], dense_pairs, dense["cudnn"])
        # per query (paper semantics)
        pq_pairs = sum(min(w, i + 1) + max(0, min(budget, i + 1 - w)) for i in range(s))
        if fits(b * h * s * budget * 4 * 2):
            t_sel = self.time(lambda: sparse.sparsek_select(u, budget, window=w, validate=False))
            self.add("sparsek", s, param, "select per query (kernel)", t_sel, pq_pairs, None)
            idx = sparse.sparsek_select(u, budget, window=w)
            t_att = self.time(lambda: torch.ops.sparsek.topk_attn_fwd(q, k, v, idx, d**-0.5, w, True, False))
            self.add("sparsek", s, param, "top-k attention per query (gather)", t_att, pq_pairs, dense["cudnn"])
            if t_sel and t_att:
                self.add("sparsek", s, param, "select + attention per query", t_sel + t_att, pq_pairs, dense["cudnn"])
            # the same per-query selection as block lists with query intervals (what sparsek_attention runs):
            # its two preparation steps alone, then the whole call
            from sparsek.selection_intervals import block_union_intervals

            _, off_pq, _ = select_limits(s, s, causal=True, window=w, block_size=None)
            nbq = -(-s // 128)
            t_first = self.time(lambda: torch.ops.sparsek.topk_select(u, budget, nbq, off_pq, 128))
            self.add("sparsek", s, param, "per query: block first-query selection", t_first, pq_pairs, None)
            first = torch.ops.sparsek.topk_select(u, budget, nbq, off_pq, 128)[0]
            t_ivb = self.time(lambda: torch.ops.sparsek.block_union_intervals(u, first, budget, s, off_pq, 128))
            self.add("sparsek", s, param, "per query: union lists + intervals (kernel)", t_ivb, pq_pairs, None)
            t_pql = self.time(lambda: torch.ops.sparsek.per_query_block_lists(u, budget, s, off_pq, 128))
            self.add("sparsek", s, param, "per query: both steps as one op (shared key order)", t_pql, pq_pairs, None)
            t_ivt = self.time(lambda: block_union_intervals(u, first, budget, s, off_pq, 128))
            self.add("sparsek", s, param, "per query: union lists + intervals (PyTorch)", t_ivt, pq_pairs, None)
            del first
            t_iv = self.time(lambda: sparse.sparsek_attention(q, k, v, u, budget, w, validate=False))
            self.add(
                "sparsek",
                s,
                param,
                "sparsek_attention per query (block intervals, e2e)",
                t_iv,
                pq_pairs,
                dense["cudnn"],
            )
            del idx
            torch.cuda.empty_cache()
        else:
            print(f"  skip per-query at S={s}, k={budget}: index tensor does not fit")
        # block-shared, block 128 (FMHA index-list mode)
        idx_b = sparse.sparsek_select(u, budget, window=w, block_size=bs)
        fidx, cnt, ibq = sparse._shared_to_fmha(idx_b, bs, w, s, s)
        # kept pairs per head: the band (sum_i min(w, i + 1)) plus each block's listed keys (all <= p0 - w <= pos)
        listed = (fidx >= 0).sum(-1).double().mean(1)[0]  # [num_blocks], averaged over heads
        nq = torch.full_like(listed, bs)
        nq[-1] = s - bs * (listed.numel() - 1)
        blk_pairs = float((listed * nq).sum()) + sum(min(w, i + 1) for i in range(s))
        t_bsel = self.time(lambda: sparse.sparsek_select(u, budget, window=w, block_size=bs, validate=False))
        self.add("sparsek", s, param, "select block-shared (kernel)", t_bsel, blk_pairs, None)
        t_batt = self.time(lambda: torch.ops.sparsek.index_attn_fwd(q, k, v, fidx, cnt, ibq, d**-0.5, w - 1, 0, False))
        self.add("sparsek", s, param, "attention block-shared (FMHA index)", t_batt, blk_pairs, dense["cudnn"])
        t_e2e = self.time(lambda: sparse.sparsek_attention(q, k, v, u, budget, w, block_size=bs, validate=False))
        self.add("sparsek", s, param, "sparsek_attention block-shared (e2e)", t_e2e, blk_pairs, dense["cudnn"])
        # FlexAttention on the identical block-shared token pattern
        if not a.no_flex:
            self.flex_sparsek(q, k, v, fidx, cnt, ibq, w, s, param, blk_pairs, dense["cudnn"])

    def flex_sparsek(self, q, k, v, fidx, cnt, ibq, w, s, param, pairs, dense_us) -> None:
        from torch.nn.attention.flex_attention import BlockMask

        h, nqb = q.shape[2], fidx.shape[2]
        sel = torch.zeros(1, h, nqb, s + 1, dtype=torch.bool, device="cuda")
        sel.scatter_(-1, torch.where(fidx >= 0, fidx, s).long(), True)
        sel = sel[..., :s].contiguous()
        nkb = -(-s // 128)
        pad = nkb * 128 - s
        blk = torch.nn.functional.pad(sel, (0, pad)).view(1, h, nqb, nkb, 128).any(-1)
        qb = torch.arange(nqb, device="cuda")
        kb = torch.arange(nkb, device="cuda")
        lo_band = (qb * ibq - w + 1).clamp_min(0) // 128
        hi_band = ((qb + 1) * ibq - 1).clamp(max=s - 1) // 128
        blk |= (kb.view(1, -1) >= lo_band.view(-1, 1)) & (kb.view(1, -1) <= hi_band.view(-1, 1))
        num = blk.sum(-1).to(torch.int32)
        order = torch.argsort((~blk).to(torch.int8), dim=-1, stable=True).to(torch.int32)

        def mask_mod(b, hh, qi, kvi):
            in_band = (kvi <= qi) & (qi - kvi < w)
            return in_band | ((kvi <= qi) & sel[b, hh, qi // ibq, kvi])

        bm = BlockMask.from_kv_blocks(num, order, BLOCK_SIZE=(ibq, 128), mask_mod=mask_mod, seq_lengths=(s, s))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        flex = self.flex_fn()
        t = self.time(lambda: flex(qt, kt, vt, block_mask=bm))
        self.add("sparsek", s, param, "FlexAttention (same pattern)", t, pairs, dense_us)

    # ----------------------------------------------------------------------------------------------------------------

    def block_sparse_sweep(self, s: int, density: float) -> None:
        from torch.nn.attention.flex_attention import BlockMask

        a = self.args
        b, h, d, bs = 1, a.heads, a.d, 128
        if not fits(4 * b * s * h * d * 2):
            print(f"skip S={s}: does not fit")
            return
        nb = -(-s // bs)
        keep = max(1, round(density * nb))
        if not fits(b * h * nb * keep * bs * 4 * 3):
            print(f"skip block-sparse S={s} density={density}: token lists do not fit")
            return
        gen = torch.Generator(device="cuda").manual_seed(1)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=a.dtype, generator=gen) for _ in range(3))
        blocks = torch.rand(b, h, nb, nb, device="cuda", generator=gen).argsort(-1)[..., :keep]
        blocks = blocks.sort(-1).values.to(torch.int32).contiguous()
        pairs = float(b * nb * keep * bs * bs)  # per head (s a multiple of 128)
        param = f"{density:.0%}"
        dense = self.dense(q, k, v, s)
        self.add("block-sparse", s, param, "dense SDPA cuDNN (causal)", dense["cudnn"], s * (s + 1) / 2, dense["cudnn"])
        # Our own dense kernel at the same shape: the base of the "80% of our dense TFLOP/s" target.
        for causal in (False, True):
            t_d = self.time(lambda causal=causal: sparsek.attention(q, k, v, causal=causal))
            pairs_d = s * (s + 1) / 2 if causal else float(s * s)
            self.add(
                "block-sparse", s, param, f"sparsek dense ({'causal' if causal else 'not causal'})", t_d, pairs_d, None
            )
        starts = (blocks * bs).contiguous()
        counts = torch.full((b, h, nb), keep, dtype=torch.int32, device="cuda")
        t_r = self.time(
            lambda: torch.ops.sparsek.block_attn_fwd(q, k, v, starts, counts, bs, bs, d**-0.5, -1, -1, False)
        )
        self.add("block-sparse", s, param, "sparsek kernel (block runs)", t_r, pairs, dense["cudnn"])
        tokens = sparse._expand_blocks(blocks, bs, s)
        fidx, cnt, ibq = sparse._shared_to_fmha(tokens, bs, 0, s, s)
        t_k = self.time(lambda: torch.ops.sparsek.index_attn_fwd(q, k, v, fidx, cnt, ibq, d**-0.5, -1, -1, False))
        self.add("block-sparse", s, param, "sparsek kernel (token lists)", t_k, pairs, dense["cudnn"])
        t_c = self.time(lambda: sparse.block_sparse_attention(q, k, v, blocks, bs, validate=False))
        self.add("block-sparse", s, param, "sparsek block_sparse_attention (call)", t_c, pairs, dense["cudnn"])
        layout = sparse.block_sparse_layout(blocks, bs, seqlen_q=s, seqlen_k=s, validate=False)  # prepared once
        t_l = self.time(lambda: sparse.block_sparse_attention(q, k, v, layout))
        self.add("block-sparse", s, param, "sparsek block_sparse_attention (layout)", t_l, pairs, dense["cudnn"])
        if not a.no_flex:
            num = torch.full((b, h, nb), keep, dtype=torch.int32, device="cuda")
            pad = torch.nn.functional.pad(blocks, (0, nb - keep))
            bm = BlockMask.from_kv_blocks(
                torch.zeros_like(num), pad, full_kv_num_blocks=num, full_kv_indices=pad, BLOCK_SIZE=bs
            )
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            flex = self.flex_fn()
            t_f = self.time(lambda: flex(qt, kt, vt, block_mask=bm))
            self.add("block-sparse", s, param, "FlexAttention (same BlockMask)", t_f, pairs, dense["cudnn"])


def write_report(runner: Runner, out: Path, args: argparse.Namespace) -> None:
    gpu = torch.cuda.get_device_name()
    header = [
        f"- GPU: {gpu}; torch {torch.__version__}; CUDA {torch.version.cuda}; sparsek {sparsek.__version__}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- shape: B=1, H={args.heads} (MHA), D={args.d}, dtype {str(args.dtype).removeprefix('torch.')}; "
        f"window {args.window}; block 128; "
        + (
            f"median of {args.iters} replays of a CUDA graph of up to 20 calls ([events]: not capturable, timed "
            "with CUDA events)"
            if args.timing == "graph"
            else f"median of {args.iters} calls queued back to back (CUDA events per call) after {args.warmup} warmup"
        ),
        "- TFLOP/s on kept (query, key) pairs only; speedup vs dense causal SDPA cuDNN at the same S",
    ]
    write_rows(runner.rows, header, gpu, out)


def read_report(path: Path) -> tuple[list[str], list[dict]]:
    """The header lines (``- ...``) and the rows of a report that ``write_report`` wrote."""
    header, rows = [], []
    for line in path.read_text().splitlines():
        if line.startswith("- "):
            header.append(line)
        elif line.startswith(("| sparsek |", "| block-sparse |")):
            c = [x.strip() for x in line.strip().strip("|").split("|")]
            sp = float(c[6].removesuffix("x")) if c[6] else float("nan")
            rows.append(
                dict(sweep=c[0], S=int(c[1]), param=c[2], impl=c[3], us=float(c[4]), tflops=float(c[5]), speedup=sp)
            )
    return header, rows


def merge_reports(paths: list[Path], out: Path) -> None:
    """One report from several runs' reports: the SparseK rows of every run in the order given, then their
    block-sparse rows; the first run's header, with every run's date."""
    reports = [read_report(p) for p in paths]
    header = list(reports[0][0])
    dates = [line.removeprefix("- date: ") for h, _ in reports for line in h if line.startswith("- date: ")]
    header = [
        f"- date: {', '.join(dates)} (merged from {len(paths)} runs)" if h.startswith("- date: ") else h for h in header
    ]
    gpu = header[0].removeprefix("- GPU: ").split(";")[0]
    rows = [r for sweep in ("sparsek", "block-sparse") for _, rs in reports for r in rs if r["sweep"] == sweep]
    write_rows(rows, header, gpu, out)


def write_rows(rows: list[dict], header: list[str], gpu: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# sparsek sparse attention benchmark",
        "",
        *header,
        "",
        "| sweep | S | budget / density | implementation | time (us) | TFLOP/s (kept) | speedup vs cuDNN |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = "" if math.isnan(r["speedup"]) else f"{r['speedup']:.2f}x"
        lines.append(
            f"| {r['sweep']} | {r['S']} | {r['param']} | {r['impl']} | {r['us']:.1f} | {r['tflops']:.1f} | {sp} |"
        )
    (out / "bench_sparse.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'bench_sparse.md'}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, sweep in ((axes[0], "sparsek"), (axes[1], "block-sparse")):
        impls = sorted({r["impl"] for r in rows if r["sweep"] == sweep})
        for impl in impls:
            pts = [r for r in rows if r["sweep"] == sweep and r["impl"] == impl]
            if sweep == "sparsek":
                for budget in sorted({r["param"] for r in pts}):
                    sub = [r for r in pts if r["param"] == budget]
                    ax.plot([r["S"] for r in sub], [r["us"] for r in sub], marker="o", label=f"{impl} {budget}")
            else:
                s_max = max(r["S"] for r in pts)
                sub = [r for r in pts if r["S"] == s_max]
                ax.plot([r["param"] for r in sub], [r["tflops"] for r in sub], marker="o", label=f"{impl} S={s_max}")
        ax.set_title(f"{sweep} ({gpu})")
        if sweep == "sparsek":
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("time (us)")
        else:
            ax.set_xlabel("density (kept blocks)")
            ax.set_ylabel("TFLOP/s on kept blocks")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "bench_sparse.png", dpi=120)
    print(f"wrote {out / 'bench_sparse.png'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory for the Markdown table and the plot")
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    p.add_argument("--budgets", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10, help="timed calls (graph replays with --timing graph)")
    p.add_argument("--timing", default="events", choices=["graph", "events"], help="see the module docstring")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (no torch.compile)")
    p.add_argument("--target", action="store_true", help="only the issue's target: S=32768, k=2048, densities")
    p.add_argument("--skip-block-sparse", action="store_true")
    p.add_argument("--merge", type=Path, nargs="+", help="join these reports into --out (no benchmark is run)")
    args = p.parse_args()
    if args.merge:
        merge_reports(args.merge, args.out)
        return
    args.dtype = getattr(torch, args.dtype)
    if args.target:
        args.seqlens, args.budgets = [32768], [2048]
    if not torch.cuda.is_available():
        raise SystemExit("bench_sparse.py needs a CUDA GPU")
    runner = Runner(args)
    # The report is rewritten after every sequence length, so an interrupted sweep still leaves its finished rows.
    for s in args.seqlens:
        for budget in args.budgets:
            runner.sparsek_sweep(s, budget)
            torch.cuda.empty_cache()
        write_report(runner, args.out, args)
    if not args.skip_block_sparse:
        for s in args.seqlens if not args.target else [32768]:
            for dens in args.densities:
                runner.block_sparse_sweep(s, dens)
                torch.cuda.empty_cache()
            write_report(runner, args.out, args)
    write_report(runner, args.out, args)


if __name__ == "__main__":
    main()
