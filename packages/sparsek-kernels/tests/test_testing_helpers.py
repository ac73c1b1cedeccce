"""The benchmark helpers of ``sparsek.testing`` (the timing ones need a GPU)."""

from __future__ import annotations

import statistics

import pytest
import torch
from sparsek import testing
from sparsek.testing import board_reading, compiled_flex_attention, interleaved_graph_times_us

dynamo = pytest.importorskip("torch._dynamo")


def _limit_fallbacks() -> int:
    """Frames Dynamo gave up on because of its recompile limit so far in this process."""
    return sum(n for reason, n in dynamo.utils.counters["unimplemented"].items() if "recompile limit" in reason.lower())


_LIMITS = ("recompile_limit", "accumulated_recompile_limit")


@pytest.fixture
def dynamo_limits():
    """Dynamo's recompile limits, restored after the test (the config module is not a plain module for monkeypatch)."""
    saved = {name: getattr(dynamo.config, name) for name in _LIMITS}
    yield dynamo.config
    for name, value in saved.items():
        setattr(dynamo.config, name, value)


@pytest.mark.slow
def test_compiled_flex_attention_keeps_compiling_past_a_low_limit(dynamo_limits):
    """With Dynamo's limit at 1, a second shape would run FlexAttention eagerly; the helper raises the limit so all
    three shapes compile, and the outputs match SDPA."""
    dynamo_limits.recompile_limit = 1
    dynamo_limits.accumulated_recompile_limit = 1
    dynamo.reset()
    flex = compiled_flex_attention(recompile_limit=4)
    assert dynamo.config.recompile_limit == 4
    assert dynamo.config.accumulated_recompile_limit >= 4
    before = _limit_fallbacks()
    gen = torch.Generator().manual_seed(0)
    for s in (32, 48, 64):
        q, k, v = (torch.randn(1, 2, s, 16, generator=gen) for _ in range(3))
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out = flex(q, k, v)
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert _limit_fallbacks() == before
    dynamo.reset()


def test_compiled_flex_attention_never_lowers_the_limit(dynamo_limits):
    dynamo_limits.recompile_limit = 500
    compiled_flex_attention(recompile_limit=16)
    assert dynamo_limits.recompile_limit == 500


@pytest.mark.gpu
def test_interleaved_graph_times_track_the_work():
    """Every function gets one time per replay, and four chained matmuls read about four times one matmul."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.float16)
    out = torch.empty_like(a)

    def one():
        torch.mm(a, a, out=out)

    def four():
        for _ in range(4):
            torch.mm(a, a, out=out)

    times = interleaved_graph_times_us({"one": one, "four": four}, calls=5, replays=12)
    assert sorted(times) == ["four", "one"]
    assert all(len(t) == 12 and min(t) > 0 for t in times.values())
    ratio = statistics.median(times["four"]) / statistics.median(times["one"])
    assert 3.0 < ratio < 5.0, ratio


def test_board_reading_is_empty_without_nvidia_smi(monkeypatch):
    monkeypatch.setattr(testing.shutil, "which", lambda name: None)
    assert board_reading() == ""
