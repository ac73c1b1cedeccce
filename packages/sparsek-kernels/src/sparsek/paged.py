"""Paged-KV ops (vLLM's cache layout): KV-cache write, paged attention for mixed prefill + decode batches.

The cache is the one vLLM's FlashAttention-style backends use: ``key_cache`` and ``value_cache`` are
``[num_blocks, block_size, heads_kv, head_dim]`` tensors with any strides (unit last stride), for example the two
halves of vLLM's packed cache ``kv_cache.transpose(1, 2).split(head_size, -1)``. Key position ``j`` of request ``b``
lives in block ``block_table[b, j // block_size]``, row ``j % block_size``.

On CUDA, single-token (decode) requests run sparsek's paged decode kernel (``csrc/paged_decode.cu``: one CTA per KV
head serving all its query heads, split-KV for long contexts) and the other requests run the paged FMHA kernel. On
the CPU the pure-PyTorch references in ``sparsek.reference.paged`` run.

Ops: ``torch.ops.sparsek.reshape_and_cache`` and ``torch.ops.sparsek.paged_attention_out`` (mutating, with fake
implementations for ``torch.compile``). The public wrappers below validate their inputs; the raw ops do not.
"""

from __future__ import annotations

import ctypes
import struct
import threading

import torch

from . import _lib
from . import ops as _ops  # noqa: F401  (defines the "sparsek" namespace first)
from ._validation import KERNEL_HEAD_DIMS, SUPPORTED_DTYPES, check_heads, check_scale, check_tensor, normalize_window
from .reference.paged import paged_attention_ref, reshape_and_cache_ref

__all__ = ["paged_attention", "paged_decode", "reshape_and_cache"]

PAGED_ABI_VERSION = 1
_i64, _i32, _ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p


class SkCacheWriteParams(ctypes.Structure):
    """ctypes mirror of ``SkCacheWriteParams`` in ``csrc/paged_abi.h``."""

    _fields_ = [
        ("key", _ptr), ("value", _ptr), ("key_cache", _ptr), ("value_cache", _ptr), ("slot_mapping", _ptr),
        ("key_token_stride", _i64), ("key_head_stride", _i64),
        ("value_token_stride", _i64), ("value_head_stride", _i64),
        ("kc_block_stride", _i64), ("kc_row_stride", _i64), ("kc_head_stride", _i64),
        ("vc_block_stride", _i64), ("vc_row_stride", _i64), ("vc_head_stride", _i64),
        ("num_tokens", _i32), ("heads_kv", _i32), ("head_dim", _i32), ("block_size", _i32),
        ("elem_bytes", _i32), ("pad0", _i32),
    ]  # fmt: skip


class SkPagedDecodeParams(ctypes.Structure):
    """ctypes mirror of ``SkPagedDecodeParams`` in ``csrc/paged_abi.h``."""

    _fields_ = [
        ("q", _ptr), ("key_cache", _ptr), ("value_cache", _ptr), ("o", _ptr), ("lse", _ptr),
        ("block_table", _ptr), ("seq_lens", _ptr), ("cu_seqlens_q", _ptr),
        ("o_partial", _ptr), ("lse_partial", _ptr),
        ("q_row_stride", _i64), ("q_head_stride", _i64),
        ("o_row_stride", _i64), ("o_head_stride", _i64),
        ("k_block_stride", _i64), ("k_row_stride", _i64), ("k_head_stride", _i64),
        ("v_block_stride", _i64), ("v_row_stride", _i64), ("v_head_stride", _i64),
        ("block_table_stride", _i64), ("lse_head_stride", _i64),
        ("batch", _i32), ("heads_q", _i32), ("heads_kv", _i32), ("head_dim", _i32), ("block_size", _i32),
        ("window_left", _i32), ("num_splits", _i32), ("is_bf16", _i32),
        ("scale", ctypes.c_float), ("pad0", _i32),
    ]  # fmt: skip


