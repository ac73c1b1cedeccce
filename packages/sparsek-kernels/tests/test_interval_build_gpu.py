"""GPU tests of the interval-build kernel (``csrc/interval_build.cu``): ``torch.ops.sparsek.block_union_intervals``
on CUDA must return exactly what the PyTorch implementation (``sparsek.selection_intervals``) returns; so must the
key order, ranks and selectable prefix that ``csrc/key_order.cu`` computes for it."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch
from sparsek import sparse
from sparsek.reference import sparse as R
from sparsek.selection_intervals import block_union_intervals, key_order_and_ranks, selectable_prefix
from sparsek.testing import rel_error, tolerance

pytestmark = pytest.mark.gpu

DEV = "cuda"


def _scores(b, h, sk, kind, gen):
    s = torch.randn(b, h, sk, device=DEV, generator=gen)
    if kind in ("ties", "inf"):
        s = (s * 2).round()  # integers cast to float: many ties
    if kind in ("neginf", "inf"):
        s = s.masked_fill(torch.rand(b, h, sk, device=DEV, generator=gen) < 0.3, float("-inf"))
    if kind == "inf":
        s = s.masked_fill(torch.rand(b, h, sk, device=DEV, generator=gen) < 0.1, float("inf"))
    return s


def _assert_same(name, got, ref):
    """int32 tensors equal element for element; the failure names the first differing positions."""
    assert got.dtype == ref.dtype == torch.int32, name
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if not torch.equal(got, ref):
        bad = (got != ref).nonzero()[:5].tolist()
        pytest.fail(f"{name} differ at {bad}: kernel {[got[tuple(i)].item() for i in bad]}, "
                    f"torch {[ref[tuple(i)].item() for i in bad]}")  # fmt: skip


def _compare(scores, first, k, sq, off, bs):
    junk = [torch.full((first.shape[:3].numel() * (k + bs),), -77, dtype=torch.int32, device=DEV) for _ in range(3)]
    del junk  # outputs allocated next start with garbage: every element must be written
    got = torch.ops.sparsek.block_union_intervals(scores, first, k, sq, off, bs)
    torch.cuda.synchronize()
    ref = block_union_intervals(scores, first, k, sq, off, bs)  # the PyTorch implementation, same device
    for name, g, r in zip(("lists", "intervals", "counts"), got, ref):
        _assert_same(name, g, r)


_SIZES = [1, 100, 129, 1000, 4097]
_CASES = [
    (sk, k, bs)
    for sk, k, bs in itertools.product(_SIZES, (1, 5, 64, 300, 2048), (64, 128))
    if k <= sk
]  # fmt: skip


@pytest.mark.parametrize("sk,k,bs", _CASES)
@pytest.mark.parametrize("kind", ["plain", "ties", "neginf", "inf"])
def test_interval_build_matches_torch(sk, k, bs, kind):
    """Bit-identical lists, intervals and counts for random batch/head counts, query lengths and windows."""
    seed = zlib.crc32(f"{sk},{k},{bs},{kind}".encode())
    gen = torch.Generator(device=DEV).manual_seed(seed)
    cpu = torch.Generator().manual_seed(seed)
    for _ in range(3):
        b, h = (int(x) for x in torch.randint(1, 4, (2,), generator=cpu))
        sq = int(torch.randint(1, sk + 1, (1,), generator=cpu))
        window = (0, 0, 1, 17, 700)[int(torch.randint(0, 5, (1,), generator=cpu))]
        scores = _scores(b, h, sk, kind, gen)
        _, off, _ = R.select_limits(sq, sk, causal=True, window=window, block_size=None)
        nb = -(-sq // bs)
        first, _ = torch.ops.sparsek.topk_select(scores, k, nb, off, bs)
        _compare(scores, first, k, sq, off, bs)


@pytest.mark.parametrize("bs", [1, 2, 16, 64, 128, 256])
def test_interval_build_odd_inputs(bs):
    """Other block sizes, half-precision scores, first sets of another width than k, blocks without queries,
    repeated and out-of-order entries, and a large budget (k = 16384, the kernel's largest)."""
    gen = torch.Generator(device=DEV).manual_seed(bs)
    sk = 3001
    scores = _scores(2, 3, sk, "inf", gen)
    for sq, k, window in ((sk, 700, 0), (1000, 40, 9), (17, 5, 0)):
        _, off, _ = R.select_limits(sq, sk, causal=True, window=window, block_size=None)
        nb = -(-sq // bs)
        first, _ = torch.ops.sparsek.topk_select(scores, k, nb, off, bs)
        _compare(scores.half(), first, k, sq, off, bs)
        _compare(scores, first[..., : max(1, k // 2)].contiguous(), k, sq, off, bs)  # narrower than k
        _compare(scores, torch.nn.functional.pad(first, (0, 7), value=-1), k, sq, off, bs)  # wider than k
        _compare(scores, first.flip(-1).contiguous(), k, sq, off, bs)  # any order
        _compare(scores, first, k, max(0, sq - 3 * bs), off, bs)  # trailing blocks without queries
        rep = first.clone()
        rep[..., 1::3] = rep[..., 0:1]  # repeated entries (the kernel's sort path)
        _compare(scores, rep, k, sq, off, bs)
    big = _scores(1, 2, 40000, "ties", gen)
    first, _ = torch.ops.sparsek.topk_select(big, 16384, 3, 20000, bs)
    _compare(big, first, 16384, 3 * bs, 20000, bs)


def test_interval_build_target_shape():
    """The H100 target shape (B=1, H=16, Sk=32768, k=2048, 128-query blocks) and Sk = 131072."""
    gen = torch.Generator(device=DEV).manual_seed(0)
    for sk, h in ((32768, 16), (131072, 2)):
        scores = _scores(1, h, sk, "ties", gen)
        first, _ = torch.ops.sparsek.topk_select(scores, 2048, sk // 128, 1, 128)
        _compare(scores, first, 2048, sk, 1, 128)


def test_interval_build_rejects_bad_inputs():
    s = torch.randn(1, 2, 50, device=DEV)
    first = torch.zeros(1, 2, 1, 4, dtype=torch.int32, device=DEV)
    with pytest.raises(TypeError, match="first_sets"):
        torch.ops.sparsek.block_union_intervals(s, first.long(), 4, 10, 0, 64)
    with pytest.raises(ValueError, match="first_sets"):
        torch.ops.sparsek.block_union_intervals(s, first[:, :1], 4, 10, 0, 64)
    with pytest.raises(ValueError, match="first_sets"):
        torch.ops.sparsek.block_union_intervals(s, first.cpu(), 4, 10, 0, 64)
    with pytest.raises(ValueError, match="k must"):
        torch.ops.sparsek.block_union_intervals(s, first, 0, 10, 0, 64)
    with pytest.raises(ValueError, match="block_size"):
        torch.ops.sparsek.block_union_intervals(s, first, 4, 10, 0, 0)


def test_interval_build_abi_rejects_bad_modes():
    """sk_interval_build returns an error code (no launch) for an unknown sets_mode, and for the scan mode with a
    first-set width other than k."""
    scores = torch.randn(1, 2, 300, device=DEV)
    lib = sparse._sparse_lib(scores.device)
    buf, order, ranks, prefix = sparse._sorted_keys(lib, scores)
    lists, intervals, counts = sparse._per_query_alloc(scores, 8, 300, 128)
    for mode, sets in ((3, 8), (-1, 8), (sparse._SETS_SCAN, 9)):
        code = sparse._interval_build(
            lib, scores, order, ranks, prefix, None, sets, 8, 300, 1, 128, lists, intervals, counts, sets_mode=mode
        )
        assert code != 0, (mode, sets)
    code = sparse._interval_build(
        lib,
        scores,
        order,
        ranks,
        prefix,
        None,
        8,
        8,
        300,
        1,
        128,
        lists,
        intervals,
        counts,
        sets_mode=sparse._SETS_SCAN,
    )
    assert code == 0
    torch.cuda.synchronize()
    del buf


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("window", [0, 33])
def test_sparsek_attention_per_query_cuda_vs_cpu(d, window):
    """End to end: per-query SparseK attention (the interval path, block_size=None) on CUDA equals the CPU path and
    the reference (the per-query mask) within the bf16 tolerance."""
    gen = torch.Generator().manual_seed(d + window)
    b, sq, sk, hq, hk = 2, 777, 1500, 4, 2
    q, k, v = (torch.randn(b, s, hh, d, generator=gen).bfloat16() for s, hh in ((sq, hq), (sk, hk), (sk, hk)))
    u = (torch.randn(b, hk, sk, generator=gen) * 2).round()  # ties
    u[0, 0, ::5] = float("-inf")
    budget = 300
    out, lse = sparse.sparsek_attention(
        q.to(DEV), k.to(DEV), v.to(DEV), u.to(DEV), budget, window, block_size=None, return_lse=True
    )
    qf, kf, vf = q.float(), k.float(), v.float()
    cpu_out, cpu_lse = sparse.sparsek_attention(qf, kf, vf, u, budget, window, block_size=None, return_lse=True)
    ref_out, ref_lse = R.sparsek_attention_ref(qf, kf, vf, u, budget, window, return_lse=True)
    assert torch.allclose(cpu_out, ref_out, atol=1e-5)
    assert torch.isfinite(out).all()
    assert rel_error(out, cpu_out) <= tolerance(torch.bfloat16)
    lse = lse.cpu()
    fin = torch.isfinite(cpu_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    assert torch.allclose(lse[fin], cpu_lse[fin], atol=2e-3, rtol=1e-4)


# ---- key order, ranks and selectable prefix (csrc/key_order.cu) ---------------------------------------------------


def _order_scores(b, h, sk, kind, gen):
    s = torch.randn(b, h, sk, device=DEV, generator=gen)
    if kind != "plain":
        s = (s * 2).round()  # integers: many ties
    if kind == "zeros":  # -0.0 and +0.0 mixed (they tie)
        s = (s * 0.3).round()
        neg = torch.rand(b, h, sk, device=DEV, generator=gen) < 0.5
        s = torch.where((s == 0) & neg, torch.tensor(-0.0, device=DEV), s.abs().where(s == 0, s))
    if kind in ("inf", "neginf_rows"):
        s = s.masked_fill(torch.rand(b, h, sk, device=DEV, generator=gen) < 0.3, float("-inf"))
        s = s.masked_fill(torch.rand(b, h, sk, device=DEV, generator=gen) < 0.1, float("inf"))
    if kind == "neginf_rows":
        s[:, -1] = float("-inf")  # rows with -inf only
        s[0, 0, : sk // 2] = float("-inf")
    return s


def _compare_order(scores):
    order, ranks, prefix = sparse.key_order_cuda(scores)
    ref_order, ref_ranks = key_order_and_ranks(scores)
    ref_prefix = selectable_prefix(scores)
    for name, g, r in (
        ("order", order, ref_order.to(torch.int32)),
        ("ranks", ranks, ref_ranks),
        ("prefix", prefix, ref_prefix),
    ):
        _assert_same(f"{name} ({scores.dtype}, {tuple(scores.shape)})", g, r)


@pytest.mark.parametrize("sk", [1, 2, 1000, 4097, 131072])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["plain", "ties", "zeros", "inf", "neginf_rows"])
def test_key_order_matches_torch(sk, dtype, kind):
    """Order, ranks and prefix equal torch.sort's (descending, stable) and the PyTorch prefix count, exactly: ties,
    -0.0 with +0.0, +-inf, rows of -inf only, fp32/fp16/bf16 scores, B and H up to 3."""
    gen = torch.Generator(device=DEV).manual_seed(zlib.crc32(f"{sk},{dtype},{kind}".encode()))
    for b, h in ((1, 1), (3, 2), (2, 3)):
        _compare_order(_order_scores(b, h, sk, kind, gen).to(dtype))


def test_key_order_odd_inputs():
    """Strided and expanded scores, float64, Sk = 0, and rows long enough for several 4096-key chunks per CTA."""
    gen = torch.Generator(device=DEV).manual_seed(1)
    s = _order_scores(3, 3, 5000, "inf", gen)
    _compare_order(s.transpose(0, 1))  # batch/head strides swapped
    _compare_order(s[:, :, ::3])  # key stride 3
    _compare_order(s[:1, :1].expand(2, 3, -1))  # stride-0 batch and head
    _compare_order(s.double())
    _compare_order(s.double() * 1e-300)  # float64 values that become +-0.0 (and ties) in float32
    _compare_order(torch.empty(2, 1, 0, device=DEV))
    for dtype in (torch.float32, torch.bfloat16):
        _compare_order(_order_scores(1, 2, 1_100_000, "ties", gen).to(dtype))


def test_interval_build_no_sync_and_graph_replay():
    """The CUDA op makes no synchronizing call and replays from a CUDA graph."""
    gen = torch.Generator(device=DEV).manual_seed(5)
    sk, k, bs = 4097, 300, 128
    scores = _scores(1, 3, sk, "inf", gen).bfloat16()
    first, _ = torch.ops.sparsek.topk_select(scores.float(), k, -(-sk // bs), 1, bs)
    fn = lambda: torch.ops.sparsek.block_union_intervals(scores, first, k, sk, 1, bs)  # noqa: E731
    ref = block_union_intervals(scores, first, k, sk, 1, bs)
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        got = fn()
    for t in got:
        t.fill_(-5)
    g.replay()
    torch.cuda.synchronize()
    for g_, r in zip(got, ref):
        assert torch.equal(g_, r)


@pytest.mark.parametrize("kind", ["plain", "ties", "neginf", "inf"])
@pytest.mark.parametrize(("b", "h", "sk", "sq", "k", "bs"), [
    (1, 1, 1, 1, 1, 128), (2, 3, 1000, 1000, 5, 128), (1, 2, 4097, 4097, 300, 128), (3, 1, 4097, 2000, 2048, 128),
    (1, 2, 1000, 700, 64, 64), (2, 1, 129, 129, 129, 64), (1, 1, 32768, 32768, 2048, 128),
])  # fmt: skip
def test_per_query_block_lists_equal_the_two_step_ops(kind, b, h, sk, sq, k, bs):
    """The fused op (key order, then the interval kernel reading each block's first-query set off the order) returns
    exactly what the two-step path (the selection kernel's first-query sets, then the interval op) and the CPU
    implementation return."""
    gen = torch.Generator(device=DEV).manual_seed(zlib.crc32(f"pq{kind}{b}{h}{sk}{sq}{k}{bs}".encode()))
    scores = _scores(b, h, sk, kind, gen)
    _, off, _ = sparse.select_limits(sq, sk, causal=True, window=3, block_size=None)
    _check_per_query_lists(scores, k, sq, off, bs)


@pytest.mark.parametrize(("kind", "sk", "sq", "k", "off", "bs"), [
    ("plain", 5000, 5300, 700, -300, 128), ("ties", 4097, 4087, 2048, 10, 64), ("neginf", 3000, 300, 9, 0, 1),
    ("inf", 2000, 1500, 64, 700, 100),
])  # fmt: skip
def test_per_query_block_lists_odd_offsets(kind, sk, sq, k, off, bs):
    """Blocks whose first query sees no key (negative offset), prefixes shorter than k, one-query blocks and block
    sizes that are not a power of two: the fused op still equals the two-step path and the CPU implementation."""
    gen = torch.Generator(device=DEV).manual_seed(zlib.crc32(f"pqo{kind}{sk}{sq}{k}{off}{bs}".encode()))
    _check_per_query_lists(_scores(2, 2, sk, kind, gen), k, sq, off, bs)


def _check_per_query_lists(scores, k, sq, off, bs):
    sk = scores.shape[2]
    got = torch.ops.sparsek.per_query_block_lists(scores, k, sq, off, bs)
    nb = -(-sq // bs)
    first, _ = torch.ops.sparsek.topk_select(scores, k, nb, off, bs)
    two_step = torch.ops.sparsek.block_union_intervals(scores, first, k, sq, off, bs)
    for name, g, r in zip(("lists", "intervals", "counts"), got, two_step):
        _assert_same(name, g, r)
    if sk <= 4097:
        cpu = torch.ops.sparsek.per_query_block_lists(scores.cpu(), k, sq, off, bs)
        for name, g, r in zip(("lists", "intervals", "counts"), got, cpu):
            _assert_same(f"{name} (CPU)", g.cpu(), r)
