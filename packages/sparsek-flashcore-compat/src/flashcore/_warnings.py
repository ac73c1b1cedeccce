"""One-time warnings: each deprecated entry point and each fallback reason warns once per process."""

from __future__ import annotations

import threading
import warnings

__all__ = ["FlashcoreFallbackWarning", "FlashcoreLayoutWarning", "deprecated", "warn_once"]


class FlashcoreFallbackWarning(UserWarning):
    """A call that sparsek cannot serve ran on PyTorch's ``scaled_dot_product_attention`` instead.

    Emitted once per process, entry point and reason (attention mask, dropout, dtype/head dim the GPU kernels
    lack, ...).
    """


class FlashcoreLayoutWarning(UserWarning):
    """``flashcore.attention`` had to guess the tensor layout and the guess may not be what the caller meant.

    Emitted once per process; pass ``layout="bhsd"`` or ``layout="bshd"`` to silence it.
    """


_lock = threading.Lock()
_emitted: set[str] = set()


def warn_once(key: str, message: str, category: type[Warning], stacklevel: int = 2) -> bool:
    """Emit ``message`` the first time ``key`` is seen in this process; return whether it was emitted.

    ``stacklevel`` counts from the caller of ``warn_once`` (2 = the caller's caller), as for ``warnings.warn``.
    """
    with _lock:
        if key in _emitted:
            return False
        _emitted.add(key)
    warnings.warn(message, category, stacklevel=stacklevel + 1)
    return True


def deprecated(old: str, replacement: str, stacklevel: int = 2) -> None:
    """Emit the process-wide single ``DeprecationWarning`` for the legacy entry point ``old``."""
    warn_once(
        f"deprecated:{old}",
        f"{old} is deprecated; use {replacement}. It is served by sparsek-flashcore-compat, which will be removed "
        "in a future release (see docs/migrating-from-flashcore.md).",
        DeprecationWarning,
        stacklevel=stacklevel + 1,
    )


def _reset_for_tests() -> None:
    """Forget which warnings were emitted (tests only)."""
    with _lock:
        _emitted.clear()
