"""GPU tests of the dense FMHA kernel against the float32 reference (run on an H100 via `nox -s "gpu(arch='sm90')"`)."""

from __future__ import annotations

import pytest
import sparsek
import torch
from sparsek.reference import attention_ref, varlen_attention_ref
from sparsek.testing import rel_error, tolerance

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _rand(*shape, dtype):
    return torch.randn(*shape, device=DEV, dtype=dtype)


def _assert_matches_reference(q, k, v, *, causal=False, window=None):
    """Output and LSE against the float32 reference; rows that see no key give zero output and a -inf LSE."""
    out, lse = sparsek.attention(q, k, v, causal=causal, window=window, return_lse=True)
    ref, ref_lse = attention_ref(q.float(), k.float(), v.float(), causal=causal, window=window, return_lse=True)
    assert rel_error(out, ref) < tolerance(q.dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite] - ref_lse[finite]).abs().max().item() < 1e-2
    sq, sk = q.shape[1], k.shape[1]
    if causal and sq > sk:
        assert out[:, : sq - sk].abs().max().item() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "sq,sk", [(1, 1), (17, 17), (128, 128), (300, 300), (1, 1000), (77, 513), (513, 77), (1000, 4097)]
)
def test_dense_matches_reference(dtype, d, causal, sq, sk):
    torch.manual_seed(sq * 7 + sk)
    q, k, v = _rand(2, sq, 4, d, dtype=dtype), _rand(2, sk, 4, d, dtype=dtype), _rand(2, sk, 4, d, dtype=dtype)
    _assert_matches_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sk,window", [(1600, None), (999, None), (1600, (100, 50))])
