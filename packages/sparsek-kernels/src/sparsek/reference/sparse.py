"""Pure-PyTorch references for sparsek's sparse attention ops (SparseK selection, top-k and block-sparse attention).

Every function here defines the semantics the CUDA kernels are tested against and is the CPU execution path.
They perform no input validation and compute in float32 (float64 for float64 inputs).

Conventions shared with [`sparsek.sparse`][sparsek.sparse]:

* ``q`` is ``[B, Sq, Hq, D]``, ``k``/``v`` are ``[B, Sk, Hkv, D]`` (``bshd``); query ``i`` sits at key position
  ``pos = i + Sk - Sq`` (bottom-right alignment).
* ``window = w > 0`` is the local band ``[pos - w + 1, pos]`` (``w`` keys including the query itself);
  ``w = 0`` means no band.
* Index lists are int32 key positions, ``-1`` padded, one list per KV head: per query ``[B, Hkv, Sq, n]`` or per
  query block of ``block_size`` queries ``[B, Hkv, ceil(Sq / block_size), n]``.
"""

from __future__ import annotations

import torch

from .dense import band_mask, masked_softmax_attention

__all__ = [
    "block_mask_from_indices",
    "block_sparse_attention_ref",
    "interval_index_mask",
    "select_limits",
    "sparsek_attention_ref",
    "sparsek_mask_ref",
    "sparsek_select_ref",
    "sparsek_threshold_ref",
    "topk_attention_ref",
    "topk_index_mask",
    "topk_rows_ref",
]


# --------------------------------------------------------------------------------------------------------------------
# SparseK operator
# --------------------------------------------------------------------------------------------------------------------