#: The two parameter structs as precompiled ``struct`` formats (packing is several times cheaper than building the
#: ctypes structures, and both launchers run once per layer and step in a serving engine).
CACHE_WRITE_PARAMS = struct.Struct(_lib._struct_format(SkCacheWriteParams._fields_))
DECODE_PARAMS = struct.Struct(_lib._struct_format(SkPagedDecodeParams._fields_))
assert CACHE_WRITE_PARAMS.size == ctypes.sizeof(SkCacheWriteParams), "SkCacheWriteParams packing disagrees"
assert DECODE_PARAMS.size == ctypes.sizeof(SkPagedDecodeParams), "SkPagedDecodeParams packing disagrees"

_ready: set[int] = set()
_ready_lock = threading.Lock()


def _load(device: torch.device) -> ctypes.CDLL:
    """The CUDA library with the paged functions' ctypes signatures set (raises ``KernelUnavailable``)."""
    lib = _lib.load(device)
    if id(lib) not in _ready:
        with _ready_lock:
            lib.sk_reshape_and_cache.argtypes = [ctypes.c_char_p, _ptr]  # CACHE_WRITE_PARAMS-packed
            lib.sk_reshape_and_cache.restype = ctypes.c_int
            lib.sk_paged_decode.argtypes = [ctypes.c_char_p, _ptr]  # DECODE_PARAMS-packed
            lib.sk_paged_decode.restype = ctypes.c_int
            lib.sk_paged_decode_workspace_floats.argtypes = [_i32, _i32, _i32, _i32]
            lib.sk_paged_decode_workspace_floats.restype = _i64
            lib.sk_paged_decode_num_splits.argtypes = [_i32, _i32, _i32, _i32]
            lib.sk_paged_decode_num_splits.restype = _i32
            lib.sk_paged_error_string.argtypes = [ctypes.c_int]
            lib.sk_paged_error_string.restype = ctypes.c_char_p
            lib.sk_paged_abi_version.restype = ctypes.c_int
            if lib.sk_paged_abi_version() != PAGED_ABI_VERSION:
                raise _lib.KernelUnavailable(
                    f"stale sparsek library: paged ABI {lib.sk_paged_abi_version()} != {PAGED_ABI_VERSION}"
                )
            _ready.add(id(lib))
    return lib


def _check(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"sparsek {what} failed: {lib.sk_paged_error_string(code).decode()} (code {code})")


def _stream(device: torch.device) -> ctypes.c_void_p:
    return _lib.current_stream(device)


# ---- raw CUDA launchers (no checks) -------------------------------------------------------------------------------


def _launch_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping) -> None:
    device = key.device
    lib = _load(device)
    ks, vs, kcs, vcs, ksh = key.stride(), value.stride(), key_cache.stride(), value_cache.stride(), key.shape
    p = CACHE_WRITE_PARAMS.pack(
        key.data_ptr(), value.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), slot_mapping.data_ptr(),
        ks[0], ks[1], vs[0], vs[1], kcs[0], kcs[1], kcs[2], vcs[0], vcs[1], vcs[2],
        slot_mapping.shape[0], ksh[1], ksh[2], key_cache.shape[1], key.element_size(), 0,
    )  # fmt: skip
    with _lib.on_device(device):
        code = lib.sk_reshape_and_cache(p, _stream(device))
    _check(lib, code, "reshape_and_cache")


