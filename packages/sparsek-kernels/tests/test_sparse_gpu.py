"""GPU tests of sparsek.sparse: selection kernel, per-query gather kernel and FMHA index-list path vs references."""

from __future__ import annotations

import pytest
import torch
from sparsek import sparse
from sparsek.reference import sparse as R
from sparsek.testing import poison_, rel_error, tolerance

pytestmark = pytest.mark.gpu

DEV = "cuda"


def _poison_cache(*shapes_dtypes) -> None:
    """Fill freed blocks of the caching allocator with NaN, so outputs allocated next start poisoned."""
    bufs = [poison_(torch.empty(s, dtype=d, device=DEV)) for s, d in shapes_dtypes]
    del bufs


def _qkv(b, sq, sk, hq, hk, d, dtype, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return tuple(
        torch.randn(b, s, h, d, device=DEV, dtype=dtype, generator=gen) for s, h in ((sq, hq), (sk, hk), (sk, hk))
    )


def _check(out, lse, ref_out, ref_lse, dtype):
    assert torch.isfinite(out).all(), "NaN/inf in the output"
    assert rel_error(out, ref_out) <= tolerance(dtype)
    ref_lse = ref_lse.to(lse.device)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert torch.allclose(lse[fin], ref_lse[fin], atol=2e-3, rtol=1e-4)
    assert not torch.isnan(lse).any()


# --------------------------------------------------------------------------------------------------------------------
# Selection kernel: exact agreement with the sort-based reference
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sq,sk,k,window,bs,perq",
    [
        (1000, 1000, 1, 0, None, False),
        (1000, 1000, 64, 16, None, False),
        (777, 3001, 300, 0, None, False),
        (4096, 4096, 2048, 512, None, False),
        (4096, 4096, 2048, 512, 64, False),
        (4096, 4096, 1024, 0, 128, False),
        (33000, 33000, 2048, 512, 128, False),
        (300, 5000, 1000, 0, None, True),
        (513, 513, 40, 8, 64, True),
        (2000, 20000, 8192, 0, 64, False),  # k + step beyond the 8192-entry pool: per-row global path
    ],
)
@pytest.mark.parametrize("ties", [False, True])
def test_select_kernel_exact(sq, sk, k, window, bs, perq, ties):
    gen = torch.Generator(device=DEV).manual_seed(sk + k)
    shape = (2, 3, sq, sk) if perq else (2, 3, sk)
    scores = torch.randn(shape, device=DEV, generator=gen)
    if ties:
        scores = scores.mul(4).round()
    scores.view(-1)[::11] = float("-inf")
    _poison_cache(((2 * 3 * max(sq, 1) * k,), torch.float32))
    idx = sparse.sparsek_select(scores, k, window=window, block_size=bs, seqlen_q=sq)
    ref = R.sparsek_select_ref(scores.cpu(), k, window=window, block_size=bs, seqlen_q=sq)
    assert torch.equal(idx.cpu(), ref)


@pytest.mark.parametrize(
    "kind,shape,k,window,bs",
    [
        ("zeros", (2, 2, 3001), 300, 0, 64),  # one bin through every radix pass: ties by position only
        ("signed_zeros", (1, 4, 32768), 2048, 512, 128),  # -0.0 and +0.0 tie
        ("misaligned", (1, 2, 5001), 2048, 512, 128),  # score rows not 16-byte aligned
        ("misaligned", (1, 2, 7, 3003), 100, 0, None),
        ("few", (1, 2, 300), 250, 0, 64),  # early prefixes shorter than k
        ("long", (1, 1, 70000), 4000, 0, 128),  # chunks of many rows answered by different warps
        ("perq_long", (1, 2, 9000), 2048, 16, None),  # one row per query: 64 rows per pool
    ],
)
def test_select_kernel_exact_edge_cases(kind, shape, k, window, bs):
    gen = torch.Generator(device=DEV).manual_seed(len(kind) + k)
    full = (*shape[:-1], shape[-1] + 1) if kind == "misaligned" else shape
    scores = torch.randn(full, device=DEV, generator=gen)
    if kind == "misaligned":
        scores = scores[..., 1:]
    elif kind == "zeros":
        scores = torch.zeros_like(scores)
    elif kind == "signed_zeros":
        scores = torch.where(scores.mul(2).round() >= 0, 0.0, -0.0)
    sk = shape[-1]
    sq = shape[2] if len(shape) == 4 else sk
    _poison_cache(((2 * 4 * max(sq, 1) * k,), torch.float32))
    idx = sparse.sparsek_select(scores, k, window=window, block_size=bs, seqlen_q=sq)
    ref = R.sparsek_select_ref(scores.cpu(), k, window=window, block_size=bs, seqlen_q=sq)
    assert torch.equal(idx.cpu(), ref)


