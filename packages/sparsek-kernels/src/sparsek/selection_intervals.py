"""Per-query SparseK selection rewritten for block kernels: one key list per block of queries plus, for every listed
key, the contiguous range of the block's queries that select it.

With query-independent scores (``[B, Hkv, Sk]``, the SparseK paper's scoring), causal query ``t`` of a block selects
the ``k`` best keys of its prefix ``[0, L0 + t)``. The prefix grows by one key per query, so the selected set changes
by at most one insertion (and one eviction) per query: a block of ``bs`` queries selects at most ``k + bs - 1``
distinct keys, and a key, once evicted, never returns (the ``k``-th best of a growing prefix only improves). Each
listed key is therefore visible to an interval ``[lo, hi)`` of the block's queries.

Construction, per (batch, head, block): ``S`` = the ``k`` best keys of the first query's prefix (the selection
kernel with ``step = bs``); its ``bs - 1`` weakest members ``W`` plus the ``bs - 1`` keys that enter the prefix
inside the block ``N`` are the only keys whose visibility can change (at most ``bs - 1`` evictions happen, and they
hit the weakest first); the strong rest of ``S`` is visible to the whole block. Key ``c`` of ``W ∪ N`` is visible to
query ``t`` when it is in the prefix and fewer than ``k - |S_strong|`` keys of ``W ∪ N`` in the prefix beat it
(higher score, ties to the lower position).
"""

from __future__ import annotations

import torch

#: Bits of the packed interval: ``lo | hi << INTERVAL_SHIFT`` (query rows relative to the block start).
INTERVAL_SHIFT = 16


