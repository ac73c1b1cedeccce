"""CPU tests of sparsek.sparse: SparseK operator, selection, references against dense attention, validation."""

from __future__ import annotations

import pytest
import sparsek
import torch
from sparsek import sparse
from sparsek.reference import attention_ref, masked_softmax_attention
from sparsek.reference import sparse as R

# --------------------------------------------------------------------------------------------------------------------
# Independent brute-force definitions (python loops) used as ground truth
# --------------------------------------------------------------------------------------------------------------------


def brute_candidates(sq, sk, i_or_block, *, causal, window, block_size):
    shift = sk - sq
    if not causal:
        return list(range(sk))
    if block_size is None:
        pos = i_or_block + shift
        hi = pos - window if window > 0 else pos
    else:
        p0 = i_or_block * block_size + shift
        hi = p0 - window if window > 0 else min(p0 + block_size - 1, sk - 1)
    return list(range(0, max(min(hi, sk - 1) + 1, 0)))


def brute_select(row_scores, cands, k):
    items = [(-float(row_scores[j]), j) for j in cands if float(row_scores[j]) != float("-inf")]
    items.sort()
    chosen = sorted(j for _, j in items[:k])
    return chosen + [-1] * (k - len(chosen))


def brute_mask(q_len, k_len, lists, *, window, causal, block_size):
    """Explicit [Sq, Sk] bool mask for one (batch, kv head) from python lists."""
    shift = k_len - q_len
    m = torch.zeros(q_len, k_len, dtype=torch.bool)
    for i in range(q_len):
        pos = i + shift
        row = i if block_size is None else i // block_size
        for j in lists[row]:
            if j < 0:
                continue
            if block_size is not None and window > 0 and j > row * block_size + shift - window:
                continue
            if causal and j > pos:
                continue
            m[i, j] = True
        if window > 0:
            for j in range(max(pos - window + 1, 0), pos + 1):
                if 0 <= j < k_len:
                    m[i, j] = True
    return m


def dense_with_mask(q, k, v, mask_kv, scale=None):
    """Dense attention ([B, S, H, D]) with a per-KV-head mask [B, Hkv, Sq, Sk]."""
    g = q.shape[2] // k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = masked_softmax_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask_kv.repeat_interleave(g, dim=1), scale
    )
    return out.transpose(1, 2), lse


def qkv(b, sq, sk, hq, hk, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, s, h, d, generator=gen, dtype=dtype) for s, h in ((sq, hq), (sk, hk), (sk, hk)))


# --------------------------------------------------------------------------------------------------------------------
# SparseK operator
# --------------------------------------------------------------------------------------------------------------------


def bisect_tau(z, k, iters=200):
    lo, hi = z.min().item() - 1.0, z.max().item()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if (z - mid).clamp(0, 1).sum().item() > k:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("n,k", [(1, 1), (7, 1), (7, 3), (33, 16), (64, 63), (64, 64), (200, 17)])
def test_sparsek_mask_values(n, k):
    z = torch.randn(6, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n + k)) * 3
    m = sparse.sparsek_mask(z, k)
    assert m.shape == z.shape and m.dtype == z.dtype
    assert torch.allclose(m.sum(-1), torch.full((6,), float(k), dtype=torch.float64), atol=1e-9)
    assert (m >= 0).all() and (m <= 1).all()
    for r in range(6):
        if n > k:
            tau = bisect_tau(z[r], k)
            assert torch.allclose(m[r], (z[r] - tau).clamp(0, 1), atol=1e-9)
    assert torch.equal(m, R.sparsek_mask_ref(z, k))


def test_sparsek_mask_ties_and_float32():
    z = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [2.0, 0.5, 0.5, 0.5, -3.0]])
    m = sparse.sparsek_mask(z, 2)
    assert torch.allclose(m.sum(-1), torch.full((2,), 2.0), atol=1e-6)
    assert torch.allclose(m[0, :4], torch.full((4,), 0.5), atol=1e-6) and m[0, 4] == 0
    assert m[1, 0] == 1 and torch.allclose(m[1, 1:4], torch.full((3,), 1 / 3), atol=1e-6)


