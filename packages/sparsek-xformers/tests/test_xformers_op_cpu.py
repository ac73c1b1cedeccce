"""CPU tests of sparsek_xformers.FwOp against a float64 materialize()-based reference and xFormers' ref_attention."""

from __future__ import annotations

import math

import pytest
import sparsek_xformers as sx
import torch
import xformers.ops as xops
from sparsek.testing import rel_error, tolerance
from sparsek_xformers import _execute
from sparsek_xformers.bias import DensePlan, VarlenPlan, plan_attention
from xf_cases import NEEDS_MORE_KEYS, Case, lse_close, make_case, reference
from xformers.attn_bias_utils import ref_attention
from xformers.ops import fmha
from xformers.ops.fmha import attn_bias as xab
from xformers.ops.fmha.common import Inputs

BIAS_TYPES = [None if t is type(None) else t for t in sx.SUPPORTED_ATTN_BIAS_TYPES]
# (batch, q_len, kv_len): odd lengths, single queries, more queries than keys.
SHAPES = [(2, 7, 33), (3, 1, 7), (1, 33, 100), (2, 8, 8), (1, 100, 33), (3, 9, 7)]


def _name(t: type | None) -> str:
    return "None" if t is None else t.__name__


def _run(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    return fmha.memory_efficient_attention_forward_requires_grad(
        case.q, case.k, case.v, case.bias, scale=case.scale, op=sx.FwOp
    )


def _check(case: Case, dtype: torch.dtype = torch.float32) -> None:
    out, lse = _run(case)
    ref_out, ref_lse = reference(case)
    assert out.shape == case.q.shape[:-1] + (case.v.shape[-1],) and out.dtype == case.q.dtype
    err = rel_error(out, ref_out)
    assert err <= tolerance(dtype), f"{case}: rel error {err}"
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape, (lse.shape, ref_lse.shape)
    assert lse_close(lse, ref_lse, atol=1e-4), f"{case}: LSE mismatch"
    # the plain (no LSE) path gives the same output
    out2 = xops.memory_efficient_attention(case.q, case.k, case.v, case.bias, scale=case.scale, op=(sx.FwOp, None))
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


def _cases(bias_type, shapes, fmts):
    for batch, q_len, kv_len in shapes:
        if bias_type in NEEDS_MORE_KEYS and q_len > kv_len:
            continue
        for fmt in fmts:
            try:
                yield make_case(bias_type, batch=batch, q_len=q_len, kv_len=kv_len, fmt=fmt, heads=(2, 3))
            except (AssertionError, ValueError, RuntimeError):
                continue  # xFormers' generator cannot build this bias for this shape


def test_declared_capabilities():
    required = {
        type(None),
        xab.LowerTriangularMask,
        xab.LowerTriangularFromBottomRightMask,
        xab.LowerTriangularFromBottomRightLocalAttentionMask,
        xab.LocalAttentionFromBottomRightMask,
        xab.BlockDiagonalMask,
        xab.BlockDiagonalCausalMask,
        xab.BlockDiagonalCausalFromBottomRightMask,
        xab.BlockDiagonalCausalLocalAttentionMask,
        xab.BlockDiagonalCausalWithOffsetPaddedKeysMask,
        xab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
    }
    assert required <= set(sx.FwOp.SUPPORTED_ATTN_BIAS_TYPES)
    assert torch.Tensor not in sx.FwOp.SUPPORTED_ATTN_BIAS_TYPES
    assert sx.FwOp.SUPPORTS_DROPOUT is False and sx.FwOp.SUPPORTS_BMGHK is True
    assert sx.FwOp.SUPPORTS_CUSTOM_SCALE is True and sx.FwOp.VARLEN_LSE_PACKED is True
    assert {"cpu", "cuda"} == set(sx.FwOp.SUPPORTED_DEVICES)
    assert sx.FwOp.is_available()
    assert issubclass(sx.FwOp, fmha.AttentionFwOpBase) and issubclass(sx.BwOp, fmha.AttentionBwOpBase)


@pytest.mark.parametrize("bias_type", BIAS_TYPES, ids=_name)
def test_bias_matrix_fp32(bias_type):
    n = 0
    for case in _cases(bias_type, SHAPES, ("BMHK", "BMGHK")):
        _check(case)
        n += 1
    assert n >= 4, "too few cases generated"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias_type", BIAS_TYPES, ids=_name)
def test_bias_matrix_half(bias_type, dtype):
    case = next(iter(_cases(bias_type, [(2, 7, 33), (1, 33, 100)], ("BMGHK",))))
    case.q, case.k, case.v = (t.to(dtype) for t in (case.q, case.k, case.v))
    _check(case, dtype)


def test_bf16_on_cpu_is_not_refused():
    q = torch.randn(1, 5, 2, 8, dtype=torch.bfloat16)
    inp = Inputs(q, q, q)
    assert any("bf16" in r for r in fmha.AttentionFwOpBase.not_supported_reasons.__func__(sx.FwOp, inp))
    assert sx.FwOp.not_supported_reasons(inp) == []


def _block_diag(q_lens, k_lens):
    return xab.BlockDiagonalMask.from_seqlens(q_lens, k_lens, device=torch.device("cpu"))


@pytest.mark.parametrize(
    "make",
    [
        lambda bd: bd.make_causal(),
        lambda bd: bd.make_local_attention(3),
        lambda bd: bd.make_local_attention(5),
    ],
    ids=["causal", "local3", "local5"],
)
def test_top_left_block_diagonal_unequal_blocks(make):
    # blocks with more queries than keys, fewer, equal, and empty query blocks
    q_lens, k_lens = [5, 1, 7, 4, 0, 6, 1], [3, 4, 7, 4, 3, 6, 1]
    bias = make(_block_diag(q_lens, k_lens))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, sum(q_lens), 4, 8, generator=g)
    k, v = (torch.randn(1, sum(k_lens), 4, 8, generator=g) for _ in range(2))
    _check(Case(q, k, v, bias, None))