def _paged_attention_cuda_impl(q, kc, vc, bt, cu_q, seq_lens, max_sq, max_sk, scale, wl, wr, num_decodes, out, lse):
    batch = seq_lens.shape[0]
    want_lse = lse.numel() > 0
    if q.shape[0] == 0 or batch == 0:
        if want_lse:
            lse.fill_(float("-inf"))
        return
    cu_q, seq_lens = cu_q.contiguous(), seq_lens.contiguous()  # no-ops for vLLM's tensors
    nd = batch if max_sq <= 1 else min(max(int(num_decodes), 0), batch)
    if nd > 0:
        lib = _load(q.device)
        with _lib.on_device(q.device):  # the split count depends on the device's SM count
            splits = int(lib.sk_paged_decode_num_splits(nd, q.shape[1], kc.shape[2], max(int(max_sk), 1)))
        if nd < batch:  # decode requests come first; a decode-only batch (every decode step) needs no views
            bt_d, sl_d, cu_d = bt[:nd], seq_lens[:nd], cu_q[: nd + 1]
        else:
            bt_d, sl_d, cu_d = bt, seq_lens, cu_q
        _launch_decode_splits(lib, q, kc, vc, bt_d, sl_d, cu_d, out, lse, scale, wl, splits)
    if nd < batch:
        _lib.fmha_fwd(
            q, kc, vc, out, lse if want_lse else None,
            cu_seqlens_q=cu_q[nd:], cu_seqlens_k=None, seqused_k=seq_lens[nd:], block_table=bt[nd:],
            max_seqlen_q=int(max_sq), max_seqlen_k=int(max_sk), scale=float(scale), window_left=wl, window_right=wr,
        )  # fmt: skip


def _launch_decode_splits(lib, q, kc, vc, bt, seq_lens, cu_q, out, lse, scale, window_left, splits) -> None:
    device = q.device
    qsh, kcsh = q.shape, kc.shape
    batch, hq, d = seq_lens.shape[0], qsh[1], qsh[2]
    ws_n = int(lib.sk_paged_decode_workspace_floats(batch, hq, d, splits))
    ws = torch.empty(ws_n, dtype=torch.float32, device=device) if ws_n else None
    o_part = ws.data_ptr() if ws is not None else 0
    l_part = ws.data_ptr() + batch * splits * hq * d * 4 if ws is not None else 0
    want_lse = lse.numel() > 0
    qs, os_, kcs, vcs = q.stride(), out.stride(), kc.stride(), vc.stride()
    p = DECODE_PARAMS.pack(
        q.data_ptr(), kc.data_ptr(), vc.data_ptr(), out.data_ptr(), lse.data_ptr() if want_lse else 0,
        bt.data_ptr(), seq_lens.data_ptr(), cu_q.data_ptr(), o_part, l_part,
        qs[0], qs[1], os_[0], os_[1], kcs[0], kcs[1], kcs[2], vcs[0], vcs[1], vcs[2],
        bt.stride(0), lse.stride(0) if want_lse else 0,
        batch, hq, kcsh[2], d, kcsh[1], window_left, splits, int(q.dtype == torch.bfloat16),
        float(scale), 0,
    )  # fmt: skip
    with _lib.on_device(device):
        code = lib.sk_paged_decode(p, _stream(device))
    _check(lib, code, "paged decode")


# ---- torch.library registration -----------------------------------------------------------------------------------

_LIB = torch.library.Library("sparsek", "FRAGMENT")
_LIB.define(
    "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
    "Tensor slot_mapping) -> ()"
)
_LIB.define(
    "paged_attention_out(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_table, Tensor cu_seqlens_q, "
    "Tensor seq_lens, int max_seqlen_q, int max_seqlen_k, float scale, int window_left, int window_right, "
    "int num_decodes, Tensor(a!) out, Tensor(b!) lse) -> ()"
)


@torch.library.impl(_LIB, "reshape_and_cache", "CPU")
def _reshape_and_cache_cpu(key, value, key_cache, value_cache, slot_mapping):
    reshape_and_cache_ref(key, value, key_cache, value_cache, slot_mapping)


@torch.library.impl(_LIB, "reshape_and_cache", "CUDA")
def _reshape_and_cache_cuda(key, value, key_cache, value_cache, slot_mapping):
    _check_base_aligned(("key_cache", key_cache), ("value_cache", value_cache))
    if slot_mapping.shape[0] == 0:
        return
    try:
        _load(key.device)
    except _lib.KernelUnavailable:
        if not _lib.fallback_allowed():
            raise
        reshape_and_cache_ref(key, value, key_cache, value_cache, slot_mapping)
        return
    _launch_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping.contiguous())


