#!/usr/bin/env python3
"""Legacy user script: ``flashcore.patch_pytorch()`` under a small transformer, as flashcore 0.5's README showed.

A GPT-style block calling ``F.scaled_dot_product_attention`` and ``nn.TransformerEncoderLayer`` (whose slow path
calls it too) must give the same outputs and gradients patched and unpatched; masked calls fall back to PyTorch.
"""

import copy

import torch
import torch.nn.functional as F
from _common import DEVICE, DTYPE, GRAD_TOL, check, expect, expect_once, finish, record_warnings, seeded, tolerance
from torch import nn

log = record_warnings()

import flashcore  # noqa: E402

ORIGINAL_SDPA = F.scaled_dot_product_attention
D_MODEL, HEADS = 256, 4  # head dim 64


class Block(nn.Module):
    """Pre-norm causal self-attention block."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.proj = nn.Linear(D_MODEL, D_MODEL)
        self.mlp = nn.Sequential(nn.Linear(D_MODEL, 4 * D_MODEL), nn.GELU(), nn.Linear(4 * D_MODEL, D_MODEL))

    def forward(self, x, mask=None):
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.ln2(x))


def run(model, x, mask=None):
    """Forward + backward of a scalar loss; returns the output and the parameter gradients.

    The loss is a fixed random projection of the output: ``out.square().mean()`` would be (nearly) constant after
    the final LayerNorm of ``nn.TransformerEncoderLayer`` and leave only rounding noise as gradients.
    """
    model.zero_grad(set_to_none=True)
    out = model(x) if mask is None else model(x, mask)
    probe = seeded(*out.shape, seed=99, dtype=torch.float32)
    (out.float() * probe).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def compare(name, model, x, mask=None):
    """Patched vs unpatched (same dtype), both held to the float32 model: within tolerance of SDPA's own error."""
    ref_model = copy.deepcopy(model).float()
    ref_out, ref_grads = run(ref_model, x.float(), mask)
    flashcore.patch_pytorch()
    out, grads = run(model, x, mask)
    flashcore.unpatch_pytorch()
    base_out, base_grads = run(model, x, mask)
    tol = tolerance(DTYPE) + 2 * check(f"{name}: unpatched output vs float32", base_out, ref_out, tol=1.0)
    check(f"{name}: patched output", out, ref_out, tol=tol)
    for pname in ("qkv.weight", "proj.weight") if "qkv.weight" in grads else list(grads)[:2]:
        gtol = GRAD_TOL + 2 * check(f"{name}: unpatched d{pname}", base_grads[pname], ref_grads[pname], tol=1.0)
        check(f"{name}: patched d{pname}", grads[pname], ref_grads[pname], tol=gtol)


torch.manual_seed(0)
block = Block().to(DEVICE, DTYPE)
x = seeded(2, 128, D_MODEL, seed=1)

# Patch / idempotency / unpatch, as in the README
flashcore.patch_pytorch()
patched_fn = F.scaled_dot_product_attention
flashcore.patch_pytorch()
expect("patch_pytorch replaces SDPA", patched_fn is not ORIGINAL_SDPA and flashcore.is_patched())
expect("patch_pytorch is idempotent", F.scaled_dot_product_attention is patched_fn)
flashcore.unpatch_pytorch()
flashcore.unpatch_pytorch()
expect("unpatch_pytorch restores SDPA", F.scaled_dot_product_attention is ORIGINAL_SDPA)

compare("causal block", block, x)

# Padding mask: falls back to the original SDPA (one warning), results still identical to unpatched
mask = torch.ones(2, 1, 128, 128, dtype=torch.bool, device=DEVICE).tril()
mask[1, :, :, 100:] = False
mask[1, :, 100:, :] = torch.ones(28, 128, dtype=torch.bool, device=DEVICE).tril(diagonal=100)
with torch.no_grad():
    ref = block(x, mask)
    with flashcore.patched():
        expect("patched() patches", flashcore.is_patched())
        out = block(x, mask)
        out2 = block(x, mask)
expect("patched() restores on exit", F.scaled_dot_product_attention is ORIGINAL_SDPA)
check("masked block (fallback)", out, ref, tol=1e-6)
check("masked block again", out2, ref, tol=1e-6)

# nn.TransformerEncoderLayer in training mode (slow path: F.multi_head_attention_forward -> patched SDPA)
torch.manual_seed(1)
layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, dim_feedforward=512, dropout=0.0, batch_first=True)
layer = layer.to(DEVICE, DTYPE).train()
compare("TransformerEncoderLayer", layer, x)


@flashcore.patched()
def decorated(t):
    return F.scaled_dot_product_attention(t, t, t), flashcore.is_patched()


_, was_patched = decorated(seeded(1, HEADS, 16, 64, seed=2))
expect("patched() as a decorator", was_patched and not flashcore.is_patched())

expect_once(log, DeprecationWarning, "flashcore.patch_pytorch is deprecated", "sparsek.attention(")
expect_once(log, DeprecationWarning, "flashcore.unpatch_pytorch is deprecated")
expect_once(log, DeprecationWarning, "flashcore.patched is deprecated")
expect_once(log, flashcore.FlashcoreFallbackWarning, "attn_mask")
n_fallbacks = sum(1 for w in log if issubclass(w.category, flashcore.FlashcoreFallbackWarning))
expect("no other fallback warnings", n_fallbacks == 1, f"got {n_fallbacks}")
finish("legacy_patched_transformer.py")
