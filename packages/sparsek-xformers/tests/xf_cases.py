"""Test cases and a float64 reference for sparsek-xformers (shared by the CPU and GPU tests)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from xformers.attn_bias_utils import create_attn_bias
from xformers.ops.fmha import attn_bias as xab

PAGED = (xab.PagedBlockDiagonalPaddedKeysMask, xab.PagedBlockDiagonalGappyKeysMask)
# Bias types whose blocks are bottom-right aligned (need at least as many keys as queries to avoid empty rows).
NEEDS_MORE_KEYS = (
    xab.BlockDiagonalCausalFromBottomRightMask,
    xab.BlockDiagonalCausalLocalAttentionFromBottomRightMask,
    xab.BlockDiagonalPaddedKeysMask,
    xab.BlockDiagonalCausalWithOffsetPaddedKeysMask,
    xab.BlockDiagonalCausalLocalAttentionPaddedKeysMask,
    xab.BlockDiagonalLocalAttentionPaddedKeysMask,
    xab.PagedBlockDiagonalPaddedKeysMask,
    xab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
    xab.PagedBlockDiagonalGappyKeysMask,
    xab.PagedBlockDiagonalCausalWithOffsetGappyKeysMask,
    xab.BlockDiagonalCausalWithOffsetGappyKeysMask,
)


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: Any
    scale: float | None

    def __repr__(self) -> str:
        return f"Case(q={tuple(self.q.shape)}, k={tuple(self.k.shape)}, bias={type(self.bias).__name__})"


def _gappy(bias_type: type, r: random.Random, batch: int, q_len: int, kv_len: int, device: str) -> Any:
    qs = [r.randint(1, q_len) for _ in range(batch)]
    ks = [r.randint(q, kv_len) for q in qs]
    total = kv_len * batch
    starts = [r.randint(0, total - n) for n in ks] + [total]
    return bias_type.from_seqlens(q_seqlen=qs, kv_seqstarts=starts, kv_seqlen=ks, device=torch.device(device))


def make_bias(bias_type: type | None, batch: int, q_len: int, kv_len: int, fmt: str, device: str, page_size: int = 4):
    """A random bias of ``bias_type`` (xFormers' own generator where it has one)."""
    r = random.Random(f"{bias_type}-{batch}-{q_len}-{kv_len}-{fmt}")
    if bias_type is xab.BlockDiagonalCausalWithOffsetGappyKeysMask or bias_type is xab.BlockDiagonalGappyKeysMask:
        bias = _gappy(bias_type, r, batch, q_len, kv_len, device)
    elif bias_type is xab.BlockDiagonalLocalAttentionPaddedKeysMask:  # xFormers' generator uses huge windows
        qs = [r.randint(1, q_len) for _ in range(batch)]
        ks = [r.randint(q, kv_len) for q in qs]
        bias = bias_type.from_seqlens_local(qs, kv_len, ks, window_left=r.randint(0, 4), window_right=r.randint(0, 4))
    else:
        bias = create_attn_bias(
            bias_type, batch, 1, 1, q_len, kv_len, device, torch.float32, False, fmt, page_size=page_size
        )
    # create_attn_bias builds some biases on the default device (CUDA when present): move them where q/k/v live.
    return bias.to(torch.device(device)) if isinstance(bias, xab.AttentionBias) else bias


def tensor_sizes(bias: Any, batch: int, q_len: int, kv_len: int) -> tuple[int, int, int]:
    """(B, Mq, Mk) of q/k/v for ``bias``."""
    if isinstance(bias, PAGED):
        pool = (int(bias.block_tables.max()) + 1) * bias.page_size
        return 1, int(bias.q_seqinfo.seqstart_py[-1]), pool
    if isinstance(bias, xab.VARLEN_BIASES):
        return 1, int(bias.q_seqinfo.seqstart_py[-1]), int(bias.k_seqinfo.seqstart_py[-1])
    return batch, q_len, kv_len


def make_case(
    bias_type: type | None,
    *,
    batch: int,
    q_len: int,
    kv_len: int,
    fmt: str = "BMHK",
    heads: tuple[int, int] = (2, 2),
    head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    scale: float | None = None,
    page_size: int = 4,
    seed: int = 0,
) -> Case:
    """q/k/v plus a bias. ``heads=(G, H)``: G KV heads, H query heads per KV head (BMGHK expands K/V with stride 0;
    BMHK uses ``G * H`` heads everywhere)."""
    bias = make_bias(bias_type, batch, q_len, kv_len, fmt, device, page_size)
    b, mq, mk = tensor_sizes(bias, batch, q_len, kv_len)
    g, h = heads
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if fmt == "BMGHK":
        q = rnd(b, mq, g, h, head_dim)
        k = rnd(b, mk, g, 1, head_dim).expand(b, mk, g, h, head_dim)
        v = rnd(b, mk, g, 1, head_dim).expand(b, mk, g, h, head_dim)
    else:
        q, k, v = rnd(b, mq, g * h, head_dim), rnd(b, mk, g * h, head_dim), rnd(b, mk, g * h, head_dim)
    return Case(q, k, v, bias, scale)


def materialize(bias: Any, mq: int, mk: int) -> torch.Tensor | None:
    """``[Mq, Mk]`` float64 additive mask (0 / -inf), padded with -inf when the key tensor is wider."""
    if bias is None:
        return None
    m = bias.materialize((mq, mk), dtype=torch.float32, device="cpu").to(torch.float64)
    if m.shape[-1] < mk:
        m = torch.nn.functional.pad(m, (0, mk - m.shape[-1]), value=-math.inf)
    return m[..., :mq, :mk]


def reference(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 attention and LSE in xFormers' format (rows with no key: output 0, LSE -inf)."""
    q, k, v = (t.detach().to("cpu", torch.float64) for t in (case.q, case.k, case.v))
    five = q.dim() == 5
    if not five:
        q, k, v = q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2)
    scale = case.scale if case.scale is not None else q.shape[-1] ** -0.5
    s = torch.einsum("bqghd,bkghd->bghqk", q, k) * scale
    mask = materialize(case.bias, q.shape[1], k.shape[1])
    if mask is not None:
        s = s + mask
    lse = torch.logsumexp(s, dim=-1)  # [B, G, H, Mq]
    empty = torch.isinf(lse)
    p = torch.exp(s - torch.where(empty, torch.zeros_like(lse), lse).unsqueeze(-1))
    p = p.masked_fill(empty.unsqueeze(-1), 0.0)
    out = torch.einsum("bghqk,bkghd->bqghd", p, v)
    if not five:
        out, lse = out.squeeze(2), lse.squeeze(1)
    return out, lse


def lse_close(lse: torch.Tensor, ref: torch.Tensor, atol: float) -> bool:
    """LSE equality with matching -inf pattern."""
    lse = lse.detach().cpu().to(torch.float64)
    inf_ref = torch.isinf(ref)
    if not torch.equal(torch.isinf(lse), inf_ref):
        return False
    if inf_ref.all():
        return True
    return bool(((lse - ref).abs()[~inf_ref] <= atol).all())