def test_many_tiles_head_dim_64(dtype, sk, window):
    """Many equal-cost query tiles (the persistent grid on Hopper); SPARSEK_SM90_D64_CONSUMERS=3 runs them on 192-row tiles."""
    torch.manual_seed(sk)
    b, sq, h, d = 2, 1600, 32, 64
    q, k, v = _rand(b, sq, h, d, dtype=dtype), _rand(b, sk, h, d, dtype=dtype), _rand(b, sk, h, d, dtype=dtype)
    _assert_matches_reference(q, k, v, window=window)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "b,sq,h,sk,d,causal,window",
    [
        (1, 512, 8, 2048, 64, False, None),  # 32 query blocks, 16 key tiles: 4 CTAs per block
        (1, 1, 32, 8191, 128, False, None),  # decode-like: one query row, 64 key tiles
        (1, 3, 4, 5000, 64, True, None),  # bottom-right causal, few rows: 8 CTAs per block
        (2, 1000, 2, 1000, 128, True, None),  # causal: the first query blocks' keys fit in one split, the rest is empty
        (1, 700, 3, 3000, 64, False, (100, 50)),  # sliding window: most splits of a block see no key
        (1, 3000, 2, 1100, 64, True, None),  # more queries than keys: the first 1900 rows see no key at all
    ],
)
def test_split_kv_small_grids(dtype, b, sq, h, sk, d, causal, window):
    """Grids under half a wave split each query block's keys over a cluster of CTAs on Hopper (SPARSEK_SM90_SPLITS)."""
    torch.manual_seed(sq + sk)
    q, k, v = _rand(b, sq, h, d, dtype=dtype), _rand(b, sk, h, d, dtype=dtype), _rand(b, sk, h, d, dtype=dtype)
    _assert_matches_reference(q, k, v, causal=causal, window=window)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "b,sq,hq,hk,sk,d",
    [
        (1, 4096, 5, 5, 4096, 64),  # 160 query blocks on 132 SMs: 132 in the persistent launch, 28 split-KV
        (1, 4000, 5, 5, 3999, 128),  # the last query block holds 32 rows, the last key tile 31 keys
        (2, 2100, 9, 3, 2500, 64),  # GQA; 306 blocks: two whole rounds and a tail of 42
        (1, 4096, 4, 2, 4096, 128),  # 128 blocks: under one round, no tail launch
    ],
)
def test_persistent_tail_split(dtype, b, sq, hq, hk, sk, d):
    """A persistent launch's partial last round runs as a second, split-KV launch on Hopper (SPARSEK_SM90_TAIL_SPLIT).

    The comments give the split on a 132-SM GPU; outputs and LSE must match the reference either way.
    """
    torch.manual_seed(sq + sk + hq)
    q = _rand(b, sq, hq, d, dtype=dtype)
    k, v = _rand(b, sk, hk, d, dtype=dtype), _rand(b, sk, hk, d, dtype=dtype)
    _assert_matches_reference(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "b,sq,h,sk,d,causal,window",
    [
        (1, 512, 8, 512, 64, False, None),  # the latency shape: 64 blocks of 64 rows, one 256-key tile per warpgroup
        (1, 512, 8, 512, 64, True, None),
        (1, 1, 8, 512, 64, False, None),  # one query row
        (1, 9, 3, 512, 64, False, None),  # half rows: the second half-block holds one query (row 8)
        (2, 70, 2, 300, 128, True, None),  # half rows: the last block's second half starts past its 6 rows
        (1, 130, 5, 383, 64, True, None),  # three 128-key tiles, the last one key short (not the 256-key kernel)
        (1, 896, 4, 896, 128, False, None),  # 7 key tiles: 4 for the first warpgroup, 3 for the second
        (1, 200, 4, 130, 128, True, None),  # the second warpgroup's only tile holds 2 keys; first rows see none
        (2, 100, 3, 257, 64, False, (10, 0)),  # sliding window: the second warpgroup's tiles are masked for most rows
    ],
)
def test_split_keys_small_grids(dtype, b, sq, h, sk, d, causal, window):
    """Small grids on Hopper: two warpgroups take alternate key tiles of a 64-row block (SPARSEK_SM90_SPLIT_KEYS).

    Grids under half a wave take each block as two CTAs of 32 rows (SPARSEK_SM90_HALF_ROWS); these shapes do.
    """
    torch.manual_seed(sq + sk + h)
    q, k, v = _rand(b, sq, h, d, dtype=dtype), _rand(b, sk, h, d, dtype=dtype), _rand(b, sk, h, d, dtype=dtype)
    _assert_matches_reference(q, k, v, causal=causal, window=window)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hk", [(8, 1), (8, 2), (6, 3)])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_gqa_layouts(dtype, hq, hk, layout):
    b, s, d = 2, 333, 128
    shape = (lambda h: (b, s, h, d)) if layout == "bshd" else (lambda h: (b, h, s, d))
    q, k, v = _rand(*shape(hq), dtype=dtype), _rand(*shape(hk), dtype=dtype), _rand(*shape(hk), dtype=dtype)
    out = sparsek.attention(q, k, v, causal=True, layout=layout)
    ref = attention_ref(q.float(), k.float(), v.float(), causal=True, layout=layout)
    assert out.shape == q.shape
    assert rel_error(out, ref) < tolerance(dtype)


@pytest.mark.parametrize("window,causal", [((32, 0), True), ((100, 50), False), ((0, 0), False), ((-1, 7), False)])
@pytest.mark.parametrize("d", [64, 128])
def test_sliding_window(window, causal, d):
    dtype = torch.bfloat16
    q, k, v = _rand(1, 517, 8, d, dtype=dtype), _rand(1, 600, 8, d, dtype=dtype), _rand(1, 600, 8, d, dtype=dtype)
    out = sparsek.attention(q, k, v, causal=causal, window=window)
    ref = attention_ref(q.float(), k.float(), v.float(), causal=causal, window=window)
    assert rel_error(out, ref) < tolerance(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_varlen_odd_lengths(dtype, causal, d):
    lens_q = [1, 17, 0, 1000, 4097, 5]
    lens_k = [1, 17, 3, 1000, 4097, 300]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    q = _rand(sum(lens_q), 8, d, dtype=dtype)
    k, v = _rand(sum(lens_k), 2, d, dtype=dtype), _rand(sum(lens_k), 2, d, dtype=dtype)
    out, lse = sparsek.varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, return_lse=True)
    ref, ref_lse = varlen_attention_ref(q.float(), k.float(), v.float(), cu_q, cu_k, causal=causal, return_lse=True)
    assert rel_error(out, ref) < tolerance(dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite] - ref_lse[finite]).abs().max().item() < 1e-2