def test_select_noncausal_and_bf16_scores():
    u = torch.randn(1, 2, 5000, device=DEV).bfloat16()
    idx = sparse.sparsek_select(u, 100, causal=False, seqlen_q=37)
    assert torch.equal(idx.cpu(), R.sparsek_select_ref(u.cpu(), 100, causal=False, seqlen_q=37))


# --------------------------------------------------------------------------------------------------------------------
# Per-query gather kernel
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize(
    "b,sq,sk,hq,hk,n,window",
    [
        (1, 257, 257, 4, 4, 16, 0),
        (2, 129, 1000, 8, 2, 100, 32),
        (1, 333, 333, 16, 1, 64, 7),
        (1, 100, 100, 32, 2, 33, 5),  # group 16: one 16-head chunk
        (1, 64, 64, 48, 1, 20, 3),  # group 48: three 16-head chunks
        (1, 1, 4096, 8, 8, 2048, 512),  # decode-like
    ],
)
def test_topk_attention_kernel(dtype, d, b, sq, sk, hq, hk, n, window):
    q, k, v = _qkv(b, sq, sk, hq, hk, d, dtype, seed=sq + n)
    gen = torch.Generator(device=DEV).manual_seed(n)
    idx = torch.rand(b, hk, sq, sk, device=DEV, generator=gen).argsort(-1)[..., :n].int().sort(-1).values
    idx[..., ::5] = -1
    _poison_cache(((b * sq * hq * d,), dtype), ((b * hq * sq,), torch.float32))
    out, lse = sparse.topk_attention(q, k, v, idx, window=window, return_lse=True)
    ref_out, ref_lse = R.topk_attention_ref(q.float(), k.float(), v.float(), idx, window=window, return_lse=True)
    _check(out, lse, ref_out, ref_lse, dtype)


def test_topk_attention_all_masked_rows():
    q, k, v = _qkv(1, 70, 70, 4, 2, 128, torch.bfloat16)
    idx = torch.full((1, 2, 70, 8), -1, dtype=torch.int32, device=DEV)
    idx[:, :, ::2, 0] = 69  # listed in the future of most queries: masked by causality
    _poison_cache(((70 * 4 * 128,), torch.bfloat16), ((4 * 70,), torch.float32))
    out, lse = sparse.topk_attention(q, k, v, idx, return_lse=True)
    assert (out[:, :69] == 0).all() and torch.isneginf(lse[..., :69]).all()
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    out_nc = sparse.topk_attention(q, k, v, idx, causal=False)
    ref = R.topk_attention_ref(q.float(), k.float(), v.float(), idx, causal=False)
    assert rel_error(out_nc, ref) <= tolerance(torch.bfloat16)


def test_topk_attention_duplicates_in_band_count_once():
    q, k, v = _qkv(1, 50, 50, 2, 1, 64, torch.float16)
    idx = torch.arange(50, device=DEV, dtype=torch.int32).view(1, 1, 50, 1).repeat(1, 1, 1, 3)
    idx[..., 1] = (idx[..., 1] - 1).clamp_min(-1)
    idx[..., 2] = -1
    out = sparse.topk_attention(q, k, v, idx, window=4, validate=False)
    ref = R.topk_attention_ref(q.float(), k.float(), v.float(), idx, window=4)
    assert rel_error(out, ref) <= tolerance(torch.float16)


