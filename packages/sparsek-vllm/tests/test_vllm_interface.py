"""Interface tests against the real vLLM classes (CPU): registration, capability validation, metadata builder and
the implementation (cache write + attention through every KV-cache layout, on the PyTorch reference path)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

vllm = pytest.importorskip("vllm")

from sparsek.reference import varlen_attention_ref  # noqa: E402
from sparsek_vllm import plugin  # noqa: E402
from sparsek_vllm.backend import (  # noqa: E402
    SparsekAttentionBackend,
    SparsekAttentionImpl,
    SparsekAttentionMetadata,
    SparsekAttentionMetadataBuilder,
    SparsekCpuAttnReplacementBackend,
)
from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.config.attention import AttentionConfig  # noqa: E402
from vllm.platforms.interface import DeviceCapability  # noqa: E402
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType, CommonAttentionMetadata  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheLayout  # noqa: E402

# ---- registration -------------------------------------------------------------------------------------------------


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.delenv("SPARSEK_VLLM_DISABLE", raising=False)
    monkeypatch.delenv("SPARSEK_VLLM_REPLACE", raising=False)
    plugin.register()
    yield
    AttentionBackendEnum.CPU_ATTN.clear_override()


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("sparsek") == "sparsek_vllm.plugin:register"


def test_register_custom_and_names(registered):
    plugin.register()  # idempotent
    assert AttentionBackendEnum.CUSTOM.get_class() is SparsekAttentionBackend
    assert SparsekAttentionBackend.get_name() == "CUSTOM"
    assert AttentionBackendEnum[SparsekAttentionBackend.get_name()] is AttentionBackendEnum.CUSTOM
    for name in ("SPARSEK", "SPARSEK_XFORMERS", "sparsek"):
        assert AttentionConfig(backend=name).backend is AttentionBackendEnum.CUSTOM
    assert AttentionBackendEnum.SPARSEK is AttentionBackendEnum.CUSTOM
    # the built-in members are untouched
    assert not AttentionBackendEnum.CPU_ATTN.is_overridden()


def test_replace_cpu_attn(registered, monkeypatch):
    monkeypatch.setenv("SPARSEK_VLLM_REPLACE", "cpu_attn")
    plugin.register()
    cls = AttentionBackendEnum.CPU_ATTN.get_class()
    assert cls is SparsekCpuAttnReplacementBackend
    assert AttentionBackendEnum[cls.get_name()] is AttentionBackendEnum.CPU_ATTN
    monkeypatch.setenv("SPARSEK_VLLM_REPLACE", "FLASHINFER")
    with pytest.raises(ValueError, match="cannot replace 'FLASHINFER'"):
        plugin.register()


def test_disable(monkeypatch):
    monkeypatch.setenv("SPARSEK_VLLM_DISABLE", "1")
    monkeypatch.setenv("SPARSEK_VLLM_REPLACE", "CPU_ATTN")
    plugin.register()
    assert not AttentionBackendEnum.CPU_ATTN.is_overridden()


_CHILD = r"""
import pickle, sys
cfg = pickle.load(open(sys.argv[1], "rb"))  # unpickled BEFORE any plugin runs, like a spawned vLLM process
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.config.attention import AttentionConfig
print(cfg.backend.name, cfg.backend.get_path(), AttentionConfig(backend="SPARSEK_XFORMERS").backend.get_path())
"""


def test_selection_by_name_crosses_processes(registered, tmp_path):
    """A config naming SPARSEK pickles as CUSTOM, and a fresh process resolves it through the entry point."""
    cfg = AttentionConfig(backend="SPARSEK")
    path = tmp_path / "cfg.pkl"
    path.write_bytes(pickle.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEK_VLLM")}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, path1, path2 = proc.stdout.strip().splitlines()[-1].split()
    assert name == "CUSTOM"
    assert path1 == path2 == plugin.BACKEND_PATH


# ---- validate_configuration ---------------------------------------------------------------------------------------

H100 = DeviceCapability(9, 0)


def _validate(backend=SparsekAttentionBackend, **over):
    args = dict(
        head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16, use_mla=False, has_sink=False,
        use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False, device_capability=H100,
        attn_type=AttentionType.DECODER,
    )  # fmt: skip
    args.update(over)
    return backend.validate_configuration(**args)


@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "float16", "bfloat16", None])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128, None])
def test_supported_configurations(head_size, dtype, kv_cache_dtype, block_size):
    assert _validate(head_size=head_size, dtype=dtype, kv_cache_dtype=kv_cache_dtype, block_size=block_size) == []
    assert _validate(head_size=head_size, dtype=dtype, block_size=block_size, has_sliding_window=True) == []
    assert _validate(device_capability=DeviceCapability(10, 0)) == []
    assert _validate(device_capability=DeviceCapability(8, 0), use_kv_connector=True) == []


@pytest.mark.parametrize(
    "over,reason",
    [
        (dict(head_size=80), "head_size not supported"),
        (dict(head_size=512), "head_size not supported"),
        (dict(dtype=torch.float32), "dtype not supported"),
        (dict(kv_cache_dtype="fp8"), "kv_cache_dtype not supported"),
        (dict(kv_cache_dtype="fp8_e4m3"), "kv_cache_dtype not supported"),
        (dict(block_size=8), "block_size not supported"),
        (dict(block_size=24), "block_size not supported"),
        (dict(use_mla=True), "MLA not supported"),
        (dict(has_sink=True), "attention sinks not supported"),
        (dict(use_sparse=True), "sparse not supported"),
        (dict(use_mm_prefix=True), "partial multimodal token full attention not supported"),
        (dict(use_per_head_quant_scales=True), "per-head quant scales not supported"),
        (dict(device_capability=DeviceCapability(7, 5)), "compute capability not supported"),
        (dict(attn_type=AttentionType.ENCODER_ONLY), f"attention type {AttentionType.ENCODER_ONLY} not supported"),
        (
            dict(attn_type=AttentionType.ENCODER_DECODER),
            f"attention type {AttentionType.ENCODER_DECODER} not supported",
        ),
        (dict(use_non_causal=True), "non-causal attention not supported"),
        (dict(use_rswa=True), "R-SWA not supported"),
        (dict(use_dcp=True), "DCP not supported"),
        (dict(use_pcp=True), "PCP not supported"),
        (dict(use_batch_invariant=True), "batch invariance not supported"),
    ],
)
def test_unsupported_configurations(over, reason):
    assert _validate(**over) == [reason]


def test_cpu_replacement_capabilities():
    assert _validate(SparsekCpuAttnReplacementBackend, dtype=torch.float32, head_size=80) == []
    assert _validate(SparsekCpuAttnReplacementBackend, kv_cache_dtype="fp8") == ["kv_cache_dtype not supported"]


def test_layouts_and_flags():
    layouts = SparsekAttentionBackend.supported_kv_cache_layouts()
    assert set(layouts) == set(KVCacheLayout) and layouts[0] == KVCacheLayout.LBHNC
    assert SparsekAttentionBackend.forward_includes_kv_cache_update is False
    assert SparsekAttentionBackend.get_builder_cls() is SparsekAttentionMetadataBuilder
    assert SparsekAttentionBackend.get_impl_cls() is SparsekAttentionImpl
    assert SparsekAttentionBackend.supports_block_size(48) and not SparsekAttentionBackend.supports_block_size(40)
    assert SparsekAttentionBackend.get_preferred_block_size(16) == 16


# ---- builder ------------------------------------------------------------------------------------------------------

BLOCK = 16


def _spec(hk=2, d=64, dtype=torch.float32, block_size=BLOCK, sliding_window=None):
    return FullAttentionSpec(
        block_size=block_size, num_kv_heads=hk, head_size=d, dtype=dtype, sliding_window=sliding_window
    )


def _common_metadata(q_lens, seq_lens, block_table, block_size=BLOCK, pad_tokens=0):
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    slots = []
    for b, (ql, sl) in enumerate(zip(q_lens, seq_lens)):
        pos = torch.arange(sl - ql, sl)
        slots.append(block_table[b, pos // block_size].long() * block_size + pos % block_size)
    slot_mapping = torch.cat([*slots, torch.full((pad_tokens,), -1, dtype=torch.int64)])
    return CommonAttentionMetadata(
        query_start_loc=cu,
        query_start_loc_cpu=cu.clone(),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        num_reqs=len(q_lens),
        num_actual_tokens=int(cu[-1]) + pad_tokens,
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        block_table_tensor=block_table,
        slot_mapping=slot_mapping,
        seq_lens_cpu_upper_bound=torch.tensor(seq_lens, dtype=torch.int32),
    )


def _block_table(seq_lens, num_blocks, block_size=BLOCK, seed=0):
    g = torch.Generator().manual_seed(seed)
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # block 0 is the null block
    need = [(s + block_size - 1) // block_size for s in seq_lens]
    bt = torch.zeros(len(seq_lens), max(need) + 2, dtype=torch.int32)
    c = 0
    for b, n in enumerate(need):
        bt[b, :n] = torch.tensor(perm[c : c + n], dtype=torch.int32)
        c += n
    return bt


@pytest.fixture
def vllm_config():
    cfg = VllmConfig()
    with set_current_vllm_config(cfg):
        yield cfg


@pytest.mark.parametrize(
    "q_lens,seq_lens,expect",
    [
        ([1, 1, 5, 17], [10, 33, 5, 40], (2, 2, 2)),  # mixed: decodes first
        ([1, 1, 1], [7, 100, 1], (3, 0, 3)),  # decode only
        ([9, 30], [9, 64], (0, 2, 0)),  # prefill only (one with a cached prefix)
    ],
)
def test_builder_synthetic_batch(vllm_config, q_lens, seq_lens, expect):
    builder = SparsekAttentionMetadataBuilder(_spec(), ["layers.0.attn"], vllm_config, torch.device("cpu"))
    assert builder.reorder_batch_threshold == 1
    assert builder.get_cudagraph_support(vllm_config, _spec()) == AttentionCGSupport.NEVER
    bt = _block_table(seq_lens, 64)
    cam = _common_metadata(q_lens, seq_lens, bt)
    md = builder.build(0, cam)
    assert isinstance(md, SparsekAttentionMetadata)
    assert (md.num_decodes, md.num_prefills, md.num_decode_tokens) == expect
    assert md.num_actual_tokens == sum(q_lens) and md.max_query_len == max(q_lens) and md.max_seq_len == max(seq_lens)
    assert md.query_start_loc is cam.query_start_loc and md.seq_lens is cam.seq_lens
    assert md.block_table is bt and md.slot_mapping is cam.slot_mapping and md.causal is True


def test_builder_rejects_tensor_causal(vllm_config):
    builder = SparsekAttentionMetadataBuilder(_spec(), ["layers.0.attn"], vllm_config, torch.device("cpu"))
    cam = _common_metadata([1, 3], [4, 3], _block_table([4, 3], 8)).replace(causal=torch.tensor([True, False]))
    with pytest.raises(NotImplementedError, match="causal"):
        builder.build(0, cam)


# ---- implementation (PyTorch reference path on CPU) ---------------------------------------------------------------


class _Layer(torch.nn.Module):
    """Stand-in for vLLM's Attention layer (the impl does not read it)."""