def test_every_output_written():
    """Poisoned output buffers: the op allocates fresh memory, so fill the caching allocator with NaN first."""
    junk = torch.full((64 << 20,), float("nan"), device=DEV, dtype=torch.float16)
    del junk
    q = _rand(3, 255, 4, 64, dtype=torch.float16)
    out = sparsek.attention(q, q, q, causal=True)
    assert torch.isfinite(out).all()


def test_torch_compile_fullgraph():
    q, k, v = (_rand(2, 200, 4, 128, dtype=torch.bfloat16) for _ in range(3))
    f = torch.compile(lambda a, b, c: sparsek.attention(a, b, c, causal=True) * 2, fullgraph=True)
    ref = attention_ref(q.float(), k.float(), v.float(), causal=True) * 2
    assert rel_error(f(q, k, v), ref) < tolerance(torch.bfloat16)


def test_cuda_graph_capture_and_stream():
    q, k, v = (_rand(1, 512, 8, 64, dtype=torch.float16) for _ in range(3))
    sparsek.attention(q, k, v)  # build + warm up
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = sparsek.attention(q, k, v, causal=True)
    for _ in range(2):
        q.copy_(torch.randn_like(q))
        g.replay()
        torch.cuda.synchronize()
        assert rel_error(out, attention_ref(q.float(), k.float(), v.float(), causal=True)) < tolerance(torch.float16)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        out2 = sparsek.attention(q, k, v)
    side.synchronize()
    assert rel_error(out2, attention_ref(q.float(), k.float(), v.float())) < tolerance(torch.float16)


@pytest.mark.parametrize("shape", [(1, 512, 8, 64), (2, 2048, 16, 128), (1, 128, 16, 128), (1, 4096, 2, 128)])
def test_back_to_back_dependent_calls(shape):
    """Each call reads what the kernel just before it wrote (programmatic dependent launch must wait for it): a chain
    of attention calls, elementwise ops in between, eager and replayed from a CUDA graph, and a large write of the
    inputs right before the first call. 1,4096,2,128 is a small grid with long keys (split-KV clusters)."""
    torch.manual_seed(shape[1])
    q, k, v = (_rand(*shape, dtype=torch.bfloat16) for _ in range(3))

    def chain():
        x = q
        outs = []
        for i in range(4):
            x = sparsek.attention(x, k, v, causal=i % 2 == 1)
            outs.append(x)
            if i == 1:
                x = x * 3.0  # a torch kernel between two of ours
        return outs

    def reference():
        x, outs = q.float(), []
        for i in range(4):
            x = attention_ref(x.to(q.dtype).float(), k.float(), v.float(), causal=i % 2 == 1)
            outs.append(x)
            if i == 1:
                x = (x.to(q.dtype) * 3.0).float()
        return outs

    for out, ref in zip(chain(), reference()):
        assert rel_error(out, ref) < 2 * tolerance(q.dtype)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        q.copy_(k.flip(1))  # the first attention call depends on this copy
        outs = chain()
    for _ in range(3):
        k.normal_()
        g.replay()
        torch.cuda.synchronize()
        for out, ref in zip(outs, reference()):
            assert rel_error(out, ref) < 2 * tolerance(q.dtype)


def test_unsupported_head_dim_raises():
    q = _rand(1, 8, 2, 40, dtype=torch.float16)
    with pytest.raises(ValueError, match="head dim 40"):
        sparsek.attention(q, q, q)


