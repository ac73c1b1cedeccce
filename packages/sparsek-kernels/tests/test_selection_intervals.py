"""CPU tests of per-query SparseK selection written as per-block key lists with query intervals."""

from __future__ import annotations

import pytest
import torch
from sparsek import sparse
from sparsek.reference import sparse as R
from sparsek.selection_intervals import INTERVAL_SHIFT, block_union_intervals, key_ranks, union_width


def _per_query_mask(scores, k, sq, window):
    """Ground truth: the per-query selection of the reference, as a [B, H, Sq, Sk] mask."""
    sk = scores.shape[-1]
    rows, off, step = R.select_limits(sq, sk, causal=True, window=window, block_size=None)
    idx, _ = R.topk_rows_ref(scores, k, rows, off, step)
    mask = torch.zeros(*idx.shape[:3], sk + 1, dtype=torch.bool)
    mask.scatter_(-1, torch.where(idx >= 0, idx, sk).long(), True)
    return mask[..., :sk]


def _interval_mask(keys, iv, sq, sk, bs):
    """The (query, key) pairs the block lists and intervals describe; fails on a key listed twice in one block."""
    b, h, nb, n = keys.shape
    lo, hi = iv & ((1 << INTERVAL_SHIFT) - 1), iv >> INTERVAL_SHIFT
    t = torch.arange(bs).view(1, 1, 1, bs, 1)
    vis = (keys >= 0).unsqueeze(-2) & (t >= lo.unsqueeze(-2)) & (t < hi.unsqueeze(-2))
    valid = keys[keys >= 0]
    for bi in range(b):
        for hi_ in range(h):
            for m in range(nb):
                row = keys[bi, hi_, m]
                row = row[row >= 0]
                assert row.unique().numel() == row.numel(), "a key is listed twice in one block"
    mask = torch.zeros(b, h, nb, bs, sk + 1, dtype=torch.bool)
    mask.scatter_(-1, torch.where(vis, keys.long().unsqueeze(-2), sk), True)
    assert valid.numel() == 0 or int(valid.max()) < sk
    return mask[..., :sk].flatten(2, 3)[:, :, :sq]