def _packed_cache(layout: KVCacheLayout, num_layers, num_blocks, hk, block_size, d, dtype, seed=0):
    """Per-layer logical ``[B, H, N, 2D]`` views of a physical buffer in ``layout`` (as vLLM builds them)."""
    order = layout.value
    logical = (num_layers, num_blocks, hk, block_size, 2 * d)
    g = torch.Generator().manual_seed(seed)
    physical = torch.randn([logical[i] for i in order], generator=g).to(dtype)
    view = physical.permute([order.index(i) for i in range(5)])
    assert tuple(view.shape) == logical
    return [view[i] for i in range(num_layers)]


def _run_impl(impl, layer, kv_cache, q_lens, seq_lens, block_table, *, hq, hk, d, dtype, pad_tokens=3, seed=0):
    """Write all K/V through do_kv_cache_update (context first, then the step's tokens) and run forward."""
    g = torch.Generator().manual_seed(seed + 1)
    ks = [torch.randn(s, hk, d, generator=g).to(dtype) for s in seq_lens]
    vs = [torch.randn(s, hk, d, generator=g).to(dtype) for s in seq_lens]
    ctx_lens = [s - q for q, s in zip(q_lens, seq_lens)]
    if sum(ctx_lens):  # the cached prefix, as an earlier step would have written it
        ctx = _common_metadata(ctx_lens, ctx_lens, block_table)
        kc = torch.cat([k[:c] for k, c in zip(ks, ctx_lens)])
        vc = torch.cat([v[:c] for v, c in zip(vs, ctx_lens)])
        impl.do_kv_cache_update(layer, kc, vc, kv_cache, ctx.slot_mapping)
    cam = _common_metadata(q_lens, seq_lens, block_table, pad_tokens=pad_tokens)
    n = sum(q_lens)
    key = torch.cat([*(k[c:] for k, c in zip(ks, ctx_lens)), torch.randn(pad_tokens, hk, d).to(dtype)])
    value = torch.cat([*(v[c:] for v, c in zip(vs, ctx_lens)), torch.randn(pad_tokens, hk, d).to(dtype)])
    impl.do_kv_cache_update(layer, key, value, kv_cache, cam.slot_mapping)
    query = torch.randn(n + pad_tokens, hq, d, generator=g).to(dtype)
    output = torch.full((n + pad_tokens, hq, d), float("nan"), dtype=dtype)
    return query, key, value, ks, vs, cam, output