@torch.library.register_fake("sparsek::reshape_and_cache")
def _reshape_and_cache_fake(key, value, key_cache, value_cache, slot_mapping):
    return None


def _paged_reference_into(q, kc, vc, bt, cu_q, seq_lens, scale, wl, wr, out, lse):
    ref, ref_lse = paged_attention_ref(
        q, kc, vc, bt, cu_q, seq_lens, causal=False, scale=scale, window=(wl, wr), return_lse=True
    )
    out.copy_(ref)
    if lse.numel() > 0:
        lse.copy_(ref_lse)


@torch.library.impl(_LIB, "paged_attention_out", "CPU")
def _paged_attention_out_cpu(q, kc, vc, bt, cu_q, seq_lens, max_sq, max_sk, scale, wl, wr, num_decodes, out, lse):
    _paged_reference_into(q, kc, vc, bt, cu_q, seq_lens, scale, wl, wr, out, lse)


@torch.library.impl(_LIB, "paged_attention_out", "CUDA")
def _paged_attention_out_cuda(q, kc, vc, bt, cu_q, seq_lens, max_sq, max_sk, scale, wl, wr, num_decodes, out, lse):
    _check_base_aligned(("q", q), ("key_cache", kc), ("value_cache", vc), ("out", out))
    try:
        _load(q.device)
    except _lib.KernelUnavailable:
        if not _lib.fallback_allowed():
            raise
        _paged_reference_into(q, kc, vc, bt, cu_q, seq_lens, scale, wl, wr, out, lse)
        return
    _paged_attention_cuda_impl(q, kc, vc, bt, cu_q, seq_lens, max_sq, max_sk, scale, wl, wr, num_decodes, out, lse)


@torch.library.register_fake("sparsek::paged_attention_out")
def _paged_attention_out_fake(q, kc, vc, bt, cu_q, seq_lens, max_sq, max_sk, scale, wl, wr, num_decodes, out, lse):
    return None


# ---- validation ---------------------------------------------------------------------------------------------------