@pytest.mark.parametrize("mq,mk", [(1, 1), (1, 7), (7, 1), (33, 100), (100, 33), (7, 7)])
@pytest.mark.parametrize("fmt", ["BMHK", "BMGHK"])
def test_lower_triangular_top_left(mq, mk, fmt):
    _check(make_case(xab.LowerTriangularMask, batch=2, q_len=mq, kv_len=mk, fmt=fmt, heads=(2, 2)))


@pytest.mark.parametrize("window", [(0, 0), (1, 3), (4, 0), (0, 5)])
def test_local_attention_band(window):
    for mq, mk in [(7, 33), (33, 7), (8, 8)]:
        case = make_case(None, batch=2, q_len=mq, kv_len=mk)
        case.bias = xab.LocalAttentionFromBottomRightMask(*window)
        _check(case)
    case = make_case(None, batch=2, q_len=9, kv_len=9)
    case.bias = xab.LowerTriangularFromBottomRightLocalAttentionMask(window[0] + 1)
    _check(case)


@pytest.mark.parametrize("head_dim", [8, 24, 40, 72])
@pytest.mark.parametrize("scale", [None, 0.3, 2.0])
def test_odd_head_dim_and_custom_scale(head_dim, scale):
    for bias_type in (xab.LowerTriangularMask, xab.BlockDiagonalCausalWithOffsetPaddedKeysMask):
        _check(make_case(bias_type, batch=2, q_len=7, kv_len=33, head_dim=head_dim, scale=scale, fmt="BMGHK"))


