"""Test utilities and the pytest plugin shared by all sparsek packages (``-p sparsek.testing``).

The plugin skips tests marked ``gpu`` when no CUDA device is present, and tests marked ``sm90``/``sm100`` unless the
current GPU is of that architecture. The helpers give the project's one definition of the error metric.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
from collections.abc import Callable, Mapping
from typing import Any

import torch


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ``‖out − ref‖ / ‖ref‖`` computed in float64 (NaN anywhere gives ``inf``)."""
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff if denom == 0 else diff / denom


def tolerance(dtype: torch.dtype) -> float:
    """Relative-error tolerance for a kernel computing in ``dtype`` against a float32 reference."""
    return {torch.float16: 3e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-5)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN so that any element a kernel forgets to write is caught."""
    return t.fill_(float("nan"))


def cuda_event_time_us(fn: Callable[[], Any], iters: int, warmup: int) -> float:
    """Median time of ``fn()`` on the current stream in microseconds, timed with CUDA events after ``warmup`` calls.

    The calls are queued back to back and synchronized once at the end (as ``triton.testing.do_bench`` does), so
    while the GPU is busy the host's launch overhead of the next call hides behind it: each pair of events brackets
    the GPU time of one call. A call whose host side takes longer than its GPU work still shows the host's pace.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) * 1000.0 for start, end in zip(starts, ends))


def cuda_graph_time_us(fn: Callable[[], Any], calls: int = 20, replays: int = 30) -> float:
    """Median kernel time per call in microseconds from CUDA-event timed replays of a graph of ``calls`` calls.

    Warms up on a side stream (as graph capture requires), captures ``calls`` calls of ``fn`` and replays the graph
    ``replays`` times; launch gaps vanish, so this measures kernel time rather than host overhead.
    """
    g = capture_cuda_graph(fn, calls)
    return statistics.median(_replay_time_us(g) / calls for _ in range(replays))


def _replay_time_us(g: torch.cuda.CUDAGraph) -> float:
    """GPU time (µs) of one replay of ``g``, between two CUDA events."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1000.0


def capture_cuda_graph(fn: Callable[[], Any], calls: int = 20) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` calls of ``fn``, warmed up on a side stream (as capture requires) and replayed once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    return g


def interleaved_graph_times_us(
    fns: Mapping[str, Callable[[], Any]], calls: int = 20, replays: int = 30, warm_below_us: float = 2000.0
) -> dict[str, list[float]]:
    """Kernel time per call (µs) of every replay of each function's graph, the functions' replays interleaved.

    Captures a graph of ``calls`` calls per function, then replays them round-robin ``replays`` times, each pass
    starting one function further on, so every function is timed under the same clocks and power state: a board held
    at its power limit runs the same kernel 10-15% slower than after a pause, and timing the functions one after
    another would credit that drift to whichever ran first. A graph shorter than ``warm_below_us`` gets an untimed
    replay right before each timed one: after another function's kernels its first call finds cold caches (measured
    +0.3 µs per call in a graph of 20 calls of a 5 µs kernel), which back-to-back calls do not. Take the median of
    each list.
    """
    graphs = {name: capture_cuda_graph(fn, calls) for name, fn in fns.items()}
    names = list(graphs)
    times: dict[str, list[float]] = {name: [] for name in names}
    warm = {name: _replay_time_us(g) < warm_below_us for name, g in graphs.items()}
    for i in range(replays):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            if warm[name]:
                graphs[name].replay()
            times[name].append(_replay_time_us(graphs[name]) / calls)
    return times


def board_reading() -> str:
    """The current GPU's SM clock and board power from ``nvidia-smi`` (``"1680 MHz, 682 W"``), or ``""`` without it."""
    if shutil.which("nvidia-smi") is None:
        return ""
    idx = torch.cuda.current_device()
    out = subprocess.run(
        ["nvidia-smi", "-i", str(idx), "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    try:
        mhz, watts = (float(x) for x in out.split(","))
    except ValueError:
        return ""
    return f"{mhz:.0f} MHz, {watts:.0f} W"


def compiled_flex_attention(recompile_limit: int = 256) -> Callable[..., Any]:
    """``torch.compile(flex_attention, dynamic=False)`` for benchmarks that time FlexAttention at many shapes or masks.

    Each new shape or mask function recompiles it; past Dynamo's recompile limit (8 by default) the call would
    silently run FlexAttention's unfused eager implementation, which materializes the whole score matrix. The limits
    are raised to ``recompile_limit`` for this process (never lowered), so every configuration gets a fused kernel.
    """
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < recompile_limit:
            setattr(cfg, name, recompile_limit)
    return torch.compile(flex_attention, dynamic=False)


def cuda_arch() -> str | None:
    """``"sm90"``, ``"sm100"`` etc. for the current CUDA device, or None without one."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}" if minor else f"sm{major}0"


def pytest_configure(config) -> None:  # pragma: no cover - exercised by pytest itself
    for name, text in (
        ("gpu", "needs a CUDA GPU; skipped without one"),
        ("sm90", "needs a Hopper GPU (sm_90)"),
        ("sm100", "needs a Blackwell GPU (sm_100)"),
    ):
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config, items) -> None:  # pragma: no cover - exercised by pytest itself
    import pytest

    arch = cuda_arch()
    for item in items:
        if arch is None and any(item.get_closest_marker(m) for m in ("gpu", "sm90", "sm100")):
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU"))
        for want in ("sm90", "sm100"):
            if arch is not None and item.get_closest_marker(want) and arch != want:
                item.add_marker(pytest.mark.skip(reason=f"needs {want}, this GPU is {arch}"))
