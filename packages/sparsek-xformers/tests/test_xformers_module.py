"""SparseKAttention module tests (CPU)."""

from __future__ import annotations

import pytest
import sparsek_xformers as sx
import torch
from sparsek.testing import rel_error
from xf_cases import Case, reference
from xformers.ops.fmha import attn_bias as xab


def _expected(mod: sx.SparseKAttention, x: torch.Tensor, bias) -> torch.Tensor:
    b, m, _ = x.shape
    hq, hkv, d = mod.num_heads, mod.num_kv_heads, mod.head_dim
    q = mod.q_proj(x).view(b, m, hkv, hq // hkv, d)
    k = mod.k_proj(x).view(b, m, hkv, 1, d).expand(b, m, hkv, hq // hkv, d)
    v = mod.v_proj(x).view(b, m, hkv, 1, d).expand(b, m, hkv, hq // hkv, d)
    out = reference(Case(q, k, v, bias, mod.scale))[0].to(x.dtype).reshape(b, m, hq * d)
    return mod.out_proj(out) if mod.out_proj is not None else out


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("out_projection", [True, False])
def test_projected_self_attention(num_kv_heads, out_projection):
    torch.manual_seed(0)
    mod = sx.SparseKAttention(4, 32, num_kv_heads=num_kv_heads, out_projection=out_projection, scale=0.4)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        out = mod(x, attn_bias=xab.LowerTriangularMask())
        exp = _expected(mod, x, xab.LowerTriangularMask())
    assert out.shape == (2, 7, 32)
    assert rel_error(out, exp) < 1e-5


def test_projected_varlen_bias():
    torch.manual_seed(1)
    mod = sx.SparseKAttention(4, 32, num_kv_heads=2, bias=True)
    bias = xab.BlockDiagonalCausalMask.from_seqlens([3, 1, 9], device=torch.device("cpu"))
    x = torch.randn(1, 13, 32)
    with torch.inference_mode():
        out = mod(x, attn_bias=bias)
        exp = _expected(mod, x, bias)
    assert rel_error(out, exp) < 1e-5


def test_cross_attention_shapes():
    mod = sx.SparseKAttention(4, 32, num_kv_heads=2)
    with torch.no_grad():
        out = mod(torch.randn(2, 5, 32), torch.randn(2, 9, 32))
    assert out.shape == (2, 5, 32)


@pytest.mark.parametrize("hkv", [1, 3, 6])
def test_no_projection_mode(hkv):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 7, 6, 16, generator=g)
    k, v = (torch.randn(2, 9, hkv, 16, generator=g) for _ in range(2))
    mod = sx.SparseKAttention(6)
    assert mod.q_proj is None and len(list(mod.parameters())) == 0
    out = mod(q, k, v, attn_bias=xab.LowerTriangularFromBottomRightMask())
    rep = 6 // hkv
    k5 = k.unsqueeze(3).expand(2, 9, hkv, rep, 16)
    v5 = v.unsqueeze(3).expand(2, 9, hkv, rep, 16)
    exp = reference(Case(q.view(2, 7, hkv, rep, 16), k5, v5, xab.LowerTriangularFromBottomRightMask(), None))[0]
    assert out.shape == q.shape
    assert rel_error(out, exp.reshape(q.shape)) < 1e-5


def test_training_raises_clear_error():
    mod = sx.SparseKAttention(2, 16)
    with pytest.raises(ValueError, match="forward-only"):
        mod(torch.randn(1, 4, 16))


def test_bad_head_config():
    with pytest.raises(ValueError, match="divide"):
        sx.SparseKAttention(4, 32, num_kv_heads=3)
    with pytest.raises(ValueError, match="divisible"):
        sx.SparseKAttention(5, 32)
