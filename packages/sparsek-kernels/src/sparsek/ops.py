"""PyTorch custom-op registration (``torch.ops.sparsek.*``) with fake implementations.

Ops are registered through ``torch.library`` so they trace under ``torch.compile(fullgraph=True)``, run inside
CUDA-graph capture, and run on the caller's current CUDA stream. The CPU kernel of every op is the reference.
"""

from __future__ import annotations

import ctypes

import torch

from . import _lib
from .reference import attention_ref, varlen_attention_ref

_LIB = torch.library.Library("sparsek", "DEF")
_LIB.define(
    "fmha_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
    "int max_seqlen_q, int max_seqlen_k, float scale, int window_left, int window_right, bool return_lse) "
    "-> (Tensor, Tensor)"
)


def _empty_lse(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty((0,), dtype=torch.float32)


def _alloc(q: torch.Tensor, return_lse: bool, lse_placeholder: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Output like ``q`` and the LSE; without ``return_lse`` an empty LSE tensor (the op's schema returns a tensor)
    or, with ``lse_placeholder=False``, ``None``."""
    out = torch.empty_like(q)
    if not return_lse:
        lse = _empty_lse(q) if lse_placeholder else None
    elif q.dim() == 4:  # [B, S, H, D] -> [B, H, S]
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    else:  # varlen [T, H, D] -> [H, T]
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, lse


def _reference(q, k, v, cu_q, cu_k, scale, wl, wr, return_lse):
    window = (wl, wr)
    if cu_q is None:
        out, lse = attention_ref(q, k, v, scale=scale, window=window, return_lse=True)
    else:
        out, lse = varlen_attention_ref(q, k, v, cu_q, cu_k, scale=scale, window=window, return_lse=True)
    return out, lse


@torch.library.impl(_LIB, "fmha_fwd", "CPU")
def _fmha_fwd_cpu(q, k, v, cu_q, cu_k, max_sq, max_sk, scale, wl, wr, return_lse):
    out, lse = _alloc(q, return_lse)
    ref_out, ref_lse = _reference(q, k, v, cu_q, cu_k, scale, wl, wr, return_lse)
    out.copy_(ref_out)
    if return_lse:
        lse.copy_(ref_lse)
    return out, lse


@torch.library.impl(_LIB, "fmha_fwd", "CUDA")
def _fmha_fwd_cuda(q, k, v, cu_q, cu_k, max_sq, max_sk, scale, wl, wr, return_lse):
    out, lse, _ = fmha_fwd_cuda_launch(q, k, v, cu_q, cu_k, max_sq, max_sk, scale, wl, wr, return_lse)
    return out, (lse if lse is not None else _empty_lse(q))


def fmha_fwd_cuda_launch(
    q, k, v, cu_q, cu_k, max_sq, max_sk, scale, wl, wr, return_lse
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[ctypes.CDLL, bytes] | None]:
    """The CUDA op's body: its outputs (the LSE ``None`` unless ``return_lse``; an eager call needs no placeholder)
    and the launch it made, ``(library, packed parameters)``, or ``None`` when no kernel ran (empty input; the
    reference ran as the allowed fallback)."""
    out, lse = _alloc(q, return_lse, lse_placeholder=False)
    try:
        lib = _lib.load(q.device)
    except _lib.KernelUnavailable:
        if not _lib.fallback_allowed():
            raise
        return (*_fmha_fwd_cpu(q, k, v, cu_q, cu_k, max_sq, max_sk, scale, wl, wr, return_lse), None)
    if q.numel() == 0:
        if return_lse:
            lse.fill_(float("-inf"))
        return out, lse, None
    params = _lib.fmha_fwd(
        q, k, v, out, lse,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=None, block_table=None,
        max_seqlen_q=max_sq, max_seqlen_k=max_sk, scale=scale, window_left=wl, window_right=wr,
    )  # fmt: skip
    return out, lse, (lib, params)


@torch.library.register_fake("sparsek::fmha_fwd")
def _fmha_fwd_fake(q, k, v, cu_q, cu_k, max_sq, max_sk, scale, wl, wr, return_lse):
    return _alloc(q, return_lse)
