"""Legacy module path ``flashcore.torch_ops`` (flashcore 0.5 defined its public API here); re-exports only."""

from __future__ import annotations

import torch

from ._functional import attention
from ._module import FlashCoreAttention
from ._patch import patch_pytorch, unpatch_pytorch

__all__ = ["FlashCoreAttention", "FlashCoreAttentionFunction", "attention", "patch_pytorch", "unpatch_pytorch"]


class FlashCoreAttentionFunction:
    """Legacy name of flashcore 0.5's autograd function; ``apply`` forwards to [`attention`][flashcore.attention]."""

    @staticmethod
    def apply(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Same as ``flashcore.attention(q, k, v, attn_mask, dropout_p, is_causal, scale)``."""
        return attention(q, k, v, attn_mask, dropout_p, is_causal, scale)
