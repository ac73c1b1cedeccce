"""The xFormers operator classes: [`FwOp`][sparsek_xformers.FwOp] and the refusing [`BwOp`][sparsek_xformers.BwOp]."""

from __future__ import annotations

import math

import sparsek
import torch
from xformers.ops.fmha import attn_bias as xab
from xformers.ops.fmha.common import AttentionBwOpBase, AttentionFwOpBase, Context, Gradients, Inputs

from . import _execute
from .bias import SUPPORTED_ATTN_BIAS_TYPES, bias_not_supported_reasons, plan_attention

__all__ = ["BwOp", "FwOp", "KERNEL_HEAD_DIMS", "NO_BACKWARD_MESSAGE"]

KERNEL_HEAD_DIMS: tuple[int, ...] = (64, 128, 256)
"""Head dimensions sparsek's CUDA kernels are built for. CPU tensors accept any head dimension."""
_CUDA_DTYPES = (torch.float16, torch.bfloat16)

NO_BACKWARD_MESSAGE = (
    "sparsek_xformers.FwOp is forward-only: sparsek has no attention backward yet, so query/key/value must not "
    "require grad (detach them, or run under torch.no_grad() / torch.inference_mode())"
)
"""The refusal reason (and error text) for inputs that require grad: sparsek has no attention backward yet."""

# Reasons from xFormers' base class that do not apply to sparsek, by prefix:
# - sparsek runs bf16 on any supported GPU and on CPU (the base refuses bf16 everywhere but CUDA sm80+);
# - sparsek does not use xFormers' compiled extension, so it does not matter whether that one loaded;
# - the generic "attn_bias type is ..." is replaced by a message that lists what sparsek implements.
_IGNORED_BASE_REASONS = ("bf16 is only supported", "xFormers wasn't build with CUDA", "attn_bias type is")


class FwOp(AttentionFwOpBase):
    """sparsek's forward attention as an xFormers operator.

    Pass it explicitly, since xFormers only dispatches to its built-in operators::

        out = xformers.ops.memory_efficient_attention(q, k, v, attn_bias, op=(sparsek_xformers.FwOp, None))
        out, lse = xformers.ops.fmha.memory_efficient_attention_forward_requires_grad(
            q, k, v, attn_bias, op=sparsek_xformers.FwOp)

    or make it the default for a block of code with [`use_sparsek`][sparsek_xformers.use_sparsek].

    Limits (refused through ``not_supported_reasons``, so xFormers raises a ``ValueError`` that lists them):

    * CUDA (compute capability 8.0+): float16/bfloat16, head dims 64/128/256. CPU: any float dtype and head dim
      (sparsek's PyTorch reference; bfloat16 included).
    * BMHK ``[B, M, H, K]`` (and legacy BMK) or GQA BMGHK ``[B, M, G, H, K]``; K/V expanded over ``H`` with stride 0
      are read un-expanded. The value head dim must equal the query's. Custom ``scale`` (positive).
    * ``attn_bias``: exactly the types in ``SUPPORTED_ATTN_BIAS_TYPES``; no tensor biases.
    * No dropout, no ``output_dtype``, no partial attention, no quantized K/V, no backward: inputs that require
      grad are refused (see [`BwOp`][sparsek_xformers.BwOp]).

    The LSE (``memory_efficient_attention_forward_requires_grad``) is float32 in xFormers' format: ``[B, H, Mq]``
    (``[B, G, H, Mq]`` for BMGHK), packed ``[1, H, total_q]`` for varlen biases (``VARLEN_LSE_PACKED``). Rows that
    see no key give output 0 and LSE ``-inf``.
    """

    OPERATOR = sparsek.attention
    NAME = "sparsekF"
    SUPPORTED_DEVICES = {"cuda", "cpu"}
    CUDA_MINIMUM_COMPUTE_CAPABILITY = (8, 0)
    SUPPORTED_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
    SUPPORTED_MAX_K = math.inf
    SUPPORTED_MIN_K = 1
    SUPPORTED_ATTN_BIAS_TYPES = SUPPORTED_ATTN_BIAS_TYPES
    SUPPORTS_DROPOUT = False
    SUPPORTS_CUSTOM_SCALE = True
    SUPPORTS_DIFFERENT_VALUE_EMBED = False
    SUPPORTS_OUTPUT_DTYPE = False
    SUPPORTS_PARTIAL = False
    SUPPORTS_BMGHK = True
    IS_DETERMINISTIC = True
    VARLEN_LSE_PACKED = True
    _TEST_K = [64, 128]

    @classmethod
    def not_supported_reasons(cls, d: Inputs) -> list[str]:
        """Why sparsek cannot run ``d``; an empty list means it can.

        Args:
            d: xFormers' inputs (``query``, ``key``, ``value``, ``attn_bias``, ``p``, ``scale``, ...).

        Returns:
            Reasons as short sentences; xFormers prints them when it refuses an explicitly requested op.
        """
        reasons = [r for r in super().not_supported_reasons(d) if not r.startswith(_IGNORED_BASE_REASONS)]
        q, k, v = d.query, d.key, d.value
        if q.device.type == "cuda":
            if q.dtype not in _CUDA_DTYPES:
                reasons.append(f"dtype={q.dtype} on CUDA: sparsek's kernels run float16/bfloat16 (others on CPU)")
            if q.shape[-1] not in KERNEL_HEAD_DIMS:
                reasons.append(
                    f"head dim {q.shape[-1]} on CUDA: sparsek's kernels support {KERNEL_HEAD_DIMS} (any on CPU)"
                )
        if k.dtype != q.dtype or v.dtype != q.dtype:
            reasons.append(f"key/value dtype {k.dtype}/{v.dtype} differs from query dtype {q.dtype} (quantized K/V)")
        if d.scale is not None and not (0 < float(d.scale) < math.inf):
            reasons.append(f"scale={d.scale}: sparsek needs a positive finite softmax scale")
        if q.requires_grad or k.requires_grad or v.requires_grad:
            reasons.append(NO_BACKWARD_MESSAGE)
        reasons += bias_not_supported_reasons(d.attn_bias, tuple(q.shape), tuple(k.shape))
        bias = d.attn_bias
        if isinstance(bias, (xab.PagedBlockDiagonalPaddedKeysMask, xab.PagedBlockDiagonalGappyKeysMask)):
            if bias.block_tables.device != q.device:
                reasons.append(f"block_tables on {bias.block_tables.device} but query on {q.device}")
        return reasons

    @classmethod
    def apply(cls, inp: Inputs, needs_gradient: bool) -> tuple[torch.Tensor, Context | None]:
        """Compute attention for already validated inputs (xFormers calls this).

        Args:
            inp: BMHK or BMGHK inputs.
            needs_gradient: also return a ``Context`` holding the LSE (xFormers sets it for
                ``memory_efficient_attention_forward_requires_grad`` and the autograd path).

        Returns:
            ``(out, None)`` or ``(out, Context(out=out, lse=lse))``.

        Raises:
            NotImplementedError: if query/key/value require grad (no backward exists).
        """
        q, k, v = inp.query, inp.key, inp.value
        if q.requires_grad or k.requires_grad or v.requires_grad:
            raise NotImplementedError(NO_BACKWARD_MESSAGE)
        q_shape = tuple(q.shape)
        plan = plan_attention(inp.attn_bias, q.shape[1], k.shape[1])
        q4, k4, v4 = _execute.fold_heads(q, k, v)
        out, lse = _execute.run(plan, q4, k4, v4, inp.scale_float, return_lse=needs_gradient)
        out = out.reshape(q_shape[:-1] + (v.shape[-1],))
        if not needs_gradient:
            return out, None
        if len(q_shape) == 5:
            lse = lse.unflatten(1, q_shape[2:4])  # [B, G*H, M] -> [B, G, H, M]
        return out, Context(out=out, lse=lse)


