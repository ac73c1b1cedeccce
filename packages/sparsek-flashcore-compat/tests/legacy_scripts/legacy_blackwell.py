#!/usr/bin/env python3
"""Legacy user script: blackwell_sparsek 0.1's API, as its README, API reference and docstrings used it.

``attention_forward(Q, K, V)`` and ``attention_forward(q, k, v, causal=True)`` on ``[B, H, S, D]`` tensors against
PyTorch SDPA, the 0.1 top-level ``attention_forward(Q, K, V, scale)`` form, gradients, and the framework
integrations (``SparseKAttention``, ``SparseKBackend``), which either resolve to the sparsek packages or raise an
ImportError naming the package to install.
"""

import torch.nn.functional as F
from _common import DEVICE, GRAD_TOL, check, expect, expect_once, finish, record_warnings, seeded

log = record_warnings()

import blackwell_sparsek  # noqa: E402
from blackwell_sparsek import attention_forward  # noqa: E402


def sdpa32(q, k, v, **kw):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)


# README example
Q, K, V = (seeded(1, 8, 512, 64, seed=s) for s in (1, 2, 3))
output = attention_forward(Q, K, V)
check("attention_forward(Q, K, V)", output, sdpa32(Q, K, V))

# kernels/sparsek.py docstring example, scaled down: [16, 96, 512, 64] causal
q, k, v = (seeded(2, 12, 256, 64, seed=s) for s in (4, 5, 6))
out = attention_forward(q, k, v, causal=True)
check("attention_forward(causal=True)", out, sdpa32(q, k, v, is_causal=True))
check(
    "attention_forward(q, k, v, True, 0.1)",
    attention_forward(q, k, v, True, 0.1),
    sdpa32(q, k, v, is_causal=True, scale=0.1),
)
# The 0.1 top-level signature was attention_forward(Q, K, V, scale=None)
check("attention_forward(Q, K, V, 0.1)", attention_forward(Q, K, V, 0.1), sdpa32(Q, K, V, scale=0.1))

# Backward (0.1's autograd function recomputed through SDPA when its kernels were missing)
qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
out = attention_forward(qg, kg, vg, causal=True)
grad = seeded(*out.shape, seed=7)
out.backward(grad)
refs = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
sdpa32(*refs, is_causal=True).backward(grad.float())
for name, got, want in zip(("dq", "dk", "dv"), (qg.grad, kg.grad, vg.grad), (r.grad for r in refs)):
    check(f"attention_forward backward {name}", got, want, tol=GRAD_TOL)

# Framework integrations promised by 0.1's docs: re-exported from sparsek-xformers / sparsek-vllm, or a clear error
for module_path, name, dist, real in (
    ("blackwell_sparsek.backends", "SparseKAttention", "sparsek-xformers", ("sparsek_xformers", "SparseKAttention")),
    ("blackwell_sparsek", "SparseKAttention", "sparsek-xformers", ("sparsek_xformers", "SparseKAttention")),
    ("blackwell_sparsek.backends", "SparseKBackend", "sparsek-vllm", ("sparsek_vllm", "SparsekAttentionBackend")),
):
    try:
        module = __import__(module_path, fromlist=[name])
        obj = getattr(module, name)
    except ImportError as e:
        print(f"     {module_path}.{name}: ImportError: {e}")
        expect(f"{module_path}.{name} ImportError names pip install {dist}", f"pip install {dist}" in str(e), str(e))
    else:
        target = getattr(__import__(real[0]), real[1])
        expect(f"{module_path}.{name} is {real[0]}.{real[1]}", obj is target)

expect_once(log, DeprecationWarning, "blackwell_sparsek.attention_forward is deprecated", "layout='bhsd'")
expect("version", blackwell_sparsek.__version__.startswith("0.1.0+sparsek"), blackwell_sparsek.__version__)
expect("no fallbacks", not any("Fallback" in w.category.__name__ for w in log))
print(f"     device {DEVICE}")
finish("legacy_blackwell.py")
