"""Paged-KV ops: references against dense attention on gathered K/V (CPU), validation errors (CPU), and the CUDA
kernels (KV-cache write, paged decode, paged FMHA prefill) against the references on vLLM-shaped batches (GPU)."""

from __future__ import annotations

import pytest
import torch
from sparsek import paged
from sparsek.reference import varlen_attention_ref
from sparsek.reference.paged import gather_paged_kv, paged_attention_ref, paged_decode_ref, reshape_and_cache_ref
from sparsek.testing import poison_, rel_error, tolerance

# ---- batch builder shared by CPU and GPU tests -------------------------------------------------------------------


def _cu(lens: list[int], device) -> torch.Tensor:
    return torch.tensor(
        [0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32, device=device
    )


def make_batch(
    q_lens,
    seq_lens,
    *,
    hq=8,
    hk=2,
    d=64,
    block_size=16,
    dtype=torch.float32,
    device="cpu",
    layout="NHD",
    extra_blocks=7,
    seed=0,
):
    """A vLLM-like batch: packed caches with randomly permuted blocks (block 0 left as the null block).

    Returns a dict with q, the per-request dense K/V (``k_list``/``v_list``), the caches (filled with every key of
    every request through the reference writer), block_table (with junk in unused columns), cu_seqlens_q, seq_lens,
    the slot mapping of the new tokens and their K/V (for cache-write tests).
    """
    g = torch.Generator().manual_seed(seed)
    batch = len(q_lens)
    blocks_per_req = [(s + block_size - 1) // block_size for s in seq_lens]
    max_blocks = max([*blocks_per_req, 1]) + 1
    num_blocks = 1 + sum(blocks_per_req) + extra_blocks
    # vLLM's packed cache [num_blocks, H, block_size, 2D] (HND, "LBHNC") or [num_blocks, block_size, H, 2D] (NHD).
    if layout == "HND":
        packed = torch.randn(num_blocks, hk, block_size, 2 * d, generator=g).to(dtype).transpose(1, 2)
    else:
        packed = torch.randn(num_blocks, block_size, hk, 2 * d, generator=g).to(dtype)
    key_cache, value_cache = packed.split(d, dim=-1)
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    block_table = torch.randint(0, num_blocks, (batch, max_blocks), generator=g, dtype=torch.int32)
    c = 0
    for b, nb in enumerate(blocks_per_req):
        for j in range(nb):
            block_table[b, j] = perm[c]
            c += 1
    k_list = [torch.randn(s, hk, d, generator=g).to(dtype) for s in seq_lens]
    v_list = [torch.randn(s, hk, d, generator=g).to(dtype) for s in seq_lens]
    all_slots = []
    for b, s in enumerate(seq_lens):
        pos = torch.arange(s)
        all_slots.append(block_table[b, pos // block_size].long() * block_size + pos % block_size)
    reshape_and_cache_ref(
        torch.cat(k_list) if k_list else torch.empty(0, hk, d, dtype=dtype),
        torch.cat(v_list) if v_list else torch.empty(0, hk, d, dtype=dtype),
        key_cache,
        value_cache,
        torch.cat(all_slots) if all_slots else torch.empty(0, dtype=torch.int64),
    )
    new_slots = [sl[s - ql :] for sl, s, ql in zip(all_slots, seq_lens, q_lens)]
    new_k = [k[s - ql :] for k, s, ql in zip(k_list, seq_lens, q_lens)]
    new_v = [v[s - ql :] for v, s, ql in zip(v_list, seq_lens, q_lens)]
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
    out = dict(
        q=q,
        k_list=k_list,
        v_list=v_list,
        packed=packed,
        key_cache=key_cache,
        value_cache=value_cache,
        block_table=block_table,
        cu_seqlens_q=_cu(q_lens, "cpu"),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        new_slots=torch.cat(new_slots) if new_slots else torch.empty(0, dtype=torch.int64),
        new_k=torch.cat(new_k) if new_k else torch.empty(0, hk, d, dtype=dtype),
        new_v=torch.cat(new_v) if new_v else torch.empty(0, hk, d, dtype=dtype),
        max_seqlen_q=max([*q_lens, 0]),
        max_seqlen_k=max([*seq_lens, 0]),
    )
    if device != "cpu":
        packed_dev = packed.to(device)  # keeps the view's strides relative to a fresh base
        out["packed"] = packed_dev
        out["key_cache"], out["value_cache"] = packed_dev.split(d, dim=-1)
        for key in ("q", "block_table", "cu_seqlens_q", "seq_lens", "new_slots", "new_k", "new_v"):
            out[key] = out[key].to(device)
    return out


def dense_reference(batch, *, causal=True, window=None, scale=None):
    """Dense varlen attention on the gathered per-request K/V (float32)."""
    q = batch["q"].float().cpu()
    k = torch.cat(batch["k_list"]).float()
    v = torch.cat(batch["v_list"]).float()
    cu_k = _cu([t.shape[0] for t in batch["k_list"]], "cpu")
    return varlen_attention_ref(
        q, k, v, batch["cu_seqlens_q"].cpu(), cu_k, causal=causal, window=window, scale=scale, return_lse=True
    )


MIXED = ([1, 1, 1, 7, 33, 1], [5, 16, 70, 7, 100, 1])  # decodes first, prefill with and without cached prefix


# ---- CPU: references --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [16, 64])
def test_reference_matches_dense(layout, hq, hk, block_size):
    b = make_batch(*MIXED, hq=hq, hk=hk, block_size=block_size, layout=layout, seed=hq + block_size)
    out, lse = paged_attention_ref(
        b["q"], b["key_cache"], b["value_cache"], b["block_table"], b["cu_seqlens_q"], b["seq_lens"], return_lse=True
    )
    ref, ref_lse = dense_reference(b)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [(0, 0), (5, 0), (40, 0), (3, 2)])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_window(window, causal):
    b = make_batch(*MIXED, seed=3)
    out = paged_attention_ref(
        b["q"], b["key_cache"], b["value_cache"], b["block_table"], b["cu_seqlens_q"], b["seq_lens"],
        causal=causal, window=window,
    )  # fmt: skip
    ref, _ = dense_reference(b, causal=causal, window=window)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_decode_reference_is_last_row():
    b = make_batch([1, 1, 1], [1, 40, 129], seed=5)
    out = paged_decode_ref(b["q"], b["key_cache"], b["value_cache"], b["block_table"], b["seq_lens"])
    ref, _ = dense_reference(b)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out_w = paged_decode_ref(b["q"], b["key_cache"], b["value_cache"], b["block_table"], b["seq_lens"], window_left=7)
    ref_w, _ = dense_reference(b, window=(7, 0))
    torch.testing.assert_close(out_w, ref_w, atol=1e-5, rtol=1e-5)


def test_gather_paged_kv_roundtrip():
    b = make_batch(*MIXED, layout="HND", seed=11)
    for i, s in enumerate(b["seq_lens"].tolist()):
        k, v = gather_paged_kv(b["key_cache"], b["value_cache"], b["block_table"][i], s)
        assert torch.equal(k, b["k_list"][i]) and torch.equal(v, b["v_list"][i])


def test_reshape_and_cache_skips_padding_and_writes_through_views():
    b = make_batch(*MIXED, layout="HND", seed=2)
    packed = torch.zeros_like(b["packed"])
    kc, vc = packed.split(b["q"].shape[-1], dim=-1)
    n = b["new_slots"].shape[0]
    slots = b["new_slots"].clone()
    slots[::3] = -1  # padding tokens are skipped
    key = torch.cat([b["new_k"], torch.randn(4, *b["new_k"].shape[1:])])  # padded beyond slot_mapping
    value = torch.cat([b["new_v"], torch.randn(4, *b["new_v"].shape[1:])])
    paged.reshape_and_cache(key, value, kc, vc, slots)
    bs = kc.shape[1]
    for i in range(n):
        s = int(slots[i])
        if s < 0:
            continue
        assert torch.equal(kc[s // bs, s % bs], key[i]) and torch.equal(vc[s // bs, s % bs], value[i])
    written = (slots >= 0).sum().item()
    assert int((packed.abs().sum(-1) != 0).sum()) == written * kc.shape[2]


# ---- CPU: public ops ---------------------------------------------------------------------------------------------


def _args(b):
    return (
        b["q"], b["key_cache"], b["value_cache"], b["block_table"], b["cu_seqlens_q"], b["seq_lens"],
        b["max_seqlen_q"], b["max_seqlen_k"],
    )  # fmt: skip


@pytest.mark.parametrize("num_decodes", [0, 3])
def test_paged_attention_cpu_op(num_decodes):
    b = make_batch(*MIXED, seed=4)
    out, lse = paged.paged_attention(*_args(b), return_lse=True, num_decodes=num_decodes)
    ref, ref_lse = dense_reference(b)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    buf = poison_(torch.empty_like(b["q"]))
    res = paged.paged_attention(*_args(b), num_decodes=num_decodes, out=buf)
    assert res is buf
    torch.testing.assert_close(buf, ref, atol=1e-5, rtol=1e-5)


def test_paged_decode_cpu_op():
    b = make_batch([1] * 4, [3, 17, 64, 200], hq=8, hk=1, seed=6)
    out = paged.paged_decode(b["q"], b["key_cache"], b["value_cache"], b["block_table"], b["seq_lens"], 200)
    ref, _ = dense_reference(b)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_paged_attention_compiles_fullgraph_cpu():
    b = make_batch(*MIXED, seed=8)
    f = torch.compile(lambda q: paged.paged_attention(q, *_args(b)[1:], num_decodes=3), fullgraph=True)
    torch.testing.assert_close(f(b["q"]), dense_reference(b)[0], atol=1e-5, rtol=1e-5)


def test_opcheck_schemas():
    b = make_batch(*MIXED, seed=9)
    lse = torch.empty(b["q"].shape[1], b["q"].shape[0])
    args = (*_args(b)[:6], b["max_seqlen_q"], b["max_seqlen_k"], 0.125, -1, 0, 3, torch.empty_like(b["q"]), lse)
    torch.library.opcheck(torch.ops.sparsek.paged_attention_out, args, test_utils=("test_schema", "test_faketensor"))
    kc = b["key_cache"].contiguous()
    vc = b["value_cache"].contiguous()
    torch.library.opcheck(
        torch.ops.sparsek.reshape_and_cache,
        (b["new_k"], b["new_v"], kc, vc, b["new_slots"]),
        test_utils=("test_schema", "test_faketensor"),
    )


# ---- CPU: validation errors name the argument ---------------------------------------------------------------------


def _call(b, **over):
    args = dict(
        q=b["q"], key_cache=b["key_cache"], value_cache=b["value_cache"], block_table=b["block_table"],
        cu_seqlens_q=b["cu_seqlens_q"], seq_lens=b["seq_lens"], max_seqlen_q=b["max_seqlen_q"],
        max_seqlen_k=b["max_seqlen_k"],
    )  # fmt: skip
    kw = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return paged.paged_attention(**args, **kw)


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (lambda b: dict(q=b["q"][None]), ValueError, "q must have 3 dimensions"),
        (lambda b: dict(q=b["q"].int()), TypeError, "q must be a floating point"),
        (lambda b: dict(key_cache=b["key_cache"][0]), ValueError, "key_cache must have 4 dimensions"),
        (
            lambda b: dict(value_cache=b["value_cache"][:, :, :1]),
            ValueError,
            "key_cache and value_cache must have the same shape",
        ),
        (
            lambda b: dict(key_cache=b["key_cache"].double(), value_cache=b["value_cache"].double()),
            TypeError,
            "key_cache dtype",
        ),
        (lambda b: dict(block_table=b["block_table"].long()), TypeError, "block_table must be int32"),
        (lambda b: dict(block_table=b["block_table"][:2]), ValueError, "block_table must have at least"),
        (lambda b: dict(block_table=b["block_table"][:, :2]), ValueError, "block_table has 2 columns"),
        (lambda b: dict(block_table=b["block_table"] + 1000), ValueError, "block_table entries"),
        (lambda b: dict(seq_lens=b["seq_lens"].long()), TypeError, "seq_lens must be int32"),
        (lambda b: dict(cu_seqlens_q=b["cu_seqlens_q"][:-1]), ValueError, "cu_seqlens_q must have batch"),
        (lambda b: dict(cu_seqlens_q=b["cu_seqlens_q"] + 1), ValueError, "cu_seqlens_q must start at 0"),
        (lambda b: dict(seq_lens=b["seq_lens"] * 0), ValueError, "seq_lens must be >="),
        (lambda b: dict(max_seqlen_k=3), ValueError, "max_seqlen_q/max_seqlen_k"),
        (lambda b: dict(max_seqlen_q=-1), ValueError, "max_seqlen_q must be >= 0"),
        (lambda b: dict(num_decodes=5), ValueError, "num_decodes=5 but"),
        (lambda b: dict(num_decodes=99), ValueError, "num_decodes must be in"),
        (lambda b: dict(scale=0.0), ValueError, "scale must be a positive"),
        (lambda b: dict(window=(1,)), ValueError, "window must be a"),
        (lambda b: dict(out=b["q"][:1]), ValueError, "out must be"),
        (lambda b: dict(q=b["q"][:, :3]), ValueError, "divisible by the number of key/value heads"),
    ],
)
def test_paged_attention_validation(over, exc, match):
    b = make_batch(*MIXED, seed=1)
    with pytest.raises(exc, match=match):
        _call(b, **over(b))


def test_reshape_and_cache_validation():
    b = make_batch(*MIXED, seed=1)
    k, v, kc, vc, s = b["new_k"], b["new_v"], b["key_cache"], b["value_cache"], b["new_slots"]
    with pytest.raises(ValueError, match="key must have 3 dimensions"):
        paged.reshape_and_cache(k[0], v, kc, vc, s)
    with pytest.raises(ValueError, match="key and value must have the same shape"):
        paged.reshape_and_cache(k, v[:-1], kc, vc, s)
    with pytest.raises(TypeError, match="slot_mapping must be int64"):
        paged.reshape_and_cache(k, v, kc, vc, s.int())
    with pytest.raises(ValueError, match="slot_mapping has"):
        paged.reshape_and_cache(k[:-1], v[:-1], kc, vc, s)
    with pytest.raises(ValueError, match="slot_mapping entry"):
        paged.reshape_and_cache(k, v, kc, vc, s + 10**6)
    with pytest.raises(TypeError, match="key dtype"):
        paged.reshape_and_cache(k.double(), v.double(), kc, vc, s)
    with pytest.raises(ValueError, match="key is \\[num_tokens, heads_kv, head_dim\\]"):
        paged.reshape_and_cache(k[:, :1], v[:, :1], kc, vc, s)


# ---- CPU: the CUDA launch path with a fake library (dispatch, slicing, workspace, ctypes ABI) ----------------------


class _FakeLib:
    """Stands in for the ctypes library: records the parameter structs the launchers pass."""

    def __init__(self, splits):
        self.splits, self.decode_calls, self.cache_calls = splits, [], []

    def sk_paged_decode_num_splits(self, batch, hq, hk, max_k):
        return self.splits

    def sk_paged_decode_workspace_floats(self, batch, hq, d, splits):
        return 0 if splits <= 1 else batch * splits * hq * (d + 1)

    def sk_paged_decode(self, params, stream):
        names = [f for f, _ in paged.SkPagedDecodeParams._fields_]
        self.decode_calls.append(dict(zip(names, paged.DECODE_PARAMS.unpack(params))))
        return 0

    def sk_reshape_and_cache(self, params, stream):
        names = [f for f, _ in paged.SkCacheWriteParams._fields_]
        self.cache_calls.append(dict(zip(names, paged.CACHE_WRITE_PARAMS.unpack(params))))
        return 0


@pytest.mark.parametrize("splits", [1, 4])
def test_cuda_dispatch_with_fake_library(monkeypatch, splits):
    import ctypes

    from sparsek import _lib

    fake, fmha_calls = _FakeLib(splits), []
    monkeypatch.setattr(paged, "_load", lambda device: fake)
    monkeypatch.setattr(paged, "_stream", lambda device: ctypes.c_void_p(0))
    monkeypatch.setattr(_lib, "fmha_fwd", lambda *a, **kw: fmha_calls.append((a, kw)))
    b = make_batch(*MIXED, hq=8, hk=2, d=64, dtype=torch.float16, layout="HND")
    q, kc, vc, bt, cu, sl = (b[k] for k in ("q", "key_cache", "value_cache", "block_table", "cu_seqlens_q", "seq_lens"))
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0])
    paged._paged_attention_cuda_impl(q, kc, vc, bt, cu, sl, 33, 100, 0.125, 7, 0, 3, out, lse)
    (dec,) = fake.decode_calls
    assert dec["batch"] == 3 and dec["num_splits"] == splits and dec["window_left"] == 7
    assert dec["heads_q"] == 8 and dec["heads_kv"] == 2 and dec["head_dim"] == 64 and dec["block_size"] == 16
    assert (
        dec["cu_seqlens_q"] == cu.data_ptr()
        and dec["seq_lens"] == sl.data_ptr()
        and dec["block_table"] == bt.data_ptr()
    )
    assert (dec["k_block_stride"], dec["k_row_stride"], dec["k_head_stride"]) == kc.stride()[:3]
    assert dec["lse"] == lse.data_ptr() and dec["lse_head_stride"] == q.shape[0] and dec["is_bf16"] == 0
    assert (dec["o_partial"] == 0) == (splits == 1)
    if splits > 1:  # lse_partial follows the batch * splits * heads_q * head_dim floats of o_partial
        assert dec["lse_partial"] - dec["o_partial"] == 3 * splits * 8 * 64 * 4
    ((args, kw),) = fmha_calls
    assert args[0] is q and args[3] is out and args[4] is lse
    assert kw["cu_seqlens_q"].data_ptr() == cu[3:].data_ptr() and kw["cu_seqlens_q"].shape[0] == len(MIXED[0]) - 2
    assert kw["seqused_k"].data_ptr() == sl[3:].data_ptr() and kw["block_table"].data_ptr() == bt[3:].data_ptr()
    assert (kw["max_seqlen_q"], kw["max_seqlen_k"], kw["window_left"], kw["window_right"]) == (33, 100, 7, 0)
    # decode-only batches (max_seqlen_q == 1) never reach the FMHA; num_decodes == 0 never reaches the decode kernel
    fake.decode_calls.clear(), fmha_calls.clear()
    paged._paged_attention_cuda_impl(q[:3], kc, vc, bt[:3], cu[:4], sl[:3], 1, 70, 0.125, -1, 0, 0, out[:3], lse[:, :3])
    assert len(fake.decode_calls) == 1 and not fmha_calls
    paged._paged_attention_cuda_impl(q, kc, vc, bt, cu, sl, 33, 100, 0.125, -1, 0, 0, out, lse)
    assert len(fake.decode_calls) == 1 and len(fmha_calls) == 1


def test_cache_write_launch_with_fake_library(monkeypatch):
    import ctypes

    fake = _FakeLib(1)
    monkeypatch.setattr(paged, "_load", lambda device: fake)
    monkeypatch.setattr(paged, "_stream", lambda device: ctypes.c_void_p(0))
    b = make_batch(*MIXED, hq=8, hk=2, d=64, dtype=torch.bfloat16, layout="HND")
    key = b["new_k"]
    paged._launch_reshape_and_cache(key, b["new_v"], b["key_cache"], b["value_cache"], b["new_slots"])
    (c,) = fake.cache_calls
    assert c["num_tokens"] == b["new_slots"].shape[0] and c["elem_bytes"] == 2 and c["block_size"] == 16
    assert (c["kc_block_stride"], c["kc_row_stride"], c["kc_head_stride"]) == b["key_cache"].stride()[:3]
    assert (c["key_token_stride"], c["key_head_stride"]) == key.stride()[:2]


def test_ctypes_structs_match_the_c_header(tmp_path):
    """Compile a probe against csrc/paged_abi.h and compare every field offset with the ctypes mirrors."""
    import ctypes
    import shutil
    import subprocess
    from pathlib import Path

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    csrc = Path(paged.__file__).parent / "csrc"
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "paged_abi.h"', "int main(void) {"]
    for struct in (paged.SkCacheWriteParams, paged.SkPagedDecodeParams):
        name = struct.__name__
        lines.append(f'printf("{name} sizeof %zu\\n", sizeof({name}));')
        for field, _ in struct._fields_:
            lines.append(f'printf("{name} {field} %zu\\n", offsetof({name}, {field}));')
    lines += ["return 0;", "}"]
    src = tmp_path / "probe.c"
    src.write_text("\n".join(lines))
    subprocess.run([cc, f"-I{csrc}", str(src), "-o", str(tmp_path / "probe")], check=True)
    got = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True, check=True).stdout.split("\n")
    want = []
    for struct in (paged.SkCacheWriteParams, paged.SkPagedDecodeParams):
        want.append(f"{struct.__name__} sizeof {ctypes.sizeof(struct)}")
        want += [f"{struct.__name__} {f} {getattr(struct, f).offset}" for f, _ in struct._fields_]
    assert [g for g in got if g] == want