def key_order_and_ranks(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection order of the keys (int64 ``[B, H, Sk]``: key of rank ``r``) and its inverse, the int32 rank of
    every key (see [`key_ranks`][sparsek.selection_intervals.key_ranks])."""
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return order, ranks.to(torch.int32)


def key_ranks(scores: torch.Tensor) -> torch.Tensor:
    """int32 rank of every key in the selection order (0 = best): higher score first, ties to the lower position;
    ``-inf`` keys rank after every finite one. ``scores``: ``[B, H, Sk]``."""
    return key_order_and_ranks(scores)[1]


def selectable_prefix(scores: torch.Tensor) -> torch.Tensor:
    """int32 ``[B, H, Sk + 1]``: number of selectable keys (score other than ``-inf``) in ``[0, j)``."""
    finite = torch.isfinite(scores) | (scores > 0)
    return torch.nn.functional.pad(finite.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))


def union_width(num_sets: int, k: int, block_size: int) -> int:
    """Width ``n`` of the lists [`block_union_intervals`][sparsek.selection_intervals.block_union_intervals] returns
    for ``first_sets`` of width ``num_sets``: the strong members and candidates it concatenates, at most
    ``k + block_size - 1``."""
    nw = min(block_size - 1, k)
    return min(num_sets + nw + block_size - 1, k + block_size - 1)


def block_union_intervals(
    scores: torch.Tensor,
    first_sets: torch.Tensor,
    k: int,
    seqlen_q: int,
    off: int,
    block_size: int,
    max_elements: int = 1 << 28,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Union key lists and packed query intervals of per-query top-k selection, per block of queries.

    Args:
        scores: float ``[B, H, Sk]`` per-key scores (no NaN).
        first_sets: int32 ``[B, H, nb, k]``: the ``k`` best keys of each block's first-query prefix
            ``[0, clamp(off + m * block_size, 0, Sk))`` (``-1`` padded; any order), as the selection kernel returns
            with ``step = block_size``.
        k: the budget.
        seqlen_q: number of queries (``nb = ceil(seqlen_q / block_size)``).
        off: query ``i`` selects among keys ``[0, clamp(off + i, 0, Sk))``.
        block_size: queries per block.

    Returns:
        ``lists`` int32 ``[B, H, nb, n]`` (``-1`` padded, ``n <= k + block_size - 1``), ``intervals`` int32 of the
        same shape (``lo | hi << 16``: the key is selected by the block's queries ``lo <= t < hi``; 0 for padding),
        and ``counts`` int32 ``[B, H, nb]`` of listed keys.

    The work tensors hold about ``B·H·blocks·2·block_size²`` elements; blocks are processed in chunks so that this
    stays under ``max_elements``.
    """
    b, h, _ = scores.shape
    nb, bs = first_sets.shape[2], block_size
    per_block = max(1, b * h * 2 * bs * bs)
    chunk = max(1, max_elements // per_block)
    if nb > chunk:
        parts = [
            _block_union_intervals(scores, first_sets[:, :, m0 : m0 + chunk], k, seqlen_q - m0 * bs, off + m0 * bs, bs)
            for m0 in range(0, nb, chunk)
        ]
        return tuple(torch.cat(t, dim=2) for t in zip(*parts))
    return _block_union_intervals(scores, first_sets, k, seqlen_q, off, bs)


def _block_union_intervals(
    scores: torch.Tensor, first_sets: torch.Tensor, k: int, seqlen_q: int, off: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, sk = scores.shape
    nb = first_sets.shape[2]
    bs = block_size
    dev = scores.device
    nw = min(bs - 1, k)  # weakest members of S that may be evicted
    ranks = key_ranks(scores)  # [B, H, Sk]
    big = torch.iinfo(torch.int32).max
    finite = torch.isfinite(scores) | (scores > 0)
    fin_prefix = torch.nn.functional.pad(finite.to(torch.int32).cumsum(-1), (1, 0))  # [B, H, Sk + 1]

    # S sorted by rank (best first); padding last.
    s_valid = first_sets >= 0
    s_rank = torch.where(
        s_valid, ranks.unsqueeze(2).expand(-1, -1, nb, -1).gather(-1, first_sets.clamp(min=0).long()), big
    )
    s_rank, s_ord = s_rank.sort(-1)
    s_keys = first_sets.gather(-1, s_ord)
    n_s = s_valid.sum(-1)  # [B, H, nb]
    n_w = n_s.clamp(max=nw)
    n_strong = n_s - n_w
    # W: the n_w weakest valid members = positions [n_strong, n_s) of the rank-sorted S, gathered into nw slots.
    slot = torch.arange(nw, device=dev)
    w_pos = (n_strong.unsqueeze(-1) + slot).clamp(max=max(s_keys.shape[-1] - 1, 0))
    w_ok = slot < n_w.unsqueeze(-1)
    w_keys = torch.where(w_ok, s_keys.gather(-1, w_pos), -1).long()
    # N: keys entering the prefix inside the block; query t of block m has prefix [0, clamp(L0 + t, 0, Sk)).
    m = torch.arange(nb, device=dev)
    l0 = off + m * bs  # unclamped prefix length of each block's first query
    nq = (seqlen_q - m * bs).clamp(max=bs)  # queries in the block
    s_idx = torch.arange(bs - 1, device=dev)
    n_keys = l0.unsqueeze(-1).long() + s_idx  # key entering at query s + 1
    n_ok = (n_keys >= 0) & (n_keys < sk) & (s_idx + 1 < nq.unsqueeze(-1))  # [nb, bs - 1]
    n_keys = torch.where(n_ok, n_keys, -1).expand(b, h, -1, -1)
    c_keys = torch.cat([w_keys, n_keys], -1)  # [B, H, nb, nw + bs - 1]
    c_ok = c_keys >= 0
    c_rank = torch.where(c_ok, ranks.unsqueeze(2).expand(-1, -1, nb, -1).gather(-1, c_keys.clamp(min=0).long()), big)
    # Query (relative to the block) from which the key is in the prefix.
    t = torch.arange(bs, device=dev)
    c_elig = (c_keys - l0.view(1, 1, nb, 1) + 1).clamp(min=0)  # [B, H, nb, C]
    c_fin = finite.unsqueeze(2).expand(-1, -1, nb, -1).gather(-1, c_keys.clamp(min=0)) & c_ok
    # While the prefix holds fewer than k selectable keys (queries t < t_full) every selectable key in it is selected.
    lt = (l0.view(nb, 1) + t).clamp(0, sk)  # [nb, bs] prefix length of each query
    fin = fin_prefix.unsqueeze(2).expand(-1, -1, nb, -1).gather(-1, lt.expand(b, h, -1, -1))  # [B, H, nb, bs]
    t_full = (fin < k).sum(-1)  # [B, H, nb]; fin is non-decreasing in t
    # From t_full on, W ∪ N shares k - |S_strong| slots: c is selected at t while the keys of W and of the entered
    # N_s (s < t) that beat it are fewer. The count only grows with t, so that holds for t < T(c).
    w_beats = (c_rank[..., :nw].unsqueeze(-2) < c_rank.unsqueeze(-1)) & w_ok.unsqueeze(-2)  # [B, H, nb, C, nw]
    room = (k - n_strong).unsqueeze(-1) - w_beats.sum(-1)  # [B, H, nb, C]
    n_rank = c_rank[..., nw:]  # [B, H, nb, bs - 1]
    n_beats = (n_rank.unsqueeze(-2) < c_rank.unsqueeze(-1)) & n_ok.view(1, 1, nb, 1, bs - 1)  # [.., C, bs - 1]
    entered = n_beats.to(torch.int32).cumsum(-1, dtype=torch.int32)  # beaters among N_0..N_s (enter at s + 1)
    until = (room > 0).to(torch.int64) + torch.searchsorted(entered, room.unsqueeze(-1).to(torch.int32)).squeeze(-1)
    lo = c_elig
    hi = torch.minimum(torch.maximum(until, t_full.unsqueeze(-1)), nq.view(1, 1, nb, 1))
    c_keep = c_fin & (lo < hi)
    lo, hi = torch.where(c_keep, lo, 0), torch.where(c_keep, hi, 0)
    # Strong members: the whole block.
    strong_slot = torch.arange(s_keys.shape[-1], device=dev)
    strong_ok = strong_slot < n_strong.unsqueeze(-1)
    strong_keys = torch.where(strong_ok, s_keys.long(), -1)
    strong_iv = torch.where(strong_ok, (nq.view(1, 1, nb, 1) << INTERVAL_SHIFT).expand_as(strong_keys), 0)
    keys = torch.cat([strong_keys, torch.where(c_keep, c_keys, -1)], -1)
    iv = torch.cat([strong_iv, torch.where(c_keep, lo | (hi << INTERVAL_SHIFT), 0)], -1)
    # Compact: listed keys first (stable); at most |S| + |N| <= k + bs - 1 of them.
    order = (keys < 0).to(torch.int8).argsort(dim=-1, stable=True)[..., : k + bs - 1]
    keys, iv = keys.gather(-1, order), iv.gather(-1, order)
    counts = (keys >= 0).sum(-1, dtype=torch.int32)
    return keys.to(torch.int32).contiguous(), iv.to(torch.int32).contiguous(), counts
