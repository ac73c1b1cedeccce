"""Pure-PyTorch reference for dense attention (also the CPU execution path)."""

from __future__ import annotations

import torch


def band_mask(seqlen_q: int, seqlen_k: int, left: int, right: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``[seqlen_q, seqlen_k]`` mask of allowed (query, key) pairs.

    Query ``i`` sits at key position ``i + seqlen_k - seqlen_q`` (bottom-right alignment) and sees keys
    ``j`` with ``pos - left <= j <= pos + right``; ``-1`` means unbounded on that side. Causal is ``right = 0``.
    """
    i = torch.arange(seqlen_q, device=device).unsqueeze(1) + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    return allowed


def masked_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention on ``[..., H, S, D]`` tensors with a boolean ``allowed`` mask broadcast over ``[..., H, Sq, Sk]``.

    Computes in float32 (float64 if the inputs are float64). Rows with no allowed key give output 0 and
    LSE ``-inf``. GQA: ``k``/``v`` may have fewer heads than ``q`` (dim -3), heads divisible.
    Returns ``(out in q.dtype, lse float32)``.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    hq, hk = q.shape[-3], k.shape[-3]
    if hq != hk:
        k = k.repeat_interleave(hq // hk, dim=-3)
        v = v.repeat_interleave(hq // hk, dim=-3)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    p = p.masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0)
    out = torch.matmul(p, v.to(acc))
    return out.to(q.dtype), lse.to(torch.float32)


def attention_ref(
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
    """Reference for [`sparsek.attention`][sparsek.attention.attention]; same arguments and semantics, no input checks."""
    from .._validation import normalize_window

    left, right = normalize_window(window, causal)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sq, sk = q.shape[-2], k.shape[-2]
    allowed = None if left < 0 and right < 0 else band_mask(sq, sk, left, right, q.device)
    out, lse = masked_softmax_attention(q, k, v, allowed, scale)
    if layout == "bshd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference for [`sparsek.varlen_attention`][sparsek.attention.varlen_attention]: one dense call per sequence.

    ``q`` is ``[total_q, Hq, D]``; the LSE is ``[Hq, total_q]`` (packed, FlashAttention's varlen format).
    """
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0:
            continue
        o_b, l_b = attention_ref(
            q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal=causal, scale=scale, window=window, return_lse=True
        )
        out[q0:q1] = o_b[0]
        lse[:, q0:q1] = l_b[0]
    return (out, lse) if return_lse else out