def test_lse_formats():
    dense = make_case(None, batch=3, q_len=5, kv_len=9, fmt="BMHK", heads=(2, 2))
    assert _run(dense)[1].shape == (3, 4, 5)
    dense5 = make_case(None, batch=3, q_len=5, kv_len=9, fmt="BMGHK", heads=(2, 3))
    assert _run(dense5)[1].shape == (3, 2, 3, 5)
    var = make_case(xab.BlockDiagonalCausalMask, batch=3, q_len=5, kv_len=5, fmt="BMHK", heads=(2, 2))
    assert _run(var)[1].shape == (1, 4, var.q.shape[1])
    var5 = make_case(xab.BlockDiagonalCausalMask, batch=3, q_len=5, kv_len=5, fmt="BMGHK", heads=(2, 3))
    assert _run(var5)[1].shape == (1, 2, 3, var5.q.shape[1])


def test_gqa_with_materialized_kv_heads():
    # BMGHK whose K/V really differ per head (no stride 0): every (g, h) must read its own K/V.
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 9, 2, 3, 16, generator=g) for _ in range(3))
    _check(Case(q, k, v, xab.LowerTriangularMask(), None))


def test_mqa_bmhk_expanded_kv():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 9, 6, 16, generator=g)
    k, v = (torch.randn(2, 11, 1, 16, generator=g).expand(2, 11, 6, 16) for _ in range(2))
    _check(Case(q, k, v, xab.LowerTriangularFromBottomRightMask(), None))
    fq, fk, _ = _execute.fold_heads(q, k, v)
    assert fk.shape == (2, 11, 1, 16) and fq.shape == q.shape


def test_legacy_bmk():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 7, 16, generator=g) for _ in range(3))
    for bias in (None, xab.LowerTriangularMask()):
        out = xops.memory_efficient_attention(q, k, v, bias, op=(sx.FwOp, None))
        ref = reference(Case(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), bias, None))[0].squeeze(2)
        assert out.shape == q.shape and rel_error(out, ref) < 1e-5


@pytest.mark.parametrize(
    "bias_type",
    [
        None,
        xab.LowerTriangularMask,
        xab.LowerTriangularFromBottomRightMask,
        xab.BlockDiagonalMask,
        xab.BlockDiagonalCausalMask,
        xab.BlockDiagonalCausalFromBottomRightMask,
        xab.BlockDiagonalCausalWithOffsetPaddedKeysMask,
    ],
    ids=_name,
)
@pytest.mark.parametrize("fmt", ["BMHK", "BMGHK"])
def test_matches_xformers_ref_attention(bias_type, fmt):
    case = make_case(bias_type, batch=2, q_len=7, kv_len=33, fmt=fmt, heads=(2, 2), scale=0.5)
    out = xops.memory_efficient_attention(case.q, case.k, case.v, case.bias, scale=0.5, op=(sx.FwOp, None))
    ref = ref_attention(case.q, case.k, case.v, case.bias, scale=0.5)
    finite = torch.isfinite(ref)
    assert finite.any()
    assert rel_error(out[finite], ref[finite]) < 1e-5


def test_plans_avoid_copies_when_possible(monkeypatch):
    def no_gather(*args, **kwargs):
        raise AssertionError("unexpected key gather")

    monkeypatch.setattr(_execute, "_gather_index", no_gather)
    g = torch.Generator().manual_seed(2)
    for make in (lambda bd: bd.make_causal(), lambda bd: bd, lambda bd: bd.make_causal_from_bottomright()):
        lens = [1, 7, 33, 4]
        q, k, v = (torch.randn(1, sum(lens), 2, 8, generator=g) for _ in range(3))
        case = Case(q, k, v, make(_block_diag(lens, lens)), None)
        plan = plan_attention(case.bias, case.q.shape[1], case.k.shape[1])
        assert isinstance(plan, VarlenPlan) and plan.keys_contiguous and plan.cu_seqlens_q is not None
        _check(case)
    assert plan_attention(xab.LowerTriangularMask(), 9, 9) == DensePlan(causal=True)
    with pytest.raises(AssertionError, match="unexpected key gather"):
        _run(make_case(xab.BlockDiagonalCausalWithOffsetPaddedKeysMask, batch=3, q_len=5, kv_len=9))