def sparsek_threshold_ref(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Threshold ``tau`` of the SparseK projection of each row of ``z`` (last dim), solved exactly by sorting.

    ``f(t) = sum_i clip(z_i - t, 0, 1)`` is continuous, piecewise linear and non-increasing with breakpoints
    ``{z_i, z_i - 1}``; the breakpoints are sorted, ``f`` is evaluated at all of them with ``searchsorted`` on the
    sorted row and prefix sums, and ``tau`` solves ``f(tau) = k`` on the segment where ``f`` crosses ``k``:
    ``tau = (sum_{i in S} z_i + |H| - k) / |S|`` with ``S = {tau < z_i < tau + 1}`` and ``H = {z_i >= tau + 1}``.

    ``-inf`` entries are excluded (mask value 0). Rows with at most ``k`` finite entries get mask 1 on every finite
    entry (``tau = -inf``).

    Returns:
        ``(tau, in_s, in_h, small)``: ``tau`` of shape ``z.shape[:-1]``; boolean ``S`` (mask strictly between 0 and
        1: the entries that carry the gradient) and ``H`` (mask 1) of ``z``'s shape; per row, whether it had at
        most ``k`` finite entries.
    """
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    z = z.detach().to(acc)
    n = z.shape[-1]
    finite = torch.isfinite(z)
    small = finite.sum(-1) <= k
    if n == 0 or bool(small.all()):
        tau = torch.full(z.shape[:-1], float("-inf"), dtype=acc, device=z.device)
        return tau, torch.zeros_like(finite), finite.clone(), small
    # Excluded entries sit 2 below the row minimum: tau > z_(k+1) - 1 >= min - 1, so they stay at 0 and out of S.
    zmin = torch.where(finite, z, torch.full_like(z, float("inf"))).amin(-1, keepdim=True)
    zmin = torch.where(torch.isfinite(zmin), zmin, torch.zeros_like(zmin))
    zf = torch.where(finite, z, zmin - 2.0)
    zs = zf.sort(-1).values.contiguous()
    csum = torch.nn.functional.pad(zs.cumsum(-1), (1, 0))
    bps = torch.cat([zs, zs - 1.0], -1).sort(-1).values.contiguous()

    def f(t: torch.Tensor) -> torch.Tensor:
        lo = torch.searchsorted(zs, t, right=True)  # entries <= t give 0
        hi = torch.searchsorted(zs, (t + 1.0).contiguous(), right=False)  # entries >= t + 1 give 1
        mid = csum.gather(-1, hi) - csum.gather(-1, lo) - (hi - lo).to(acc) * t
        return (n - hi).to(acc) + mid

    fb = f(bps)
    last = ((fb >= k).sum(-1, keepdim=True) - 1).clamp(0, 2 * n - 2)  # f non-increasing: last breakpoint f >= k
    t_mid = 0.5 * (bps.gather(-1, last) + bps.gather(-1, last + 1))  # no breakpoint strictly inside the segment
    keep = finite & ~small.unsqueeze(-1)
    in_s = (zf > t_mid) & (zf < t_mid + 1.0) & keep
    in_h = (zf >= t_mid + 1.0) & keep
    tau = ((zf * in_s).sum(-1) + in_h.sum(-1).to(acc) - k) / in_s.sum(-1).clamp_min(1).to(acc)
    tau = torch.where(small, torch.full_like(tau, float("-inf")), tau)
    in_h = in_h | (finite & small.unsqueeze(-1))
    return tau, in_s, in_h, small


def sparsek_mask_ref(scores: torch.Tensor, k: int) -> torch.Tensor:
    """SparseK mask ``clip(z - tau, 0, 1)`` of every row (last dim) with plain autograd through ``tau``'s formula.

    Reference for [`sparsek.sparse.sparsek_mask`][sparsek.sparse.sparsek_mask]: same values; its gradient follows
    from differentiating ``tau = (sum_S z + |H| - k) / |S|`` with the sets ``S``, ``H`` held fixed.
    """
    _, in_s, in_h, _ = sparsek_threshold_ref(scores, k)
    z = torch.where(in_s, scores, torch.zeros_like(scores))
    tau = (z.sum(-1) + in_h.sum(-1).to(z.dtype) - k) / in_s.sum(-1).clamp_min(1).to(z.dtype)
    return torch.where(in_s, (z - tau.unsqueeze(-1)).clamp(0.0, 1.0), in_h.to(z.dtype))


# --------------------------------------------------------------------------------------------------------------------
# Hard top-k selection
# --------------------------------------------------------------------------------------------------------------------


def select_limits(
    seqlen_q: int, seqlen_k: int, *, causal: bool, window: int, block_size: int | None
) -> tuple[int, int, int]:
    """Candidate prefixes of the selection rows: row ``r`` selects among keys ``[0, clamp(off + r * step, 0, Sk))``.

    Returns ``(num_rows, off, step)``. Per query (``block_size=None``), causal: keys ``j <= pos - window`` when
    ``window > 0`` (the band is attended anyway), ``j <= pos`` when ``window = 0``. Per query block of ``bs``
    queries with first position ``p0``: ``j <= p0 - window`` when ``window > 0`` (outside the band of every query
    of the block), ``j <= p0 + bs - 1`` when ``window = 0``. Non-causal: all keys (``window`` must be 0).
    """
    shift = seqlen_k - seqlen_q
    if block_size is None:
        rows, bs = seqlen_q, 1
    else:
        bs = block_size
        rows = -(-seqlen_q // bs)
    if not causal:
        return rows, seqlen_k, 0
    if window > 0:
        return rows, shift + 1 - window, bs
    return rows, shift + bs, bs


def topk_rows_ref(
    scores: torch.Tensor, k: int, num_rows: int, off: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of the selection kernel: the ``k`` best keys of every row's candidate prefix, ascending.

    Args:
        scores: float ``[B, H, Sk]`` (one score per key, shared by every row) or ``[B, H, num_rows, Sk]``.
        k: budget.
        num_rows: number of rows ``R``.
        off: row ``r`` selects among keys ``[0, clamp(off + r * step, 0, Sk))``.
        step: see ``off``.

    Order: higher score first, ties broken by the lower key position; ``-inf`` scores are never selected.

    Returns:
        int32 ``indices [B, H, R, k]`` (sorted ascending, ``-1`` padded) and int32 ``counts [B, H, R]``.
    """
    sk = scores.shape[-1]
    if scores.dim() == 3:
        scores = scores.unsqueeze(2).expand(-1, -1, num_rows, -1)
    scores = scores.float()
    lim = (off + step * torch.arange(num_rows, device=scores.device)).clamp(0, sk)
    cand = torch.arange(sk, device=scores.device).unsqueeze(0) < lim.unsqueeze(1)  # [R, Sk]
    z = scores.masked_fill(~cand, float("-inf"))
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices[..., :k]
    best = z.gather(-1, order)
    order = torch.where(torch.isfinite(best) | (best > 0), order, torch.full_like(order, sk))
    idx = order.sort(-1).values
    counts = (idx < sk).sum(-1).to(torch.int32)
    idx = torch.where(idx < sk, idx, torch.full_like(idx, -1)).to(torch.int32)
    if idx.shape[-1] < k:  # Sk < k cannot happen through the public API, but keep the shape contract
        idx = torch.nn.functional.pad(idx, (0, k - idx.shape[-1]), value=-1)
    return idx, counts


def _block_scores(scores: torch.Tensor, seqlen_q: int, block_size: int, causal: bool) -> torch.Tensor:
    """Block score of a per-query score matrix ``[B, H, Sq, Sk]``: max over the block's queries that see the key."""
    b, h, sq, sk = scores.shape
    nb = -(-sq // block_size)
    z = scores.float()
    if causal:
        z = z.masked_fill(~band_mask(sq, sk, -1, 0, z.device), float("-inf"))
    pad = nb * block_size - sq
    if pad:
        z = torch.nn.functional.pad(z, (0, 0, 0, pad), value=float("-inf"))
    return z.view(b, h, nb, block_size, sk).amax(3)


def sparsek_select_ref(
    scores: torch.Tensor,
    k: int,
    *,
    seqlen_q: int | None = None,
    causal: bool = True,
    window: int = 0,
    block_size: int | None = None,
    return_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference for [`sparsek.sparse.sparsek_select`][sparsek.sparse.sparsek_select] (same arguments)."""
    sk = scores.shape[-1]
    sq = seqlen_q if seqlen_q is not None else (scores.shape[2] if scores.dim() == 4 else sk)
    rows, off, step = select_limits(sq, sk, causal=causal, window=window, block_size=block_size)
    rs = scores
    if scores.dim() == 4 and block_size is not None:
        rs = _block_scores(scores, sq, block_size, causal)
    idx, _ = topk_rows_ref(rs, k, rows, off, step)
    if not return_mask:
        return idx
    return idx, selected_mask_values(rs, idx, k, rows, off, step)


def selected_mask_values(
    scores: torch.Tensor, idx: torch.Tensor, k: int, num_rows: int, off: int, step: int
) -> torch.Tensor:
    """SparseK mask values ``clip(z_j - tau_row, 0, 1)`` at the selected indices (0 where ``idx == -1``).

    ``tau_row`` is the SparseK threshold of the row's whole candidate prefix (the projection of the prefix scores
    onto ``{0 <= m <= 1, sum m = k}``); rows with at most ``k`` candidates get 1 on every candidate.
    """
    sk = scores.shape[-1]
    if scores.dim() == 3:
        scores = scores.unsqueeze(2).expand(-1, -1, num_rows, -1)
    lim = (off + step * torch.arange(num_rows, device=scores.device)).clamp(0, sk)
    cand = torch.arange(sk, device=scores.device).unsqueeze(0) < lim.unsqueeze(1)
    z = scores.float().masked_fill(~cand, float("-inf"))
    m = sparsek_mask_ref(z, k).detach()
    vals = m.gather(-1, idx.long().clamp_min(0))
    return torch.where(idx >= 0, vals, torch.zeros_like(vals))


# --------------------------------------------------------------------------------------------------------------------
# Attention over index lists
# --------------------------------------------------------------------------------------------------------------------


def topk_index_mask(
    indices: torch.Tensor,
    seqlen_q: int,
    seqlen_k: int,
    *,
    window: int = 0,
    causal: bool = True,
    block_size: int | None = None,
) -> torch.Tensor:
    """Boolean ``[B, Hkv, Sq, Sk]`` mask of the (query, key) pairs [`topk_attention`][sparsek.sparse.topk_attention] uses.

    Query ``i`` (position ``pos``) sees its band ``[pos - window + 1, pos]`` (``window > 0``) and the listed keys
    ``j >= 0`` with ``j <= pos`` when ``causal``. Block-shared lists (``block_size`` given) additionally drop listed
    keys ``j > p0 - window`` when ``window > 0`` (``p0``: position of the block's first query), so that no listed
    key overlaps the band of any query of the block. Repeated or in-band listed keys count once.
    """
    b, h, rows, n = indices.shape
    dev = indices.device
    idx = indices.long()
    valid = idx >= 0
    shift = seqlen_k - seqlen_q
    if block_size is not None:
        p0 = torch.arange(rows, device=dev) * block_size + shift
        if window > 0:
            valid = valid & (idx <= (p0 - window).view(1, 1, rows, 1))
    listed = torch.zeros(b, h, rows, seqlen_k + 1, dtype=torch.bool, device=dev)
    listed.scatter_(-1, torch.where(valid, idx, torch.full_like(idx, seqlen_k)), True)
    listed = listed[..., :seqlen_k]
    if block_size is not None:
        listed = listed.repeat_interleave(block_size, dim=2)[:, :, :seqlen_q]
    allowed = listed
    if causal:
        allowed = allowed & band_mask(seqlen_q, seqlen_k, -1, 0, dev)
    if window > 0:
        allowed = allowed | band_mask(seqlen_q, seqlen_k, window - 1, 0, dev)
    return allowed


def interval_index_mask(
    indices: torch.Tensor,
    intervals: torch.Tensor,
    seqlen_q: int,
    seqlen_k: int,
    block_size: int,
    *,
    window: int = 0,
) -> torch.Tensor:
    """Boolean ``[B, Hkv, Sq, Sk]`` mask of block lists with a query interval per entry, plus the causal band.

    Query ``t`` of block ``m`` (position ``pos``) sees listed key ``indices[b, h, m, e] >= 0`` when
    ``lo <= t < hi`` (``intervals[b, h, m, e] = lo | hi << 16``) and ``j <= pos``, and its band
    ``[pos - window + 1, pos]`` when ``window > 0``. Per-query SparseK selection in this form:
    [`sparsek.selection_intervals`][sparsek.selection_intervals].
    """
    b, h, rows, n = indices.shape
    dev = indices.device
    t = torch.arange(block_size, device=dev)
    lo, hi = (intervals & 0xFFFF).long(), (intervals >> 16).long()
    vis = (indices >= 0).unsqueeze(-2) & (t.view(-1, 1) >= lo.unsqueeze(-2)) & (t.view(-1, 1) < hi.unsqueeze(-2))
    idx = torch.where(vis, indices.long().unsqueeze(-2), seqlen_k)  # [B, H, rows, bs, n]
    listed = torch.zeros(b, h, rows, block_size, seqlen_k + 1, dtype=torch.bool, device=dev)
    listed.scatter_(-1, idx, True)
    allowed = listed[..., :seqlen_k].flatten(2, 3)[:, :, :seqlen_q] & band_mask(seqlen_q, seqlen_k, -1, 0, dev)
    if window > 0:
        allowed = allowed | band_mask(seqlen_q, seqlen_k, window - 1, 0, dev)
    return allowed


def _attend(q, k, v, allowed_kv, scale, return_lse):
    """Run the dense masked reference with a per-KV-head mask ``[B, Hkv, Sq, Sk]`` on ``bshd`` tensors."""
    hq, hk = q.shape[2], k.shape[2]
    allowed = allowed_kv.repeat_interleave(hq // hk, dim=1) if hq != hk else allowed_kv
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = masked_softmax_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), allowed, scale)
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def topk_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: float | None = None,
    window: int = 0,
    causal: bool = True,
    block_size: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference for [`sparsek.sparse.topk_attention`][sparsek.sparse.topk_attention] (dense attention, explicit mask)."""
    allowed = topk_index_mask(indices, q.shape[1], k.shape[1], window=window, causal=causal, block_size=block_size)
    return _attend(q, k, v, allowed, scale, return_lse)


def block_mask_from_indices(
    block_indices: torch.Tensor,
    num_blocks: torch.Tensor | None,
    seqlen_q: int,
    seqlen_k: int,
    q_block: int,
    kv_block: int,
) -> torch.Tensor:
    """Boolean ``[B, H, Sq, Sk]`` token mask of a block list (FlexAttention ``kv_num_blocks``/``kv_indices``).

    Query block ``m`` sees KV blocks ``block_indices[b, h, m, :num_blocks[b, h, m]]`` (all non-negative entries when
    ``num_blocks`` is None).
    """
    n = block_indices.shape[-1]
    idx = block_indices.long()
    valid = idx >= 0
    if num_blocks is not None:  # may broadcast the lists over the batch
        valid = valid & (torch.arange(n, device=idx.device) < num_blocks.long().unsqueeze(-1))
    b, h, rows, n = valid.shape
    idx = idx.expand(b, h, rows, n)
    nkb = -(-seqlen_k // kv_block)
    blk = torch.zeros(b, h, rows, nkb + 1, dtype=torch.bool, device=idx.device)
    blk.scatter_(-1, torch.where(valid, idx.clamp(0, nkb), torch.full_like(idx, nkb)), True)
    blk = blk[..., :nkb]
    tok = blk.repeat_interleave(kv_block, dim=-1)[..., :seqlen_k]
    return tok.repeat_interleave(q_block, dim=2)[:, :, :seqlen_q]


def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int | tuple[int, int],
    *,
    num_blocks: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference for [`sparsek.sparse.block_sparse_attention`][sparsek.sparse.block_sparse_attention] (index form).

    ``block_indices`` has one list per KV head (``H = Hkv``), per query head (``H = Hq``) or shared (``H = 1``).
    """
    qb, kb = (block_size, block_size) if isinstance(block_size, int) else block_size
    sq, sk = q.shape[1], k.shape[1]
    allowed = block_mask_from_indices(block_indices, num_blocks, sq, sk, qb, kb)
    if causal:
        allowed = allowed & band_mask(sq, sk, -1, 0, q.device)
    hq, hk, hm = q.shape[2], k.shape[2], allowed.shape[1]
    allowed = allowed.expand(q.shape[0], -1, -1, -1)
    if hm == hq and hq != hk:  # per query head: expand K/V instead of the mask
        k = k.repeat_interleave(hq // hk, dim=2)
        v = v.repeat_interleave(hq // hk, dim=2)
    elif hm == 1:
        allowed = allowed.expand(-1, hk, -1, -1)
    return _attend(q, k, v, allowed, scale, return_lse)


def sparsek_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scores: torch.Tensor,
    k_budget: int,
    window: int,
    causal: bool = True,
    *,
    block_size: int | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference for [`sparsek.sparse.sparsek_attention`][sparsek.sparse.sparsek_attention]: select, then attend."""
    idx = sparsek_select_ref(scores, k_budget, seqlen_q=q.shape[1], causal=causal, window=window, block_size=block_size)
    return topk_attention_ref(
        q, k, v, idx, scale=scale, window=window, causal=causal, block_size=block_size, return_lse=return_lse
    )
