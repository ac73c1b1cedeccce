"""``flashcore.build_baseline``: the build-then-run API of flashcore's early releases, on sparsek."""

from __future__ import annotations

import logging

import torch

from ._dispatch import run_attention
from ._warnings import deprecated

__all__ = ["BaselineKernel", "build_baseline"]

logger = logging.getLogger("flashcore")


class BaselineKernel:
    """What [`build_baseline`][flashcore.build_baseline] returns: ``forward(Q, K, V)`` on ``[B, H, S, D]`` tensors.

    Nothing is compiled here: sparsek builds its CUDA library just in time on first GPU use.
    """

    def forward(self, Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """Attention ``softmax(Q Kᵀ · scale) V`` on ``[B, H, S, D]`` tensors (non-causal).

        Args:
            Q: queries ``[B, H, S, D]``.
            K: keys ``[B, H, S_k, D]`` (fewer heads than ``Q`` is allowed: GQA).
            V: values, same shape as ``K``.
            scale: softmax scale, default ``1 / sqrt(D)`` (the old extension required it; here it is optional).

        Returns:
            The output ``[B, H, S, D]``.
        """
        return run_attention(Q, K, V, layout="bhsd", caller="flashcore.build_baseline().forward", scale=scale)

    __call__ = forward

    def __repr__(self) -> str:
        return "BaselineKernel(backend='sparsek')"


def build_baseline(verbose: bool = False) -> BaselineKernel:
    """Return a kernel object whose ``forward(Q, K, V)`` runs attention on sparsek.

    Deprecated: there is no build step any more; call ``sparsek.attention(Q, K, V, layout="bhsd")``.

    Args:
        verbose: log (logger ``"flashcore"``, level INFO) which backend serves the kernel, instead of the old
            compiler output.

    Returns:
        A [`BaselineKernel`][flashcore._baseline.BaselineKernel].
    """
    deprecated("flashcore.build_baseline", "sparsek.attention(Q, K, V, layout='bhsd') (no build step is needed)")
    if verbose:
        logger.info("flashcore.build_baseline: nothing to build; attention runs on sparsek %s", _sparsek_version())
    return BaselineKernel()


def _sparsek_version() -> str:
    import sparsek

    return getattr(sparsek, "__version__", "?")