@pytest.mark.parametrize("layout", list(KVCacheLayout))
@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 2), (8, 1)])
def test_impl_matches_dense_reference(vllm_config, layout, hq, hk):
    d, dtype, num_blocks = 64, torch.float32, 48
    q_lens, seq_lens = [1, 1, 1, 7, 20, 33], [5, 16, 40, 7, 50, 33]
    bt = _block_table(seq_lens, num_blocks, seed=hq)
    kv = _packed_cache(layout, 2, num_blocks, hk, BLOCK, d, dtype)[1]
    impl = SparsekAttentionImpl(hq, d, d**-0.5, hk, None, None, "auto", None, AttentionType.DECODER, None)
    layer = _Layer()
    query, key, value, ks, vs, cam, output = _run_impl(
        impl, layer, kv, q_lens, seq_lens, bt, hq=hq, hk=hk, d=d, dtype=dtype
    )
    builder = SparsekAttentionMetadataBuilder(_spec(hk, d, dtype), ["l"], vllm_config, torch.device("cpu"))
    md = builder.build(0, cam)
    md.num_actual_tokens = sum(q_lens)  # the padded tail rows are not computed
    res = impl.forward(layer, query, key, value, kv, md, output=output)
    assert res is output
    n = sum(q_lens)
    cu_q = cam.query_start_loc
    cu_k = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()], dtype=torch.int32)
    ref = varlen_attention_ref(query[:n], torch.cat(ks), torch.cat(vs), cu_q, cu_k, causal=True, scale=d**-0.5)
    torch.testing.assert_close(output[:n], ref, atol=1e-5, rtol=1e-5)
    assert torch.isnan(output[n:]).all(), "padding rows must be left untouched"


