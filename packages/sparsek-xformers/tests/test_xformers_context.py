"""use_sparsek() context manager tests. They use CPU tensors, for which xFormers itself has no operator."""

from __future__ import annotations

import threading

import pytest
import sparsek_xformers as sx
import torch
import xformers.ops as xops
from sparsek.testing import rel_error
from xf_cases import Case, reference
from xformers.ops import fmha, memory_efficient_attention  # imported before any patching on purpose
from xformers.ops.fmha import attn_bias as xab


def _qkv():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 7, 2, 16, generator=g) for _ in range(3))


def test_outside_block_xformers_has_no_cpu_op():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="No operator found"):
        xops.memory_efficient_attention(q, k, v)


def test_block_routes_all_entry_points_and_restores():
    q, k, v = _qkv()
    bias = xab.LowerTriangularMask()
    ref_out, ref_lse = reference(Case(q, k, v, bias, None))
    original = fmha._dispatch_fw
    assert not sx.is_sparsek_active()
    with sx.use_sparsek():
        assert sx.is_sparsek_active()
        out1 = xops.memory_efficient_attention(q, k, v, bias)
        out2 = memory_efficient_attention(q, k, v, bias)  # reference bound before the block
        out3 = fmha.memory_efficient_attention_forward(q, k, v, bias)
        out4, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, bias)
    assert fmha._dispatch_fw is original and not sx.is_sparsek_active()
    for out in (out1, out2, out3, out4):
        assert rel_error(out, ref_out) < 1e-5
    assert torch.allclose(lse.double(), ref_lse, atol=1e-4)
    with pytest.raises(NotImplementedError, match="No operator found"):
        xops.memory_efficient_attention(q, k, v, bias)


def test_nested_and_decorator():
    q, k, v = _qkv()

    @sx.use_sparsek()
    def run():
        return xops.memory_efficient_attention(q, k, v)

    with sx.use_sparsek():
        with sx.use_sparsek(fallback=True):
            xops.memory_efficient_attention(q, k, v)
        xops.memory_efficient_attention(q, k, v)
        assert run().shape == q.shape
    assert run().shape == q.shape
    assert not sx.is_sparsek_active()


def test_unsupported_inputs_strict_and_fallback():
    q, k, v = _qkv()
    tensor_bias = torch.zeros(2, 2, 7, 7)
    with sx.use_sparsek():
        with pytest.raises(ValueError, match="sparsek does not implement attn_bias of type torch.Tensor"):
            xops.memory_efficient_attention(q, k, v, tensor_bias)
        q.requires_grad_(True)
        with pytest.raises(ValueError, match="forward-only"):
            xops.memory_efficient_attention(q, k, v)
        q.requires_grad_(False)
    with sx.use_sparsek(fallback=True):
        # handed to xFormers' own dispatch, which has nothing for CPU
        with pytest.raises(NotImplementedError, match="No operator found"):
            xops.memory_efficient_attention(q, k, v, tensor_bias)


def test_other_threads_unaffected():
    q, k, v = _qkv()
    inside = threading.Event()
    release = threading.Event()
    results: dict[str, object] = {}

    def worker_in_block():
        with sx.use_sparsek():
            inside.set()
            release.wait(10)
            results["in"] = xops.memory_efficient_attention(q, k, v).shape

    t = threading.Thread(target=worker_in_block)
    t.start()
    assert inside.wait(10)
    try:
        xops.memory_efficient_attention(q, k, v)  # this thread never entered a block
        results["main"] = "ran"
    except NotImplementedError:
        results["main"] = "refused"
    release.set()
    t.join(10)
    assert results == {"in": q.shape, "main": "refused"}
    assert fmha._dispatch_fw.__module__.startswith("xformers")


def test_explicit_op_left_alone():
    q, k, v = _qkv()
    with sx.use_sparsek():
        out = xops.memory_efficient_attention(q, k, v, op=(sx.FwOp, None))
    assert out.shape == q.shape
