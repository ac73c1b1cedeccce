"""SparseK sparse attention (Lou et al. 2024, arXiv 2406.16747): selection, the SparseK operator and sparse attention.

Conventions (see ``docs/sparse.md``):

* ``q`` is ``[B, Sq, Hq, D]``, ``k``/``v`` are ``[B, Sk, Hkv, D]`` (``bshd``, unit last stride), ``Hq % Hkv == 0``.
  Query ``i`` sits at key position ``pos = i + Sk - Sq`` (bottom-right alignment, as in
  [`sparsek.attention`][sparsek.attention.attention]).
* ``window = w > 0`` is the local band ``[pos - w + 1, pos]`` (``w`` keys including the query); ``w = 0``: no band.
* Index lists are int32 key positions, ``-1`` padded, one list per KV head: per query ``[B, Hkv, Sq, n]`` or shared
  by each block of ``block_size`` consecutive queries ``[B, Hkv, ceil(Sq / block_size), n]``.

GPU ops are registered as ``torch.ops.sparsek.{topk_select, block_union_intervals, per_query_block_lists,
topk_attn_fwd, index_attn_fwd, interval_attn_fwd, block_attn_fwd}``
(namespace fragment), with fake implementations, so they trace under ``torch.compile``. On CPU tensors the references
in [`sparsek.reference.sparse`][sparsek.reference.sparse] and
[`sparsek.selection_intervals`][sparsek.selection_intervals] run.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import torch

from . import _lib, ops  # noqa: F401  (ops registers the sparsek namespace first)
from ._validation import check_heads, check_qkv, check_scale, check_tensor
from .reference.sparse import (
    _attend,
    _block_scores,
    interval_index_mask,
    select_limits,
    selected_mask_values,
    sparsek_threshold_ref,
    topk_attention_ref,
    topk_rows_ref,
)
from .selection_intervals import block_union_intervals, union_width

__all__ = [
    "BlockSparseLayout",
    "block_sparse_attention",
    "block_sparse_layout",
    "sparsek_attention",
    "sparsek_mask",
    "sparsek_select",
    "topk_attention",
]

#: Head dims of the per-query gather kernel (``csrc/topk_attention.cu``).
TOPK_KERNEL_HEAD_DIMS = (64, 128)
#: Head dims of the lead's FMHA kernel in index-list mode.
INDEX_KERNEL_HEAD_DIMS = (64, 128, 256)


# --------------------------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return value


def _check_window(window: object, causal: bool) -> int:
    w = _check_int("window", window, lo=0)
    if not causal and w > 0:
        raise ValueError(f"window={w} needs causal=True (the local band is [pos - window + 1, pos])")
    return w


def _check_block_size(name: str, block_size: object) -> int | None:
    if block_size is None:
        return None
    return _check_int(name, block_size, lo=1)


def _host_checks_allowed() -> bool:
    return not (
        torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
    )


def _check_index_tensor(
    name: str, idx: object, batch: int, heads: tuple[int, ...], rows: int, hi: int, device: torch.device, validate: bool
) -> torch.Tensor:
    """int32 ``[B or 1, H, rows, n]`` on ``device`` with values in ``[-1, hi)`` (host check) and no repeats."""
    idx = _check_index_form(name, idx, rows, device)
    _check_index_owners(name, idx, batch, heads)
    if validate:
        _check_index_values(name, idx, hi)
    if idx.shape[0] != batch:
        idx = idx.expand(batch, -1, -1, -1)
    return idx


def _check_index_form(name: str, idx: object, rows: int, device: torch.device | None) -> torch.Tensor:
    """A 4-D int32 tensor (on ``device`` when given) with ``rows`` lists in dim 2."""
    idx = check_tensor(name, idx, 4)
    if idx.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {idx.dtype}")
    if device is not None and idx.device != device:
        raise ValueError(f"{name} must be on {device} (like q), got {idx.device}")
    if idx.shape[2] != rows:
        raise ValueError(f"{name}.shape[2] must be {rows} (query rows or blocks), got shape {tuple(idx.shape)}")
    return idx


def _check_index_owners(name: str, idx: torch.Tensor, batch: int, heads: tuple[int, ...]) -> None:
    """Dim 0 is the batch (or 1), dim 1 one of the allowed head counts."""
    if idx.shape[0] not in (1, batch):
        raise ValueError(f"{name}.shape[0] must be the batch size {batch} (or 1), got shape {tuple(idx.shape)}")
    if idx.shape[1] not in heads:
        raise ValueError(f"{name}.shape[1] must be one of {heads} (heads), got shape {tuple(idx.shape)}")


def _check_index_values(name: str, idx: torch.Tensor, hi: int) -> None:
    """Values in ``[-1, hi)`` and no repeated entry within a list (one device sync; skipped while tracing)."""
    if idx.numel() == 0 or not _host_checks_allowed():
        return
    lo_v, hi_v = int(idx.min()), int(idx.max())
    if lo_v < -1 or hi_v >= hi:
        raise ValueError(f"{name} values must lie in [-1, {hi}) (-1 = padding), got min {lo_v}, max {hi_v}")
    srt = idx.sort(-1).values
    if bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()):
        raise ValueError(f"{name} must not repeat an entry within one list (found a repeated index)")


def _check_kernel_head_dim(q: torch.Tensor, dims: tuple[int, ...], what: str) -> None:
    if q.device.type == "cuda" and q.shape[-1] not in dims:
        raise ValueError(f"head dim {q.shape[-1]} is not supported by the {what} CUDA kernel (supported: {dims})")


def _check_attn_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_qkv(q, k, v, ndim=4)
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k, v must have the same batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same sequence length, got {k.shape[1]} and {v.shape[1]}")
    check_heads(q.shape[2], k.shape[2], v.shape[2])


# --------------------------------------------------------------------------------------------------------------------
# ctypes bindings of csrc/sparse_abi.h
# --------------------------------------------------------------------------------------------------------------------

_i64, _i32, _ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p


class SkTopkAttnParams(ctypes.Structure):
    """ctypes mirror of ``SkTopkAttnParams`` in ``csrc/sparse_abi.h``."""

    _fields_ = [
        ("q", _ptr), ("k", _ptr), ("v", _ptr), ("o", _ptr), ("lse", _ptr), ("indices", _ptr),
        ("q_batch_stride", _i64), ("q_row_stride", _i64), ("q_head_stride", _i64),
        ("k_batch_stride", _i64), ("k_row_stride", _i64), ("k_head_stride", _i64),
        ("v_batch_stride", _i64), ("v_row_stride", _i64), ("v_head_stride", _i64),
        ("o_batch_stride", _i64), ("o_row_stride", _i64), ("o_head_stride", _i64),
        ("lse_batch_stride", _i64), ("lse_head_stride", _i64),
        ("idx_batch_stride", _i64), ("idx_head_stride", _i64), ("idx_row_stride", _i64),
        ("batch", _i32), ("heads_q", _i32), ("heads_kv", _i32), ("seqlen_q", _i32), ("seqlen_k", _i32),
        ("head_dim", _i32), ("num_indices", _i32), ("window", _i32), ("causal", _i32), ("is_bf16", _i32),
        ("scale_log2", ctypes.c_float), ("pad0", _i32),
    ]  # fmt: skip


#: Version of ``csrc/sparse_abi.h`` (``sk_sparse_abi_version``) these bindings expect.
SPARSE_ABI_VERSION = 6
_BOUND: set[int] = set()


def _sparse_lib(device: torch.device) -> ctypes.CDLL:
    lib = _lib.load(device)
    if id(lib) not in _BOUND:
        lib.sk_sparse_abi_version.restype = ctypes.c_int
        lib.sk_topk_select.argtypes = [
            _ptr, _i64, _i64, _i64, _i32, _i32, _i32, _i32, _i32, _i32, _i32, _ptr, _ptr, _ptr
        ]  # fmt: skip
        lib.sk_topk_select.restype = ctypes.c_int
        lib.sk_topk_attn_fwd.argtypes = [ctypes.POINTER(SkTopkAttnParams), _ptr]
        lib.sk_topk_attn_fwd.restype = ctypes.c_int
        if lib.sk_sparse_abi_version() != SPARSE_ABI_VERSION:
            raise _lib.KernelUnavailable("stale sparsek library: sparse ABI version mismatch")
        lib.sk_key_order_workspace_bytes.argtypes = [_i64, _i32, _i32, ctypes.POINTER(ctypes.c_int64)]
        lib.sk_key_order_workspace_bytes.restype = ctypes.c_int
        lib.sk_key_order.argtypes = [
            _ptr, _i32, _i64, _i64, _i64, _i32, _i32, _i32, _ptr, _ptr, _ptr, _ptr, _i64, _ptr
        ]  # fmt: skip
        lib.sk_key_order.restype = ctypes.c_int
        lib.sk_interval_build.argtypes = [
            _ptr, _ptr, _ptr, _ptr, _i32, _i32, _i32, _i32, _i32, _i32, _i32, _i64, _i64, _i32, _i32, _ptr, _ptr, _ptr,
            _ptr,
        ]  # fmt: skip
        lib.sk_interval_build.restype = ctypes.c_int
        _BOUND.add(id(lib))
    return lib


def _stream(device: torch.device) -> ctypes.c_void_p:
    return _lib.current_stream(device)


def _kernel_or_fallback(device: torch.device) -> ctypes.CDLL | None:
    try:
        return _sparse_lib(device)
    except _lib.KernelUnavailable:
        if not _lib.fallback_allowed():
            raise
        return None


# --------------------------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------------------------

_FRAG = torch.library.Library("sparsek", "FRAGMENT")
_FRAG.define("topk_select(Tensor scores, int k, int num_rows, int off, int step) -> (Tensor, Tensor)")
_FRAG.define(
    "block_union_intervals(Tensor scores, Tensor first_sets, int k, int seqlen_q, int off, int block_size) "
    "-> (Tensor, Tensor, Tensor)"
)
_FRAG.define(
    "per_query_block_lists(Tensor scores, int k, int seqlen_q, int off, int block_size) -> (Tensor, Tensor, Tensor)"
)
_FRAG.define(
    "topk_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor indices, float scale, int window, bool causal, "
    "bool return_lse) -> (Tensor, Tensor)"
)
_FRAG.define(
    "index_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor kv_indices, Tensor kv_counts, int index_block_q, "
    "float scale, int window_left, int window_right, bool return_lse) -> (Tensor, Tensor)"
)
_FRAG.define(
    "interval_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor kv_indices, Tensor kv_intervals, Tensor kv_counts, "
    "int index_block_q, float scale, int window_left, bool return_lse) -> (Tensor, Tensor)"
)
_FRAG.define(
    "block_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor kv_starts, Tensor kv_counts, int index_block_q, int run, "
    "float scale, int window_left, int window_right, bool return_lse) -> (Tensor, Tensor)"
)


def _select_alloc(scores: torch.Tensor, k: int, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, h = scores.shape[0], scores.shape[1]
    idx = scores.new_empty((b, h, num_rows, k), dtype=torch.int32)
    cnt = scores.new_empty((b, h, num_rows), dtype=torch.int32)
    return idx, cnt


@torch.library.impl(_FRAG, "topk_select", "CPU")
def _topk_select_cpu(scores, k, num_rows, off, step):
    return topk_rows_ref(scores, k, num_rows, off, step)


@torch.library.impl(_FRAG, "topk_select", "CUDA")
def _topk_select_cuda(scores, k, num_rows, off, step):
    lib = _kernel_or_fallback(scores.device)
    if lib is None:
        return topk_rows_ref(scores, k, num_rows, off, step)
    idx, cnt = _select_alloc(scores, k, num_rows)
    if idx.numel() == 0:
        cnt.zero_()
        return idx, cnt
    s = scores if scores.dtype == torch.float32 else scores.float()
    if s.stride(-1) != 1:
        s = s.contiguous()
    b, h, sk = s.shape[0], s.shape[1], s.shape[-1]
    row_stride = s.stride(2) if s.dim() == 4 else 0
    with _lib.on_device(s.device):
        code = lib.sk_topk_select(
            s.data_ptr(), s.stride(0), s.stride(1), row_stride, b, h, num_rows, sk, k, off, step,
            idx.data_ptr(), cnt.data_ptr(), _stream(s.device),
        )  # fmt: skip
    _lib.check(lib, code, "top-k selection")
    return idx, cnt


@torch.library.register_fake("sparsek::topk_select")
def _topk_select_fake(scores, k, num_rows, off, step):
    return _select_alloc(scores, k, num_rows)


#: Largest ``first_sets`` width and ``block_size`` the interval-build kernel takes (``csrc/interval_build.cu``: the
#: block's ranks are sorted in shared memory, 4 bytes each); larger ones run the PyTorch implementation.
INTERVAL_KERNEL_MAX_SETS = 16384
INTERVAL_KERNEL_MAX_BLOCK = 1024
_I32_MAX = 2**31 - 1


def _check_list_build_args(scores, k, seqlen_q, off, block_size) -> tuple[int, int]:
    """Checks of the arguments that ``block_union_intervals`` and ``per_query_block_lists`` share (scores and the
    scalars); returns ``k`` and ``block_size``."""
    check_tensor("scores", scores, 3)
    if not scores.dtype.is_floating_point:
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")
    if scores.shape[2] >= _I32_MAX:
        raise ValueError(f"scores has too many keys ({scores.shape[2]}); at most {_I32_MAX - 1}")
    k = _check_int("k", k, lo=1, hi=_I32_MAX)
    _check_int("seqlen_q", seqlen_q, lo=0, hi=2**62)
    _check_int("off", off, lo=-(2**62), hi=2**62)
    return k, _check_int("block_size", block_size, lo=1, hi=2**15 - 1)


def _check_union_args(scores, first_sets, k, seqlen_q, off, block_size) -> int:
    """Checks of ``block_union_intervals``'s arguments (shapes, dtypes, devices, ranges); returns the list width."""
    k, block_size = _check_list_build_args(scores, k, seqlen_q, off, block_size)
    check_tensor("first_sets", first_sets, 4)
    if first_sets.dtype != torch.int32:
        raise TypeError(f"first_sets must be int32, got {first_sets.dtype}")
    if first_sets.device != scores.device:
        raise ValueError(f"first_sets must be on {scores.device} (like scores), got {first_sets.device}")
    if tuple(first_sets.shape[:2]) != tuple(scores.shape[:2]):
        raise ValueError(
            f"first_sets must be [B, H, num_blocks, n] with B, H of scores {tuple(scores.shape)}, "
            f"got shape {tuple(first_sets.shape)}"
        )
    if first_sets.shape[3] < 1:
        raise ValueError(f"first_sets must hold at least one entry per block, got shape {tuple(first_sets.shape)}")
    return union_width(first_sets.shape[3], k, block_size)