# --------------------------------------------------------------------------------------------------------------------
# Block-shared lists (FMHA index-list mode) and block-sparse attention
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bs", [64, 128, 256, 32])
@pytest.mark.parametrize("sq,sk,hq,hk,budget,window", [(1000, 1000, 8, 2, 200, 64), (513, 700, 4, 4, 64, 0)])
def test_block_shared_sparsek_attention(dtype, bs, sq, sk, hq, hk, budget, window):
    q, k, v = _qkv(1, sq, sk, hq, hk, 128, dtype, seed=bs)
    u = torch.randn(1, hk, sk, device=DEV)
    _poison_cache(((sq * hq * 128,), dtype), ((hq * sq,), torch.float32))
    out, lse = sparse.sparsek_attention(q, k, v, u, budget, window, block_size=bs, return_lse=True)
    ref_out, ref_lse = R.sparsek_attention_ref(
        q.float(), k.float(), v.float(), u, budget, window, block_size=bs, return_lse=True
    )
    _check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize(
    "sq,sk,hq,hk,budget,window", [(1000, 1000, 8, 2, 200, 64), (513, 700, 4, 4, 64, 0), (1, 300, 2, 1, 17, 3)]
)
def test_per_query_sparsek_attention_by_block_intervals(dtype, d, sq, sk, hq, hk, budget, window):
    """Per-query selection with per-key scores runs as block lists with query intervals (FMHA index-list kernel)."""
    q, k, v = _qkv(1, sq, sk, hq, hk, d, dtype, seed=sq + d)
    u = torch.randn(1, hk, sk, device=DEV)
    u[:, :, ::11] = float("-inf")
    _poison_cache(((sq * hq * d,), dtype), ((hq * sq,), torch.float32))
    out, lse = sparse.sparsek_attention(q, k, v, u, budget, window, return_lse=True)
    ref_out, ref_lse = R.sparsek_attention_ref(q.float(), k.float(), v.float(), u, budget, window, return_lse=True)
    _check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block", [64, 128])
def test_block_sparse_blockmask(causal, block):
    from torch.nn.attention.flex_attention import create_block_mask

    sq = sk = 1000

    def mm(b, h, qi, kvi):
        return ((qi // block) * 7 + (kvi // block) * 3) % 4 != 1

    bm = create_block_mask(mm, 1, 4, sq, sk, device=DEV, BLOCK_SIZE=block)
    q, k, v = _qkv(1, sq, sk, 8, 4, 128, torch.bfloat16)
    _poison_cache(((sq * 8 * 128,), torch.bfloat16))
    out, lse = sparse.block_sparse_attention(q, k, v, bm, causal=causal, return_lse=True)
    lists, bsz = sparse._blockmask_lists(bm)
    ref_out, ref_lse = R.block_sparse_attention_ref(
        q.float(), k.float(), v.float(), lists, bsz, causal=causal, return_lse=True
    )
    _check(out, lse, ref_out, ref_lse, torch.bfloat16)


@pytest.mark.parametrize("qb,kb,hm", [(128, 128, 1), (128, 128, 4), (256, 128, 8), (128, 48, 4), (32, 32, 4)])
def test_block_sparse_layout_equals_the_direct_call(qb, kb, hm):
    """A prepared layout runs the same kernel on the same lists as the direct call (runs, token lists, gather), also
    inside a CUDA graph."""
    sq, sk, hq, hk = 700, 900, 8, 4
    nqb, nkb = -(-sq // qb), -(-sk // kb)
    gen = torch.Generator(device=DEV).manual_seed(qb + kb + hm)
    lists = torch.rand(1, hm, nqb, nkb, device=DEV, generator=gen).argsort(-1)[..., :5].to(torch.int32)
    nb = torch.randint(1, 6, (2, hm, nqb), device=DEV, dtype=torch.int32, generator=gen)
    q, k, v = _qkv(2, sq, sk, hq, hk, 128, torch.bfloat16, seed=hm)
    layout = sparse.block_sparse_layout(lists, (qb, kb), seqlen_q=sq, seqlen_k=sk, num_blocks=nb)
    for causal in (False, True):
        direct = sparse.block_sparse_attention(q, k, v, lists, (qb, kb), num_blocks=nb, causal=causal)
        out = sparse.block_sparse_attention(q, k, v, layout, causal=causal)
        assert torch.equal(out, direct)
    ref = R.block_sparse_attention_ref(q.float(), k.float(), v.float(), lists, (qb, kb), num_blocks=nb, causal=True)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        sparse.block_sparse_attention(q, k, v, layout, causal=True)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        graphed = sparse.block_sparse_attention(q, k, v, layout, causal=True)
    g.replay()
    torch.cuda.synchronize()
    assert rel_error(graphed, ref) <= tolerance(torch.bfloat16)


def test_sparsek_attention_torch_compile():
    q, k, v = _qkv(1, 512, 512, 4, 2, 64, torch.bfloat16)
    u = torch.randn(1, 2, 512, device=DEV)
    fn = torch.compile(lambda q, k, v, u: sparse.sparsek_attention(q, k, v, u, 64, 32), fullgraph=True)
    out = fn(q, k, v, u)
    ref = R.sparsek_attention_ref(q.float(), k.float(), v.float(), u, 64, 32)
    assert rel_error(out, ref) <= tolerance(torch.bfloat16)
