"""Routing shared by every legacy entry point: sparsek when it can serve the call, PyTorch SDPA otherwise.

sparsek serves 4-D ``bhsd``/``bshd`` attention without a mask or dropout: on the CPU through its PyTorch reference
(any float dtype / head dim), on CUDA through its kernels (fp16/bf16, head dims 64/128/256, compute capability 8.0+).
Everything else runs on the SDPA captured when this module was imported (never on a patched one), with one
[`FlashcoreFallbackWarning`][flashcore.FlashcoreFallbackWarning] per entry point, reason and process.

sparsek is forward only. When autograd needs a graph, the forward still runs on sparsek inside
[`SparsekAttentionFunction`][flashcore._dispatch.SparsekAttentionFunction], whose backward recomputes the attention
with PyTorch SDPA and differentiates that (as flashcore 0.5's ``FlashCoreAttentionFunction`` did).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import sparsek
import torch
import torch.nn.functional as F

from ._warnings import FlashcoreFallbackWarning, warn_once

try:  # the error sparsek raises when its CUDA library cannot be built for this GPU
    from sparsek._lib import KernelUnavailable as _KernelUnavailable
except ImportError:  # pragma: no cover - depends on the sparsek version
    _KernelUnavailable = RuntimeError  # type: ignore[assignment,misc]

logger = logging.getLogger("flashcore")

#: PyTorch's own SDPA, captured at import time (before any ``patch_pytorch``): every fallback and every backward
#: recomputation uses it, so a patched ``F.scaled_dot_product_attention`` never recurses into itself.
TORCH_SDPA: Callable[..., torch.Tensor] = F.scaled_dot_product_attention

#: dtypes and head dims sparsek's CUDA kernels are built for (the CPU reference accepts any).
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (64, 128, 256)
LAYOUTS = ("bhsd", "bshd")


class Unsupported(NamedTuple):
    """Why a call goes to SDPA: a stable ``key`` (one warning per key), the ``message``, and whether to ``warn``.

    ``warn=False`` is for calls SDPA itself will reject or that are outside flashcore's API (mismatched shapes,
    non-tensors): they are passed on silently so that the caller gets PyTorch's own error.
    """

    key: str
    message: str
    warn: bool = True


def _dims(layout: str) -> tuple[int, int]:
    """(sequence dim, heads dim) of a 4-D tensor in ``layout``."""
    return (2, 1) if layout == "bhsd" else (1, 2)


def unsupported_reason(
    q: Any,
    k: Any,
    v: Any,
    *,
    layout: str,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    gqa: bool = True,
) -> Unsupported | None:
    """Return why sparsek cannot serve this call, or None when it can.

    ``gqa`` says whether fewer key/value heads than query heads are allowed (SDPA's ``enable_gqa``).
    """
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return Unsupported("not-tensor", "query/key/value are not all tensors", warn=False)
    if any(t.is_nested for t in (q, k, v)):
        return Unsupported("nested", "nested tensors are not supported by sparsek")
    if attn_mask is not None:
        return Unsupported("attn-mask", "sparsek does not support arbitrary attn_mask tensors")
    if dropout_p and dropout_p > 0.0:
        return Unsupported("dropout", "sparsek does not support attention dropout (dropout_p > 0)")
    if not (q.dim() == k.dim() == v.dim() == 4):
        return Unsupported("ndim", "sparsek needs 4-D [B, H, S, D] / [B, S, H, D] tensors")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        return Unsupported("dtype-mismatch", "query/key/value dtypes differ or are not floating point", warn=False)
    if not (q.device == k.device == v.device):
        return Unsupported("device-mismatch", "query/key/value are on different devices", warn=False)
    seq, heads = _dims(layout)
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[seq] != v.shape[seq]:
        return Unsupported("shape", "query/key/value shapes are inconsistent", warn=False)
    hq, hk, hv = q.shape[heads], k.shape[heads], v.shape[heads]
    if hk != hv or hk == 0 or hq % hk != 0 or (hq != hk and not gqa):
        return Unsupported("heads", "query/key/value head counts are not equal (or GQA-compatible)", warn=False)
    if q.shape[-1] != k.shape[-1]:
        return Unsupported("qk-head-dim", "query and key head dims differ", warn=False)
    if v.shape[-1] != q.shape[-1]:
        return Unsupported("v-head-dim", "sparsek needs the value head dim to equal the query head dim")
    if is_causal and q.shape[seq] != k.shape[seq]:
        return Unsupported(
            "causal-unequal",
            "is_causal with seqlen_q != seqlen_k uses SDPA's top-left aligned mask, which sparsek (bottom-right "
            "aligned) does not implement",
        )
    if scale is not None and not (0.0 < float(scale) < float("inf")):
        return Unsupported("scale", "sparsek needs a positive finite scale")
    if q.numel() == 0 or k.numel() == 0:
        return Unsupported("empty", "empty tensors", warn=False)
    if q.device.type == "cpu":
        return None
    if q.device.type != "cuda":
        return Unsupported(f"device-{q.device.type}", f"sparsek does not run on {q.device.type} tensors")
    if q.dtype not in KERNEL_DTYPES:
        return Unsupported(
            f"gpu-dtype-{q.dtype}",
            f"sparsek's CUDA kernels support float16/bfloat16, not {q.dtype}".replace("torch.", ""),
        )
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        return Unsupported(
            f"gpu-head-dim-{q.shape[-1]}",
            f"sparsek's CUDA kernels support head dims {KERNEL_HEAD_DIMS}, not {q.shape[-1]}",
        )
    if _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())[0] < 8:
        return Unsupported("gpu-arch", "sparsek's CUDA kernels need compute capability 8.0 or newer")
    return None


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def sdpa_in_layout(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: str,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    sdpa: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """PyTorch SDPA on ``layout`` tensors; the output is contiguous in that layout."""
    sdpa = TORCH_SDPA if sdpa is None else sdpa
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    extra = {"enable_gqa": True} if enable_gqa else {}
    out = sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **extra)
    if layout == "bshd":
        out = out.transpose(1, 2).contiguous()
    return out


def _run_sparsek(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None, layout: str):
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return sparsek.attention(q, k, v, causal=causal, scale=scale, layout=layout)


class SparsekAttentionFunction(torch.autograd.Function):
    """Forward on sparsek, backward by recomputing the attention with PyTorch SDPA (differentiable)."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float | None, layout: str):
        out = _run_sparsek(q, k, v, causal, scale, layout)
        ctx.save_for_backward(q, k, v)
        ctx.causal, ctx.scale, ctx.layout = causal, scale, layout
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        heads = _dims(ctx.layout)[1]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) for t, need in zip((q, k, v), ctx.needs_input_grad[:3])]
            out = sdpa_in_layout(
                *leaves,
                layout=ctx.layout,
                is_causal=ctx.causal,
                scale=ctx.scale,
                enable_gqa=q.shape[heads] != k.shape[heads],
            )
            wanted = [t for t in leaves if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out)) if wanted else iter(())
        return (*(next(grads) if t.requires_grad else None for t in leaves), None, None, None)


