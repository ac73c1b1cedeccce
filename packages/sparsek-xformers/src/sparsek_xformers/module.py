"""[`SparseKAttention`][sparsek_xformers.SparseKAttention]: an attention ``nn.Module`` that runs sparsek through
xFormers' ``memory_efficient_attention``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from xformers.ops import memory_efficient_attention

from .op import FwOp

__all__ = ["SparseKAttention"]


class SparseKAttention(nn.Module):
    """Multi-head / grouped-query attention computed by sparsek, with optional projections.

    A drop-in for code built around xFormers attention: the core is
    ``memory_efficient_attention(q, k, v, attn_bias, scale=scale, op=(FwOp, None))`` and ``attn_bias`` accepts every
    bias type [`FwOp`][sparsek_xformers.FwOp] supports (``LowerTriangularMask``, ``BlockDiagonalCausalMask``,
    paged/padded-keys masks, ...).

    * With projections (``embed_dim`` given): ``forward(x, key=None, value=None)`` takes ``[B, M, embed_dim]``
      (``key``/``value`` default to ``x``: self-attention), projects to ``num_heads`` query heads and
      ``num_kv_heads`` key/value heads of size ``head_dim``, and returns ``[B, Mq, embed_dim]`` (after ``out_proj``
      if ``out_projection``, else ``[B, Mq, num_heads * head_dim]``).
    * Without projections (``embed_dim=None``): ``forward(q, k, v)`` takes xFormers-layout tensors ``[B, M, H, D]``
      (or ``[B, M, G, H, D]``) and returns the attention output in the query's layout. ``k``/``v`` may have fewer
      heads than ``q`` (GQA): they are expanded with stride 0, which sparsek reads without copying.

    Forward only: parameters that require grad are fine under ``torch.no_grad()``/``torch.inference_mode()``, but a
    call that would need a backward raises ``ValueError`` (sparsek has no attention backward yet).

    Args:
        num_heads: query heads.
        embed_dim: model width; ``None`` disables all projections.
        num_kv_heads: key/value heads (GQA/MQA), default ``num_heads``; must divide ``num_heads``.
        head_dim: per-head size, default ``embed_dim // num_heads``.
        bias: whether the projections have a bias.
        out_projection: whether to apply an output projection (only with ``embed_dim``).
        scale: softmax scale, default ``head_dim ** -0.5``.
        device: device of the projection weights.
        dtype: dtype of the projection weights.
    """

    def __init__(
        self,
        num_heads: int,
        embed_dim: int | None = None,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = False,
        out_projection: bool = True,
        scale: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must be positive and divide num_heads ({num_heads})")
        if head_dim is None and embed_dim is not None:
            if embed_dim % num_heads != 0:
                raise ValueError(f"embed_dim ({embed_dim}) is not divisible by num_heads ({num_heads})")
            head_dim = embed_dim // num_heads
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.embed_dim = embed_dim
        self.scale = scale
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.q_proj: nn.Linear | None = None
        self.k_proj: nn.Linear | None = None
        self.v_proj: nn.Linear | None = None
        self.out_proj: nn.Linear | None = None
        if embed_dim is not None:
            assert head_dim is not None
            self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias, **factory)
            self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **factory)
            self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **factory)
            if out_projection:
                self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **factory)

    def extra_repr(self) -> str:
        """Summary shown by ``print(module)``."""
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"embed_dim={self.embed_dim}, scale={self.scale}"
        )

    @staticmethod
    def _group(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """BMHK with fewer K/V heads -> xFormers' BMGHK with K/V expanded (stride 0) over the group."""
        b, mq, hq, d = q.shape
        hkv = k.shape[2]
        if hkv == hq:
            return q, k, v
        if hq % hkv != 0:
            raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
        g = hq // hkv
        q = q.reshape(b, mq, hkv, g, d)
        k = k.unsqueeze(3).expand(k.shape[0], k.shape[1], hkv, g, k.shape[-1])
        v = v.unsqueeze(3).expand(v.shape[0], v.shape[1], hkv, g, v.shape[-1])
        return q, k, v

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        attn_bias: Any = None,
    ) -> torch.Tensor:
        """Attention of ``query`` over ``key``/``value`` under ``attn_bias``.

        Args:
            query: ``[B, Mq, embed_dim]`` with projections, else ``[B, Mq, H, D]`` / ``[B, Mq, G, H, D]``.
            key: like ``query`` with ``Mk`` positions; defaults to ``query``.
            value: like ``key``; defaults to ``key``.
            attn_bias: an xFormers attention bias supported by [`FwOp`][sparsek_xformers.FwOp], or ``None``.

        Returns:
            ``[B, Mq, embed_dim]`` with projections (see the class docs), else the query's layout.
        """
        key = query if key is None else key
        value = key if value is None else value
        if self.q_proj is None:
            squeeze = query.dim() == 4
            q, k, v = self._group(query, key, value) if squeeze else (query, key, value)
            out = memory_efficient_attention(q, k, v, attn_bias, scale=self.scale, op=(FwOp, None))
            return out.reshape(query.shape[:-1] + (value.shape[-1],)) if squeeze else out
        assert self.k_proj is not None and self.v_proj is not None and self.head_dim is not None
        b, mq, _ = query.shape
        q = self.q_proj(query).view(b, mq, self.num_heads, self.head_dim)
        k = self.k_proj(key).view(key.shape[0], key.shape[1], self.num_kv_heads, self.head_dim)
        v = self.v_proj(value).view(value.shape[0], value.shape[1], self.num_kv_heads, self.head_dim)
        q, k, v = self._group(q, k, v)
        out = memory_efficient_attention(q, k, v, attn_bias, scale=self.scale, op=(FwOp, None))
        out = out.reshape(b, mq, self.num_heads * self.head_dim)
        return self.out_proj(out) if self.out_proj is not None else out
