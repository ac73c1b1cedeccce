"""Execution of a [`bias`][sparsek_xformers.bias] plan with sparsek's kernels (internal).

Tensor conventions here: dense ``[B, M, H, D]``; packed ``[rows, H, D]``. GQA is passed to sparsek un-expanded
(``H_kv`` heads), which handles it natively.
"""

from __future__ import annotations

import sparsek
import torch

from .bias import DensePlan, Plan, VarlenPlan


def fold_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BMHK or BMGHK xFormers tensors to sparsek's ``[B, M, H, D]`` with un-expanded K/V heads.

    BMGHK ``[B, M, G, H, K]`` with K/V broadcast over ``H`` (stride 0, as xFormers asks callers to build GQA inputs)
    becomes ``G`` KV heads for ``G * H`` query heads (query head ``g * H + h`` reads KV head ``g``, which is sparsek's
    GQA mapping). K/V that are really materialized per head are kept as ``G * H`` heads. Likewise a BMHK K/V expanded
    over heads (stride 0, MQA) becomes one KV head.
    """
    if q.dim() == 5:
        b, mq, g, h, d = q.shape
        q = q.reshape(b, mq, g * h, d)
        if h == 1 or (k.stride(3) == 0 and v.stride(3) == 0):
            k, v = k[:, :, :, 0], v[:, :, :, 0]
        else:
            k = k.reshape(k.shape[0], k.shape[1], g * h, k.shape[-1])
            v = v.reshape(v.shape[0], v.shape[1], g * h, v.shape[-1])
    elif q.shape[2] > 1 and k.stride(2) == 0 and v.stride(2) == 0:
        k, v = k[:, :, :1], v[:, :, :1]
    q, k, v = (t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous() for t in (q, k, v))
    return q, k, v


def _device_ints(device: torch.device, *rows: list[int]) -> list[torch.Tensor]:
    """Copy several host int lists to ``device`` in one transfer (int64)."""
    n = max((len(r) for r in rows), default=0)
    host = torch.zeros((len(rows), n), dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            host[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
    dev = host.to(device, non_blocking=True)
    return [dev[i, : len(r)] for i, r in enumerate(rows)]


def _prefix(lens: list[int]) -> list[int]:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def _gather_index(plan: VarlenPlan, k_lens: list[int], device: torch.device) -> torch.Tensor:
    """Rows of the packed (or paged) key tensor that make up the sequences' keys, concatenated (int64, on device).

    Computed on the device from a few small per-sequence arrays, without a host sync.
    """
    total = sum(k_lens)
    rows = [plan.k_lo, k_lens] + ([plan.k_row] if plan.paged else [])
    lo, lens, *rest = _device_ints(device, *rows)
    seq = torch.repeat_interleave(torch.arange(len(k_lens), device=device), lens, output_size=total)
    starts = torch.cumsum(lens, 0) - lens
    pos = lo[seq] + torch.arange(total, device=device) - starts[seq]
    if not plan.paged:
        return pos
    page = int(plan.page_size)
    table = plan.block_tables.to(device=device, dtype=torch.int64)
    return table[rest[0][seq], pos // page] * page + pos % page


def _varlen_keys(
    plan: VarlenPlan, k: torch.Tensor, v: torch.Tensor, k_lens: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Packed keys/values for the plan's sequences, and a reusable device ``cu_seqlens_k`` if there is one.

    Back-to-back key ranges are a zero-copy slice. Anything else (padded or gappy keys, paged caches, truncated
    top-left blocks) is gathered into a packed copy. This gather is the place to plug in a native paged/padded
    kernel call (``seqused_k`` + ``block_table``) once sparsek's public API exposes one.
    """
    if plan.keys_contiguous:
        start = plan.k_lo[0] if plan.k_lo else 0
        end = plan.k_hi[-1] if plan.k_hi else 0
        cu = plan.cu_seqlens_k if start == 0 else None
        return k[start:end], v[start:end], cu
    idx = _gather_index(plan, k_lens, k.device)
    return k.index_select(0, idx), v.index_select(0, idx), None


def run_varlen(
    plan: VarlenPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, return_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a varlen plan: ``q`` is ``[total_q, Hq, D]``, ``k``/``v`` are ``[rows, Hkv, D]`` (rows of the packed keys,
    or of the page pool for paged plans). Returns the output ``[total_q, Hq, D]`` and the LSE ``[Hq, total_q]``."""
    device = q.device
    k_lens = [hi - lo for lo, hi in zip(plan.k_lo, plan.k_hi)]
    kk, vv, cu_k = _varlen_keys(plan, k, v, k_lens)
    cu_q = plan.cu_seqlens_q
    if cu_q is not None and (cu_q.device != device or cu_q.dtype != torch.int32):
        cu_q = None
    if cu_k is not None and (cu_k.device != device or cu_k.dtype != torch.int32 or cu_k.numel() != len(k_lens) + 1):
        cu_k = None
    if cu_q is None or cu_k is None:
        prefix_q, prefix_k = _device_ints(device, _prefix(plan.q_lens), _prefix(k_lens))
        cu_q = prefix_q.to(torch.int32) if cu_q is None else cu_q
        cu_k = prefix_k.to(torch.int32) if cu_k is None else cu_k
    res = sparsek.varlen_attention(
        q,
        kk,
        vv,
        cu_q,
        cu_k,
        max(plan.q_lens, default=0),
        max(k_lens, default=0),
        causal=plan.causal,
        scale=scale,
        window=plan.window,
        return_lse=return_lse,
        validate=False,  # the prefix sums come from the plan's host lengths: no device sync per call
    )
    return res if return_lse else (res, None)


def run_dense(
    plan: DensePlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, return_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a dense plan on ``[B, M, H, D]`` tensors. Returns the output and the LSE ``[B, Hq, Mq]``."""
    if plan.key_limit is not None:
        k, v = k[:, : plan.key_limit], v[:, : plan.key_limit]
    res = sparsek.attention(
        q, k, v, causal=plan.causal, scale=scale, window=plan.window, layout="bshd", return_lse=return_lse
    )
    return res if return_lse else (res, None)


def run(
    plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, return_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run any plan on folded ``[B, M, H, D]`` tensors; the output is ``[B, Mq, Hq, D]``.

    The LSE is ``[B, Hq, Mq]`` for dense plans and ``[1, Hq, total_q]`` (packed) for varlen plans.
    """
    if isinstance(plan, DensePlan):
        return run_dense(plan, q, k, v, scale, return_lse)
    out, lse = run_varlen(plan, q[0], k[0], v[0], scale, return_lse)
    return out.unsqueeze(0), (lse.unsqueeze(0) if lse is not None else None)
