"""CPU: bad input raises a clear exception naming the argument."""

from __future__ import annotations

import pytest
import sparsek
import torch


def qkv(b=1, s=8, h=4, d=16, hk=None, dtype=torch.float32):
    hk = hk or h
    return (
        torch.randn(b, s, h, d, dtype=dtype),
        torch.randn(b, s, hk, d, dtype=dtype),
        torch.randn(b, s, hk, d, dtype=dtype),
    )


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dimensions"),
        (lambda q, k, v: (q, k.half(), v), ValueError, "same dtype"),
        (lambda q, k, v: (q, k, v[..., :8]), ValueError, "v must have the same head dim"),
        (lambda q, k, v: (q, k[..., :8], v), ValueError, "q and k must have the same head dim"),
        (lambda q, k, v: (q, k[:, :, :3], v[:, :, :3]), ValueError, "divisible"),
        (lambda q, k, v: (q, k[:, :, :2], v), ValueError, "k and v must have the same number of heads"),
        (lambda q, k, v: (q, k, v[:, :5]), ValueError, "same sequence length"),
        (lambda q, k, v: (q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v), ValueError, "contiguous last"),
        (lambda q, k, v: ([1], k, v), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "floating point"),
        (lambda q, k, v: (q, k.expand(2, -1, -1, -1), v), ValueError, "batch size"),
    ],
)
def test_attention_bad_inputs(mutate, exc, match):
    with pytest.raises(exc, match=match):
        sparsek.attention(*mutate(*qkv()))


def test_bad_keywords():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="layout"):
        sparsek.attention(q, k, v, layout="sbhd")
    with pytest.raises(ValueError, match="window"):
        sparsek.attention(q, k, v, window=(1, 2, 3))
    with pytest.raises(ValueError, match="window entries"):
        sparsek.attention(q, k, v, window=(-5, 0))
    with pytest.raises(ValueError, match="scale"):
        sparsek.attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="scale"):
        sparsek.attention(q, k, v, scale=float("nan"))


def _varlen_args():
    q = torch.randn(10, 4, 16)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    return q, q.clone(), q.clone(), cu, cu.clone(), 7, 7


@pytest.mark.parametrize(
    "index,value,exc,match",
    [
        (3, torch.tensor([0, 3, 10]), TypeError, "cu_seqlens_q must be int32"),
        (
            4,
            torch.tensor([0, 5, 3, 10], dtype=torch.int32),
            ValueError,
            "cu_seqlens_q and cu_seqlens_k must have the same length",
        ),
        (3, torch.tensor([0, 8, 3], dtype=torch.int32), ValueError, "non-decreasing"),
        (3, torch.tensor([1, 3, 10], dtype=torch.int32), ValueError, "must start at 0"),
        (4, torch.tensor([0, 3, 9], dtype=torch.int32), ValueError, r"cu_seqlens_k\[-1\] must equal"),
        (5, 4, ValueError, "max_seqlen_q/max_seqlen_k"),
        (6, -1, ValueError, "max_seqlen_k must be >= 0"),
        (3, torch.tensor([[0, 3, 10]], dtype=torch.int32), ValueError, "cu_seqlens_q must have 1 dimensions"),
    ],
)
def test_varlen_bad_inputs(index, value, exc, match):
    args = list(_varlen_args())
    args[index] = value
    with pytest.raises(exc, match=match):
        sparsek.varlen_attention(*args)


def test_varlen_requires_3d():
    q = torch.randn(1, 10, 4, 16)
    cu = torch.tensor([0, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        sparsek.varlen_attention(q, q, q, cu, cu, 10, 10)


def test_varlen_validate_false_trusts_cu_seqlens():
    """Same result without the host check; the bad-value cases above all come from the checked default."""
    args = _varlen_args()
    assert torch.equal(sparsek.varlen_attention(*args), sparsek.varlen_attention(*args, validate=False))
    bad = list(args)
    bad[5] = 4  # max_seqlen_q smaller than a sequence: only the host check can tell
    with pytest.raises(ValueError, match="max_seqlen_q/max_seqlen_k"):
        sparsek.varlen_attention(*bad)
    empty = list(args)
    empty[3] = empty[4] = torch.zeros(0, dtype=torch.int32)  # form checks run without the host copy too
    with pytest.raises(ValueError, match="cu_seqlens_q must have at least one element"):
        sparsek.varlen_attention(*empty, validate=False)