def test_sparsek_mask_neg_inf_and_small_rows():
    z = torch.randn(3, 10, dtype=torch.float64)
    z[0, :8] = float("-inf")  # 2 finite entries <= k: both get 1
    z[1, 3] = float("-inf")
    m = sparse.sparsek_mask(z, 3)
    assert torch.equal(m[0], torch.tensor([0.0] * 8 + [1.0, 1.0], dtype=torch.float64))
    assert m[1, 3] == 0 and abs(m[1].sum().item() - 3) < 1e-9
    z.requires_grad_(True)
    sparse.sparsek_mask(z, 3).pow(2).sum().backward()
    assert torch.isfinite(z.grad).all() and (z.grad[0] == 0).all()


def test_sparsek_mask_gradcheck():
    gen = torch.Generator().manual_seed(3)
    z = (torch.randn(4, 23, dtype=torch.float64, generator=gen) * 2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sparse.sparsek_mask(x, 5), (z,))
    assert torch.autograd.gradcheck(lambda x: R.sparsek_mask_ref(x, 5), (z,))
    w = torch.randn(4, 23, dtype=torch.float64, generator=gen)
    (g1,) = torch.autograd.grad((sparse.sparsek_mask(z, 5) * w).sum(), z)
    (g2,) = torch.autograd.grad((R.sparsek_mask_ref(z, 5) * w).sum(), z)
    assert torch.allclose(g1, g2, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------------------------

SELECT_CASES = [
    # sq, sk, k, causal, window, block_size, per_query_scores
    (37, 37, 5, True, 0, None, False),
    (37, 37, 5, True, 4, None, False),
    (20, 45, 8, True, 3, None, False),
    (45, 45, 45, True, 0, None, False),
    (37, 37, 6, True, 0, 8, False),
    (70, 70, 9, True, 5, 16, False),
    (30, 50, 7, True, 2, 7, True),
    (33, 33, 4, True, 0, None, True),
    (33, 33, 4, True, 0, 5, True),
    (12, 40, 10, False, 0, None, False),
    (12, 40, 10, False, 0, 4, True),
]


@pytest.mark.parametrize("sq,sk,k,causal,window,bs,perq", SELECT_CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_select_matches_bruteforce(sq, sk, k, causal, window, bs, perq, ties):
    gen = torch.Generator().manual_seed(sq * 31 + sk + k)
    shape = (2, 2, sq, sk) if perq else (2, 2, sk)
    scores = torch.randn(shape, generator=gen)
    if ties:
        scores = scores.mul(2).round()  # many equal scores: ties go to the lower position
    scores.view(-1)[::7] = float("-inf")
    idx = sparse.sparsek_select(scores, k, causal=causal, window=window, block_size=bs, seqlen_q=sq)
    rows = sq if bs is None else -(-sq // bs)
    assert idx.dtype == torch.int32 and idx.shape == (2, 2, rows, k)
    for b in range(2):
        for h in range(2):
            for r in range(rows):
                cands = brute_candidates(sq, sk, r, causal=causal, window=window, block_size=bs)
                if perq and bs is not None:  # block score = max over the block's queries that see the key
                    qs = range(r * bs, min((r + 1) * bs, sq))
                    row = torch.stack(
                        [
                            scores[b, h, i].masked_fill(torch.arange(sk) > i + sk - sq, float("-inf"))
                            if causal
                            else scores[b, h, i]
                            for i in qs
                        ]
                    ).amax(0)
                else:
                    row = scores[b, h, r] if perq else scores[b, h]
                assert idx[b, h, r].tolist() == brute_select(row, cands, k), (b, h, r)
    assert torch.equal(idx, R.sparsek_select_ref(scores, k, causal=causal, window=window, block_size=bs, seqlen_q=sq))


def test_select_mask_values():
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(1, 2, 30, generator=gen, dtype=torch.float64)
    idx, mv = sparse.sparsek_select(u, 4, window=3, return_mask=True)
    assert mv.shape == idx.shape
    for h in range(2):
        for i in range(30):
            cands = brute_candidates(30, 30, i, causal=True, window=3, block_size=None)
            if not cands:
                assert (idx[0, h, i] == -1).all() and (mv[0, h, i] == 0).all()
                continue
            m = R.sparsek_mask_ref(u[0, h, cands].unsqueeze(0), 4)[0]
            for t, j in enumerate(idx[0, h, i].tolist()):
                want = 0.0 if j < 0 else m[j].item()
                assert abs(mv[0, h, i, t].item() - want) < 1e-6


# --------------------------------------------------------------------------------------------------------------------
# Attention references against dense attention with the explicit mask
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "sq,sk,hq,hk,n,window,causal,bs",
    [
        (17, 17, 2, 2, 5, 0, True, None),
        (17, 29, 4, 2, 6, 3, True, None),
        (40, 40, 4, 1, 7, 4, True, 8),
        (40, 40, 2, 2, 7, 0, True, 16),
        (9, 21, 2, 1, 4, 0, False, None),
        (130, 150, 2, 1, 9, 6, True, 64),
        (130, 130, 2, 2, 9, 0, True, 128),
    ],
)
def test_topk_attention_matches_dense_mask(dtype, sq, sk, hq, hk, n, window, causal, bs):
    q, k, v = qkv(2, sq, sk, hq, hk, 16, dtype, seed=sq + n)
    rows = sq if bs is None else -(-sq // bs)
    gen = torch.Generator().manual_seed(n)
    idx = torch.stack([torch.randperm(sk, generator=gen)[:n] for _ in range(2 * hk * rows)]).view(2, hk, rows, n)
    idx = idx.to(torch.int32)
    idx[..., -1] = -1
    out, lse = sparse.topk_attention(q, k, v, idx, window=window, causal=causal, block_size=bs, return_lse=True)
    mask = torch.stack(
        [
            torch.stack(
                [brute_mask(sq, sk, idx[b, h].tolist(), window=window, causal=causal, block_size=bs) for h in range(hk)]
            )
            for b in range(2)
        ]
    )
    ref_out, ref_lse = dense_with_mask(q, k, v, mask)
    assert torch.allclose(out, ref_out, atol=1e-6 if dtype == torch.float32 else 1e-12)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert torch.allclose(lse[fin], ref_lse[fin], atol=1e-5)
    empty = ~mask.any(-1).repeat_interleave(hq // hk, dim=1)  # [B, Hq, Sq]
    assert (out.transpose(1, 2)[empty] == 0).all() and torch.isneginf(lse[empty]).all()


def test_full_budget_equals_dense_causal():
    q, k, v = qkv(1, 50, 50, 4, 2, 16)
    u = torch.randn(1, 2, 50)
    out = sparse.sparsek_attention(q, k, v, u, 50, 0)
    assert torch.allclose(out, attention_ref(q, k, v, causal=True), atol=1e-6)
    out_w = sparse.sparsek_attention(q, k, v, u, 50, 8)
    assert torch.allclose(out_w, attention_ref(q, k, v, causal=True), atol=1e-6)
    out_b = sparse.sparsek_attention(q, k, v, u, 50, 0, block_size=8)
    assert torch.allclose(out_b, attention_ref(q, k, v, causal=True), atol=1e-6)


def test_window_only_equals_sliding_window():
    q, k, v = qkv(1, 40, 60, 2, 1, 16)
    idx = torch.full((1, 1, 40, 3), -1, dtype=torch.int32)
    out = sparse.topk_attention(q, k, v, idx, window=7)
    assert torch.allclose(out, attention_ref(q, k, v, causal=True, window=(6, 0)), atol=1e-6)


def test_sparsek_attention_matches_composition():
    q, k, v = qkv(2, 64, 64, 4, 2, 16, seed=9)
    u = torch.randn(2, 2, 64)
    for bs in (None, 16, 64):
        out = sparse.sparsek_attention(q, k, v, u, 6, 4, block_size=bs)
        idx = R.sparsek_select_ref(u, 6, window=4, block_size=bs, seqlen_q=64)
        assert torch.equal(out, R.topk_attention_ref(q, k, v, idx, window=4, block_size=bs))
        assert torch.equal(out, R.sparsek_attention_ref(q, k, v, u, 6, 4, block_size=bs))


@pytest.mark.parametrize("sq,sk,window,bs", [(100, 300, 20, 64), (130, 260, 37, 128), (200, 200, 70, 64)])
def test_sparsek_attention_own_lists_skip_the_band_filter(sq, sk, window, bs):
    """sparsek_attention hands its block-shared selection to the FMHA path without filtering it against the band (the
    selection never holds band keys): exact against the reference layer, bottom-right aligned queries included."""
    q, k, v = qkv(1, sq, sk, 4, 2, 16, seed=sq + bs)
    u = torch.randn(1, 2, sk)
    out = sparse.sparsek_attention(q, k, v, u, 30, window, block_size=bs)
    assert torch.equal(out, R.sparsek_attention_ref(q, k, v, u, 30, window, block_size=bs))
    idx = sparse.sparsek_select(u, 30, window=window, block_size=bs, seqlen_q=sq)
    assert torch.equal(out, sparse.topk_attention(q, k, v, idx, window=window, block_size=bs))


@pytest.mark.parametrize("qb,kb", [(128, 128), (256, 128), (128, 256), (64, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_runs_path_padding_anywhere(qb, kb, causal):
    """Block sizes that are multiples of 64 take the run path (lists sorted with padding last, query blocks re-blocked
    to kernel tiles): -1 entries in the middle of a list, num_blocks cut-offs and a ragged last block."""
    sq, sk = 600, 700
    q, k, v = qkv(1, sq, sk, 4, 2, 16, seed=qb + kb)
    nqb, nkb = -(-sq // qb), -(-sk // kb)
    g = torch.Generator().manual_seed(qb * 7 + kb)
    lists = torch.stack([torch.randperm(nkb, generator=g)[:3] for _ in range(2 * nqb)]).view(1, 2, nqb, 3)
    lists = lists.to(torch.int32)
    lists[..., 1] = torch.where(torch.arange(nqb) % 2 == 0, -1, lists[..., 1])  # padding before a valid entry
    nb = torch.randint(1, 4, (1, 2, nqb), generator=g, dtype=torch.int32)
    out = sparse.block_sparse_attention(q, k, v, lists, (qb, kb), num_blocks=nb, causal=causal)
    ref = R.block_sparse_attention_ref(q, k, v, lists, (qb, kb), num_blocks=nb, causal=causal)
    assert torch.allclose(out, ref, atol=1e-6)


def test_block_sparse_attention_tensor_and_blockmask():
    from torch.nn.attention.flex_attention import create_block_mask

    sq = sk = 300
    q, k, v = qkv(1, sq, sk, 4, 2, 16, seed=4)

    def mm(b, h, qi, kvi):
        return (qi >= kvi) & (((qi // 128) - (kvi // 128)) % 2 == 0)

    bm = create_block_mask(mm, 1, 1, sq, sk, device="cpu", BLOCK_SIZE=128)
    dense_blocks = bm.to_dense()[0, 0].bool()  # [nqb, nkb], full or partial
    tok = dense_blocks.repeat_interleave(128, 0).repeat_interleave(128, 1)[:sq, :sk]
    causal = torch.ones(sq, sk, dtype=torch.bool).tril()
    ref, _ = dense_with_mask(q, k, v, (tok & causal).expand(1, 2, -1, -1))
    out = sparse.block_sparse_attention(q, k, v, bm, causal=True)
    assert torch.allclose(out, ref, atol=1e-6)
    ref_nc, _ = dense_with_mask(q, k, v, tok.expand(1, 2, -1, -1))
    assert torch.allclose(sparse.block_sparse_attention(q, k, v, bm, causal=False), ref_nc, atol=1e-6)
    # tensor form with kv_num_blocks and odd block sizes (gather path), per query head lists (GQA expand)
    blocks = torch.tensor([[[[2, 0, 5], [1, -1, 3], [0, 4, 2], [3, 1, 0], [4, 3, 2]]]], dtype=torch.int32)
    blocks = blocks.expand(1, 4, -1, -1).contiguous()
    nb = torch.tensor([[[2, 3, 1, 3, 2]]], dtype=torch.int32).expand(1, 4, -1).contiguous()
    q2, k2, v2 = qkv(1, 70, 90, 4, 2, 16, seed=1)
    out2 = sparse.block_sparse_attention(q2, k2, v2, blocks, (16, 15), num_blocks=nb)
    m = R.block_mask_from_indices(blocks, nb, 70, 90, 16, 15)
    k3, v3 = k2.repeat_interleave(2, dim=2), v2.repeat_interleave(2, dim=2)
    ref2, _ = dense_with_mask(q2, k3, v3, m)
    assert torch.allclose(out2, ref2, atol=1e-6)
    assert torch.allclose(out2, R.block_sparse_attention_ref(q2, k2, v2, blocks, (16, 15), num_blocks=nb), atol=1e-6)


@pytest.mark.parametrize(
    "qb,kb,hm", [(128, 128, 1), (128, 128, 2), (256, 128, 4), (64, 64, 2), (128, 48, 2), (16, 15, 4), (16, 15, 1)]
)
def test_block_sparse_layout_matches_the_direct_call(qb, kb, hm):
    """A layout prepared once gives the same output as passing the lists to every call (runs, token-list and
    per-query paths; lists per batch or broadcast, per KV head, per query head or shared), for fresh q/k/v each time,
    and does not follow later changes of the source lists."""
    sq, sk, hq, hk = 300, 700, 4, 2
    nqb, nkb = -(-sq // qb), -(-sk // kb)
    g = torch.Generator().manual_seed(qb + kb + hm)
    lists = torch.stack([torch.randperm(nkb, generator=g)[:4] for _ in range(hm * nqb)]).view(1, hm, nqb, 4)
    lists = lists.to(torch.int32)
    lists[..., 2] = -1
    nb = torch.randint(1, 5, (2, hm, nqb), generator=g, dtype=torch.int32)
    layout = sparse.block_sparse_layout(lists, (qb, kb), seqlen_q=sq, seqlen_k=sk, num_blocks=nb)
    assert layout.path == ("runs" if kb % 64 == 0 and qb % 64 == 0 else "tokens" if qb % 64 == 0 else "per-query")
    assert layout.block_lists.shape[0] == 2  # num_blocks per batch entry broadcasts the shared lists
    source = lists.clone()
    for seed in range(2):
        q, k, v = qkv(2, sq, sk, hq, hk, 16, seed=seed)
        for causal in (False, True):
            direct, lse = sparse.block_sparse_attention(
                q, k, v, source, (qb, kb), num_blocks=nb, causal=causal, return_lse=True
            )
            out, lse2 = sparse.block_sparse_attention(q, k, v, layout, causal=causal, return_lse=True)
            assert torch.equal(out, direct) and torch.equal(lse2, lse)
            ref = R.block_sparse_attention_ref(q, k, v, source, (qb, kb), num_blocks=nb, causal=causal)
            assert torch.allclose(out, ref, atol=1e-6)
        lists.fill_(0)  # the layout keeps its own copy


def test_block_sparse_layout_from_blockmask_and_head_dim_256():
    from torch.nn.attention.flex_attention import create_block_mask

    sq = sk = 300
    bm = create_block_mask(lambda b, h, qi, kvi: qi >= kvi, 1, 1, sq, sk, device="cpu", BLOCK_SIZE=128)
    layout = sparse.block_sparse_layout(bm)  # sizes and lengths from the BlockMask
    assert (layout.q_block, layout.kv_block, layout.seqlen_q, layout.seqlen_k) == (128, 128, sq, sk)
    assert layout.kernel_block_q == 128
    for d in (16, 256):  # head dim 256 re-blocks the layout's lists to 64-query tiles on the fly
        q, k, v = qkv(1, sq, sk, 4, 2, d, seed=d)
        out = sparse.block_sparse_attention(q, k, v, layout, causal=True)
        assert torch.equal(out, sparse.block_sparse_attention(q, k, v, bm, causal=True))
        assert torch.allclose(out, attention_ref(q, k, v, causal=True), atol=1e-5)


def test_block_sparse_layout_errors():
    lists = torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    layout = sparse.block_sparse_layout(lists, 8, seqlen_q=16, seqlen_k=16)
    q, k, v = qkv(1, 16, 16, 2, 1, 16)
    with pytest.raises(ValueError, match="seqlen_q and seqlen_k are required"):
        sparse.block_sparse_layout(lists, 8)
    with pytest.raises(ValueError, match=r"block_indices.shape\[2\] must be 3"):
        sparse.block_sparse_layout(lists, 8, seqlen_q=17, seqlen_k=16)
    with pytest.raises(ValueError, match=r"values must lie in \[-1, 1\)"):
        sparse.block_sparse_layout(lists + 1, 8, seqlen_q=16, seqlen_k=8)
    with pytest.raises(ValueError, match="layout for seqlen_q=16, seqlen_k=16"):
        sparse.block_sparse_attention(q[:, :8], k, v, layout)
    with pytest.raises(ValueError, match="must not be given with a BlockSparseLayout"):
        sparse.block_sparse_attention(q, k, v, layout, 8)
    with pytest.raises(ValueError, match=r"block_indices.shape\[1\] must be one of"):
        sparse.block_sparse_attention(
            q, k, v, sparse.block_sparse_layout(lists.expand(1, 3, 2, 1), 8, seqlen_q=16, seqlen_k=16)
        )
    with pytest.raises(TypeError, match="BlockSparseLayout"):
        sparse.block_sparse_attention(q, k, v, [[0]], 8)


def test_opcheck_custom_ops():
    q, k, v = qkv(1, 20, 20, 2, 1, 16)
    u = torch.randn(1, 1, 20)
    idx = torch.randint(0, 20, (1, 1, 20, 3), dtype=torch.int32)
    torch.library.opcheck(torch.ops.sparsek.topk_select.default, (u, 4, 20, 1, 1))
    torch.library.opcheck(torch.ops.sparsek.topk_attn_fwd.default, (q, k, v, idx, 0.25, 3, True, True))
    cnt = torch.full((1, 1, 1), 3, dtype=torch.int32)
    torch.library.opcheck(torch.ops.sparsek.index_attn_fwd.default, (q, k, v, idx[:, :, :1], cnt, 64, 0.25, 2, 0, True))


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------


def test_validation_errors():
    q, k, v = qkv(1, 16, 16, 2, 1, 16)
    u = torch.randn(1, 1, 16)
    good = torch.zeros(1, 1, 16, 2, dtype=torch.int32)
    good[..., 1] = -1
    with pytest.raises(ValueError, match="k must be <= 16"):
        sparse.sparsek_select(u, 17)
    with pytest.raises(ValueError, match="k must be >= 1"):
        sparse.sparsek_select(u, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        sparse.sparsek_select(u, 2.0)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        sparse.sparsek_select(u, 2, block_size=0)
    with pytest.raises(ValueError, match="window=3 needs causal=True"):
        sparse.sparsek_select(u, 2, causal=False, window=3)
    with pytest.raises(ValueError, match="window must be >= 0"):
        sparse.topk_attention(q, k, v, good, window=-1)
    with pytest.raises(ValueError, match="scores must be"):
        sparse.sparsek_select(torch.randn(16), 2)
    nan_u = u.clone()
    nan_u[0, 0, 5] = float("nan")
    with pytest.raises(ValueError, match="scores contain NaN"):
        sparse.sparsek_select(nan_u, 2)
    with pytest.raises(ValueError, match="scores contain NaN"):
        sparse.sparsek_attention(q, k, v, nan_u, 2, 4)
    assert sparse.sparsek_select(nan_u, 2, validate=False).shape == (1, 1, 16, 2)  # unchecked: no error
    with pytest.raises(TypeError, match="indices must be int32"):
        sparse.topk_attention(q, k, v, good.long())
    with pytest.raises(ValueError, match=r"indices values must lie in \[-1, 16\)"):
        sparse.topk_attention(q, k, v, good + 16)
    with pytest.raises(ValueError, match=r"indices values must lie"):
        sparse.topk_attention(q, k, v, good - 2)
    with pytest.raises(ValueError, match="must not repeat"):
        sparse.topk_attention(q, k, v, torch.zeros(1, 1, 16, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"indices.shape\[2\] must be 16"):
        sparse.topk_attention(q, k, v, good[:, :, :8])
    with pytest.raises(ValueError, match=r"indices.shape\[2\] must be 2"):
        sparse.topk_attention(q, k, v, good, block_size=8)
    with pytest.raises(ValueError, match=r"indices.shape\[1\]"):
        sparse.topk_attention(q, k, v, good.expand(1, 2, -1, -1))
    with pytest.raises(ValueError, match="k_budget|k must be <= 16"):
        sparse.sparsek_attention(q, k, v, u, 17, 0)
    with pytest.raises(ValueError, match="scores must have shape"):
        sparse.sparsek_attention(q, k, v, torch.randn(1, 2, 16), 2, 0)
    with pytest.raises(ValueError, match="block_size is required"):
        sparse.block_sparse_attention(q, k, v, good)
    with pytest.raises(ValueError, match=r"block_indices values must lie in \[-1, 2\)"):
        sparse.block_sparse_attention(q, k, v, torch.full((1, 1, 2, 1), 2, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="block_size must be an int or"):
        sparse.block_sparse_attention(q, k, v, good, (8, 8, 8))
    with pytest.raises(TypeError, match="num_blocks must be int32"):
        sparse.block_sparse_attention(q, k, v, good[:, :, :2], 8, num_blocks=torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="k must be <= 4"):
        sparse.sparsek_mask(torch.randn(3, 4), 5)


def test_public_names():
    for name in (
        "sparsek_select",
        "sparsek_mask",
        "topk_attention",
        "block_sparse_attention",
        "block_sparse_layout",
        "sparsek_attention",
    ):
        assert callable(getattr(sparse, name))
    assert hasattr(sparsek.reference, "topk_attention_ref")


def test_block_sparse_layout_under_torch_compile():
    q, k, v = qkv(1, 256, 256, 4, 2, 64, seed=3)
    lists = torch.tensor([[[[0, 1], [1, -1]]]], dtype=torch.int32)
    layout = sparse.block_sparse_layout(lists, 128, seqlen_q=256, seqlen_k=256)
    f = torch.compile(lambda a, b, c, lay: sparse.block_sparse_attention(a, b, c, lay, causal=True), fullgraph=True)
    assert torch.equal(f(q, k, v, layout), sparse.block_sparse_attention(q, k, v, lists, 128, causal=True))