def _union_alloc(first_sets: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, nb = first_sets.shape[:3]
    lists = first_sets.new_empty((b, h, nb, n))
    return lists, torch.empty_like(lists), first_sets.new_empty((b, h, nb))


@torch.library.impl(_FRAG, "block_union_intervals", "CPU")
def _block_union_intervals_cpu(scores, first_sets, k, seqlen_q, off, block_size):
    _check_union_args(scores, first_sets, k, seqlen_q, off, block_size)
    return block_union_intervals(scores, first_sets, k, seqlen_q, off, block_size)


def _sorted_keys(lib: ctypes.CDLL, scores: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """Runs ``sk_key_order`` on ``scores`` (call on their device) into one new buffer laid out as the int32 key order,
    ranks and selectable prefix, then the sort workspace. Returns the buffer (keep it until the kernels that read it
    are enqueued) and the addresses of order, ranks and prefix."""
    b, h, sk = scores.shape
    dev = scores.device
    s, dtype = _key_order_scores(scores)
    rows = b * h
    n_keys, n_prefix = _align(4 * rows * sk), _align(4 * rows * (sk + 1))
    ws_bytes = _key_order_workspace(lib, dev, rows, sk, dtype)
    buf = torch.empty(2 * n_keys + n_prefix + ws_bytes, dtype=torch.uint8, device=dev)
    order = buf.data_ptr()
    ranks, prefix = order + n_keys, order + 2 * n_keys
    code = lib.sk_key_order(
        s.data_ptr(), dtype, s.stride(0), s.stride(1), s.stride(2), b, h, sk, order, ranks, prefix, prefix + n_prefix,
        ws_bytes, _stream(dev),
    )  # fmt: skip
    _lib.check(lib, code, "key order")
    return buf, order, ranks, prefix


#: ``SK_SETS_*`` of ``csrc/sparse_abi.h``: how ``sk_interval_build`` gets each block's first-query selection.
_SETS_KEYS, _SETS_SCAN = 0, 1


def _interval_build(lib, scores, order, ranks, prefix, first_sets, num_sets, k, seqlen_q, off, block_size, lists,
                    intervals, counts, sets_mode=_SETS_KEYS) -> int:  # fmt: skip
    """Launches ``sk_interval_build`` (addresses from ``_sorted_keys``; first sets ``[B, H, nb, num_sets]`` of keys,
    or with ``_SETS_SCAN`` none: the kernel reads each block's set off the key order)."""
    b, h, nb, n = lists.shape
    return lib.sk_interval_build(
        ranks, order, prefix, first_sets, sets_mode, b, h, nb, num_sets, scores.shape[2], k, seqlen_q, off,
        block_size, n, lists.data_ptr(), intervals.data_ptr(), counts.data_ptr(), _stream(scores.device),
    )  # fmt: skip


@torch.library.impl(_FRAG, "block_union_intervals", "CUDA")
def _block_union_intervals_cuda(scores, first_sets, k, seqlen_q, off, block_size):
    n = _check_union_args(scores, first_sets, k, seqlen_q, off, block_size)
    sets = first_sets.shape[3]
    lib = _kernel_or_fallback(scores.device)
    if lib is None or sets > INTERVAL_KERNEL_MAX_SETS or block_size > INTERVAL_KERNEL_MAX_BLOCK:
        return block_union_intervals(scores, first_sets, k, seqlen_q, off, block_size)
    lists, intervals, counts = _union_alloc(first_sets, n)
    if counts.numel() == 0:
        return lists, intervals, counts
    fs = first_sets if first_sets.is_contiguous() else first_sets.contiguous()
    with _lib.on_device(scores.device):
        _buf, order, ranks, prefix = _sorted_keys(lib, scores)
        code = _interval_build(lib, scores, order, ranks, prefix, fs.data_ptr(), sets, k, seqlen_q, off, block_size,
                               lists, intervals, counts)  # fmt: skip
    _lib.check(lib, code, "block interval build")
    return lists, intervals, counts


#: ``SK_SCORES_*`` codes of ``csrc/sparse_abi.h``; other floating dtypes are converted to float32 first.
_SCORE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_KEY_ORDER_WS: dict[tuple[int, int, int, int], int] = {}  # (device, rows, Sk, dtype code) -> workspace bytes


def _align(nbytes: int) -> int:
    return (nbytes + 255) & ~255


def _key_order_scores(scores: torch.Tensor) -> tuple[torch.Tensor, int]:
    code = _SCORE_DTYPES.get(scores.dtype)
    if code is None:  # e.g. float8: exact in float32, with the same -inf keys
        return scores.float(), 0
    return scores, code


def _key_order_workspace(lib: ctypes.CDLL, device: torch.device, rows: int, sk: int, dtype: int) -> int:
    """Bytes of ``sk_key_order``'s workspace (a host-only query, cached; call on ``device``)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, rows, sk, dtype)
    nbytes = _KEY_ORDER_WS.get(key)
    if nbytes is None:
        out = ctypes.c_int64(0)
        _lib.check(lib, lib.sk_key_order_workspace_bytes(rows, sk, dtype, ctypes.byref(out)), "key order workspace")
        nbytes = _KEY_ORDER_WS[key] = out.value
    return nbytes


def key_order_cuda(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CUDA kernels' selection order, ranks and selectable prefix of float ``[B, H, Sk]`` CUDA scores (no NaN):
    int32 ``order`` and ``ranks`` ``[B, H, Sk]`` and ``prefix`` ``[B, H, Sk + 1]``, equal to
    [`key_order_and_ranks`][sparsek.selection_intervals.key_order_and_ranks] (order as int32) and
    [`selectable_prefix`][sparsek.selection_intervals.selectable_prefix]. Asynchronous (``csrc/key_order.cu``)."""
    check_tensor("scores", scores, 3)
    if not scores.dtype.is_floating_point or scores.device.type != "cuda":
        raise TypeError(f"scores must be a floating-point CUDA tensor, got {scores.dtype} on {scores.device}")
    b, h, sk = scores.shape
    if sk >= _I32_MAX or b * h > 2**31:
        raise ValueError(f"scores of shape {tuple(scores.shape)} are too large")
    lib = _sparse_lib(scores.device)
    with _lib.on_device(scores.device):
        buf, order, ranks, prefix = _sorted_keys(lib, scores)

    def part(addr: int, shape: tuple[int, ...]) -> torch.Tensor:  # int32 view of the buffer at ``addr``
        at = addr - buf.data_ptr()
        return buf[at : at + 4 * b * h * shape[-1]].view(torch.int32).view(shape)

    return part(order, (b, h, sk)), part(ranks, (b, h, sk)), part(prefix, (b, h, sk + 1))


@torch.library.register_fake("sparsek::block_union_intervals")
def _block_union_intervals_fake(scores, first_sets, k, seqlen_q, off, block_size):
    return _union_alloc(first_sets, union_width(first_sets.shape[3], k, block_size))


# Per-query SparseK as block lists: each block's first-query selection, then the union lists and query intervals.
def _per_query_block_lists_ops(scores, k, seqlen_q, off, block_size):
    _check_list_build_args(scores, k, seqlen_q, off, block_size)
    nb = -(-seqlen_q // block_size)
    first, _ = torch.ops.sparsek.topk_select(scores, k, nb, off, block_size)
    return torch.ops.sparsek.block_union_intervals(scores, first, k, seqlen_q, off, block_size)


@torch.library.impl(_FRAG, "per_query_block_lists", "CPU")
def _per_query_block_lists_cpu(scores, k, seqlen_q, off, block_size):
    return _per_query_block_lists_ops(scores, k, seqlen_q, off, block_size)


@torch.library.impl(_FRAG, "per_query_block_lists", "CUDA")
def _per_query_block_lists_cuda(scores, k, seqlen_q, off, block_size):
    """One key order (CUB sort) serves both steps: the interval kernel reads each block's first-query set off the
    order (the first keys below the block's prefix) and builds the block's list from it."""
    k, block_size = _check_list_build_args(scores, k, seqlen_q, off, block_size)
    lib = _kernel_or_fallback(scores.device)
    if lib is None or k > INTERVAL_KERNEL_MAX_SETS or block_size > INTERVAL_KERNEL_MAX_BLOCK or scores.shape[2] == 0:
        return _per_query_block_lists_ops(scores, k, seqlen_q, off, block_size)
    lists, intervals, counts = _per_query_alloc(scores, k, seqlen_q, block_size)
    if counts.numel() == 0:
        return lists, intervals, counts
    with _lib.on_device(scores.device):
        _buf, order, ranks, prefix = _sorted_keys(lib, scores)
        code = _interval_build(lib, scores, order, ranks, prefix, None, k, k, seqlen_q, off, block_size, lists,
                               intervals, counts, sets_mode=_SETS_SCAN)  # fmt: skip
    _lib.check(lib, code, "block interval build")
    return lists, intervals, counts


def _per_query_alloc(scores: torch.Tensor, k: int, seqlen_q: int, block_size: int):
    b, h, nb = scores.shape[0], scores.shape[1], -(-seqlen_q // block_size)
    lists = scores.new_empty((b, h, nb, union_width(k, k, block_size)), dtype=torch.int32)
    return lists, torch.empty_like(lists), scores.new_empty((b, h, nb), dtype=torch.int32)


@torch.library.register_fake("sparsek::per_query_block_lists")
def _per_query_block_lists_fake(scores, k, seqlen_q, off, block_size):
    return _per_query_alloc(scores, k, seqlen_q, block_size)


def _attn_alloc(q: torch.Tensor, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty_like(q)
    shape = (q.shape[0], q.shape[2], q.shape[1]) if return_lse else (0,)
    return out, q.new_empty(shape, dtype=torch.float32)


def _into(
    q: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor], return_lse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy a reference result into freshly allocated outputs with the kernels' (contiguous) layout."""
    out, lse = _attn_alloc(q, return_lse)
    out.copy_(ref[0])
    if return_lse:
        lse.copy_(ref[1])
    return out, lse


def _topk_attn_reference(q, k, v, indices, scale, window, causal, return_lse):
    ref = topk_attention_ref(q, k, v, indices, scale=scale, window=window, causal=causal, return_lse=True)
    return _into(q, ref, return_lse)


@torch.library.impl(_FRAG, "topk_attn_fwd", "CPU")
def _topk_attn_cpu(q, k, v, indices, scale, window, causal, return_lse):
    return _topk_attn_reference(q, k, v, indices, scale, window, causal, return_lse)


@torch.library.impl(_FRAG, "topk_attn_fwd", "CUDA")
def _topk_attn_cuda(q, k, v, indices, scale, window, causal, return_lse):
    lib = _kernel_or_fallback(q.device)
    if lib is None:
        return _topk_attn_reference(q, k, v, indices, scale, window, causal, return_lse)
    out, lse = _attn_alloc(q, return_lse)
    if q.numel() == 0:
        return out, lse
    if indices.stride(-1) != 1 and indices.shape[-1] > 1:
        indices = indices.contiguous()
    lb, lh = (lse.stride(0), lse.stride(1)) if return_lse else (0, 0)
    p = SkTopkAttnParams(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr() if return_lse else None,
        indices.data_ptr() if indices.numel() else None,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), lb, lh,
        indices.stride(0), indices.stride(1), indices.stride(2),
        q.shape[0], q.shape[2], k.shape[2], q.shape[1], k.shape[1], q.shape[3], indices.shape[3],
        window, int(causal), int(q.dtype == torch.bfloat16), scale * _lib._LOG2E, 0,
    )  # fmt: skip
    with _lib.on_device(q.device):
        code = lib.sk_topk_attn_fwd(ctypes.byref(p), _stream(q.device))
    _lib.check(lib, code, "top-k attention")
    return out, lse


@torch.library.register_fake("sparsek::topk_attn_fwd")
def _topk_attn_fake(q, k, v, indices, scale, window, causal, return_lse):
    return _attn_alloc(q, return_lse)


def _index_attn_reference(q, k, v, kv_indices, kv_counts, ibq, scale, wl, wr, return_lse):
    n = kv_indices.shape[-1]
    keep = torch.arange(n, device=kv_indices.device) < kv_counts.unsqueeze(-1)
    idx = torch.where(keep, kv_indices, torch.full_like(kv_indices, -1))
    window = wl + 1 if wl >= 0 else 0
    ref = topk_attention_ref(q, k, v, idx, scale=scale, window=window, causal=wr == 0, block_size=ibq, return_lse=True)
    return _into(q, ref, return_lse)


@torch.library.impl(_FRAG, "index_attn_fwd", "CPU")
def _index_attn_cpu(q, k, v, kv_indices, kv_counts, ibq, scale, wl, wr, return_lse):
    return _index_attn_reference(q, k, v, kv_indices, kv_counts, ibq, scale, wl, wr, return_lse)


@torch.library.impl(_FRAG, "index_attn_fwd", "CUDA")
def _index_attn_cuda(q, k, v, kv_indices, kv_counts, ibq, scale, wl, wr, return_lse):
    return _index_fmha_cuda(q, k, v, kv_indices, kv_counts, ibq, 1, scale, wl, wr, return_lse)


@torch.library.register_fake("sparsek::index_attn_fwd")
def _index_attn_fake(q, k, v, kv_indices, kv_counts, ibq, scale, wl, wr, return_lse):
    return _attn_alloc(q, return_lse)


def _runs_to_tokens(starts: torch.Tensor, counts: torch.Tensor, run: int, sk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run lists (first key of ``run`` consecutive keys, first ``counts`` entries used) → token lists and counts."""
    keep = torch.arange(starts.shape[-1], device=starts.device) < counts.unsqueeze(-1)
    starts = torch.where(keep, starts, torch.full_like(starts, -1))
    tok = starts.unsqueeze(-1) + torch.arange(run, device=starts.device, dtype=torch.int32)
    tok = torch.where((starts.unsqueeze(-1) >= 0) & (tok < sk), tok, torch.full_like(tok, -1)).flatten(-2)
    return tok, torch.full(tok.shape[:3], tok.shape[-1], dtype=torch.int32, device=tok.device)


@torch.library.impl(_FRAG, "block_attn_fwd", "CPU")
def _block_attn_cpu(q, k, v, kv_starts, kv_counts, ibq, run, scale, wl, wr, return_lse):
    tok, cnt = _runs_to_tokens(kv_starts, kv_counts, run, k.shape[1])
    return _index_attn_reference(q, k, v, tok, cnt, ibq, scale, wl, wr, return_lse)


@torch.library.impl(_FRAG, "block_attn_fwd", "CUDA")
def _block_attn_cuda(q, k, v, kv_starts, kv_counts, ibq, run, scale, wl, wr, return_lse):
    return _index_fmha_cuda(q, k, v, kv_starts, kv_counts, ibq, run, scale, wl, wr, return_lse)


def _interval_attn_reference(q, k, v, kv_indices, kv_intervals, kv_counts, ibq, scale, wl, return_lse):
    keep = torch.arange(kv_indices.shape[-1], device=kv_indices.device) < kv_counts.unsqueeze(-1)
    idx = torch.where(keep, kv_indices, torch.full_like(kv_indices, -1))
    window = wl + 1 if wl >= 0 else 0
    allowed = interval_index_mask(idx, kv_intervals, q.shape[1], k.shape[1], ibq, window=window)
    return _into(q, _attend(q, k, v, allowed, scale, True), return_lse)


@torch.library.impl(_FRAG, "interval_attn_fwd", "CPU")
def _interval_attn_cpu(q, k, v, kv_indices, kv_intervals, kv_counts, ibq, scale, wl, return_lse):
    return _interval_attn_reference(q, k, v, kv_indices, kv_intervals, kv_counts, ibq, scale, wl, return_lse)


@torch.library.impl(_FRAG, "interval_attn_fwd", "CUDA")
def _interval_attn_cuda(q, k, v, kv_indices, kv_intervals, kv_counts, ibq, scale, wl, return_lse):
    return _index_fmha_cuda(q, k, v, kv_indices, kv_counts, ibq, 1, scale, wl, 0, return_lse, kv_intervals)


@torch.library.register_fake("sparsek::interval_attn_fwd")
def _interval_attn_fake(q, k, v, kv_indices, kv_intervals, kv_counts, ibq, scale, wl, return_lse):
    return _attn_alloc(q, return_lse)


def _index_fmha_cuda(q, k, v, lists, counts, ibq, run, scale, wl, wr, return_lse, intervals=None):
    """Both index ops on CUDA: the FMHA kernel's index-list mode (``run`` keys per entry), or the reference when the
    kernels cannot be built and ``SPARSEK_ALLOW_FALLBACK=1``."""
    try:
        _lib.load(q.device)
    except _lib.KernelUnavailable:
        if not _lib.fallback_allowed():
            raise
        if intervals is not None:
            return _interval_attn_reference(q, k, v, lists, intervals, counts, ibq, scale, wl, return_lse)
        if run == 1:
            return _index_attn_reference(q, k, v, lists, counts, ibq, scale, wl, wr, return_lse)
        return _block_attn_cpu(q, k, v, lists, counts, ibq, run, scale, wl, wr, return_lse)
    out, lse = _attn_alloc(q, return_lse)
    if q.numel() == 0:
        return out, lse
    _lib.fmha_fwd(
        q, k, v, out, lse if return_lse else None,
        cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, block_table=None,
        max_seqlen_q=q.shape[1], max_seqlen_k=k.shape[1], scale=scale, window_left=wl, window_right=wr,
        kv_indices=lists.contiguous(), kv_counts=counts.contiguous(), index_block_q=ibq, kv_index_run=run,
        kv_intervals=intervals.contiguous() if intervals is not None else None,
    )  # fmt: skip
    return out, lse


@torch.library.register_fake("sparsek::block_attn_fwd")
def _block_attn_fake(q, k, v, kv_starts, kv_counts, ibq, run, scale, wl, wr, return_lse):
    return _attn_alloc(q, return_lse)


# --------------------------------------------------------------------------------------------------------------------
# SparseK operator
# --------------------------------------------------------------------------------------------------------------------


class _SparseKMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, k: int) -> torch.Tensor:
        tau, in_s, in_h, _ = sparsek_threshold_ref(z, k)
        m = torch.where(in_s, (z - tau.unsqueeze(-1).to(z.dtype)).clamp(0.0, 1.0), in_h.to(z.dtype))
        ctx.save_for_backward(in_s)
        return m

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (in_s,) = ctx.saved_tensors
        g = grad.masked_fill(~in_s, 0.0)
        mean = g.sum(-1, keepdim=True) / in_s.sum(-1, keepdim=True).clamp_min(1).to(g.dtype)
        return (g - mean).masked_fill(~in_s, 0.0), None


def sparsek_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The differentiable SparseK operator: projection of each row onto ``{0 <= m <= 1, sum m = k}``.

    ``m = clip(z - tau, 0, 1)`` with the per-row threshold ``tau`` solved exactly by sorting (``O(n log n)`` per
    row). The Jacobian is that of the projection: for entries strictly inside ``(0, 1)`` (set ``S``),
    ``dm_i/dz_j = [i == j] - 1/|S|``; entries at 0 or 1 have zero gradient.

    Args:
        scores: floating tensor ``[..., n]``; the operator acts on the last dim. ``-inf`` entries are excluded
            (mask 0); a row with at most ``k`` finite entries gets 1 on each of them.
        k: budget, ``1 <= k <= n``.

    Returns:
        The mask, same shape and dtype as ``scores``; every row with more than ``k`` finite entries sums to ``k``.
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating point tensor, got {scores.dtype}")
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension")
    _check_int("k", k, lo=1, hi=scores.shape[-1])
    return _SparseKMask.apply(scores, k)


# --------------------------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------------------------


def _check_selection(scores: torch.Tensor, k: int, window: object, causal: bool, sq: int, validate: bool) -> int:
    """Budget, window and query count of a selection over ``scores`` (keys in the last dim), and no NaN scores when
    ``validate`` (one device sync; skipped while tracing). Returns the window."""
    sk = scores.shape[-1]
    _check_int("k", k, lo=1, hi=sk)
    window = _check_window(window, causal)
    if causal and sq > sk:
        raise ValueError(f"causal selection needs seqlen_q <= Sk, got seqlen_q={sq}, Sk={sk}")
    if validate and scores.numel() > 0 and _host_checks_allowed() and bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN; selection needs finite or -inf scores (-inf keys are never selected)")
    return window


def sparsek_select(
    scores: torch.Tensor,
    k: int,
    *,
    causal: bool = True,
    window: int = 0,
    block_size: int | None = None,
    return_mask: bool = False,
    seqlen_q: int | None = None,
    validate: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Hard top-k selection of key positions per query (or per query block) among its causal prefix minus its band.

    Args:
        scores: the scoring network's output per KV head. ``[B, Hkv, Sk]``: one importance score per key/value
            pair, shared by all queries (the SparseK paper's query-independent scoring ``u = X w``); query ``i``
            selects among the keys of its own prefix. ``[B, Hkv, Sq, Sk]``: one score per (query, key) pair
            (e.g. an indexer). Any floating dtype (selection runs in float32). ``-inf`` keys are never selected.
        k: budget of selected keys per query (row), ``1 <= k <= Sk``.
        causal: query at position ``pos`` selects among keys ``j <= pos - window`` (``window > 0``) or ``j <= pos``
            (``window = 0``). ``causal=False``: among all keys (requires ``window = 0``).
        window: size of the local band ``[pos - window + 1, pos]`` attended anyway, so excluded from selection.
        block_size: share one selection per block of ``block_size`` consecutive queries (the form the fast FMHA
            index-list path runs; 64 or 128 are native). Block ``m`` with first position ``p0`` selects among keys
            ``j <= p0 - window`` (``window > 0``: outside every band of the block) or ``j <= p0 + block_size - 1``
            (``window = 0``). Block score of a key: its score (``[B, Hkv, Sk]`` scores) or the **max** over the
            block's queries that can see it (``[B, Hkv, Sq, Sk]``): a key is kept if it matters to any query.
        return_mask: also return the SparseK mask values ``clip(z_j - tau, 0, 1)`` at the selected positions,
            ``tau`` the SparseK threshold of the row's whole candidate prefix (0 at padding). Computed in PyTorch,
            ``O(rows * Sk)`` memory: meant for training at moderate lengths.
        seqlen_q: number of queries for ``[B, Hkv, Sk]`` scores (default ``Sk``; bottom-right aligned).
        validate: reject NaN scores with ``ValueError`` (one device sync; skipped under ``torch.compile`` and
            CUDA-graph capture, where NaN scores give an unspecified selection).

    Returns:
        int32 ``[B, Hkv, rows, k]`` key positions sorted ascending and ``-1`` padded (rows with fewer than ``k``
        candidates), ``rows = Sq`` or ``ceil(Sq / block_size)``; and the float32 mask values of the same shape if
        ``return_mask``. Order: higher score first, ties broken by the lower position (the CUDA radix-select kernel
        and the CPU sort-based reference agree exactly).
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() not in (3, 4):
        raise ValueError(f"scores must be [B, Hkv, Sk] or [B, Hkv, Sq, Sk], got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating point tensor, got {scores.dtype}")
    sk = scores.shape[-1]
    if sk == 0:
        raise ValueError("scores must have at least one key (last dim is 0)")
    block_size = _check_block_size("block_size", block_size)
    if scores.dim() == 4:
        if seqlen_q is not None and seqlen_q != scores.shape[2]:
            raise ValueError(f"seqlen_q={seqlen_q} disagrees with scores.shape[2]={scores.shape[2]}")
        sq = scores.shape[2]
    else:
        sq = sk if seqlen_q is None else _check_int("seqlen_q", seqlen_q, lo=0)
    window = _check_selection(scores, k, window, causal, sq, validate)
    rows, off, step = select_limits(sq, sk, causal=causal, window=window, block_size=block_size)
    rs = scores
    if scores.dim() == 4 and block_size is not None:
        rs = _block_scores(scores, sq, block_size, causal)
    idx, _ = torch.ops.sparsek.topk_select(rs, k, rows, off, step)
    if not return_mask:
        return idx
    return idx, selected_mask_values(rs, idx, k, rows, off, step)


# --------------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------------


def _shared_to_fmha(
    idx: torch.Tensor, block_size: int, window: int, sq: int, sk: int, head_dim: int = 128, band_free: bool = False
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Block-shared lists → FMHA index lists: drop keys overlapping the block's bands (unless ``band_free``: lists
    from ``sparsek_select`` with the same window never hold them), re-block to 64/128.

    The FMHA kernel takes 64- or 128-query tiles (64 only for head dim 256).
    """
    rows = idx.shape[2]
    if window > 0 and not band_free:
        p0 = torch.arange(rows, device=idx.device, dtype=torch.int32) * block_size + (sk - sq)
        idx = torch.where(idx <= (p0 - window).view(1, 1, rows, 1), idx, torch.full_like(idx, -1))
    idx, ibq = _reblock_fmha(idx, block_size, sq, head_dim)
    counts = torch.full(idx.shape[:3], idx.shape[3], dtype=torch.int32, device=idx.device)
    return idx, counts, ibq


def _reblock_fmha(idx: torch.Tensor, block_size: int, sq: int, head_dim: int) -> tuple[torch.Tensor, int]:
    """Lists per ``block_size`` queries → lists per FMHA query tile (128 rows, 64 at head dim 256), contiguous."""
    ibq = 128 if block_size % 128 == 0 and head_dim != 256 else 64
    if block_size != ibq:
        idx = idx.repeat_interleave(block_size // ibq, dim=2)[:, :, : -(-sq // ibq)]
    return idx.contiguous(), ibq


def _attend_lists(q, k, v, indices, scale, window, causal, block_size, return_lse, band_free=False):
    """Checked inputs → (out, lse): block-shared lists with ``block_size`` a multiple of 64 through the FMHA
    index-list kernel, others through the per-query gather kernel. ``band_free``: see ``_shared_to_fmha``."""
    sq, sk = q.shape[1], k.shape[1]
    if block_size is not None and block_size % 64 == 0:
        _check_kernel_head_dim(q, INDEX_KERNEL_HEAD_DIMS, "FMHA index-list")
        idx, counts, ibq = _shared_to_fmha(indices, block_size, window, sq, sk, q.shape[-1], band_free)
        wl = window - 1 if window > 0 else -1
        return torch.ops.sparsek.index_attn_fwd(q, k, v, idx, counts, ibq, scale, wl, 0 if causal else -1, return_lse)
    _check_kernel_head_dim(q, TOPK_KERNEL_HEAD_DIMS, "top-k gather")
    if block_size is not None:
        indices = _shared_to_per_query(indices, block_size, window, sq, sk)
    return torch.ops.sparsek.topk_attn_fwd(q, k, v, indices, scale, window, causal, return_lse)


def _shared_to_per_query(idx: torch.Tensor, block_size: int, window: int, sq: int, sk: int) -> torch.Tensor:
    rows = idx.shape[2]
    if window > 0:
        p0 = torch.arange(rows, device=idx.device, dtype=torch.int32) * block_size + (sk - sq)
        idx = torch.where(idx <= (p0 - window).view(1, 1, rows, 1), idx, torch.full_like(idx, -1))
    return idx.repeat_interleave(block_size, dim=2)[:, :, :sq]


def topk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: float | None = None,
    window: int = 0,
    causal: bool = True,
    block_size: int | None = None,
    return_lse: bool = False,
    validate: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query to its local band plus a list of key positions (token-level sparse attention).

    Args:
        q: ``[B, Sq, Hq, D]``.
        k: ``[B, Sk, Hkv, D]`` (GQA: the lists are per KV head and shared by the group's query heads).
        v: ``[B, Sk, Hkv, D]``.
        indices: int32 key positions, ``-1`` padded. Per query: ``[B, Hkv, Sq, n]``. Block-shared (``block_size``
            given): ``[B, Hkv, ceil(Sq / block_size), n]``. A batch dim of 1 broadcasts. Lists must not repeat a
            position; ascending order is fastest.
        scale: softmax scale, default ``D ** -0.5``.
        window: local band ``[pos - window + 1, pos]`` (``window > 0``), attended in addition to the list; listed
            keys inside a query's band count once.
        causal: listed keys ``j > pos`` are masked. ``causal=False`` needs ``window = 0``.
        block_size: block size of block-shared lists. With ``window > 0``, a block's listed keys
            ``j > p0 - window`` (``p0``: the block's first query position) are ignored so that no listed key
            overlaps any band of the block ([`sparsek_select`][sparsek.sparse.sparsek_select] never produces
            them). Multiples of 64 run the FMHA index-list kernel, other sizes the per-query gather kernel.
        return_lse: also return the float32 LSE ``[B, Hq, Sq]`` (``-inf`` where a query sees no key; output 0).
        validate: check index values on the host (range ``[-1, Sk)``, no repeats; one device sync). Skipped
            under ``torch.compile`` and CUDA-graph capture.

    Returns:
        The output ``[B, Sq, Hq, D]`` in ``q``'s dtype, and the LSE if ``return_lse``.

    CUDA: fp16/bf16; per-query lists run ``csrc/topk_attention.cu`` (head dims 64/128), block-shared ones the
    FMHA index-list mode (64/128/256). CPU: the reference.
    """
    _check_attn_inputs(q, k, v)
    window = _check_window(window, causal)
    block_size = _check_block_size("block_size", block_size)
    b, sq, hq, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    rows = sq if block_size is None else -(-sq // block_size)
    indices = _check_index_tensor("indices", indices, b, (hk,), rows, sk, q.device, validate)
    scale = check_scale(scale, q.shape[-1])
    out, lse = _attend_lists(q, k, v, indices, scale, window, causal, block_size, return_lse)
    return (out, lse) if return_lse else out


def _blockmask_lists(bm: Any) -> tuple[torch.Tensor, tuple[int, int]]:
    """Union of a BlockMask's partial and full KV-block lists, ``-1`` padded (unsorted)."""
    parts = []
    for nblk, blk in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)):
        if nblk is None or blk is None:
            continue
        keep = torch.arange(blk.shape[-1], device=blk.device) < nblk.unsqueeze(-1)
        parts.append(torch.where(keep, blk.to(torch.int32), torch.full_like(blk, -1, dtype=torch.int32)))
    return torch.cat(parts, -1), tuple(bm.BLOCK_SIZE)


def _sort_padded(lists: torch.Tensor) -> torch.Tensor:
    """Valid entries first (descending; the kernels do not depend on the order), ``-1`` padding last: one sort."""
    return lists.sort(-1, descending=True).values


def _expand_blocks(blocks: torch.Tensor, kv_block: int, sk: int) -> torch.Tensor:
    """KV-block lists ``[..., n]`` → token lists ``[..., n * kv_block]`` (-1 for padding and tokens >= Sk)."""
    tok = blocks.unsqueeze(-1) * kv_block + torch.arange(kv_block, device=blocks.device, dtype=torch.int32)
    tok = torch.where((blocks.unsqueeze(-1) >= 0) & (tok < sk), tok, torch.full_like(tok, -1))
    return tok.flatten(-2)


@dataclass(frozen=True, eq=False)
class BlockSparseLayout:
    """A block-sparse pattern prepared once for [`block_sparse_attention`][sparsek.sparse.block_sparse_attention].

    Build it with [`block_sparse_layout`][sparsek.sparse.block_sparse_layout] and pass it as ``block_indices`` to
    every call that shares the pattern (all layers of a model, every step): the calls then skip the list preparation
    and the host-side validation (FlashInfer's plan/run split; FlexAttention's ``BlockMask`` plays the same role).
    It holds its own tensors, so changing the source lists afterwards does not change it. Build it outside CUDA-graph
    capture (inside one, its tensors are only filled when the graph replays); a graph may then use it freely.

    Attributes:
        block_lists: int32 ``[B or 1, H, ceil(seqlen_q / q_block), n]`` KV-block lists, valid entries first,
            ``-1`` padded (``num_blocks`` applied).
        q_block: queries per block.
        kv_block: keys per block.
        seqlen_q: the query length the layout was built for.
        seqlen_k: the key length the layout was built for.
        path: the kernel path: ``"runs"`` (both block sizes multiples of 64: lists of ``kv_block``-key runs),
            ``"tokens"`` (``q_block`` a multiple of 64: token lists) or ``"per-query"`` (the gather kernel).
        kernel_lists: what that path's kernel reads (run starts, token lists or per-query lists), prepared for
            head dims up to 128.
        kernel_counts: valid entries per kernel list (``None`` on the per-query path).
        kernel_block_q: queries per kernel list (128 or 64; 1 on the per-query path).
    """

    block_lists: torch.Tensor
    q_block: int
    kv_block: int
    seqlen_q: int
    seqlen_k: int
    path: str
    kernel_lists: torch.Tensor
    kernel_counts: torch.Tensor | None
    kernel_block_q: int


def _kernel_lists(
    lists: torch.Tensor, qb: int, kb: int, sq: int, sk: int, head_dim: int
) -> tuple[str, torch.Tensor, torch.Tensor | None, int]:
    """Sorted KV-block lists → (path, kernel lists, counts, queries per list) for the kernels."""
    if qb % 64 == 0 and kb % 64 == 0:  # runs of kb keys go to the FMHA kernel without expanding them to tokens
        # Few small ops (on a slow host each costs ~10-20 us): padding sorts last, and its start (-kb) stays negative.
        starts, ibq = _reblock_fmha(lists * kb, qb, sq, head_dim)
        return "runs", starts, (starts >= 0).sum(-1, dtype=torch.int32), ibq  # valid entries come first
    tokens = _expand_blocks(lists, kb, sk)
    if qb % 64 == 0:
        idx, counts, ibq = _shared_to_fmha(tokens, qb, 0, sq, sk, head_dim)
        return "tokens", idx, counts, ibq
    return "per-query", _shared_to_per_query(tokens, qb, 0, sq, sk), None, 1


def _block_sizes(block_size: object) -> tuple[int, int]:
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        qb, kb = block_size, block_size
    elif isinstance(block_size, (tuple, list)) and len(block_size) == 2:
        qb, kb = block_size
    else:
        raise ValueError(f"block_size must be an int or a (q_block, kv_block) pair, got {block_size!r}")
    return _check_int("block_size (q_block)", qb, lo=1), _check_int("block_size (kv_block)", kb, lo=1)


def _build_layout(
    block_indices: torch.Tensor | Any,
    block_size: int | tuple[int, int] | None,
    seqlen_q: int | None,
    seqlen_k: int | None,
    num_blocks: torch.Tensor | None,
    validate: bool,
    head_dim: int,
    device: torch.device | None = None,
) -> BlockSparseLayout:
    if isinstance(block_indices, torch.Tensor):
        if block_size is None:
            raise ValueError("block_size is required when block_indices is a tensor")
        lists = block_indices
    elif hasattr(block_indices, "kv_indices") and hasattr(block_indices, "BLOCK_SIZE"):
        if num_blocks is not None:
            raise ValueError("num_blocks must not be given with a BlockMask (it carries its own counts)")
        lists, bm_bs = _blockmask_lists(block_indices)
        if block_size is not None and _block_sizes(block_size) != bm_bs:
            raise ValueError(f"block_size={block_size} disagrees with the BlockMask's BLOCK_SIZE {bm_bs}")
        block_size = bm_bs
        lists = lists if device is None else lists.to(device)
        lens = getattr(block_indices, "seq_lengths", None)
        seqlen_q = lens[0] if seqlen_q is None and lens is not None else seqlen_q
        seqlen_k = lens[1] if seqlen_k is None and lens is not None else seqlen_k
    else:
        raise TypeError(
            "block_indices must be an int32 tensor, a BlockMask or a BlockSparseLayout, "
            f"got {type(block_indices).__name__}"
        )
    if seqlen_q is None or seqlen_k is None:
        raise ValueError("seqlen_q and seqlen_k are required when block_indices is a tensor")
    sq, sk = _check_int("seqlen_q", seqlen_q, lo=0), _check_int("seqlen_k", seqlen_k, lo=0)
    qb, kb = _block_sizes(block_size)
    nqb, nkb = -(-sq // qb), -(-sk // kb)
    lists = _check_index_form("block_indices", lists, nqb, device)
    if validate:
        _check_index_values("block_indices", lists, nkb)
    if num_blocks is not None:
        check_tensor("num_blocks", num_blocks, 3)
        if num_blocks.dtype != torch.int32:
            raise TypeError(f"num_blocks must be int32, got {num_blocks.dtype}")
        if num_blocks.device != lists.device:
            raise ValueError(f"num_blocks must be on {lists.device} (like block_indices), got {num_blocks.device}")
        batches_match = num_blocks.shape[0] == lists.shape[0] or 1 in (num_blocks.shape[0], lists.shape[0])
        if tuple(num_blocks.shape[1:]) != tuple(lists.shape[1:3]) or not batches_match:
            raise ValueError(
                f"num_blocks must have shape [B or 1, {lists.shape[1]}, {nqb}], got {tuple(num_blocks.shape)}"
            )
        keep = torch.arange(lists.shape[-1], device=lists.device) < num_blocks.unsqueeze(-1)
        lists = torch.where(keep, lists, torch.full_like(lists, -1))
    lists = _sort_padded(lists)
    path, kl, kc, ibq = _kernel_lists(lists, qb, kb, sq, sk, head_dim)
    return BlockSparseLayout(lists, qb, kb, sq, sk, path, kl, kc, ibq)


def block_sparse_layout(
    block_indices: torch.Tensor | Any,
    block_size: int | tuple[int, int] | None = None,
    *,
    seqlen_q: int | None = None,
    seqlen_k: int | None = None,
    num_blocks: torch.Tensor | None = None,
    validate: bool = True,
) -> BlockSparseLayout:
    """Prepare a block-sparse pattern once for many [`block_sparse_attention`][sparsek.sparse.block_sparse_attention]
    calls.

    Args:
        block_indices: int32 ``[B or 1, H, ceil(seqlen_q / q_block), n]`` KV-block lists or a FlexAttention
            ``BlockMask``, as in ``block_sparse_attention``.
        block_size: ``q_block`` and ``kv_block`` (an int for both, or a pair); taken from the BlockMask if omitted.
        seqlen_q: query length the pattern is for (taken from the BlockMask's ``seq_lengths`` if omitted).
        seqlen_k: key length (likewise).
        num_blocks: int32 ``[B or 1, H, ceil(seqlen_q / q_block)]`` valid entries per list (tensor lists only).
        validate: check ranges and repeats here (one device sync); calls with the layout never check again.

    Returns:
        A [`BlockSparseLayout`][sparsek.sparse.BlockSparseLayout] on the lists' device.

    ```python
    layout = sparsek.block_sparse_layout(block_mask)  # once
    out = sparsek.block_sparse_attention(q, k, v, layout, causal=True)  # every layer, every step
    ```
    """
    return _build_layout(block_indices, block_size, seqlen_q, seqlen_k, num_blocks, validate, head_dim=128)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor | BlockSparseLayout | Any,
    block_size: int | tuple[int, int] | None = None,
    *,
    num_blocks: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    validate: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention: each query block attends to a list of KV blocks (FlexAttention BlockMask semantics).

    Args:
        q: ``[B, Sq, Hq, D]``.
        k: ``[B, Sk, Hkv, D]``.
        v: ``[B, Sk, Hkv, D]``.
        block_indices: int32 ``[B or 1, H, ceil(Sq / q_block), n]`` KV-block indices per query block (FlexAttention's
            ``kv_indices``; ``H`` is 1, ``Hkv`` or ``Hq``; per-query-head lists with GQA expand K/V to ``Hq`` heads),
            a ``torch.nn.attention.flex_attention.BlockMask`` (its partial **and** full blocks are used; its
            ``BLOCK_SIZE`` gives the block sizes), or a [`BlockSparseLayout`][sparsek.sparse.BlockSparseLayout]
            prepared by [`block_sparse_layout`][sparsek.sparse.block_sparse_layout] (no preparation per call).
        block_size: ``q_block`` and ``kv_block`` (an int for both, or a pair); taken from the BlockMask if omitted.
        num_blocks: int32 ``[B or 1, H, ceil(Sq / q_block)]``: only the first ``num_blocks`` entries of each list
            are used (FlexAttention's ``kv_num_blocks``); without it every non-negative entry is used.
        causal: additionally mask keys ``j > pos`` (bottom-right; equal to FlexAttention's ``q_idx >= kv_idx``
            when ``Sq == Sk``). This is the only ``mask_mod`` honoured: with a BlockMask, partial blocks are
            attended in full (``causal=False``) or with the causal mask (``causal=True``); any other ``mask_mod``
            is not evaluated.
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the float32 LSE ``[B, Hq, Sq]``.
        validate: host-side check of the block indices (range, repeats; one device sync). A layout was checked
            when it was built.

    Returns:
        The output ``[B, Sq, Hq, D]`` and the LSE if ``return_lse``.

    CUDA: when ``q_block`` and ``kv_block`` are multiples of 64 the block lists go to the FMHA kernel as runs of
    ``kv_block`` keys (no expansion to tokens); other sizes expand to token lists (FMHA index-list kernel when
    ``q_block`` is a multiple of 64, otherwise the per-query gather kernel). CPU: the reference.
    """
    _check_attn_inputs(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    if isinstance(block_indices, BlockSparseLayout):
        if block_size is not None or num_blocks is not None:
            raise ValueError("block_size and num_blocks must not be given with a BlockSparseLayout (it carries them)")
        layout = block_indices
        if (layout.seqlen_q, layout.seqlen_k) != (sq, sk):
            raise ValueError(
                f"block_indices is a layout for seqlen_q={layout.seqlen_q}, seqlen_k={layout.seqlen_k}; "
                f"q and k have {sq} and {sk}"
            )
    else:
        layout = _build_layout(block_indices, block_size, sq, sk, num_blocks, validate, head_dim=d, device=q.device)
    lists = layout.block_lists
    if lists.device != q.device:
        raise ValueError(f"block_indices must be on {q.device} (like q), got {lists.device}")
    _check_index_owners("block_indices", lists, b, (1, hk, hq))
    scale = check_scale(scale, d)
    path, kl, kc, ibq = layout.path, layout.kernel_lists, layout.kernel_counts, layout.kernel_block_q
    if path != "per-query" and d == 256 and ibq != 64:  # a layout prepares 128-query tiles; head dim 256 takes 64
        path, kl, kc, ibq = _kernel_lists(lists, layout.q_block, layout.kv_block, sq, sk, d)
    hm = lists.shape[1]
    if hm == hq and hq != hk:
        k = k.repeat_interleave(hq // hk, dim=2)
        v = v.repeat_interleave(hq // hk, dim=2)
    heads = hq if hm == hq else hk
    if kl.shape[:2] != (b, heads):  # views; the op makes them contiguous
        kl = kl.expand(b, heads, -1, -1)
        kc = kc.expand(b, heads, -1) if kc is not None else None
    wr = 0 if causal else -1
    if path == "runs":
        _check_kernel_head_dim(q, INDEX_KERNEL_HEAD_DIMS, "FMHA index-list")
        out, lse = torch.ops.sparsek.block_attn_fwd(q, k, v, kl, kc, ibq, layout.kv_block, scale, -1, wr, return_lse)
    elif path == "tokens":
        _check_kernel_head_dim(q, INDEX_KERNEL_HEAD_DIMS, "FMHA index-list")
        out, lse = torch.ops.sparsek.index_attn_fwd(q, k, v, kl, kc, ibq, scale, -1, wr, return_lse)
    else:
        _check_kernel_head_dim(q, TOPK_KERNEL_HEAD_DIMS, "top-k gather")
        out, lse = torch.ops.sparsek.topk_attn_fwd(q, k, v, kl.contiguous(), scale, 0, causal, return_lse)
    return (out, lse) if return_lse else out


def sparsek_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scores: torch.Tensor,
    k_budget: int,
    window: int,
    causal: bool = True,
    *,
    block_size: int | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    validate: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The SparseK attention layer forward: select ``k_budget`` keys per query, attend to them plus the local band.

    Equivalent to ``topk_attention(q, k, v, sparsek_select(scores, k_budget, ...), window=window, ...)``.

    Args:
        q: ``[B, Sq, Hq, D]``.
        k: ``[B, Sk, Hkv, D]``.
        v: ``[B, Sk, Hkv, D]``.
        scores: ``[B, Hkv, Sk]`` per-key scores (paper) or ``[B, Hkv, Sq, Sk]``, as in
            [`sparsek_select`][sparsek.sparse.sparsek_select].
        k_budget: selected keys per query (or per query block), ``1 <= k_budget <= Sk``.
        window: local band size (``0``: none).
        causal: causal selection and masking (``False`` needs ``window = 0``).
        block_size: share the selection per block of queries (64 or 128 run the fast FMHA index-list path);
            ``None`` selects per query, exactly as in the paper.
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the LSE ``[B, Hq, Sq]``.
        validate: reject NaN scores (see [`sparsek_select`][sparsek.sparse.sparsek_select]; one device sync).

    Returns:
        The output ``[B, Sq, Hq, D]`` and the LSE if ``return_lse``.
    """
    _check_attn_inputs(q, k, v)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    b, sq, _, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    want = (b, hk, sk) if scores.dim() == 3 else (b, hk, sq, sk)
    if tuple(scores.shape) != want:
        raise ValueError(f"scores must have shape {want} ([B, Hkv, Sk] or [B, Hkv, Sq, Sk]), got {tuple(scores.shape)}")
    if scores.device != q.device:
        raise ValueError(f"scores must be on {q.device} (like q), got {scores.device}")
    if block_size is None and causal and scores.dim() == 3 and q.shape[-1] in INDEX_KERNEL_HEAD_DIMS:
        return _per_query_by_blocks(q, k, v, scores, k_budget, window, scale, return_lse, validate)
    idx = sparsek_select(
        scores, k_budget, causal=causal, window=window, block_size=block_size, seqlen_q=sq, validate=validate
    )
    scale = check_scale(scale, q.shape[-1])
    # the selection never lists band keys, so the lists need no band filter
    out, lse = _attend_lists(q, k, v, idx, scale, window, causal, block_size, return_lse, band_free=True)
    return (out, lse) if return_lse else out


def _per_query_by_blocks(q, k, v, scores, k_budget, window, scale, return_lse, validate):
    """Per-query selection (the paper's semantics) run as one key list per block of queries with a query interval
    per listed key (see [`sparsek.selection_intervals`][sparsek.selection_intervals]): the FMHA index-list kernel then
    loads each selected key once per block instead of once per query."""
    sq, sk = q.shape[1], k.shape[1]
    window = _check_selection(scores, k_budget, window, True, sq, validate)
    scale = check_scale(scale, q.shape[-1])
    ibq = 64 if q.shape[-1] == 256 else 128  # the FMHA kernel's query tile
    _, off, _ = select_limits(sq, sk, causal=True, window=window, block_size=None)
    lists, intervals, counts = torch.ops.sparsek.per_query_block_lists(scores, k_budget, sq, off, ibq)
    wl = window - 1 if window > 0 else -1
    out, lse = torch.ops.sparsek.interval_attn_fwd(q, k, v, lists, intervals, counts, ibq, scale, wl, return_lse)
    return (out, lse) if return_lse else out
