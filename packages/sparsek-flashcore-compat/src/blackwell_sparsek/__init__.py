"""blackwell_sparsek 0.1's public API, running on sparsek (shipped by ``sparsek-flashcore-compat``). Deprecated.

[`attention_forward`][blackwell_sparsek.attention_forward] computes attention on ``[B, H, S, D]`` tensors, now on
sparsek (CPU reference or CUDA kernels) with a working backward.

The framework integrations blackwell_sparsek's docs promised are re-exported lazily on first access, from
``blackwell_sparsek`` and from ``blackwell_sparsek.backends`` (where those docs put them):

| old name | now | pip install |
|---|---|---|
| ``SparseKAttention`` | ``sparsek_xformers.SparseKAttention`` | ``sparsek-xformers`` |
| ``SparseKBackend`` | ``sparsek_vllm.SparsekAttentionBackend`` | ``sparsek-vllm`` |
| ``register_vllm_backend`` | ``sparsek_vllm.register`` | ``sparsek-vllm`` |

When that package (or the framework it needs) is missing, accessing the name raises ``ImportError`` naming the
distribution to install. They are not in ``__all__``, so ``from blackwell_sparsek import *`` works without them.

Every entry point emits one ``DeprecationWarning`` per process naming its sparsek replacement.
``blackwell_sparsek.__version__`` is ``"0.1.0+sparsek.compat.<version of this distribution>"``.
"""

from __future__ import annotations

from typing import Any

import torch
from flashcore._dispatch import run_attention
from flashcore._version import BLACKWELL_SPARSEK_VERSION as __version__
from flashcore._warnings import deprecated

from ._lazy import LAZY_NAMES, resolve

__author__ = "periodicdent42 (blackwell_sparsek); sparsek developers (compat layer)"
__license__ = "Apache-2.0"

__all__ = ["__version__", "attention_forward"]


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention on ``[B, H, S, D]`` tensors, computed by sparsek.

    Deprecated: use ``sparsek.attention(q, k, v, causal=causal, scale=scale, layout="bhsd")``.

    Unlike blackwell_sparsek 0.1 this accepts CPU tensors (sparsek's PyTorch reference), bf16, head dim 256, GQA
    (fewer key/value heads) and different query/key lengths; inputs the GPU kernels lack run on PyTorch SDPA with a
    one-time [`FlashcoreFallbackWarning`][flashcore.FlashcoreFallbackWarning]. Gradients flow (the backward
    recomputes through SDPA).

    Args:
        q: queries ``[B, H, S, D]``.
        k: keys ``[B, H_kv, S_k, D]``.
        v: values, same shape as ``k``.
        causal: causal mask (top-left aligned as in SDPA; identical to sparsek's when ``S == S_k``). A float in this
            position is taken as ``scale``, the fourth parameter of the top-level
            ``blackwell_sparsek.attention_forward(Q, K, V, scale=None)`` of the 0.1 package.
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        The output ``[B, H, S, D]``.

    Example:
        >>> q = torch.randn(16, 96, 512, 64, device="cuda", dtype=torch.float16)
        >>> out = attention_forward(q, q, q, causal=True)
    """
    deprecated(
        "blackwell_sparsek.attention_forward",
        "sparsek.attention(q, k, v, causal=..., scale=..., layout='bhsd')",
    )
    if isinstance(causal, float):  # attention_forward(Q, K, V, 0.125): the 0.1 top-level signature's scale
        if scale is not None:
            raise TypeError("attention_forward got a float for 'causal' and a 'scale'; pass causal as a bool")
        causal, scale = False, causal
    return run_attention(
        q,
        k,
        v,
        layout="bhsd",
        caller="blackwell_sparsek.attention_forward",
        is_causal=bool(causal),
        scale=scale,
        stacklevel=2,
    )


def __getattr__(name: str) -> Any:
    if name in LAZY_NAMES:
        value = resolve(__name__, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
