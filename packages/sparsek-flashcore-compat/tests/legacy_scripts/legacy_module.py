#!/usr/bin/env python3
"""Legacy user script: ``flashcore.FlashCoreAttention`` as flashcore 0.5's docstring used it.

Held to ``nn.MultiheadAttention`` with the same weights: sequence-first inputs (0.5's default), the batch-first tie
case, cross-attention, masks, attention weights, unbatched inputs, gradients, and state-dict round trips in both
directions with flashcore 0.5's parameter names.
"""

import copy
import io

import torch
from _common import DEVICE, DTYPE, GRAD_TOL, check, expect, expect_once, finish, record_warnings, seeded, tolerance
from torch import nn

log = record_warnings()

import flashcore  # noqa: E402

E, H = 256, 4  # head dim 64 (0.5's docstring: embed_dim=512, num_heads=8)
OLD_KEYS = {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}

torch.manual_seed(0)
attn = flashcore.FlashCoreAttention(embed_dim=E, num_heads=H).to(DEVICE, DTYPE).eval()
expect("parameter names are flashcore 0.5's", set(attn.state_dict()) == OLD_KEYS, str(set(attn.state_dict())))


def mha_like(module, batch_first=False, dtype=DTYPE):
    """nn.MultiheadAttention loaded with ``module``'s weights (strict)."""
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, bias=module.in_proj_bias is not None)
    mha.load_state_dict(module.state_dict())
    return mha.to(DEVICE, dtype).eval()


def compare(name, got, mha, *args, **kwargs):
    """FlashCoreAttention output vs nn.MultiheadAttention (float32), within tolerance of MHA's own dtype error."""
    with torch.no_grad():
        ref32 = copy.deepcopy(mha).float()(*(a.float() for a in args), **kwargs)[0]
        same_dtype = mha(*args, **kwargs)[0]
    tol = tolerance(DTYPE) + 2 * check(f"{name}: nn.MultiheadAttention {DTYPE} vs float32", same_dtype, ref32, tol=1)
    check(name, got, ref32, tol=tol)


mha = mha_like(attn)
# 0.5's default: [N, B, E] (dims 0 and 1 differ -> sequence first, like nn.MultiheadAttention)
x = seeded(64, 2, E, seed=1)
with torch.no_grad():
    out, weights = attn(x, x, x)
expect("returns (output, None)", weights is None)
compare("self-attention [N, B, E]", out, mha, x, x, x, need_weights=False)

# Cross-attention: 0.5 projected the query three times; now key/value are projected like nn.MultiheadAttention
mem = seeded(96, 2, E, seed=2)
with torch.no_grad():
    out, _ = attn(x, mem, mem)
compare("cross-attention", out, mha, x, mem, mem, need_weights=False)

# Tie (dims 0 and 1 equal): 0.5 treated it as [B, N, E]; warns once
xb = seeded(8, 8, E, seed=3)
with torch.no_grad():
    out, _ = attn(xb, xb, xb)
    out2, _ = attn(xb, xb, xb)
compare("ambiguous [B, N, E]", out, mha_like(attn, batch_first=True), xb, xb, xb, need_weights=False)
check("ambiguous [B, N, E] again", out2, out, tol=1e-6)

# Explicit batch_first
attn_bf = flashcore.FlashCoreAttention(E, H, batch_first=True).to(DEVICE, DTYPE).eval()
attn_bf.load_state_dict(attn.state_dict())
xbf = seeded(2, 64, E, seed=4)
with torch.no_grad():
    out, _ = attn_bf(xbf, xbf, xbf)
compare("batch_first=True", out, mha_like(attn, batch_first=True), xbf, xbf, xbf, need_weights=False)

# Unbatched [N, E] (0.5 mishandled it)
xu = seeded(64, E, seed=5)
with torch.no_grad():
    out, _ = attn(xu, xu, xu)
compare("unbatched [N, E]", out, mha, xu, xu, xu, need_weights=False)

