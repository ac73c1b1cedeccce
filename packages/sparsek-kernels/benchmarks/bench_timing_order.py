#!/usr/bin/env python3
"""Does the order of timing decide which attention backend looks faster? Sequential against interleaved replays.

A GPU at its board power limit lowers its clocks, so a kernel timed right after a pause runs faster than the same
kernel timed after 150 ms of work. ``tools/bench_attention.py`` used to time the backends of a shape one after
another; this script shows what that does, on the shapes where the table's rounds split into two groups:

- **sequential**: each backend's graph timed in turn (``cuda_graph_time_us``), the SM clock and board power read
  with ``nvidia-smi`` after each;
- **interleaved**: one replay of each backend in turn (``interleaved_graph_times_us``, what the table uses now);
- **output placement**: our kernel writing O at several byte offsets of one buffer (0 B to 2 MiB), interleaved, to
  rule the output's address in or out.

    python packages/sparsek-kernels/benchmarks/bench_timing_order.py
"""

from __future__ import annotations

import argparse
import statistics

import sparsek
import torch
import torch.nn.functional as F
from sparsek import _lib
from sparsek.testing import board_reading, cuda_graph_time_us, interleaved_graph_times_us
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [  # dtype, B, H, S, D (non-causal): the S=2048 rows of the dense table
    ("fp16", 4, 16, 2048, 64),
    ("fp16", 4, 16, 2048, 128),
    ("bf16", 4, 16, 2048, 128),
]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def output_at(qs, ks, vs, buf, offset):
    """A call of our kernel that writes O into ``buf`` from element ``offset`` on ([B, S, H, D] inputs)."""
    b, s, h, d = qs.shape
    o = buf[offset : offset + qs.numel()].view(b, s, h, d)

    def run():
        _lib.fmha_fwd(
            qs, ks, vs, o, None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, block_table=None,
            max_seqlen_q=s, max_seqlen_k=s, scale=d**-0.5, window_left=-1, window_right=-1,
        )  # fmt: skip

    return run, o


def time_shape(name: str, b: int, h: int, s: int, d: int, rounds: int) -> None:
    """Print the three timings for one shape."""
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=DTYPES[name]) for _ in range(3))
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        return run

    fns = {
        "sparsek": lambda: sparsek.attention(qs, ks, vs),
        "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
    }
    print(f"== {name} B={b} H={h} S={s} D={d}", flush=True)
    for r in range(rounds):
        cells = [f"{n} {cuda_graph_time_us(f):.1f} [{board_reading()}]" for n, f in fns.items()]
        print(f"  sequential round {r}: " + " | ".join(cells), flush=True)
    for r in range(rounds):
        times = interleaved_graph_times_us(fns)
        cells = [f"{n} {statistics.median(t):.1f}" for n, t in times.items()]
        print(f"  interleaved round {r}: " + " | ".join(cells) + f" [{board_reading()}]", flush=True)
    buf = torch.empty(qs.numel() + 2 * 1024 * 1024, device="cuda", dtype=qs.dtype)
    placed = {}
    for offset_bytes in (0, 128, 4096, 65536, 1 << 20, (2 << 20) + 128):
        run, o = output_at(qs, ks, vs, buf, offset_bytes // qs.element_size())
        run()
        if not torch.equal(o, fns["sparsek"]()):
            raise SystemExit(f"the output at offset {offset_bytes} B differs from sparsek.attention's")
        placed[f"O at {offset_bytes} B"] = run
    for r in range(2):
        times = interleaved_graph_times_us(placed)
        print(f"  output placement {r}: " + " | ".join(f"{n} {statistics.median(t):.1f}" for n, t in times.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4, help="rounds of each timing method")
    args = ap.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; sparsek {sparsek.__version__}")
    print("board readings (SM clock, power) after each sequential timing and after each interleaved round")
    for shape in SHAPES:
        time_shape(*shape, rounds=args.rounds)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
