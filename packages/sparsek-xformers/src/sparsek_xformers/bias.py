"""Mapping of xFormers ``attn_bias`` objects onto sparsek's masks.

sparsek knows one mask family: a band around the **bottom-right** aligned diagonal, per (packed) sequence
(``causal`` and ``window=(left, right)`` of ``sparsek.attention``). Every supported xFormers
bias is translated here into either a [`DensePlan`][sparsek_xformers.bias.DensePlan] (batched
``sparsek.attention``) or a [`VarlenPlan`][sparsek_xformers.bias.VarlenPlan] (packed ``sparsek.varlen_attention``
over a list of (query range, key range) sequences). The translation only reads the host-side copies of the
sequence lengths that xFormers biases carry (``seqstart_py``, ``seqlen_py``), so it causes no device sync.

Top-left causal masks (``LowerTriangularMask`` and ``BlockDiagonalCausal[LocalAttention]Mask`` when a block has
different numbers of queries and keys) are rewritten exactly:

* ``Mq <= Mk``: keys ``>= Mq`` are never visible, so the block is the square ``Mq x Mq`` causal block, where top-left
  and bottom-right alignment coincide (keys truncated to the first ``Mq``).
* ``Mq > Mk`` (dense): query ``i`` sees keys ``j <= i = pos + (Mq - Mk)`` with ``pos = i + Mk - Mq``, i.e. the
  non-causal band ``window=(-1, Mq - Mk)``.
* ``Mq > Mk`` (varlen): rows ``i < Mk`` form the square causal block; every further row becomes its own one-query
  sequence over exactly the keys it may see (a one-query bottom-right causal sequence sees all its keys).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from xformers.ops.fmha import attn_bias as xab

__all__ = [
    "SUPPORTED_ATTN_BIAS_TYPES",
    "DensePlan",
    "VarlenPlan",
    "bias_not_supported_reasons",
    "plan_attention",
]


@dataclass(frozen=True)
class DensePlan:
    """Run batched ``sparsek.attention`` on ``[B, M, H, D]`` tensors.

    Attributes:
        causal: bottom-right causal mask.
        window: ``(left, right)`` band (``-1`` unbounded) or ``None``.
        key_limit: use only the first ``key_limit`` keys (``None``: all).
    """

    causal: bool = False
    window: tuple[int, int] | None = None
    key_limit: int | None = None


@dataclass(frozen=True)
class VarlenPlan:
    """Run ``sparsek.varlen_attention`` over packed sequences.

    Sequence ``s`` owns the next ``q_lens[s]`` packed queries (the sequences tile all queries in order) and the keys
    ``[k_lo[s], k_hi[s])``. With ``page_size is None`` these are rows of the packed key tensor; otherwise they are
    logical positions in row ``k_row[s]`` of ``block_tables`` (paged KV cache, physical row
    ``block_tables[row, pos // page_size] * page_size + pos % page_size``).

    Attributes:
        q_lens: queries per sequence.
        k_lo: first key of each sequence.
        k_hi: one past the last key of each sequence.
        causal: per-sequence bottom-right causal mask.
        window: per-sequence ``(left, right)`` band or ``None``.
        k_row: block-table row of each sequence (paged only).
        block_tables: int32 ``[batch, max_pages]`` on the keys' device (paged only).
        page_size: tokens per page (paged only).
        cu_seqlens_q: device copy of the query prefix sums when the bias already holds it (saves a copy).
        cu_seqlens_k: device copy of the key prefix sums when the keys need no gather and start at row 0.
    """

    q_lens: list[int]
    k_lo: list[int]
    k_hi: list[int]
    causal: bool = False
    window: tuple[int, int] | None = None
    k_row: list[int] | None = None
    block_tables: torch.Tensor | None = None
    page_size: int | None = None
    cu_seqlens_q: torch.Tensor | None = field(default=None, repr=False)
    cu_seqlens_k: torch.Tensor | None = field(default=None, repr=False)

    @property
    def paged(self) -> bool:
        """Whether keys live in a paged cache addressed through ``block_tables``."""
        return self.page_size is not None

    @property
    def keys_contiguous(self) -> bool:
        """Whether the key ranges are back-to-back rows of the packed key tensor (no gather needed)."""
        if self.paged:
            return False
        return all(hi == lo for hi, lo in zip(self.k_hi[:-1], self.k_lo[1:]))


Plan = DensePlan | VarlenPlan


def _intervals(seqinfo: Any) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in seqinfo.intervals()]


# ----------------------------------------------------------------------------------------------------------------
# dense biases


def _dense_none(bias: Any, mq: int, mk: int) -> DensePlan:
    return DensePlan()


def _dense_top_left(bias: Any, mq: int, mk: int) -> DensePlan:
    if mq == mk:
        return DensePlan(causal=True)
    if mq < mk:
        return DensePlan(causal=True, key_limit=mq)
    return DensePlan(window=(-1, mq - mk))


def _dense_bottom_right(bias: Any, mq: int, mk: int) -> DensePlan:
    return DensePlan(causal=True)


def _dense_bottom_right_local(bias: Any, mq: int, mk: int) -> DensePlan:
    return DensePlan(causal=True, window=(bias._window_size - 1, 0))


def _dense_band(bias: Any, mq: int, mk: int) -> DensePlan:
    return DensePlan(window=(bias.window_left, bias.window_right))


# ----------------------------------------------------------------------------------------------------------------
# varlen biases


def _varlen_bottom_right(causal: bool, window: Callable[[Any], tuple[int, int] | None]) -> Callable[..., VarlenPlan]:
    """Bottom-right aligned block-diagonal bias whose key blocks are ``k_seqinfo.intervals()``."""

    def rule(bias: Any, mq: int, mk: int) -> VarlenPlan:
        q_iv, k_iv = _intervals(bias.q_seqinfo), _intervals(bias.k_seqinfo)
        k_lo, k_hi = [a for a, _ in k_iv], [b for _, b in k_iv]
        plan_kw: dict[str, Any] = {}
        if isinstance(bias, xab.BlockDiagonalMask) and k_lo and k_lo[0] == 0:
            plan_kw["cu_seqlens_k"] = bias.k_seqinfo.seqstart  # tiles keys from row 0: reuse the device copy
        return VarlenPlan(
            q_lens=[b - a for a, b in q_iv],
            k_lo=k_lo,
            k_hi=k_hi,
            causal=causal,
            window=window(bias),
            cu_seqlens_q=bias.q_seqinfo.seqstart,
            **plan_kw,
        )

    return rule


def _varlen_top_left(left: Callable[[Any], int]) -> Callable[..., VarlenPlan]:
    """``BlockDiagonalCausal[LocalAttention]Mask``: per-block causal aligned top-left, band ``left`` (-1 unbounded)."""

    def rule(bias: Any, mq: int, mk: int) -> VarlenPlan:
        q_iv, k_iv = _intervals(bias.q_seqinfo), _intervals(bias.k_seqinfo)
        lft = left(bias)
        window = (lft, 0) if lft >= 0 else None
        if all(qe - qs == ke - ks for (qs, qe), (ks, ke) in zip(q_iv, k_iv)):
            return _varlen_bottom_right(True, lambda b: window)(bias, mq, mk)
        q_lens: list[int] = []
        k_lo: list[int] = []
        k_hi: list[int] = []
        for (qs, qe), (ks, ke) in zip(q_iv, k_iv):
            nq, nk = qe - qs, ke - ks
            m = min(nq, nk)
            q_lens.append(m)  # square top-left block == bottom-right block
            k_lo.append(ks)
            k_hi.append(ks + m)
            for i in range(nk, nq):  # extra rows (nq > nk): one single-query sequence each
                q_lens.append(1)
                k_lo.append(min(ke, ks + (0 if lft < 0 else max(0, i - lft))))
                k_hi.append(ke)
        return VarlenPlan(q_lens=q_lens, k_lo=k_lo, k_hi=k_hi, causal=True, window=window)

    return rule


def _paged_rule(causal: bool) -> Callable[..., VarlenPlan]:
    """``PagedBlockDiagonal[CausalWithOffset]{PaddedKeys,GappyKeys}Mask``: keys at logical positions of a row."""

    def rule(bias: Any, mq: int, mk: int) -> VarlenPlan:
        q_iv = _intervals(bias.q_seqinfo)
        if isinstance(bias, xab.PagedBlockDiagonalGappyKeysMask):
            # seqstart_py[b]: first position in row b; seqlen_py[b]: one past the last position in row b.
            k_lo = [int(s) for s in bias.k_seqinfo.seqstart_py[: len(q_iv)]]
            k_hi = [int(e) for e in bias.k_seqinfo.seqlen_py[: len(q_iv)]]
        else:
            k_lo = [0] * len(q_iv)
            k_hi = [int(n) for n in bias.k_seqinfo.seqlen_py]
        return VarlenPlan(
            q_lens=[b - a for a, b in q_iv],
            k_lo=k_lo,
            k_hi=k_hi,
            causal=causal,
            k_row=list(range(len(q_iv))),
            block_tables=bias.block_tables,
            page_size=int(bias.page_size),
            cu_seqlens_q=bias.q_seqinfo.seqstart,
        )

    return rule


def _no_window(bias: Any) -> None:
    return None


def _causal_local_window(bias: Any) -> tuple[int, int]:
    return (bias._window_size - 1, 0)


def _band_window(bias: Any) -> tuple[int, int]:
    return (bias.window_left, bias.window_right)


#: How each supported bias type maps onto sparsek. Keys are matched by exact type, as xFormers does.
_RULES: dict[type, Callable[[Any, int, int], Plan]] = {
    type(None): _dense_none,
    xab.LowerTriangularMask: _dense_top_left,
    xab.LowerTriangularFromBottomRightMask: _dense_bottom_right,
    xab.LowerTriangularFromBottomRightLocalAttentionMask: _dense_bottom_right_local,
    xab.LocalAttentionFromBottomRightMask: _dense_band,
    xab.BlockDiagonalMask: _varlen_bottom_right(False, _no_window),
    xab.BlockDiagonalCausalMask: _varlen_top_left(lambda b: -1),
    xab.BlockDiagonalCausalLocalAttentionMask: _varlen_top_left(lambda b: b._window_size - 1),
    xab.BlockDiagonalCausalFromBottomRightMask: _varlen_bottom_right(True, _no_window),
    xab.BlockDiagonalCausalLocalAttentionFromBottomRightMask: _varlen_bottom_right(True, _causal_local_window),
    xab.BlockDiagonalPaddedKeysMask: _varlen_bottom_right(False, _no_window),
    xab.BlockDiagonalCausalWithOffsetPaddedKeysMask: _varlen_bottom_right(True, _no_window),
    xab.BlockDiagonalCausalLocalAttentionPaddedKeysMask: _varlen_bottom_right(True, _causal_local_window),
    xab.BlockDiagonalLocalAttentionPaddedKeysMask: _varlen_bottom_right(False, _band_window),
    xab.BlockDiagonalGappyKeysMask: _varlen_bottom_right(False, _no_window),
    xab.BlockDiagonalCausalWithOffsetGappyKeysMask: _varlen_bottom_right(True, _no_window),
    xab.PagedBlockDiagonalPaddedKeysMask: _paged_rule(False),
    xab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask: _paged_rule(True),
    xab.PagedBlockDiagonalGappyKeysMask: _paged_rule(False),
    xab.PagedBlockDiagonalCausalWithOffsetGappyKeysMask: _paged_rule(True),
}

SUPPORTED_ATTN_BIAS_TYPES: tuple[type, ...] = tuple(_RULES)
"""Every ``attn_bias`` type [`FwOp`][sparsek_xformers.FwOp] implements (``type(None)`` for no bias). Matched by exact
type, as xFormers does: subclasses are not implied."""

_VARLEN_TYPES = xab.VARLEN_BIASES


def bias_not_supported_reasons(bias: Any, query_shape: tuple[int, ...], key_shape: tuple[int, ...]) -> list[str]:
    """Why ``bias`` cannot be mapped onto sparsek for these (BMHK or BMGHK) shapes; empty if it can.

    Args:
        bias: the ``attn_bias`` passed to xFormers.
        query_shape: shape of the query tensor.
        key_shape: shape of the key tensor.

    Returns:
        Human-readable reasons, in the style of xFormers' ``not_supported_reasons``.
    """
    if type(bias) not in _RULES:
        names = ", ".join(t.__name__ for t in SUPPORTED_ATTN_BIAS_TYPES if t is not type(None))
        return [
            f"sparsek does not implement attn_bias of type {type(bias).__module__}.{type(bias).__qualname__} "
            f"(implemented: None, {names})"
        ]
    if not isinstance(bias, _VARLEN_TYPES):
        return []
    reasons = []
    if query_shape[0] != 1 or key_shape[0] != 1:
        reasons.append(f"{type(bias).__name__} needs batch size 1 (sequences packed along M)")
    total_q = int(bias.q_seqinfo.seqstart_py[-1])
    if query_shape[1] != total_q:
        reasons.append(f"query.shape[1]={query_shape[1]} != {total_q} queries described by {type(bias).__name__}")
    if not isinstance(bias, (xab.PagedBlockDiagonalPaddedKeysMask, xab.PagedBlockDiagonalGappyKeysMask)):
        needed = max((int(e) for _, e in bias.k_seqinfo.intervals()), default=0)
        if key_shape[1] < needed:
            reasons.append(f"key.shape[1]={key_shape[1]} < {needed} keys addressed by {type(bias).__name__}")
    return reasons


def plan_attention(bias: Any, seqlen_q: int, seqlen_k: int) -> Plan:
    """Translate a supported ``attn_bias`` into a sparsek execution plan.

    Args:
        bias: an instance of one of [`SUPPORTED_ATTN_BIAS_TYPES`][sparsek_xformers.bias.SUPPORTED_ATTN_BIAS_TYPES],
            or ``None``.
        seqlen_q: ``query.shape[1]``.
        seqlen_k: ``key.shape[1]``.

    Returns:
        A [`DensePlan`][sparsek_xformers.bias.DensePlan] or a [`VarlenPlan`][sparsek_xformers.bias.VarlenPlan].

    Raises:
        NotImplementedError: for a bias type sparsek does not implement.
    """
    rule = _RULES.get(type(bias))
    if rule is None:
        raise NotImplementedError(bias_not_supported_reasons(bias, (1, seqlen_q), (1, seqlen_k))[0])
    return rule(bias, seqlen_q, seqlen_k)
