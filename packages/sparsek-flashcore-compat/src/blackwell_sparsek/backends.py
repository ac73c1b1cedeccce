"""``blackwell_sparsek.backends``: where blackwell_sparsek 0.1's docs put ``SparseKAttention``, ``SparseKBackend``
and ``register_vllm_backend``. The names resolve lazily to ``sparsek_xformers`` / ``sparsek_vllm`` (see
[`blackwell_sparsek`][blackwell_sparsek]); a missing package raises ``ImportError`` naming what to install."""

from __future__ import annotations

from typing import Any

from ._lazy import LAZY_NAMES, resolve

__all__: list[str] = []


def __getattr__(name: str) -> Any:
    if name in LAZY_NAMES:
        value = resolve(__name__, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
