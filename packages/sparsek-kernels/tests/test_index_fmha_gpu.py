"""GPU tests of the FMHA index-list mode (ops ``sparsek::index_attn_fwd`` / ``sparsek::block_attn_fwd``) against
the reference, with hand-made lists: unsorted entries, ``-1`` holes inside the counted part, empty lists, runs of
64/128/256 keys, bands, GQA and odd lengths. On Hopper, 128-query lists (runs of whole 128-key tiles) take the wgmma
kernel (TMA for runs and band, cp.async gathers for token lists); 64-query lists and 64-key runs take the portable
kernel, so both are covered on the same GPU."""

from __future__ import annotations

import math

import pytest
import torch
from sparsek import sparse  # noqa: F401  (registers the ops)
from sparsek.sparse import _block_attn_cpu, _index_attn_reference
from sparsek.testing import poison_, rel_error, tolerance

pytestmark = pytest.mark.gpu

DEV = "cuda"


def _lists(b, hk, sq, sk, ibq, n, wl, run, seed):
    """Random lists per (batch, kv head, query block): entries outside every band of the block, no repeats,
    unsorted, with -1 holes; every third block of a band-less problem gets an empty list."""
    gen = torch.Generator().manual_seed(seed)
    nblk = math.ceil(sq / ibq)
    lists = torch.full((b, hk, nblk, n), -1, dtype=torch.int32)
    counts = torch.zeros((b, hk, nblk), dtype=torch.int32)
    off = sk - sq
    for bi in range(b):
        for h in range(hk):
            for m in range(nblk):
                limit = sk if wl < 0 else max(0, m * ibq + off - wl)  # keys before the band of every query
                if wl < 0 and m % 3 == 2:
                    continue
                if run == 1:
                    cand = torch.randperm(limit, generator=gen)[: max(0, n - 2)].to(torch.int32)
                else:
                    n_runs = math.ceil(sk / run) if wl < 0 else limit // run  # runs wholly outside the band
                    cand = (torch.randperm(n_runs, generator=gen)[: max(0, n - 2)] * run).to(torch.int32)
                c = min(n, cand.numel() + 2) if cand.numel() else 0
                row = torch.full((c,), -1, dtype=torch.int32)
                if c:
                    slots = torch.randperm(c, generator=gen)[: cand.numel()]
                    row[slots] = cand
                lists[bi, h, m, :c] = row
                counts[bi, h, m] = c
    return lists.to(DEV), counts.to(DEV)


def _qkv(b, sq, sk, hq, hk, d, dtype, seed):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return tuple(
        torch.randn(b, s, h, d, device=DEV, dtype=dtype, generator=gen) for s, h in ((sq, hq), (sk, hk), (sk, hk))
    )


def _check(out, lse, ref_out, ref_lse, dtype):
    assert torch.isfinite(out).all(), "NaN/inf in the output"
    assert rel_error(out, ref_out) <= tolerance(dtype)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "empty rows must have LSE -inf"
    fin = torch.isfinite(ref_lse)
    assert torch.allclose(lse[fin], ref_lse[fin], atol=2e-3, rtol=1e-4)


GEOMETRY = [(1, 1000, 1000, 8, 4), (2, 77, 700, 4, 4), (1, 300, 2000, 2, 1)]  # b, sq, sk, hq, hk
WINDOWS = [(-1, -1), (-1, 0), (63, 0)]  # (window_left, window_right): non-causal, causal, band + causal


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("ibq", [64, 128])
@pytest.mark.parametrize("geom", GEOMETRY)
@pytest.mark.parametrize("wl,wr", WINDOWS)
def test_index_lists(dtype, d, ibq, geom, wl, wr):
    b, sq, sk, hq, hk = geom
    q, k, v = _qkv(b, sq, sk, hq, hk, d, dtype, seed=d + ibq)
    lists, counts = _lists(b, hk, sq, sk, ibq, 300, wl, 1, seed=sq + wl)
    scale = d**-0.5
    poison_(torch.empty(b * sq * hq * d, device=DEV, dtype=dtype))
    out, lse = torch.ops.sparsek.index_attn_fwd(q, k, v, lists, counts, ibq, scale, wl, wr, True)
    ref_out, ref_lse = _index_attn_reference(q.float(), k.float(), v.float(), lists, counts, ibq, scale, wl, wr, True)
    _check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("ibq,run", [(128, 128), (128, 256), (64, 128), (128, 64)])
@pytest.mark.parametrize("geom", GEOMETRY)
@pytest.mark.parametrize("wl,wr", WINDOWS)
def test_block_runs(dtype, d, ibq, run, geom, wl, wr):
    b, sq, sk, hq, hk = geom
    q, k, v = _qkv(b, sq, sk, hq, hk, d, dtype, seed=run + d)
    lists, counts = _lists(b, hk, sq, sk, ibq, 6, wl, run, seed=sk + run)
    scale = d**-0.5
    poison_(torch.empty(b * sq * hq * d, device=DEV, dtype=dtype))
    out, lse = torch.ops.sparsek.block_attn_fwd(q, k, v, lists, counts, ibq, run, scale, wl, wr, True)
    ref_out, ref_lse = _block_attn_cpu(q.float(), k.float(), v.float(), lists, counts, ibq, run, scale, wl, wr, True)
    _check(out, lse, ref_out, ref_lse, dtype)


def test_index_lists_long_and_graph_replay():
    """A 4096-token problem with 1024-entry lists (many gathered tiles per CTA), replayed from a CUDA graph."""
    b, sq, sk, hq, hk, d = 1, 4096, 4096, 4, 2, 128
    q, k, v = _qkv(b, sq, sk, hq, hk, d, torch.bfloat16, seed=7)
    lists, counts = _lists(b, hk, sq, sk, 128, 1024, 255, 1, seed=9)
    ref_out, ref_lse = _index_attn_reference(q.float(), k.float(), v.float(), lists, counts, 128, d**-0.5, 255, 0, True)
    fn = lambda: torch.ops.sparsek.index_attn_fwd(q, k, v, lists, counts, 128, d**-0.5, 255, 0, True)  # noqa: E731
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, lse = fn()
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    _check(out, lse, ref_out, ref_lse, torch.bfloat16)