@pytest.mark.parametrize("seed", range(24))
def test_block_intervals_reproduce_per_query_selection(seed):
    """Exact: for random sizes, budgets, windows and block sizes, with ties and -inf scores."""
    g = torch.Generator().manual_seed(seed)
    sk = int(torch.randint(1, 260, (1,), generator=g))
    sq = int(torch.randint(1, sk + 1, (1,), generator=g))
    k = int(torch.randint(1, sk + 1, (1,), generator=g)) if seed % 2 else int(torch.randint(1, min(sk, 12) + 1, (1,)))
    window = int(torch.randint(0, 30, (1,), generator=g)) if seed % 3 else 0
    bs = (1, 2, 8, 16, 64, 128)[seed % 6]
    scores = torch.randn(2, 2, sk, generator=g)
    if seed % 4 == 0:
        scores = (scores * 2).round()  # many ties
    if seed % 5 == 0:
        scores = scores.masked_fill(torch.rand(2, 2, sk, generator=g) < 0.3, float("-inf"))
    _, off, _ = R.select_limits(sq, sk, causal=True, window=window, block_size=None)
    nb = -(-sq // bs)
    first, _ = R.topk_rows_ref(scores, k, nb, off, bs)
    keys, iv, counts = block_union_intervals(scores, first, k, sq, off, bs)
    assert keys.shape[-1] == k + bs - 1 and torch.equal(counts, (keys >= 0).sum(-1, dtype=torch.int32))
    assert torch.equal(_interval_mask(keys, iv, sq, sk, bs), _per_query_mask(scores, k, sq, window))


def test_key_ranks_order():
    s = torch.tensor([[[1.0, 3.0, 3.0, float("-inf"), 2.0, float("-inf")]]])
    assert key_ranks(s).tolist() == [[[3, 0, 1, 4, 2, 5]]]


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("sq,sk", [(300, 300), (130, 333), (1, 50)])
def test_sparsek_attention_per_query_by_blocks(d, window, sq, sk):
    """sparsek_attention with per-key scores and per-query selection (the block-interval path) equals the
    reference, with GQA and the LSE."""
    q, k, v = (t for t in (torch.randn(2, sq, 4, d), torch.randn(2, sk, 2, d), torch.randn(2, sk, 2, d)))
    u = torch.randn(2, 2, sk)
    u[0, 0, ::7] = float("-inf")
    budget = min(20, sk)
    out, lse = sparse.sparsek_attention(q, k, v, u, budget, window, return_lse=True)
    ref, ref_lse = R.sparsek_attention_ref(q, k, v, u, budget, window, return_lse=True)
    assert torch.allclose(out, ref, atol=1e-5)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and torch.allclose(lse[finite], ref_lse[finite], atol=1e-5)


def test_interval_op_checks():
    q, k, v = (torch.randn(1, 20, 2, 64), torch.randn(1, 20, 1, 64), torch.randn(1, 20, 1, 64))
    lists = torch.tensor([[[[3, 7, -1]]]], dtype=torch.int32)
    ivs = torch.tensor([[[[5 | 20 << 16, 0 | 9 << 16, 0]]]], dtype=torch.int32)
    cnt = torch.tensor([[[2]]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.sparsek.interval_attn_fwd.default, (q, k, v, lists, ivs, cnt, 128, 0.125, 2, True))
    out = torch.ops.sparsek.interval_attn_fwd(q, k, v, lists, ivs, cnt, 128, 0.125, -1, False)[0]
    allowed = torch.zeros(1, 1, 20, 20, dtype=torch.bool)
    allowed[0, 0, 5:20, 3] = True
    allowed[0, 0, 7:9, 7] = True  # key 7 listed for queries 0-8, causal from query 7
    ref = R._attend(q, k, v, allowed, 0.125, False)
    assert torch.allclose(out, ref, atol=1e-6)


def test_block_intervals_in_chunks_equal_one_pass():
    g = torch.Generator().manual_seed(7)
    sk, sq, k, bs = 700, 650, 40, 16
    scores = torch.randn(2, 3, sk, generator=g)
    _, off, _ = R.select_limits(sq, sk, causal=True, window=9, block_size=None)
    first, _ = R.topk_rows_ref(scores, k, -(-sq // bs), off, bs)
    whole = block_union_intervals(scores, first, k, sq, off, bs)
    for limit in (1, 2 * 6 * bs * bs * 3):  # one block per chunk; three blocks per chunk
        chunked = block_union_intervals(scores, first, k, sq, off, bs, max_elements=limit)
        assert all(torch.equal(a, c) for a, c in zip(whole, chunked))


@pytest.mark.parametrize("sets_delta", [-3, 0, 5])
@pytest.mark.parametrize("bs", [1, 16, 64])
def test_block_union_intervals_op_cpu_and_width(sets_delta, bs):
    """torch.ops.sparsek.block_union_intervals on CPU is the PyTorch implementation; union_width is its list width
    (also for first sets narrower or wider than k); the fake implementation gives the same shapes."""
    g = torch.Generator().manual_seed(bs)
    sk, sq, k = 150, 120, 20
    scores = (torch.randn(2, 3, sk, generator=g) * 2).round()
    _, off, _ = R.select_limits(sq, sk, causal=True, window=0, block_size=None)
    nb = -(-sq // bs)
    first, _ = R.topk_rows_ref(scores, k, nb, off, bs)
    first = torch.nn.functional.pad(first, (0, sets_delta), value=-1) if sets_delta >= 0 else first[..., :sets_delta]
    ref = block_union_intervals(scores, first, k, sq, off, bs)
    got = torch.ops.sparsek.block_union_intervals(scores, first, k, sq, off, bs)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert ref[0].shape[-1] == union_width(first.shape[-1], k, bs)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.sparsek.block_union_intervals(
            mode.from_tensor(scores), mode.from_tensor(first), k, sq, off, bs
        )
    assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in ref]
    assert all(t.dtype == torch.int32 for t in fake)


def test_block_union_intervals_op_rejects_bad_inputs():
    s = torch.randn(1, 2, 50)
    first = torch.zeros(1, 2, 1, 4, dtype=torch.int32)
    op = torch.ops.sparsek.block_union_intervals
    with pytest.raises(TypeError, match="first_sets must be int32"):
        op(s, first.long(), 4, 10, 0, 64)
    with pytest.raises(ValueError, match="first_sets must be"):
        op(s, first[:, :1], 4, 10, 0, 64)
    with pytest.raises(ValueError, match="first_sets must hold"):
        op(s, first[..., :0], 4, 10, 0, 64)
    with pytest.raises(ValueError, match="scores must have 3"):
        op(s[0], first, 4, 10, 0, 64)
    with pytest.raises(TypeError, match="scores must be a floating-point"):
        op(s.long(), first, 4, 10, 0, 64)
    with pytest.raises(ValueError, match="k must be >= 1"):
        op(s, first, 0, 10, 0, 64)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        op(s, first, 4, 10, 0, 0)
    with pytest.raises(ValueError, match="seqlen_q must be >= 0"):
        op(s, first, 4, -1, 0, 64)