# key_padding_mask (0.5: NotImplementedError) -> PyTorch SDPA, one warning
pad = torch.zeros(2, 64, dtype=torch.bool, device=DEVICE)
pad[1, 40:] = True
with torch.no_grad():
    out, _ = attn(x, x, x, key_padding_mask=pad)
    attn(x, x, x, key_padding_mask=pad)
compare("key_padding_mask (fallback)", out, mha, x, x, x, key_padding_mask=pad, need_weights=False)

# Causal via is_causal
causal = torch.ones(64, 64, dtype=torch.bool, device=DEVICE).triu(1)
with torch.no_grad():
    out, _ = attn(x, x, x, is_causal=True)
compare("is_causal", out, mha, x, x, x, attn_mask=causal, need_weights=False)

# need_weights=True (0.5: NotImplementedError) -> weights from PyTorch, one warning
with torch.no_grad():
    out, weights = attn(x, x, x, need_weights=True)
    ref_out, ref_weights = mha(x, x, x, need_weights=True)
check("need_weights output", out, ref_out, tol=1e-6)
check("need_weights weights", weights, ref_weights, tol=1e-6)

# Training: gradients through the module match nn.MultiheadAttention's (float32)
attn.train()
mha32 = mha_like(attn, dtype=torch.float32).train()
probe = seeded(64, 2, E, seed=6, dtype=torch.float32)
(attn(x, x, x)[0].float() * probe).sum().backward()
(mha32(x.float(), x.float(), x.float(), need_weights=False)[0] * probe).sum().backward()
for pname in ("in_proj_weight", "in_proj_bias", "out_proj.weight"):
    got, want = attn.get_parameter(pname).grad, mha32.get_parameter(pname).grad
    check(f"gradient {pname}", got, want, tol=GRAD_TOL)
attn.eval()

# State dicts: save/load round trip, from flashcore 0.5's names, and from/to nn.MultiheadAttention
buf = io.BytesIO()
torch.save(attn.state_dict(), buf)
buf.seek(0)
restored = flashcore.FlashCoreAttention(E, H).to(DEVICE, DTYPE).eval()
restored.load_state_dict(torch.load(buf, weights_only=True))
with torch.no_grad():
    check("state dict round trip", restored(x, x, x)[0], attn(x, x, x)[0], tol=1e-6)
legacy_state = {key: value.clone() for key, value in attn.state_dict().items()}  # exactly what 0.5 saved
missing, unexpected = restored.load_state_dict(legacy_state, strict=True)
expect("loads a flashcore 0.5 state dict", not missing and not unexpected)
torch.manual_seed(7)
theirs = nn.MultiheadAttention(E, H).to(DEVICE, DTYPE).eval()
restored.load_state_dict(theirs.state_dict())
with torch.no_grad():
    compare("weights from nn.MultiheadAttention", restored(x, x, x)[0], theirs, x, x, x, need_weights=False)
nobias = flashcore.FlashCoreAttention(E, H, bias=False)
expect("bias=False names", set(nobias.state_dict()) == {"in_proj_weight", "out_proj.weight"})
nn.MultiheadAttention(E, H, bias=False).load_state_dict(nobias.state_dict())

# dropout > 0 (0.5: NotImplementedError): sparsek in eval, PyTorch SDPA with dropout in training (one warning)
drop = flashcore.FlashCoreAttention(E, H, dropout=0.1).to(DEVICE, DTYPE)
drop.load_state_dict(attn.state_dict())
with torch.no_grad():
    compare("dropout module in eval", drop.eval()(x, x, x)[0], mha, x, x, x, need_weights=False)
    train_out = drop.train()(x, x, x)[0]
expect("dropout applied in training", not torch.allclose(train_out, attn(x, x, x)[0]))

expect_once(log, DeprecationWarning, "flashcore.FlashCoreAttention is deprecated", "sparsek.attention(")
expect_once(log, flashcore.FlashcoreLayoutWarning, "ambiguous")
expect_once(log, flashcore.FlashcoreFallbackWarning, "attn_mask")  # key_padding_mask travels as an SDPA mask
expect_once(log, flashcore.FlashcoreFallbackWarning, "attention weights")
expect_once(log, flashcore.FlashcoreFallbackWarning, "dropout")
finish("legacy_module.py")