def _capturing_or_compiling() -> bool:
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _check_int_tensor(name: str, t: object, ndim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    check_tensor(name, t, ndim)
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {str(dtype).removeprefix('torch.')}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (like the other inputs), got {t.device}")
    return t


def _check_base_aligned(*named: tuple[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless every non-empty tensor starts on a 16-byte boundary (the kernels' vector width)."""
    for name, t in named:
        if t.numel() and t.data_ptr() % 16 != 0:
            raise ValueError(f"{name} must be 16-byte aligned for sparsek's CUDA kernels")


def _check_kernel_alignment(name: str, t: torch.Tensor, dims: int) -> None:
    """The CUDA kernels read 16-byte chunks: 16-byte aligned base and strides (dims before the last) in units of 8."""
    if t.device.type != "cuda" or t.numel() == 0:
        return
    # data_ptr() cannot be traced; under torch.compile the CUDA op implementations re-check the base address.
    if not torch.compiler.is_compiling() and t.data_ptr() % 16 != 0:
        raise ValueError(f"{name} must be 16-byte aligned for sparsek's CUDA kernels")
    for i in range(dims):
        if (t.stride(i) * t.element_size()) % 16 != 0:
            raise ValueError(
                f"{name} stride {t.stride(i)} of dim {i} must be a multiple of 16 bytes for sparsek's CUDA kernels"
            )


def _check_caches(key_cache: object, value_cache: object) -> None:
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        check_tensor(name, t, 4)
        if t.stride(-1) != 1 and t.numel() > 0:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got stride {t.stride(-1)}")
    if key_cache.shape != value_cache.shape:
        raise ValueError(
            "key_cache and value_cache must have the same shape [num_blocks, block_size, heads_kv, head_dim], "
            f"got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    if key_cache.dtype != value_cache.dtype:
        raise ValueError(
            f"key_cache and value_cache must have the same dtype, got {key_cache.dtype} and {value_cache.dtype}"
        )
    if key_cache.device != value_cache.device:
        raise ValueError(
            f"key_cache and value_cache must be on the same device, got {key_cache.device} and {value_cache.device}"
        )
    if key_cache.shape[1] < 1:
        raise ValueError(f"key_cache block_size (dim 1) must be >= 1, got shape {tuple(key_cache.shape)}")


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new keys/values into their paged-cache slots (vLLM's ``reshape_and_cache_flash``), in place.

    Args:
        key: ``[num_tokens, heads_kv, head_dim]`` (any strides, unit last stride).
        value: same shape as ``key``.
        key_cache: ``[num_blocks, block_size, heads_kv, head_dim]`` (any strides, unit last stride), same dtype.
        value_cache: same shape and dtype as ``key_cache``.
        slot_mapping: int64 ``[n]`` with ``n <= num_tokens``: token ``i < n`` goes to slot ``slot_mapping[i]``
            (block ``slot // block_size``, row ``slot % block_size``); negative slots (padding) are skipped. Only the
            first ``n`` tokens are read, so ``key``/``value`` may be padded longer.

    Raises:
        TypeError, ValueError: naming the offending argument.
    """
    for name, t in (("key", key), ("value", value)):
        check_tensor(name, t, 3)
        if t.stride(-1) != 1 and t.numel() > 0:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got stride {t.stride(-1)}")
    _check_caches(key_cache, value_cache)
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}")
    if tuple(key.shape[1:]) != tuple(key_cache.shape[2:]):
        raise ValueError(
            f"key is [num_tokens, heads_kv, head_dim] = {tuple(key.shape)} but key_cache has heads_kv, head_dim = "
            f"{tuple(key_cache.shape[2:])}"
        )
    for name, t in (("key", key), ("value", value)):
        if t.dtype != key_cache.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must match the cache dtype {key_cache.dtype}")
        if t.device != key_cache.device:
            raise ValueError(f"{name} must be on the cache's device {key_cache.device}, got {t.device}")
    _check_int_tensor("slot_mapping", slot_mapping, 1, torch.int64, key_cache.device)
    if slot_mapping.shape[0] > key.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries but key/value only {key.shape[0]} tokens")
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        _check_kernel_alignment(name, t, t.dim() - 1)
    if slot_mapping.numel() and not _capturing_or_compiling():
        num_slots = key_cache.shape[0] * key_cache.shape[1]
        hi = int(slot_mapping.max())
        if hi >= num_slots:
            raise ValueError(f"slot_mapping entry {hi} is out of range for a cache of {num_slots} slots")
    torch.ops.sparsek.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: float | None = None,
    causal: bool = True,
    window: tuple[int, int] | None = None,
    return_lse: bool = False,
    num_decodes: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of packed queries over a paged KV cache: mixed prefill (with cached prefix) and decode batches.

    Args:
        q: ``[total_q, heads_q, head_dim]``, the requests' new query tokens concatenated.
        key_cache: ``[num_blocks, block_size, heads_kv, head_dim]`` (any strides, unit last stride); holds every key
            of every request, the new ones included (write them first with
            [`reshape_and_cache`][sparsek.paged.reshape_and_cache]).
        value_cache: same shape and dtype as ``key_cache``.
        block_table: int32 ``[batch, max_blocks]`` (any row stride): key ``j`` of request ``b`` lives in block
            ``block_table[b, j // block_size]``.
        cu_seqlens_q: int32 ``[batch + 1]`` prefix sums of the query lengths (starts at 0, ends at ``total_q``).
        seq_lens: int32 ``[batch]``, keys of each request in the cache (cached prefix + new tokens).
        max_seqlen_q: the longest query length (an upper bound is fine).
        max_seqlen_k: the longest ``seq_lens`` entry (an upper bound is fine).
        scale: softmax scale, default ``head_dim ** -0.5``.
        causal: bottom-right causal per request: query ``i`` of request ``b`` sits at position
            ``seq_lens[b] - q_len_b + i`` and sees keys up to it (vLLM's semantics).
        window: ``(left, right)`` sliding window around each query's position (``-1`` unbounded); with ``causal``
            the right side is 0. vLLM's ``sliding_window=w`` is ``window=(w - 1, 0)``.
        return_lse: also return the float32 log-sum-exp ``[heads_q, total_q]`` (natural log, ``-inf`` without keys).
        num_decodes: hint that requests ``0 .. num_decodes - 1`` have exactly one query each (vLLM puts decodes
            first); on CUDA they run the paged decode kernel, the others the paged FMHA kernel. With
            ``max_seqlen_q == 1`` every request is a decode. ``0`` runs everything through the FMHA kernel.
        out: optional preallocated output ``[total_q, heads_q, head_dim]`` of ``q``'s dtype, written in place.

    Returns:
        The output ``[total_q, heads_q, head_dim]`` (``out`` if given), and the LSE if ``return_lse``.

    Raises:
        TypeError, ValueError: naming the offending argument. Value checks that need the host (cu_seqlens, lengths
            against the block table) are skipped under CUDA-graph capture and ``torch.compile``.

    fp16/bf16 with head dims 64/128/256 on CUDA; any floating dtype and head dim on the CPU (reference path).
    """
    check_tensor("q", q, 3)
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating point tensor, got {q.dtype}")
    if q.device.type == "cuda" and q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q must be float16 or bfloat16 on the GPU, got {q.dtype}")
    if q.stride(-1) != 1 and q.numel() > 0:
        raise ValueError(f"q must have a contiguous last dimension (stride 1), got stride {q.stride(-1)}")
    _check_caches(key_cache, value_cache)
    if key_cache.dtype != q.dtype:
        raise TypeError(f"key_cache dtype {key_cache.dtype} must match q's dtype {q.dtype}")
    if key_cache.device != q.device:
        raise ValueError(f"key_cache must be on q's device {q.device}, got {key_cache.device}")
    if key_cache.shape[-1] != q.shape[-1]:
        raise ValueError(f"key_cache head_dim {key_cache.shape[-1]} must match q's head_dim {q.shape[-1]}")
    check_heads(q.shape[1], key_cache.shape[2], value_cache.shape[2])
    if q.device.type == "cuda" and q.shape[-1] not in KERNEL_HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[-1]} is not supported by sparsek's CUDA kernels ({KERNEL_HEAD_DIMS})")
    _check_int_tensor("seq_lens", seq_lens, 1, torch.int32, q.device)
    batch = seq_lens.shape[0]
    _check_int_tensor("cu_seqlens_q", cu_seqlens_q, 1, torch.int32, q.device)
    if cu_seqlens_q.shape[0] != batch + 1:
        raise ValueError(
            f"cu_seqlens_q must have batch + 1 = {batch + 1} entries (batch from seq_lens), got {cu_seqlens_q.shape[0]}"
        )
    _check_int_tensor("block_table", block_table, 2, torch.int32, q.device)
    if block_table.shape[0] < batch:
        raise ValueError(f"block_table must have at least batch = {batch} rows, got {block_table.shape[0]}")
    if block_table.stride(1) != 1 and block_table.numel() > 0:
        raise ValueError(f"block_table must have a contiguous last dimension (stride 1), got {block_table.stride(1)}")
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if int(n) < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    if not 0 <= int(num_decodes) <= batch:
        raise ValueError(f"num_decodes must be in [0, batch = {batch}], got {num_decodes}")
    for name, t in (("q", q), ("key_cache", key_cache), ("value_cache", value_cache)):
        _check_kernel_alignment(name, t, t.dim() - 1)
    left, right = normalize_window(window, causal)
    scale = check_scale(scale, q.shape[-1])
    if out is None:
        out = torch.empty_like(q)
    else:
        check_tensor("out", out, 3)
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(
                f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} {out.dtype} on {out.device}"
            )
        if out.stride(-1) != 1 and out.numel() > 0:
            raise ValueError(f"out must have a contiguous last dimension (stride 1), got stride {out.stride(-1)}")
    lse = q.new_empty((q.shape[1], q.shape[0]) if return_lse else (0,), dtype=torch.float32)
    if not _capturing_or_compiling():
        _check_lengths(q, key_cache, block_table, cu_seqlens_q, seq_lens, max_seqlen_q, max_seqlen_k, int(num_decodes))
    torch.ops.sparsek.paged_attention_out(
        q, key_cache, value_cache, block_table, cu_seqlens_q, seq_lens, int(max_seqlen_q), int(max_seqlen_k),
        scale, left, right, int(num_decodes), out, lse,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def _check_lengths(q, key_cache, block_table, cu_q, seq_lens, max_sq, max_sk, num_decodes) -> None:
    """Host-side value checks of the batch description (one device sync)."""
    cu = cu_q.cpu()
    lens = seq_lens.cpu()
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens_q must start at 0, got {int(cu[0])}")
    q_lens = cu[1:] - cu[:-1]
    if bool((q_lens < 0).any()):
        raise ValueError(f"cu_seqlens_q must be non-decreasing, got {cu.tolist()}")
    if int(cu[-1]) != q.shape[0]:
        raise ValueError(f"cu_seqlens_q[-1] must equal total_q = {q.shape[0]}, got {int(cu[-1])}")
    if lens.numel() == 0:
        return
    if bool((lens < q_lens).any()):
        raise ValueError(
            f"seq_lens must be >= each request's query length (it counts the new tokens too); "
            f"seq_lens={lens.tolist()}, query lengths={q_lens.tolist()}"
        )
    if int(q_lens.max()) > max_sq or int(lens.max()) > max_sk:
        raise ValueError(
            f"max_seqlen_q/max_seqlen_k ({max_sq}, {max_sk}) are smaller than the longest query/key lengths "
            f"({int(q_lens.max())}, {int(lens.max())})"
        )
    if num_decodes and bool((q_lens[:num_decodes] > 1).any()):
        raise ValueError(f"num_decodes={num_decodes} but some of the first {num_decodes} requests have >1 query")
    bs = key_cache.shape[1]
    need = int(((lens + bs - 1) // bs).max())
    if need > block_table.shape[1]:
        raise ValueError(
            f"block_table has {block_table.shape[1]} columns but a request needs {need} blocks of {bs} keys"
        )
    if need > 0:
        used = block_table[: lens.numel(), :need].cpu()
        mask = torch.arange(need).unsqueeze(0) < ((lens + bs - 1) // bs).unsqueeze(1)
        ids = used[mask]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= key_cache.shape[0]):
            raise ValueError(
                f"block_table entries must lie in [0, num_blocks = {key_cache.shape[0]}), got "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )


def paged_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seqlen_k: int,
    *,
    scale: float | None = None,
    window_left: int = -1,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode step: one query per request (``q`` is ``[batch, heads_q, head_dim]``) over the paged cache.

    Request ``b``'s query sits at position ``seq_lens[b] - 1`` and attends keys
    ``[max(0, seq_lens[b] - 1 - window_left), seq_lens[b])``. Same as
    [`paged_attention`][sparsek.paged.paged_attention] with ``cu_seqlens_q = arange(batch + 1)``; on CUDA it runs the
    GQA-grouped split-KV decode kernel. Returns ``[batch, heads_q, head_dim]`` (and the LSE ``[heads_q, batch]``).
    """
    check_tensor("q", q, 3)
    check_tensor("seq_lens", seq_lens, 1)
    if q.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"q has {q.shape[0]} rows but seq_lens has {seq_lens.shape[0]} requests (one query each)")
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_attention(
        q, key_cache, value_cache, block_table, cu, seq_lens, 1, max_seqlen_k,
        scale=scale, causal=True, window=(int(window_left), 0), return_lse=return_lse,
        num_decodes=q.shape[0], out=out,
    )  # fmt: skip
