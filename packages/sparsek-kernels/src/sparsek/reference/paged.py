"""Pure-PyTorch references for the paged-KV ops (vLLM's cache layout); also the CPU execution path.

Cache convention (vLLM's ``reshape_and_cache_flash`` / FlashAttention paged layout): ``key_cache`` and ``value_cache``
are ``[num_blocks, block_size, heads_kv, head_dim]`` (any strides). Token slot ``s`` lives in block ``s // block_size``,
row ``s % block_size``. Key position ``j`` of request ``b`` lives in block ``block_table[b, j // block_size]``.
"""

from __future__ import annotations

import torch

from .dense import band_mask, masked_softmax_attention


def reshape_and_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write token ``i`` of ``key``/``value`` (``[num_tokens, heads_kv, head_dim]``) into cache slot ``slot_mapping[i]``.

    Only the first ``slot_mapping.shape[0]`` tokens are written (``key``/``value`` may be padded longer);
    negative slots (padding) are skipped. The caches are modified in place, through their strides.
    """
    n = slot_mapping.shape[0]
    if n == 0:
        return
    slots = slot_mapping.to(device=key_cache.device, dtype=torch.int64)
    keep = slots >= 0
    idx = torch.nonzero(keep).flatten()
    slots = slots[idx]
    bs = key_cache.shape[1]
    blocks, rows = slots // bs, slots % bs
    src_idx = idx.to(key.device)
    key_cache[blocks, rows] = key[:n][src_idx].to(key_cache.dtype)
    value_cache[blocks, rows] = value[:n][src_idx].to(value_cache.dtype)


def gather_paged_kv(
    key_cache: torch.Tensor, value_cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``seq_len`` keys and values of one request, ``[seq_len, heads_kv, head_dim]`` each (copies)."""
    bs = key_cache.shape[1]
    pos = torch.arange(seq_len, device=block_table_row.device)
    blocks = block_table_row.to(torch.int64)[pos // bs].to(key_cache.device)
    rows = (pos % bs).to(key_cache.device)
    return key_cache[blocks, rows], value_cache[blocks, rows]


def paged_attention_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference for [`sparsek.paged.paged_attention`][sparsek.paged.paged_attention].

    ``q`` is ``[total_q, heads_q, head_dim]`` packed by ``cu_seqlens_q`` (int32 ``[batch + 1]``); request ``b`` has
    ``seq_lens[b]`` keys in the paged cache (its new tokens included), read through ``block_table[b]``. Query ``i`` of
    request ``b`` sits at position ``seq_lens[b] - q_len_b + i`` (bottom-right alignment). Returns the output in
    ``q``'s dtype and, with ``return_lse``, the float32 LSE ``[heads_q, total_q]`` (``-inf`` for rows without keys).
    """
    from .._validation import normalize_window

    left, right = normalize_window(window, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(q.shape[0], q.shape[1], value_cache.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    cq, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for b in range(len(cq) - 1):
        q0, q1, sk = cq[b], cq[b + 1], int(lens[b])
        if q1 == q0:
            continue
        k, v = gather_paged_kv(key_cache, value_cache, block_table[b], sk)
        k, v = k.to(q.device), v.to(q.device)
        allowed = None if left < 0 and right < 0 else band_mask(q1 - q0, sk, left, right, q.device)
        o_b, l_b = masked_softmax_attention(
            q[q0:q1].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), allowed, scale
        )
        out[q0:q1] = o_b.transpose(0, 1)
        lse[:, q0:q1] = l_b
    return (out, lse) if return_lse else out


def paged_decode_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    window_left: int = -1,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode reference: one query per request (``q`` is ``[batch, heads_q, head_dim]``) at the last position.

    Request ``b`` attends its keys ``[max(0, seq_lens[b] - 1 - window_left), seq_lens[b])`` (all of them when
    ``window_left`` is -1). Same as [`paged_attention_ref`][sparsek.reference.paged.paged_attention_ref] with
    ``cu_seqlens_q = arange(batch + 1)``.
    """
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_attention_ref(
        q,
        key_cache,
        value_cache,
        block_table,
        cu,
        seq_lens,
        causal=True,
        scale=scale,
        window=(window_left, 0),
        return_lse=return_lse,
    )
