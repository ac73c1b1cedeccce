"""``flashcore.FlashCoreAttention``: flashcore 0.5's ``nn.MultiheadAttention``-like module, on sparsek."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._dispatch import run_attention
from ._warnings import FlashcoreFallbackWarning, FlashcoreLayoutWarning, deprecated, warn_once

__all__ = ["FlashCoreAttention"]

_REPLACEMENT = (
    "sparsek.attention(q, k, v, layout='bshd') between your own projections (the parameter names of "
    "torch.nn.MultiheadAttention are kept, so its state dicts load), or sparsek_xformers.SparseKAttention"
)
# Frames between run_attention's caller (forward) and user code: Module._call_impl, Module._wrapped_call_impl.
_MODULE_STACKLEVEL = 4


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """nn.MultiheadAttention mask convention (bool True = masked out, float = added) -> additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"attention masks must be bool or floating point, got {mask.dtype}")
    return mask.to(dtype)


class FlashCoreAttention(nn.Module):
    """flashcore 0.5's multi-head attention module, running on sparsek. Deprecated.

    Parameters have the same names and shapes as in flashcore 0.5 and ``torch.nn.MultiheadAttention``
    (``in_proj_weight [3E, E]``, ``in_proj_bias [3E]``, ``out_proj.weight``, ``out_proj.bias``), so state dicts load
    in both directions, and the module computes what ``nn.MultiheadAttention`` computes with the same weights.

    Differences from flashcore 0.5, all towards ``nn.MultiheadAttention``: ``key`` and ``value`` are projected
    (0.5 projected ``query`` three times, which only mattered for cross-attention); 2-D (unbatched) inputs follow
    ``nn.MultiheadAttention``; masks, ``need_weights=True`` and dropout work (on PyTorch's implementation, with a
    one-time [`FlashcoreFallbackWarning`][flashcore.FlashcoreFallbackWarning]) instead of raising
    ``NotImplementedError``; and the attention itself is right for every shape (0.5 attended over the heads axis
    when the number of heads differed from the sequence length).

    Args:
        embed_dim: model width ``E``; must be divisible by ``num_heads``.
        num_heads: number of attention heads.
        dropout: attention dropout probability, applied in training mode (0.5 rejected any non-zero value).
        bias: whether the input and output projections have biases.
        device: device of the parameters.
        dtype: dtype of the parameters.
        batch_first: input layout. ``None`` (default) keeps flashcore 0.5's guess: 3-D inputs are
            ``[N, B, E]`` (sequence first, like ``nn.MultiheadAttention``'s default) unless dims 0 and 1 are equal,
            in which case they are ``[B, N, E]`` and a one-time
            [`FlashcoreLayoutWarning`][flashcore.FlashcoreLayoutWarning] is emitted. ``True``/``False`` fix the
            layout as ``nn.MultiheadAttention(batch_first=...)`` does.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        batch_first: bool | None = None,
    ) -> None:
        deprecated("flashcore.FlashCoreAttention", _REPLACEMENT)
        super().__init__()
        if embed_dim % num_heads != 0:  # flashcore 0.5 asserted this
            raise AssertionError("embed_dim must be divisible by num_heads")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        factory = {"device": device, "dtype": dtype}
        self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def __setstate__(self, state: dict) -> None:
        # whole modules pickled by flashcore 0.5 (class path flashcore.torch_ops.FlashCoreAttention) lack batch_first
        state.setdefault("batch_first", None)
        super().__setstate__(state)

    def _reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"bias={self.in_proj_bias is not None}, batch_first={self.batch_first}"
        )

    def _is_batch_first(self, query: torch.Tensor) -> bool:
        if self.batch_first is not None:
            return bool(self.batch_first)
        if query.shape[0] != query.shape[1]:
            return False  # flashcore 0.5: "likely [N, B, E]"
        warn_once(
            "module-layout:ambiguous",
            f"flashcore.FlashCoreAttention: the layout of an input of shape {tuple(query.shape)} is ambiguous "
            "(dims 0 and 1 are equal); treating it as [B, N, E] like flashcore 0.5.0 (nn.MultiheadAttention would "
            "read [N, B, E]). Construct the module with batch_first=True or False "
            "(this warning is shown once per process).",
            FlashcoreLayoutWarning,
            stacklevel=_MODULE_STACKLEVEL + 1,
        )
        return True

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Multi-head attention of ``query`` over ``key``/``value``.

        Args:
            query: ``[N, B, E]`` or ``[B, N, E]`` (see ``batch_first``), or unbatched ``[N, E]``.
            key: ``[S, B, E]`` / ``[B, S, E]`` / ``[S, E]``, same layout as ``query``.
            value: same shape as ``key``.
            key_padding_mask: ``[B, S]`` (``[S]`` unbatched); bool True = ignore that key, or an additive float
                mask (``nn.MultiheadAttention``'s convention).
            need_weights: also return the attention weights (computed by PyTorch, not sparsek).
            attn_mask: ``[N, S]`` or ``[B * num_heads, N, S]``; bool True = not allowed, or additive float.
            average_attn_weights: average the returned weights over heads (only with ``need_weights``).
            is_causal: causal self-attention (top-left aligned); if ``attn_mask`` is also given it is taken to be
                the causal mask, as in ``nn.MultiheadAttention``.

        Returns:
            ``(output, weights)``: output in ``query``'s layout with width ``E``; ``weights`` is None unless
            ``need_weights``.
        """
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (unbatched) or 3-D, got shape {tuple(query.shape)}")
        unbatched = query.dim() == 2
        self_attention = query is key and key is value
        if unbatched:  # [N, E] -> [1, N, E]
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            batch_first = True
        else:
            batch_first = self._is_batch_first(query)
            if not batch_first:
                query, key, value = (t.transpose(0, 1) for t in (query, key, value))

        if need_weights:
            out, weights = self._forward_with_weights(
                query, key, value, self_attention, key_padding_mask, attn_mask, average_attn_weights, is_causal
            )
        else:
            out, weights = self._forward_sparsek(
                query, key, value, self_attention, key_padding_mask, attn_mask, is_causal
            )

        if unbatched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        elif not batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _forward_sparsek(self, query, key, value, self_attention, key_padding_mask, attn_mask, is_causal):
        batch, n_q, _ = query.shape
        n_k = key.shape[1]
        heads, head_dim = self.num_heads, self.head_dim
        if self_attention:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            weights = self.in_proj_weight.chunk(3)
            biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
            q, k, v = (F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))
        q = q.reshape(batch, n_q, heads, head_dim)
        k = k.reshape(batch, n_k, heads, head_dim)
        v = v.reshape(batch, n_k, heads, head_dim)

        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, q.dtype)
            if mask.dim() == 2:
                mask = mask.view(1, 1, n_q, n_k)
            elif mask.dim() == 3:
                mask = mask.view(batch, heads, n_q, n_k)
            else:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got shape {tuple(attn_mask.shape)}")
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, q.dtype).view(batch, 1, 1, n_k)
            if is_causal and attn_mask is None:  # keep causality alongside the padding mask
                causal = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1)
                padding = padding + _additive(causal, q.dtype)
            mask = padding if mask is None else mask + padding
        out = run_attention(
            q,
            k,
            v,
            layout="bshd",
            caller="flashcore.FlashCoreAttention",
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=bool(is_causal) and mask is None,
            gqa=False,
            stacklevel=_MODULE_STACKLEVEL + 1,
        )
        return self.out_proj(out.reshape(batch, n_q, self.embed_dim)), None

    def _forward_with_weights(
        self, query, key, value, self_attention, key_padding_mask, attn_mask, average_attn_weights, is_causal
    ):
        warn_once(
            "fallback:need-weights",
            "flashcore.FlashCoreAttention: sparsek does not return attention weights; need_weights=True runs "
            "torch.nn.functional.multi_head_attention_forward instead (this warning is shown once per process)",
            FlashcoreFallbackWarning,
            stacklevel=_MODULE_STACKLEVEL + 1,
        )
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(query.shape[1], key.shape[1], dtype=torch.bool, device=query.device).triu(1)
        # sequence first; keep query/key/value one object for self-attention (packed in-projection, as in nn.MHA)
        query = query.transpose(0, 1)
        key, value = (query, query) if self_attention else (key.transpose(0, 1), value.transpose(0, 1))
        out, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            None,
            None,
            False,
            self.dropout,
            self.out_proj.weight,
            self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=True,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
        )
        return out.transpose(0, 1), weights