@pytest.mark.parametrize("window", [1, 8, 30])
def test_impl_sliding_window(vllm_config, window):
    d, hq, hk, dtype, num_blocks = 64, 8, 2, torch.float32, 32
    q_lens, seq_lens = [1, 1, 9, 17], [5, 40, 9, 60]
    bt = _block_table(seq_lens, num_blocks)
    kv = _packed_cache(KVCacheLayout.LBNHC, 1, num_blocks, hk, BLOCK, d, dtype)[0]
    impl = SparsekAttentionImpl(hq, d, 0.1, hk, None, window, "auto", None, AttentionType.DECODER, None)
    layer = _Layer()
    query, key, value, ks, vs, cam, output = _run_impl(
        impl, layer, kv, q_lens, seq_lens, bt, hq=hq, hk=hk, d=d, dtype=dtype, pad_tokens=0
    )
    md = SparsekAttentionMetadataBuilder(_spec(hk, d, dtype, sliding_window=window), ["l"], vllm_config, "cpu").build(
        0, cam
    )
    impl.forward(layer, query, key, value, kv, md, output=output)
    cu_k = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()], dtype=torch.int32)
    ref = varlen_attention_ref(
        query, torch.cat(ks), torch.cat(vs), cam.query_start_loc, cu_k, causal=True, scale=0.1, window=(window - 1, 0)
    )
    torch.testing.assert_close(output, ref, atol=1e-5, rtol=1e-5)


def test_impl_profiling_run_and_output_quant(vllm_config):
    impl = SparsekAttentionImpl(8, 64, 0.125, 2, None, None, "auto", None, AttentionType.DECODER, None)
    out = torch.full((5, 8, 64), float("nan"))
    q = torch.randn(5, 8, 64)
    kv = torch.zeros(4, 2, 16, 128)
    assert impl.forward(_Layer(), q, None, None, kv, None, output=out) is out
    assert (out == 0).all()
    with pytest.raises(NotImplementedError, match="output quantization"):
        impl.forward(_Layer(), q, None, None, kv, None, output=out, output_scale=torch.ones(1))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(alibi_slopes=[0.1] * 8), "ALiBi"),
        (dict(logits_soft_cap=30.0), "soft-capping"),
        (dict(attn_type=AttentionType.ENCODER_ONLY), "decoder attention only"),
        (dict(kv_cache_dtype="fp8"), "kv_cache_dtype"),
        (dict(sinks=torch.zeros(8)), "sinks"),
    ],
)
def test_impl_rejects_unsupported(vllm_config, kwargs, match):
    with pytest.raises(NotImplementedError, match=match):
        SparsekAttentionImpl(8, 64, 0.125, 2, **kwargs)


def test_impl_accepts_extra_kwargs(vllm_config):
    impl = SparsekAttentionImpl(8, 64, 0.125, 2, None, 128, "auto", 0.0, AttentionType.DECODER, None, foo=1)
    assert impl.window == (127, 0) and impl.num_kv_heads == 2 and impl.kv_cache_dtype == "auto"


def test_split_kv_cache_rejects_wrong_shape():
    from sparsek_vllm.backend import split_kv_cache

    with pytest.raises(ValueError, match="packed KV cache"):
        split_kv_cache(torch.zeros(4, 2, 16, 100), 64)
