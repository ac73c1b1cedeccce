"""CPU: the references against PyTorch SDPA with explicit masks, in float64."""

from __future__ import annotations

import pytest
import sparsek
import torch
import torch.nn.functional as F
from sparsek.reference import attention_ref, band_mask, varlen_attention_ref
from sparsek.testing import rel_error


def _sdpa(q, k, v, mask, scale=None):
    """SDPA in [B, H, S, D] with GQA expanded and a boolean mask; rows with no key give 0."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if mask is not None:
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return torch.nan_to_num(out)


@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (5, 33), (33, 5), (64, 100)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, (4, 0), (3, 2), (-1, 5)])
def test_attention_ref_matches_sdpa(sq, sk, causal, window):
    torch.manual_seed(0)
    q = torch.randn(2, 4, sq, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, sk, 16, dtype=torch.float64), torch.randn(2, 2, sk, 16, dtype=torch.float64)
    out, lse = attention_ref(q, k, v, causal=causal, window=window, layout="bhsd", return_lse=True)
    left, right = sparsek._validation.normalize_window(window, causal)
    mask = band_mask(sq, sk, left, right)
    ref = _sdpa(q, k, v, mask)
    assert rel_error(out, ref) < 1e-12
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 16**-0.5
    ref_lse = torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1)
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5)


def test_band_mask_bottom_right_causal():
    m = band_mask(2, 4, -1, 0)
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_public_api_cpu_runs_reference_in_both_layouts():
    q = torch.randn(2, 9, 4, 32, dtype=torch.bfloat16)
    k = torch.randn(2, 11, 2, 32, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = sparsek.attention(q, k, v, causal=True, scale=0.3)
    ref = _sdpa(*(t.transpose(1, 2).double() for t in (q, k, v)), band_mask(9, 11, -1, 0), scale=0.3)
    assert rel_error(out.transpose(1, 2), ref) < 1e-2
    out2 = sparsek.attention(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, scale=0.3, layout="bhsd")
    assert torch.equal(out2, out.transpose(1, 2))


def test_varlen_matches_per_sequence_with_empty_sequences():
    lens_q, lens_k = [3, 0, 7, 1], [5, 2, 7, 0]
    cu_q = torch.tensor([0, 3, 3, 10, 11], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 7, 14, 14], dtype=torch.int32)
    q = torch.randn(sum(lens_q), 4, 8, dtype=torch.float64)
    k, v = torch.randn(sum(lens_k), 2, 8, dtype=torch.float64), torch.randn(sum(lens_k), 2, 8, dtype=torch.float64)
    out, lse = sparsek.varlen_attention(q, k, v, cu_q, cu_k, 7, 7, causal=True, return_lse=True)
    assert lse.shape == (4, 11)
    for b in range(4):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if q1 == q0:
            continue
        ref = attention_ref(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal=True)[0]
        assert torch.allclose(out[q0:q1], ref)
    assert (out[10] == 0).all() and torch.isinf(lse[:, 10]).all()  # sequence with no keys
    direct = varlen_attention_ref(q, k, v, cu_q, cu_k, causal=True)
    assert torch.equal(direct, out)