def test_fp32_rejected_on_gpu():
    q = torch.randn(1, 8, 2, 64, device=DEV)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        sparsek.attention(q, q, q)


def test_eager_fast_path_matches_the_op():
    """Plain eager calls skip the dispatcher; the result is bit-identical to the registered op's."""
    import importlib

    attn_mod = importlib.import_module("sparsek.attention")
    q, k, v = (torch.randn(2, 300, 4, 64, device=DEV, dtype=torch.float16) for _ in range(3))
    assert attn_mod._eager_cuda(q, k, v)
    assert not attn_mod._eager_cuda(q.requires_grad_(False), k, v.clone().requires_grad_(True))
    out, lse = sparsek.attention(q, k, v, causal=True, return_lse=True)
    ref_out, ref_lse = torch.ops.sparsek.fmha_fwd(q, k, v, None, None, 300, 300, 64**-0.5, -1, 0, True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_repeated_calls_reuse_the_launch_plan(dtype):
    """Eager calls after the first with the same shapes and options run from its cached plan: fresh inputs, views
    with other strides and the bhsd layout must each give their own correct result."""
    from sparsek import _dense_plans

    _dense_plans.clear()
    for _ in range(3):
        _assert_matches_reference(*(_rand(2, 203, 4, 64, dtype=dtype) for _ in range(3)), causal=True)
    base = _rand(2, 4, 203, 64, dtype=dtype)  # [B, H, S, D] storage: a bshd view with other strides, then bhsd
    _assert_matches_reference(base.transpose(1, 2), base.transpose(1, 2), base.transpose(1, 2), causal=True)
    for _ in range(2):
        q, k, v = (_rand(2, 4, 203, 64, dtype=dtype) for _ in range(3))
        out = sparsek.attention(q, k, v, layout="bhsd", window=(31, 7))
        ref = attention_ref(*(t.transpose(1, 2).float() for t in (q, k, v)), window=(31, 7)).transpose(1, 2)
        assert out.shape == q.shape and rel_error(out, ref) < tolerance(dtype)
    assert len(_dense_plans._plans) == 3


def test_compiled_fast_path_runs_planned_calls():
    """Planned eager calls run through the compiled fast path (built on the first CUDA call): its results on fresh
    inputs over NaN-filled memory, with GQA, the bhsd layout and the LSE, on a side stream and captured in a CUDA
    graph, against the reference."""
    import os

    from sparsek import _dense_plans

    if os.environ.get("SPARSEK_EAGER_FASTPATH") == "0":
        pytest.skip("SPARSEK_EAGER_FASTPATH=0")
    sparsek.attention(*(_rand(1, 8, 2, 64, dtype=torch.float16) for _ in range(3)))
    fast = _dense_plans.compiled_call
    assert fast is not None, _dense_plans.compiled_status
    _dense_plans.clear()
    cases = [
        ((2, 203, 8, 64), (2, 203, 2, 64), "bshd", dict(causal=True, scale=None, window=None, return_lse=False)),
        ((1, 4, 77, 128), (1, 4, 300, 128), "bhsd", dict(causal=False, scale=0.1, window=(40, 3), return_lse=True)),
        ((1, 512, 8, 64), (1, 512, 8, 64), "bshd", dict(causal=False, scale=None, window=None, return_lse=True)),
    ]
    for shape_q, shape_kv, layout, opts in cases:
        dtype = torch.bfloat16 if shape_q[-1] == 128 else torch.float16
        sparsek.attention(*(_rand(*s, dtype=dtype) for s in (shape_q, shape_kv, shape_kv)), layout=layout, **opts)
        for _ in range(2):
            junk = torch.full((16 << 20,), float("nan"), device=DEV, dtype=torch.float16)
            del junk
            q, k, v = _rand(*shape_q, dtype=dtype), _rand(*shape_kv, dtype=dtype), _rand(*shape_kv, dtype=dtype)
            args = (q, k, v, opts["causal"], opts["scale"], opts["window"], layout, opts["return_lse"])
            result = fast(*args)
            assert result is not None
            out, lse = result if opts["return_lse"] else (result, None)
            bshd = [t.transpose(1, 2) if layout == "bhsd" else t for t in (q, k, v)]
            ref, ref_lse = attention_ref(
                *(t.float() for t in bshd), causal=opts["causal"], scale=opts["scale"], window=opts["window"],
                return_lse=True,
            )  # fmt: skip
            got = out.transpose(1, 2) if layout == "bhsd" else out
            assert out.shape == q.shape and rel_error(got, ref) < tolerance(dtype)
            if lse is not None:
                assert (lse - ref_lse).abs().max().item() < 1e-2
    q, k, v = (_rand(1, 512, 8, 64, dtype=torch.float16) for _ in range(3))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out, _ = fast(q, k, v, False, None, None, "bshd", True)
    side.synchronize()
    assert rel_error(out, attention_ref(q.float(), k.float(), v.float())) < tolerance(torch.float16)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = fast(q, k, v, False, None, None, "bshd", True)
    assert captured is not None
    for _ in range(2):
        q.copy_(torch.randn_like(q))
        g.replay()
        torch.cuda.synchronize()
        assert rel_error(captured[0], attention_ref(q.float(), k.float(), v.float())) < tolerance(torch.float16)


def test_dispatch_mode_sees_eager_calls():
    """A call that would take the eager shortcut (and, planned, the compiled fast path) runs through the registered
    op under a TorchDispatchMode, so the mode sees it, and the result is the kernel's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = (_rand(1, 300, 4, 64, dtype=torch.float16) for _ in range(3))
    for _ in range(2):
        sparsek.attention(q, k, v, causal=True)  # planned outside the mode
    with Record():
        out = sparsek.attention(q, k, v, causal=True)
    assert seen.count("sparsek.fmha_fwd.default") == 1
    ref = attention_ref(q.float(), k.float(), v.float(), causal=True)
    assert rel_error(out, ref) < tolerance(torch.float16)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_device_that_is_not_current():
    """Every kernel family runs on cuda:1 while cuda:0 is current (layers spread over GPUs in one process)."""
    from sparsek.reference.paged import paged_decode_ref, reshape_and_cache_ref

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    q, k, v = (torch.randn(2, 300, 4, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
    for causal in (False, True, True):  # the repeated call runs from its plan (the compiled path declines it)
        out = sparsek.attention(q, k, v, causal=causal)
        assert out.device == dev
        assert rel_error(out, attention_ref(q.float(), k.float(), v.float(), causal=causal)) < tolerance(q.dtype)
    idx = torch.rand(2, 4, 300, 300, device=dev).argsort(-1)[..., :16].to(torch.int32)  # distinct keys per list
    out = sparsek.topk_attention(q, k, v, idx)
    ref = sparsek.topk_attention(q.cpu().float(), k.cpu().float(), v.cpu().float(), idx.cpu())
    assert rel_error(out.cpu(), ref) < tolerance(q.dtype)
    kc = torch.zeros(8, 16, 4, 128, device=dev, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(128, device=dev)[:100]
    kn, vn = (torch.randn(100, 4, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
    sparsek.reshape_and_cache(kn, vn, kc, vc, slots)
    kr, vr = torch.zeros_like(kc), torch.zeros_like(vc)
    reshape_and_cache_ref(kn, vn, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    qd = torch.randn(2, 4, 128, device=dev, dtype=torch.bfloat16)
    bt = torch.tensor([[3, 0, 7, 5], [1, 2, 4, 6]], device=dev, dtype=torch.int32)
    lens = torch.tensor([50, 64], device=dev, dtype=torch.int32)
    out = sparsek.paged_decode(qd, kc, vc, bt, lens, 64)
    assert rel_error(out, paged_decode_ref(qd, kc, vc, bt, lens)) < tolerance(qd.dtype)
    assert torch.cuda.current_device() == 0
