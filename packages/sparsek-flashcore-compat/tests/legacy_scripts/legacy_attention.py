#!/usr/bin/env python3
"""Legacy user script: ``flashcore.attention`` as flashcore 0.5's README and docstrings used it.

Checks both layouts, the layout guess and its warnings, causal attention (a NotImplementedError in 0.5), mask and
dtype/head-dim fallbacks, and autograd, against PyTorch SDPA.
"""

import torch
import torch.nn.functional as F
from _common import DEVICE, GRAD_TOL, check, expect, expect_once, finish, record_warnings, seeded

log = record_warnings()

import flashcore  # noqa: E402

B, H, N, D = 2, 4, 128, 64


def sdpa32(q, k, v, **kw):
    """SDPA in float32 on the same inputs: the reference the sparsek path is held to."""
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)


# flashcore 0.5 docstring: q = torch.randn(16, 8, 512, 64); out = flashcore.attention(q, k, v)  ([B, H, N, D])
q, k, v = (seeded(B, H, N, D, seed=s) for s in (1, 2, 3))
out = flashcore.attention(q, k, v)
check("attention [B, H, N, D] (guessed)", out, sdpa32(q, k, v))
out = flashcore.attention(q, k, v)  # second call: no new warnings
check("attention [B, H, N, D] again", out, sdpa32(q, k, v))

# [B, N, H, D] inputs
qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
out = flashcore.attention(qs, ks, vs)
check("attention [B, N, H, D] (guessed)", out, sdpa32(q, k, v).transpose(1, 2))
check("attention layout='bshd'", flashcore.attention(qs, ks, vs, layout="bshd"), sdpa32(q, k, v).transpose(1, 2))
check("attention layout='bhnd'", flashcore.attention(q, k, v, layout="bhnd"), sdpa32(q, k, v))

# causal (flashcore 0.5 raised NotImplementedError) and a custom scale
check("attention is_causal", flashcore.attention(q, k, v, is_causal=True), sdpa32(q, k, v, is_causal=True))
check("attention scale=0.05", flashcore.attention(q, k, v, scale=0.05), sdpa32(q, k, v, scale=0.05))
check(
    "attention is_causal [B, N, H, D]",
    flashcore.attention(qs, ks, vs, is_causal=True),
    sdpa32(q, k, v, is_causal=True).transpose(1, 2),
)

# GQA (fewer key/value heads) in SDPA layout
kg, vg = k[:, :2].contiguous(), v[:, :2].contiguous()
check(
    "attention GQA",
    flashcore.attention(q, kg, vg, layout="bhsd"),
    sdpa32(q, kg.repeat_interleave(2, dim=1), vg.repeat_interleave(2, dim=1)),
)

# Ambiguous shape: heads == seqlen -> [B, H, N, D] as in 0.5, with a warning
x = seeded(B, 8, 8, D, seed=4)
check("attention ambiguous shape", flashcore.attention(x, x, x), sdpa32(x, x, x))

# attn_mask (0.5: NotImplementedError) -> PyTorch SDPA
mask = torch.rand(N, N, generator=torch.Generator().manual_seed(5)).to(DEVICE) > 0.3
mask.fill_diagonal_(True)
out = flashcore.attention(q, k, v, attn_mask=mask)
check("attention attn_mask (fallback)", out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), tol=1e-6)
out = flashcore.attention(q, k, v, attn_mask=mask.logical_not().logical_not())  # second masked call: no new warning
check("attention attn_mask again", out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), tol=1e-6)

# Head dim 80 and float32: sparsek's reference on the CPU, SDPA fallback on the GPU
q80 = seeded(B, H, N, 80, seed=6)
check("attention head dim 80", flashcore.attention(q80, q80, q80), sdpa32(q80, q80, q80), tol=3e-3)
q32 = seeded(B, H, N, D, seed=7, dtype=torch.float32)
check("attention float32", flashcore.attention(q32, q32, q32), sdpa32(q32, q32, q32), tol=1e-5)

# Autograd: training code differentiated through flashcore.attention
qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
out = flashcore.attention(qg, kg, vg, is_causal=True)
grad = seeded(*out.shape, seed=8)
out.backward(grad)
q_ref, k_ref, v_ref = (t.detach().float().requires_grad_(True) for t in (q, k, v))
sdpa32(q_ref, k_ref, v_ref, is_causal=True).backward(grad.float())
for name, got, want in (("dq", qg.grad, q_ref.grad), ("dk", kg.grad, k_ref.grad), ("dv", vg.grad, v_ref.grad)):
    check(f"attention backward {name}", got, want, tol=GRAD_TOL)
expect("attention output requires grad", out.requires_grad)

# Warnings: each exactly once per process
expect_once(log, DeprecationWarning, "flashcore.attention is deprecated", "sparsek.attention(")
expect_once(log, flashcore.FlashcoreLayoutWarning, "dim 1 is shorter")
expect_once(log, flashcore.FlashcoreLayoutWarning, "ambiguous")
expect_once(log, flashcore.FlashcoreFallbackWarning, "attn_mask")
n_fallbacks = sum(1 for w in log if issubclass(w.category, flashcore.FlashcoreFallbackWarning))
if DEVICE.type == "cuda":
    expect_once(log, flashcore.FlashcoreFallbackWarning, "head dims")
    expect_once(log, flashcore.FlashcoreFallbackWarning, "float16/bfloat16")
    expect("three fallback warnings in all", n_fallbacks == 3, f"got {n_fallbacks}")
else:
    expect("one fallback warning in all", n_fallbacks == 1, f"got {n_fallbacks}")
finish("legacy_attention.py")
