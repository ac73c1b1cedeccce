"""CPU: cached launch plans of eager dense calls pack the same parameters as a first (checked) call.

The CUDA path runs on CPU tensors with a stand-in library that records each launch's decoded parameters.
"""

from __future__ import annotations

import ctypes
import importlib

import pytest
import sparsek
import torch
from sparsek import _dense_plans, _lib

attention_module = importlib.import_module("sparsek.attention")
POINTER_FIELDS = ("q", "k", "v", "o", "lse")


class _RecordLaunches:
    def __init__(self):
        self.params = []

    def sk_fmha_fwd(self, params, stream):
        self.params.append(_lib.SkFmhaParams.from_buffer_copy(params))
        return 0


@pytest.fixture
def launches(monkeypatch):
    lib = _RecordLaunches()
    monkeypatch.setattr(_lib, "load", lambda device: lib)
    monkeypatch.setattr(_lib, "current_stream", lambda device: ctypes.c_void_p(0))
    monkeypatch.setattr(attention_module, "_eager_cuda", lambda q, k, v: True)
    _dense_plans.clear()
    yield lib.params
    _dense_plans.clear()


def _fields(p, skip=POINTER_FIELDS):
    return {name: getattr(p, name) for name, _ in _lib.SkFmhaParams._fields_ if name not in skip}


def _qkv(layout="bshd", dtype=torch.float16, b=2, s=37, h=4, hk=2, d=16):
    shape_q, shape_kv = ((b, s, h, d), (b, s + 5, hk, d)) if layout == "bshd" else ((b, h, s, d), (b, hk, s + 5, d))
    return torch.randn(shape_q, dtype=dtype), torch.randn(shape_kv, dtype=dtype), torch.randn(shape_kv, dtype=dtype)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("return_lse", [False, True])
def test_second_call_reuses_the_plan_with_its_own_pointers(launches, layout, return_lse):
    opts = dict(causal=True, scale=0.3, window=(5, 0), layout=layout, return_lse=return_lse)
    first = sparsek.attention(*_qkv(layout), **opts)
    assert len(_dense_plans._plans) == 1
    q, k, v = _qkv(layout)
    second = sparsek.attention(q, k, v, **opts)
    assert len(_dense_plans._plans) == 1 and len(launches) == 2
    p0, p1 = launches
    assert _fields(p1) == _fields(p0)
    out, lse = second if return_lse else (second, None)
    out0 = first[0] if return_lse else first
    assert (out.shape, out.stride(), out.dtype) == (out0.shape, out0.stride(), out0.dtype)
    assert (p1.q, p1.k, p1.v, p1.o) == (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr())
    if return_lse:
        assert lse.shape == (2, 4, 37) and lse.dtype == torch.float32 and p1.lse == lse.data_ptr()
    else:
        assert p1.lse is None


def test_plans_match_fresh_checked_calls(launches):
    """Each key gets its own plan; a cached call packs what a call with an empty cache packs (except the output)."""
    q, k, v = _qkv()
    calls = [
        dict(),
        dict(causal=True),
        dict(scale=0.5),
        dict(window=(3, 2)),
        dict(return_lse=True),
    ]
    for opts in calls:
        sparsek.attention(q, k, v, **opts)
    views = (q[:, :20], k[:, :30], v[:, :30])  # same dtype and device, other shapes and strides
    sparsek.attention(*views)
    assert len(_dense_plans._plans) == len(calls) + 1
    cached = list(launches)
    launches.clear()
    for opts in calls:
        sparsek.attention(q, k, v, **opts)
        _dense_plans.clear()
        sparsek.attention(q, k, v, **opts)
    for i, p in enumerate(cached[: len(calls)]):
        assert (
            _fields(p, ("o", "lse"))
            == _fields(launches[2 * i], ("o", "lse"))
            == _fields(launches[2 * i + 1], ("o", "lse"))
        )
    assert (cached[-1].seqlen_q, cached[-1].seqlen_k, cached[-1].q_batch_stride) == (20, 30, q.stride(0))
    assert cached[1].window_right == 0 and cached[3].window_left == 3 and cached[3].window_right == 2


def test_bad_input_after_a_plan_still_raises(launches):
    q, k, v = _qkv()
    sparsek.attention(q, k, v)
    with pytest.raises(ValueError, match="same dtype"):
        sparsek.attention(q, k.to(torch.bfloat16), v)
    with pytest.raises(ValueError, match="head dim"):
        sparsek.attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="layout"):
        sparsek.attention(q, k, v, layout="sbhd")
    with pytest.raises(ValueError, match="scale"):
        sparsek.attention(q, k, v, scale=-1.0)
    assert len(_dense_plans._plans) == 1 and len(launches) == 1


def test_options_that_are_not_plain_values_are_not_cached(launches):
    q, k, v = _qkv()
    sparsek.attention(q, k, v, window=[3, 2])
    sparsek.attention(q, k, v, scale=torch.tensor(0.5))
    sparsek.attention(q, k, v, causal=1)
    assert len(_dense_plans._plans) == 0 and len(launches) == 3
    assert launches[0].window_left == 3 and launches[2].window_right == 0


def test_cache_is_bounded(launches, monkeypatch):
    monkeypatch.setattr(_dense_plans, "MAX_PLANS", 3)
    q, k, v = _qkv()
    for s in range(1, 6):
        sparsek.attention(q[:, :s], k, v)
    assert 1 <= len(_dense_plans._plans) <= 3


def test_dispatch_modes_keep_calls_on_the_registered_op():
    """Under a TorchDispatchMode (FlopCounterMode, FakeTensorMode, a recording mode) the eager shortcut is off, so the
    mode sees ``sparsek.fmha_fwd``; a TorchFunctionMode (``torch.set_default_device``'s) leaves it on."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    assert not attention_module._dispatch_mode_active()
    with Record():
        assert attention_module._dispatch_mode_active()
        q, k, v = (torch.randn(1, 33, 2, 16) for _ in range(3))
        out = sparsek.attention(q, k, v)
    assert "sparsek.fmha_fwd.default" in seen
    assert torch.allclose(out, sparsek.attention(q, k, v))
    with TorchFunctionMode():
        assert not attention_module._dispatch_mode_active()
    with torch.device("cpu"):
        assert not attention_module._dispatch_mode_active()
    assert not attention_module._dispatch_mode_active()