# ---- GPU: kernels against the references --------------------------------------------------------------------------

DEV = "cuda"


def _gpu_check(b, dtype, *, num_decodes=0, window=None, causal=True):
    out = poison_(torch.empty_like(b["q"]))
    res, lse = paged.paged_attention(
        *_args(b), causal=causal, window=window, return_lse=True, num_decodes=num_decodes, out=out
    )
    ref, ref_lse = dense_reference(b, causal=causal, window=window)
    assert torch.isfinite(res).all(), "unwritten (NaN) output rows"
    assert rel_error(res, ref) < tolerance(dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert (lse.cpu()[finite] - ref_lse[finite]).abs().max().item() < 1e-2


CASES = {
    "decode": ([1] * 9, [1, 2, 15, 16, 17, 63, 64, 65, 1000]),
    "prefill": ([5, 16, 17, 100, 333], [5, 16, 17, 100, 333]),
    "prefix": ([3, 17, 64, 1], [40, 17, 300, 1]),
    "mixed": ([1, 1, 1, 1, 77, 5, 130], [1, 700, 64, 33, 77, 301, 200]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("hq,hk", [(8, 8), (8, 2), (12, 4), (16, 2), (48, 4)])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_paged_attention(dtype, case, hq, hk, block_size, d):
    q_lens, seq_lens = CASES[case]
    b = make_batch(q_lens, seq_lens, hq=hq, hk=hk, d=d, block_size=block_size, dtype=dtype, device=DEV, layout="NHD")
    num_decodes = next((i for i, ql in enumerate(q_lens) if ql != 1), len(q_lens))
    _gpu_check(b, dtype, num_decodes=num_decodes)
    if num_decodes:  # the same batch entirely through the FMHA kernel
        _gpu_check(b, dtype, num_decodes=0)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_layouts(layout, dtype):
    b = make_batch(*CASES["mixed"], hq=8, hk=2, d=128, dtype=dtype, device=DEV, layout=layout)
    _gpu_check(b, dtype, num_decodes=4)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [(0, 0), (31, 0), (500, 0)])
def test_gpu_sliding_window(window):
    b = make_batch(*CASES["mixed"], hq=8, hk=2, d=128, dtype=torch.bfloat16, device=DEV)
    _gpu_check(b, torch.bfloat16, num_decodes=4, window=window)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hk", [(8, 1), (32, 8), (64, 8)])
@pytest.mark.parametrize("seq", [4097, 32768])
def test_gpu_long_context_split_kv(hq, hk, seq):
    """Small batches with long contexts take the split-KV path (several CTAs per request + combine)."""
    dtype = torch.bfloat16
    b = make_batch([1, 1], [seq, seq // 3 + 5], hq=hq, hk=hk, d=128, block_size=16, dtype=dtype, device=DEV)
    _gpu_check(b, dtype, num_decodes=2)
    _gpu_check(b, dtype, num_decodes=2, window=(1000, 0))


@pytest.mark.gpu
def test_gpu_decode_batch_256():
    dtype = torch.float16
    g = torch.Generator().manual_seed(0)
    seq_lens = torch.randint(1, 3000, (256,), generator=g).tolist()
    b = make_batch([1] * 256, seq_lens, hq=32, hk=8, d=128, block_size=16, dtype=dtype, device=DEV)
    _gpu_check(b, dtype, num_decodes=256)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("d", [64, 128, 80])
def test_gpu_reshape_and_cache(dtype, layout, d):
    b = make_batch(*CASES["mixed"], hq=8, hk=2, d=d, block_size=16, dtype=dtype, device=DEV, layout=layout)
    packed_ref = torch.randn_like(b["packed"])
    packed_gpu = packed_ref.clone()
    slots = b["new_slots"].clone()
    slots[1::4] = -1
    key = torch.cat([b["new_k"], torch.randn_like(b["new_k"][:3])])
    value = torch.cat([b["new_v"], torch.randn_like(b["new_v"][:3])])
    kr, vr = packed_ref.split(d, -1)
    kg, vg = packed_gpu.split(d, -1)
    reshape_and_cache_ref(key, value, kr, vr, slots)
    paged.reshape_and_cache(key, value, kg, vg, slots)
    torch.cuda.synchronize()
    assert torch.equal(packed_gpu, packed_ref)


@pytest.mark.gpu
def test_gpu_reshape_and_cache_strided_key():
    """key/value as slices of a fused QKV projection (row stride > heads * head_dim)."""
    d, hk = 128, 2
    b = make_batch(*CASES["mixed"], hq=8, hk=hk, d=d, dtype=torch.bfloat16, device=DEV)
    n = b["new_k"].shape[0]
    qkv = torch.randn(n, (8 + 2 * hk) * d, device=DEV, dtype=torch.bfloat16)
    key = qkv[:, 8 * d : (8 + hk) * d].view(n, hk, d)
    value = qkv[:, (8 + hk) * d :].view(n, hk, d)
    ref = b["packed"].clone()
    reshape_and_cache_ref(key, value, *ref.split(d, -1), b["new_slots"])
    paged.reshape_and_cache(key, value, b["key_cache"], b["value_cache"], b["new_slots"])
    torch.cuda.synchronize()
    assert torch.equal(b["packed"], ref)


@pytest.mark.gpu
def test_gpu_end_to_end_write_then_attend():
    """Cache written by the CUDA writer, then read by the attention kernels (what the vLLM backend does)."""
    dtype = torch.bfloat16
    b = make_batch(*CASES["mixed"], hq=16, hk=4, d=128, block_size=64, dtype=dtype, device=DEV)
    # wipe the new tokens' slots, then write them back with the kernel
    kc, vc = b["key_cache"], b["value_cache"]
    bs = kc.shape[1]
    s = b["new_slots"]
    kc[s // bs, s % bs] = float("nan")
    vc[s // bs, s % bs] = float("nan")
    paged.reshape_and_cache(b["new_k"], b["new_v"], kc, vc, s)
    _gpu_check(b, dtype, num_decodes=4)


@pytest.mark.gpu
def test_gpu_decode_cuda_graph_replay():
    """The decode path captures into a CUDA graph and replays correctly with new lengths and block tables."""
    dtype = torch.float16
    b = make_batch([1] * 8, [300] * 8, hq=32, hk=8, d=128, dtype=dtype, device=DEV, extra_blocks=400)
    out = torch.empty_like(b["q"])
    args = _args(b)
    paged.paged_attention(*args, num_decodes=8, out=out)  # warm up (builds/loads the library)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged.paged_attention(*args, num_decodes=8, out=out)
    new_lens = torch.tensor([1, 17, 64, 65, 128, 200, 299, 300], dtype=torch.int32)
    b["seq_lens"].copy_(new_lens)
    b["block_table"].copy_(b["block_table"][torch.randperm(8)])
    b["k_list"] = [None] * 8
    b["v_list"] = [None] * 8
    graph.replay()
    torch.cuda.synchronize()
    ref = paged_attention_ref(
        b["q"].float(), b["key_cache"].float(), b["value_cache"].float(), b["block_table"], b["cu_seqlens_q"],
        b["seq_lens"],
    )  # fmt: skip
    assert rel_error(out, ref) < tolerance(dtype)


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    dtype = torch.bfloat16
    b = make_batch(*CASES["mixed"], hq=8, hk=2, d=128, dtype=dtype, device=DEV)
    args = _args(b)
    f = torch.compile(lambda q: paged.paged_attention(q, *args[1:], num_decodes=4), fullgraph=True)
    ref, _ = dense_reference(b)
    assert rel_error(f(b["q"]), ref) < tolerance(dtype)


@pytest.mark.gpu
def test_gpu_validation_alignment():
    b = make_batch(*CASES["mixed"], hq=8, hk=2, d=64, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="head dim 80 is not supported"):
        q = torch.randn(b["q"].shape[0], 8, 80, device=DEV, dtype=torch.float16)
        kc = torch.randn(10, 16, 2, 80, device=DEV, dtype=torch.float16)
        paged.paged_attention(q, kc, kc, *_args(b)[3:])
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        paged.paged_attention(b["q"].float(), b["key_cache"].float(), b["value_cache"].float(), *_args(b)[3:])
