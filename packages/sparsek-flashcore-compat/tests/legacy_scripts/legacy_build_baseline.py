#!/usr/bin/env python3
"""Legacy user script: flashcore's build-then-run API, as in its DEPRECATION_NOTICE and migration guide.

``kernel = build_baseline(verbose=True); output = kernel.forward(Q, K, V)`` on ``[B, H, S, D]`` tensors, held to
PyTorch SDPA, and the guide's side-by-side comparison with ``blackwell_sparsek.attention_forward``.
"""

import logging

import torch.nn.functional as F
from _common import DEVICE, check, expect, expect_once, finish, record_warnings, seeded

log = record_warnings()
logging.basicConfig(level=logging.INFO)

from blackwell_sparsek import attention_forward  # noqa: E402
from flashcore import build_baseline  # noqa: E402

# Build kernel (nothing to compile any more)
kernel = build_baseline(verbose=True)
kernel_again = build_baseline()

# Create inputs: the guide used [1, 8, 512, 64]
Q, K, V = (seeded(1, 8, 512, 64, seed=s) for s in (1, 2, 3))
ref = F.scaled_dot_product_attention(Q.float(), K.float(), V.float())

output = kernel.forward(Q, K, V)
check("kernel.forward(Q, K, V)", output, ref)
check("kernel(Q, K, V)", kernel_again(Q, K, V), ref)
# The old extension took the scale as a fourth argument
scale = 1.0 / 64**0.5
check("kernel.forward(Q, K, V, scale)", kernel.forward(Q, K, V, scale), ref)
check(
    "kernel.forward(Q, K, V, 0.2)",
    kernel.forward(Q, K, V, 0.2),
    F.scaled_dot_product_attention(Q.float(), K.float(), V.float(), scale=0.2),
)

# Step 2 of the migration guide: both should match SDPA, and each other
blackwell_out = attention_forward(Q, K, V)
check("attention_forward vs SDPA", blackwell_out, ref)
diff = (output.float() - blackwell_out.float()).abs().max().item()
expect("build_baseline and attention_forward agree", diff <= 1e-3 if DEVICE.type == "cuda" else diff == 0.0, f"{diff}")

# Shapes other than the old kernel's (D=64, fp16, CUDA only) work too
Qs = seeded(2, 4, 100, 128, seed=4)
check("kernel.forward, S=100, D=128", kernel.forward(Qs, Qs, Qs), F.scaled_dot_product_attention(*(Qs.float(),) * 3))

expect_once(log, DeprecationWarning, "flashcore.build_baseline is deprecated", "sparsek.attention(")
expect_once(log, DeprecationWarning, "blackwell_sparsek.attention_forward is deprecated")
expect("no fallbacks", not any("Fallback" in w.category.__name__ for w in log))
finish("legacy_build_baseline.py")