class BwOp(AttentionBwOpBase):
    """Placeholder backward operator: sparsek has no attention backward yet.

    ``not_supported_reasons`` always explains that, so ``memory_efficient_attention_backward(..., op=BwOp)`` and
    ``memory_efficient_attention(..., op=(FwOp, BwOp))`` with inputs that require grad fail with a clear message
    instead of silently running another library's backward.
    """

    OPERATOR = sparsek.attention
    NAME = "sparsekB"
    SUPPORTED_DEVICES = FwOp.SUPPORTED_DEVICES
    CUDA_MINIMUM_COMPUTE_CAPABILITY = FwOp.CUDA_MINIMUM_COMPUTE_CAPABILITY
    SUPPORTED_DTYPES = FwOp.SUPPORTED_DTYPES
    SUPPORTED_MAX_K = FwOp.SUPPORTED_MAX_K
    SUPPORTED_ATTN_BIAS_TYPES = FwOp.SUPPORTED_ATTN_BIAS_TYPES
    SUPPORTS_DROPOUT = False
    SUPPORTS_CUSTOM_SCALE = True
    SUPPORTS_BMGHK = True
    VARLEN_LSE_PACKED = True

    @classmethod
    def not_supported_reasons(cls, d: Inputs) -> list[str]:
        """Always refuses: returns the reason that no backward exists (plus any other reason)."""
        reasons = [r for r in super().not_supported_reasons(d) if not r.startswith(_IGNORED_BASE_REASONS)]
        return reasons + ["sparsek has no attention backward yet (sparsek_xformers is inference/forward-only)"]

    @classmethod
    def apply(cls, ctx: Context, inp: Inputs, grad: torch.Tensor) -> Gradients:
        """Raise ``NotImplementedError``: there is no backward to run."""
        raise NotImplementedError("sparsek has no attention backward yet (sparsek_xformers is forward-only)")
