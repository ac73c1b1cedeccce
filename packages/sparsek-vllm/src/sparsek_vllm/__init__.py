"""sparsek-vllm: sparsek's paged-KV attention kernels as a vLLM (V1) attention backend.

Installing the package registers the backend through the ``vllm.general_plugins`` entry point
([`sparsek_vllm.plugin.register`][sparsek_vllm.plugin.register]); select it with ``--attention-backend SPARSEK``
(or ``CUSTOM``). The backend classes are imported lazily, so ``import sparsek_vllm`` works without vLLM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .backend import (
        SparsekAttentionBackend,
        SparsekAttentionImpl,
        SparsekAttentionMetadata,
        SparsekAttentionMetadataBuilder,
        SparsekCpuAttnReplacementBackend,
    )
    from .plugin import register

__all__ = [
    "SparsekAttentionBackend",
    "SparsekAttentionImpl",
    "SparsekAttentionMetadata",
    "SparsekAttentionMetadataBuilder",
    "SparsekCpuAttnReplacementBackend",
    "__version__",
    "register",
]

_BACKEND_NAMES = {
    "SparsekAttentionBackend",
    "SparsekAttentionImpl",
    "SparsekAttentionMetadata",
    "SparsekAttentionMetadataBuilder",
    "SparsekCpuAttnReplacementBackend",
}


def __getattr__(name: str) -> Any:
    if name in _BACKEND_NAMES:
        try:
            from . import backend
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"sparsek_vllm.{name} needs vLLM (>=0.32,<0.34): install vLLM first, or `pip install sparsek-vllm[vllm]`"
            ) from e
        return getattr(backend, name)
    if name == "register":
        from .plugin import register

        return register
    raise AttributeError(f"module 'sparsek_vllm' has no attribute {name!r}")
