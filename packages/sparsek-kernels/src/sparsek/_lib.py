"""Loading the built CUDA library and calling its C functions through ctypes (mirrors csrc/sparsek_abi.h)."""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import struct
import threading

import torch

from .arch import device_choice

ABI_VERSION = 4
_LOG2E = 1.0 / math.log(2.0)
_i64, _i32, _ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p


class SkFmhaParams(ctypes.Structure):
    """ctypes mirror of ``SkFmhaParams`` in ``csrc/sparsek_abi.h``."""

    _fields_ = [
        ("q", _ptr), ("k", _ptr), ("v", _ptr), ("o", _ptr), ("lse", _ptr),
        ("cu_seqlens_q", _ptr), ("cu_seqlens_k", _ptr), ("seqused_k", _ptr), ("block_table", _ptr),
        ("kv_indices", _ptr), ("kv_counts", _ptr),
        ("kv_indices_batch_stride", _i64), ("kv_indices_head_stride", _i64), ("kv_indices_block_stride", _i64),
        ("kv_counts_batch_stride", _i64), ("kv_counts_head_stride", _i64),
        ("index_block_q", _i32), ("pad0", _i32),
        ("q_batch_stride", _i64), ("q_row_stride", _i64), ("q_head_stride", _i64),
        ("k_batch_stride", _i64), ("k_row_stride", _i64), ("k_head_stride", _i64),
        ("v_batch_stride", _i64), ("v_row_stride", _i64), ("v_head_stride", _i64),
        ("o_batch_stride", _i64), ("o_row_stride", _i64), ("o_head_stride", _i64),
        ("lse_batch_stride", _i64), ("lse_head_stride", _i64),
        ("block_table_batch_stride", _i64),
        ("batch", _i32), ("heads_q", _i32), ("heads_kv", _i32), ("seqlen_q", _i32), ("seqlen_k", _i32),
        ("head_dim", _i32), ("page_size", _i32), ("window_left", _i32), ("window_right", _i32),
        ("is_bf16", _i32), ("scale_log2", ctypes.c_float), ("total_q", _i32), ("total_k", _i32),
        ("kv_index_run", _i32), ("pad1", _i32), ("kv_intervals", _ptr),
    ]  # fmt: skip


def _struct_format(fields: list[tuple[str, type]]) -> str:
    codes = {_ptr: "Q", _i64: "q", _i32: "i", ctypes.c_float: "f"}
    return "@" + "".join(codes[t] for _, t in fields) + "0q"  # "0q": the C struct's trailing padding to 8 bytes


#: The same layout as a precompiled ``struct`` format: packing the arguments is several times cheaper than building
#: the ctypes structure, which matters for small, latency-bound calls.
FMHA_PARAMS = struct.Struct(_struct_format(SkFmhaParams._fields_))
assert FMHA_PARAMS.size == ctypes.sizeof(SkFmhaParams), "SkFmhaParams packing disagrees with the ctypes layout"
#: The leading pointer fields (q, k, v, o, lse): what differs between two launches of one cached dense plan.
FMHA_POINTERS = struct.Struct("@5Q")
assert SkFmhaParams.lse.offset + 8 == FMHA_POINTERS.size


class KernelUnavailable(RuntimeError):
    """No built kernel for this GPU and the reference fallback was not requested."""


_libs: dict[str, ctypes.CDLL] = {}
_by_device: dict[int, ctypes.CDLL] = {}  # device index -> library (hot-path cache)
_lock = threading.Lock()


def fallback_allowed() -> bool:
    """Whether ``SPARSEK_ALLOW_FALLBACK=1`` asks to run the reference on a GPU without a kernel."""
    return os.environ.get("SPARSEK_ALLOW_FALLBACK", "0") not in ("", "0", "false", "False")


def load(device: torch.device) -> ctypes.CDLL:
    """The library for ``device``'s architecture, built just in time on first use (then cached)."""
    lib = _by_device.get(device.index if device.index is not None else torch.cuda.current_device())
    if lib is not None:
        return lib
    from . import build as _build

    target = device_choice(device).target
    lib = _libs.get(target)
    if lib is not None:
        return lib
    with _lock:
        if target not in _libs:
            try:
                path = _build.build(target)
            except _build.BuildError as e:
                raise KernelUnavailable(
                    f"sparsek's CUDA kernels for {target} are not available ({e}). "
                    "Install the CUDA toolkit (nvcc) and ninja, or set SPARSEK_ALLOW_FALLBACK=1 "
                    "to run the slow PyTorch reference on the GPU."
                ) from e
            lib = ctypes.CDLL(str(path))
            lib.sk_fmha_fwd.argtypes = [ctypes.c_char_p, ctypes.c_void_p]  # FMHA_PARAMS-packed SkFmhaParams
            lib.sk_fmha_fwd.restype = ctypes.c_int
            lib.sk_error_string.argtypes = [ctypes.c_int]
            lib.sk_error_string.restype = ctypes.c_char_p
            lib.sk_abi_version.restype = ctypes.c_int
            if lib.sk_abi_version() != ABI_VERSION:
                raise KernelUnavailable(f"stale sparsek library at {path}: ABI {lib.sk_abi_version()} != {ABI_VERSION}")
            _libs[target] = lib
    _by_device[device.index if device.index is not None else torch.cuda.current_device()] = _libs[target]
    return _libs[target]


def function_address(lib: object, name: str) -> int | None:
    """Address of the C function ``name`` of a loaded library (``None`` for a stand-in object without one; a
    stand-in may provide ``address_of(name)``)."""
    if isinstance(lib, ctypes.CDLL):
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    address_of = getattr(lib, "address_of", None)
    return None if address_of is None else address_of(name)