# ---------------------------------------------------------------------------------------------------------------
# refusals


def _qkv(*shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*shape, generator=g, dtype=dtype) for _ in range(3))


class _MyCausal(xab.LowerTriangularMask):
    pass


@pytest.mark.parametrize(
    "bias_fn,match",
    [
        (lambda: torch.zeros(2, 2, 5, 5), "torch.Tensor"),
        (lambda: xab.LowerTriangularMaskWithTensorBias(torch.zeros(2, 2, 5, 5)), "LowerTriangularMaskWithTensorBias"),
        (lambda: _MyCausal(), "_MyCausal"),
    ],
    ids=["tensor", "tensor+causal", "subclass"],
)
def test_unsupported_bias_refused(bias_fn, match):
    q, k, v = _qkv(2, 5, 2, 8)
    with pytest.raises(ValueError, match=f"sparsek does not implement attn_bias of type .*{match}"):
        xops.memory_efficient_attention(q, k, v, bias_fn(), op=(sx.FwOp, None))


def test_dropout_output_dtype_partial_scale_refused():
    q, k, v = _qkv(2, 5, 2, 8)
    with pytest.raises(ValueError, match="dropout"):
        xops.memory_efficient_attention(q, k, v, p=0.1, op=(sx.FwOp, None))
    with pytest.raises(ValueError, match="Custom output dtype"):
        xops.memory_efficient_attention(q, k, v, output_dtype=torch.float64, op=(sx.FwOp, None))
    with pytest.raises(ValueError, match="Partial"):
        fmha.memory_efficient_attention_partial(q, k, v, op=sx.FwOp)
    for scale in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="positive finite"):
            xops.memory_efficient_attention(q, k, v, scale=scale, op=(sx.FwOp, None))
    with pytest.raises(ValueError, match="query.shape\\[-1\\] != value.shape\\[-1\\]"):
        xops.memory_efficient_attention(q, k, torch.randn(2, 5, 2, 4), op=(sx.FwOp, None))


def test_varlen_bias_shape_checks():
    bias = xab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([2, 3], 8, [5, 6], device=torch.device("cpu"))
    q = torch.randn(1, 4, 2, 8)  # 5 queries described, 4 given
    k = torch.randn(1, 16, 2, 8)
    with pytest.raises(ValueError, match="query.shape\\[1\\]=4 != 5 queries"):
        xops.memory_efficient_attention(q, k, k, bias, op=(sx.FwOp, None))
    with pytest.raises(ValueError, match="key.shape\\[1\\]=12 < 14 keys"):
        xops.memory_efficient_attention(torch.randn(1, 5, 2, 8), k[:, :12], k[:, :12], bias, op=(sx.FwOp, None))


def test_requires_grad_refused_with_clear_error():
    q, k, v = _qkv(2, 5, 2, 8)
    q.requires_grad_(True)
    with pytest.raises(ValueError, match="forward-only"):
        xops.memory_efficient_attention(q, k, v, xab.LowerTriangularMask(), op=(sx.FwOp, None))
    with pytest.raises(ValueError, match="forward-only"):
        xops.memory_efficient_attention(q, k, v, op=(sx.FwOp, sx.BwOp))
    with pytest.raises(NotImplementedError, match="forward-only"):
        sx.FwOp.apply(Inputs(q, k, v), needs_gradient=True)
    # the backward placeholder always explains itself
    q2, k2, v2 = _qkv(2, 5, 2, 8)
    out, lse = fmha.memory_efficient_attention_forward_requires_grad(q2, k2, v2, op=sx.FwOp)
    with pytest.raises(ValueError, match="no attention backward"):
        fmha.memory_efficient_attention_backward(torch.ones_like(out), out, lse, q2, k2, v2, op=sx.BwOp)
    with pytest.raises(NotImplementedError):
        sx.BwOp.apply(None, Inputs(q2, k2, v2), out)
