"""Public dense attention API: `attention` and `varlen_attention`."""

from __future__ import annotations

import torch

from . import _dense_plans, ops  # ops registers torch.ops.sparsek.*
from ._validation import (
    KERNEL_HEAD_DIMS,
    check_cu_seqlens,
    check_heads,
    check_layout,
    check_qkv,
    check_scale,
    check_tensor,
    normalize_window,
)


def _check_kernel_head_dim(q: torch.Tensor) -> None:
    if q.device.type == "cuda" and q.shape[-1] not in KERNEL_HEAD_DIMS:
        raise ValueError(
            f"head dim {q.shape[-1]} is not supported by sparsek's CUDA kernels (supported: {KERNEL_HEAD_DIMS}); "
            "the CPU reference path accepts any head dim"
        )


_is_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)
_dispatch_mode_depth = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)


def _dispatch_mode_active() -> bool:
    """A ``TorchDispatchMode`` is active (``FlopCounterMode``, ``FakeTensorMode``, ``make_fx`` tracing): calls must then
    go through the registered op, where the mode sees them. (``TorchFunctionMode``s such as the one
    ``torch.set_default_device`` installs do not need the op and keep the direct launch.)"""
    return _dispatch_mode_depth() > 0


def _eager_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Plain CUDA tensors without autograd, outside ``torch.compile``: the op's CUDA kernel can be called directly,
    skipping the dispatcher (same result, a few microseconds less per call for small, latency-bound problems)."""
    return (
        not torch.compiler.is_compiling()  # first: under tracing nothing else may be evaluated
        and type(q) is torch.Tensor
        and type(k) is torch.Tensor
        and type(v) is torch.Tensor
        and q.is_cuda
        and not (q.requires_grad or k.requires_grad or v.requires_grad)
        and not _is_functorch_wrapped(q)
        and not _dispatch_mode_active()
    )


def _capturing_or_compiling() -> bool:
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    layout: str = "bshd",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention forward, ``softmax(q kᵀ · scale) v``.

    Args:
        q: queries, ``[batch, seqlen_q, heads_q, head_dim]`` (``layout="bshd"``) or
            ``[batch, heads_q, seqlen_q, head_dim]`` (``layout="bhsd"``, PyTorch SDPA's layout).
        k: keys, same layout, ``heads_kv`` heads with ``heads_q % heads_kv == 0`` (GQA/MQA).
        v: values, same shape as ``k``.
        causal: causal mask aligned **bottom-right**: query ``i`` sees keys ``j <= i + seqlen_k - seqlen_q``
            (FlashAttention ≥ 2.1 semantics; identical to top-left when the lengths are equal).
        scale: softmax scale, default ``head_dim ** -0.5``.
        window: ``(left, right)`` sliding window around the (bottom-right aligned) diagonal; ``-1`` is unbounded.
            Combined with ``causal`` the right side is 0.
        layout: ``"bshd"`` or ``"bhsd"``.
        return_lse: also return the log-sum-exp of the scaled scores, float32 ``[batch, heads_q, seqlen_q]``
            (``-inf`` for rows that see no key; their output is 0).

    Returns:
        The output in ``q``'s layout and dtype, and the LSE if ``return_lse``.

    fp16/bf16 on the GPU with head dims 64, 128 and 256; any floating dtype and head dim on the CPU, where the
    pure-PyTorch reference runs. Works under ``torch.compile`` and CUDA-graph capture (op ``torch.ops.sparsek.fmha_fwd``).
    Eager calls with plain CUDA tensors skip the dispatcher, and a call with the same shapes, strides, dtypes, devices
    and options as an earlier one reuses that call's checked launch plan (a few microseconds less host time).
    """
    fast = _dense_plans.compiled_call
    if fast is not None and not torch.compiler.is_compiling():  # the compiled plan path (None: not planned)
        result = fast(q, k, v, causal, scale, window, layout, return_lse)
        if result is not None:
            return result
    eager = _eager_cuda(q, k, v)
    if eager:  # a call like an earlier one (shapes, strides, dtypes, devices, options) reuses its checked plan
        key = _dense_plans.plan_key(q, k, v, causal, scale, window, layout, return_lse)
        plan = _dense_plans.lookup(key)
        if plan is not None:
            out, lse = plan(q, k, v)
            return (out, lse) if return_lse else out
    call = (q, k, v, causal, scale, window, layout, return_lse)  # as given: the compiled fast path's key
    check_layout(layout)
    check_qkv(q, k, v, ndim=4)
    seq_dim, head_dim = (1, 2) if layout == "bshd" else (2, 1)
    qs, ks, vs = q.shape, k.shape, v.shape
    if not (qs[0] == ks[0] == vs[0]):
        raise ValueError(f"q, k, v must have the same batch size, got {qs[0]}, {ks[0]}, {vs[0]}")
    if ks[seq_dim] != vs[seq_dim]:
        raise ValueError(f"k and v must have the same sequence length, got {ks[seq_dim]} and {vs[seq_dim]}")
    check_heads(qs[head_dim], ks[head_dim], vs[head_dim])
    _check_kernel_head_dim(q)
    left, right = normalize_window(window, causal)
    scale = check_scale(scale, qs[-1])
    if layout == "bhsd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    args = (q, k, v, None, None, qs[seq_dim], ks[seq_dim], scale, left, right, return_lse)
    if eager:  # the CUDA kernel directly, skipping the dispatcher
        out, lse, launch = ops.fmha_fwd_cuda_launch(*args)
    else:
        out, lse = torch.ops.sparsek.fmha_fwd(*args)
    if layout == "bhsd":
        out = out.transpose(1, 2)
    if eager and launch is not None:
        _dense_plans.store(key, _dense_plans.DensePlan(*launch, out, lse), call)
    return (out, lse) if return_lse else out


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    return_lse: bool = False,
    validate: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over a packed batch of variable-length sequences (FlashAttention's ``varlen`` convention).

    Args:
        q: ``[total_q, heads_q, head_dim]``, the sequences' queries concatenated.
        k: ``[total_k, heads_kv, head_dim]``.
        v: ``[total_k, heads_kv, head_dim]``.
        cu_seqlens_q: int32 ``[batch + 1]`` prefix sums of the query lengths (starts at 0, ends at ``total_q``).
        cu_seqlens_k: int32 ``[batch + 1]`` prefix sums of the key lengths.
        max_seqlen_q: the longest query sequence (an upper bound is fine).
        max_seqlen_k: the longest key sequence (an upper bound is fine).
        causal: per-sequence bottom-right causal mask, as in [`attention`][sparsek.attention.attention].
        scale: softmax scale, default ``head_dim ** -0.5``.
        window: ``(left, right)`` sliding window, as in [`attention`][sparsek.attention.attention].
        return_lse: also return the LSE, float32 ``[heads_q, total_q]``.
        validate: check the cu_seqlens values on the host (one device sync for both tensors; skipped anyway while a
            CUDA graph is captured or ``torch.compile`` traces). ``False`` trusts them, as FlashAttention does: for
            serving loops that build them correctly and cannot afford the sync; wrong values are then undefined
            behaviour.

    Empty sequences are allowed.
    """
    check_qkv(q, k, v, ndim=3)
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v must have the same total length, got {k.shape[0]} and {v.shape[0]}")
    check_heads(q.shape[1], k.shape[1], v.shape[1])
    _check_kernel_head_dim(q)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, cu, 1)
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {cu.dtype}")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on {q.device}, got {cu.device}")
        if cu.numel() < 1:
            raise ValueError(f"{name} must have at least one element (batch + 1)")
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), "
            f"got {cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}"
        )
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if int(n) < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    if validate and not _capturing_or_compiling():
        both = torch.cat([cu_seqlens_q, cu_seqlens_k]).cpu()  # one device sync for both
        n = cu_seqlens_q.shape[0]
        lens_q = check_cu_seqlens("cu_seqlens_q", both[:n], q.shape[0])
        lens_k = check_cu_seqlens("cu_seqlens_k", both[n:], k.shape[0])
        if lens_q > max_seqlen_q or lens_k > max_seqlen_k:
            raise ValueError(
                f"max_seqlen_q/max_seqlen_k ({max_seqlen_q}, {max_seqlen_k}) are smaller than the longest "
                f"sequences in cu_seqlens ({lens_q}, {lens_k})"
            )
    left, right = normalize_window(window, causal)
    scale = check_scale(scale, q.shape[-1])
    out, lse = torch.ops.sparsek.fmha_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale, left, right, return_lse
    )
    return (out, lse) if return_lse else out