def current_stream(device: torch.device) -> ctypes.c_void_p:
    """The caller's current CUDA stream on ``device`` as a ctypes handle (cheap raw-stream query)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return ctypes.c_void_p(torch._C._cuda_getCurrentRawStream(index))


_SAME_DEVICE = contextlib.nullcontext()

#: The current CUDA device's index (``torch.cuda.current_device()`` without its Python wrapper; CUDA is initialized
#: wherever a launcher sees a CUDA tensor).
_current_device_index = getattr(torch._C, "_cuda_getDevice", lambda: -1)


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Context in which ``device`` is the current CUDA device, as the kernel launchers expect.

    A process may drive several GPUs while another one is current (e.g. layers spread over GPUs); the launchers read
    the SM count and set kernel attributes on the current device, and launch on ``device``'s stream.
    """
    if device.type != "cuda" or device.index is None:
        return _SAME_DEVICE
    return _SAME_DEVICE if device.index == _current_device_index() else torch.cuda.device(device.index)


def check(lib: ctypes.CDLL, code: int, what: str) -> None:
    """Raise ``RuntimeError`` with the CUDA error text when ``code`` is non-zero."""
    if code != 0:
        raise RuntimeError(f"sparsek {what} failed: {lib.sk_error_string(code).decode()} (code {code})")


def _ptr_of(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def fmha_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    *,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    block_table: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    window_left: int,
    window_right: int,
    kv_indices: torch.Tensor | None = None,
    kv_counts: torch.Tensor | None = None,
    index_block_q: int = 64,
    kv_index_run: int = 1,
    kv_intervals: torch.Tensor | None = None,
) -> bytes:
    """Launch the FMHA kernel on the current stream; returns the packed ``SkFmhaParams`` it launched with.

    Dense tensors are ``[B, S, H, D]`` (any strides with a unit last stride); varlen/paged ones are
    ``[total, H, D]`` (or ``[num_pages, page_size, H, D]`` for paged K/V). Index-list (sparse) mode:
    ``kv_indices`` int32 ``[B, Hkv, num_q_blocks, max_n]`` and ``kv_counts`` int32 ``[B, Hkv, num_q_blocks]``,
    semantics in ``csrc/sparsek_abi.h``; ``kv_index_run=R > 1`` makes every entry the start of R consecutive keys
    (R a multiple of 64). All tensors must be on ``q``'s device; no checks happen here.
    """
    device = q.device
    lib = load(device)
    paged = block_table is not None
    # Stride and shape tuples once per tensor (each single-dimension query costs as much as the whole tuple).
    qs, os_, ks, vs = q.stride(), out.stride(), k.stride(), v.stride()
    qsh, ksh = q.shape, k.shape
    if len(qsh) == 4:
        qb, qr, qh = qs[0], qs[1], qs[2]
        ob, orr, oh = os_[0], os_[1], os_[2]
        batch = qsh[0]
    else:
        qb, qr, qh = 0, qs[0], qs[1]
        ob, orr, oh = 0, os_[0], os_[1]
        batch = cu_seqlens_q.shape[0] - 1
    if len(ksh) == 4:
        kb, kr, kh = ks[0], ks[1], ks[2]
        vb, vr, vh = vs[0], vs[1], vs[2]
    else:
        kb, kr, kh = 0, ks[0], ks[1]
        vb, vr, vh = 0, vs[0], vs[1]
    if lse is not None and lse.numel() > 0:
        ls = lse.stride()
        lb, lh = (ls[0], ls[1]) if len(ls) == 3 else (0, ls[0])
        lse_ptr = lse.data_ptr()
    else:
        lb = lh = 0
        lse_ptr = 0
    p = FMHA_PARAMS.pack(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse_ptr,
        _ptr_of(cu_seqlens_q), _ptr_of(cu_seqlens_k), _ptr_of(seqused_k), _ptr_of(block_table),
        _ptr_of(kv_indices), _ptr_of(kv_counts),
        *(kv_indices.stride()[:3] if kv_indices is not None else (0, 0, 0)),
        *(kv_counts.stride()[:2] if kv_counts is not None else (0, 0)),
        index_block_q, 0,
        qb, qr, qh, kb, kr, kh, vb, vr, vh, ob, orr, oh, lb, lh,
        block_table.stride(0) if paged else 0,
        batch, qsh[-2], ksh[-2], max_seqlen_q, max_seqlen_k, qsh[-1],
        ksh[1] if paged else 0, window_left, window_right,
        int(q.dtype == torch.bfloat16), scale * _LOG2E, qsh[-3], ksh[-3], kv_index_run, 0, _ptr_of(kv_intervals),
    )  # fmt: skip
    launch_fmha(lib, device, p)
    return p


def launch_fmha(lib: ctypes.CDLL, device: torch.device, params: bytes) -> None:
    """Launch the FMHA kernel with packed ``params`` on ``device``'s current stream.

    ``on_device``'s rule written inline: this runs in every eager call, and calling ``on_device`` (even without
    entering its no-op context) measured 0.6-0.8 us more per call (CPU machine, ``tools/bench_host_overhead.py``).
    """
    index = device.index
    if index is None or index == _current_device_index():
        code = lib.sk_fmha_fwd(params, current_stream(device))
    else:
        with torch.cuda.device(index):
            code = lib.sk_fmha_fwd(params, current_stream(device))
    check(lib, code, "fmha forward")
