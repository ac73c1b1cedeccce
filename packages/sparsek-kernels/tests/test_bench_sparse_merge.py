"""CPU test of ``benchmarks/bench_sparse.py --merge``: reports of a sweep split over processes join into one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sparse.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sparse", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _report(path: Path, date: str, s: int) -> Path:
    path.write_text(
        "# sparsek sparse attention benchmark\n\n"
        f"- GPU: Some GPU; torch 9.9; CUDA 1.0; sparsek 0.0.1\n- date: {date}\n- shape: B=1\n\n"
        "| sweep | S | budget / density | implementation | time (us) | TFLOP/s (kept) | speedup vs cuDNN |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| sparsek | {s} | k=512 | dense SDPA cuDNN (causal) | 151.4 | 454.1 | 1.00x |\n"
        f"| sparsek | {s} | k=512 | select per query (kernel) | 201.7 | 149.1 |  |\n"
        f"| block-sparse | {s} | 1% | sparsek kernel (block runs) | 12.5 | 300.0 | 9.50x |\n"
    )
    return path


def test_merge_keeps_every_row_in_sweep_order(tmp_path):
    bench = _bench()
    a = _report(tmp_path / "a.md", "D1", 4096)
    b = _report(tmp_path / "b.md", "D2", 65536)
    bench.merge_reports([a, b], tmp_path / "out")
    header, rows = bench.read_report(tmp_path / "out" / "bench_sparse.md")
    assert [(r["sweep"], r["S"]) for r in rows] == [
        ("sparsek", 4096), ("sparsek", 4096), ("sparsek", 65536), ("sparsek", 65536),
        ("block-sparse", 4096), ("block-sparse", 65536),
    ]  # fmt: skip
    assert rows[0]["us"] == 151.4 and rows[0]["speedup"] == 1.0
    assert rows[1]["speedup"] != rows[1]["speedup"]  # an empty speedup cell reads back as NaN
    assert rows[-1]["tflops"] == 300.0 and rows[-1]["impl"] == "sparsek kernel (block runs)"
    assert "- date: D1, D2 (merged from 2 runs)" in header
    assert header[0].startswith("- GPU: Some GPU;")