def run_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: str,
    caller: str,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    gqa: bool = True,
    fallback: Callable[..., torch.Tensor] | None = None,
    fallback_enable_gqa: bool | None = None,
    stacklevel: int = 2,
) -> torch.Tensor:
    """Attention on ``layout`` tensors: sparsek if it can serve the call, else SDPA (``fallback``, default PyTorch's).

    Args:
        q: queries, 4-D in ``layout``.
        k: keys.
        v: values.
        layout: ``"bhsd"`` or ``"bshd"``.
        caller: name used in warnings (``"flashcore.attention"``, ...).
        attn_mask: SDPA attention mask (forces the fallback).
        dropout_p: SDPA dropout probability (> 0 forces the fallback).
        is_causal: causal mask (SDPA's top-left alignment; sparsek serves it when ``seqlen_q == seqlen_k``).
        scale: softmax scale, default ``head_dim ** -0.5``.
        gqa: allow fewer key/value heads than query heads (passed to SDPA as ``enable_gqa`` on fallback).
        fallback: the SDPA to fall back to.
        fallback_enable_gqa: ``enable_gqa`` to pass to ``fallback``; default: True when the head counts differ.
        stacklevel: where fallback warnings point, counted from the caller of ``run_attention`` (2 = its caller).
    """
    reason = unsupported_reason(
        q, k, v, layout=layout, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, gqa=gqa
    )
    if reason is None:
        try:
            if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
                return SparsekAttentionFunction.apply(q, k, v, bool(is_causal), scale, layout)
            return _run_sparsek(q, k, v, bool(is_causal), scale, layout)
        except _KernelUnavailable as e:
            reason = Unsupported("kernel-unavailable", f"sparsek's CUDA kernels are unavailable ({e})")
    if reason.warn:
        warn_once(
            f"fallback:{caller}:{reason.key}",
            f"{caller}: {reason.message}; running PyTorch scaled_dot_product_attention instead "
            "(this warning is shown once per process)",
            FlashcoreFallbackWarning,
            stacklevel=stacklevel + 1,
        )
    logger.debug("%s: SDPA fallback (%s)", caller, reason.key)
    enable_gqa = bool(fallback_enable_gqa)
    if fallback_enable_gqa is None and gqa and reason.key not in ("not-tensor", "ndim") and q.dim() == k.dim() == 4:
        heads = _dims(layout)[1]
        enable_gqa = q.shape[heads] != k.shape[heads]
    return sdpa_in_layout(
        q,
        k,
        v,
        layout=layout,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
        sdpa=fallback,
    )
