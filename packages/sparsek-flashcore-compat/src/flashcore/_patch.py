"""``flashcore.patch_pytorch`` / ``unpatch_pytorch`` / ``patched``: route PyTorch SDPA calls to sparsek."""

from __future__ import annotations

import functools
import logging
import threading
import warnings
from collections.abc import Callable
from types import TracebackType

import torch
import torch.nn.functional as F

from ._dispatch import run_attention
from ._warnings import deprecated

__all__ = ["is_patched", "patch_pytorch", "patched", "unpatch_pytorch"]

logger = logging.getLogger("flashcore")

_REPLACEMENT = "sparsek.attention(q, k, v, layout='bhsd') where you call F.scaled_dot_product_attention"

_lock = threading.Lock()
_original: Callable[..., torch.Tensor] | None = None  # what F.scaled_dot_product_attention was before patching
_patched_fn: Callable[..., torch.Tensor] | None = None  # the function installed in its place
_explicit = False  # patch_pytorch() is in effect
_contexts = 0  # number of active patched() blocks


def _make_patched(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(original)
    def scaled_dot_product_attention(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        return run_attention(
            query,
            key,
            value,
            layout="bhsd",
            caller="torch.nn.functional.scaled_dot_product_attention (patched by flashcore)",
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            gqa=bool(enable_gqa),
            fallback=original,
            fallback_enable_gqa=bool(enable_gqa),
            stacklevel=2,
        )

    scaled_dot_product_attention._flashcore_patched = True  # type: ignore[attr-defined]
    return scaled_dot_product_attention


def _apply_locked() -> None:
    global _original, _patched_fn
    current = F.scaled_dot_product_attention
    if _patched_fn is not None and current is _patched_fn:
        return
    if _patched_fn is not None:
        logger.warning(
            "flashcore: torch.nn.functional.scaled_dot_product_attention was replaced after it was patched; "
            "patching the replacement"
        )
    _original = current
    _patched_fn = _make_patched(current)
    F.scaled_dot_product_attention = _patched_fn
    logger.info("flashcore: torch.nn.functional.scaled_dot_product_attention now runs on sparsek")


def _restore_locked() -> None:
    global _original, _patched_fn
    if _patched_fn is None:
        return
    if F.scaled_dot_product_attention is _patched_fn:
        F.scaled_dot_product_attention = _original
        logger.info("flashcore: torch.nn.functional.scaled_dot_product_attention restored")
    else:
        warnings.warn(
            "flashcore.unpatch_pytorch: torch.nn.functional.scaled_dot_product_attention was replaced by someone "
            "else after flashcore patched it; leaving that replacement in place",
            RuntimeWarning,
            stacklevel=3,
        )
    _original = _patched_fn = None


def is_patched() -> bool:
    """Whether ``torch.nn.functional.scaled_dot_product_attention`` is currently flashcore's sparsek router."""
    with _lock:
        return _patched_fn is not None and F.scaled_dot_product_attention is _patched_fn


def original_sdpa() -> Callable[..., torch.Tensor]:
    """The SDPA that the current patch falls back to (``F.scaled_dot_product_attention`` when not patched)."""
    with _lock:
        return _original if _patched_fn is not None else F.scaled_dot_product_attention


def patch_pytorch() -> None:
    """Make ``torch.nn.functional.scaled_dot_product_attention`` run on sparsek.

    Deprecated: call ``sparsek.attention(q, k, v, layout="bhsd")`` where you call SDPA.

    Every later call of ``F.scaled_dot_product_attention`` (including the one inside
    ``F.multi_head_attention_forward``, used by ``nn.MultiheadAttention`` outside its fast path) runs on sparsek
    when sparsek can serve it and on the original SDPA otherwise: attention masks, dropout, ``enable_gqa`` with
    uneven heads, causal attention with different query and key lengths, non-4-D tensors, and dtypes, head dims or
    devices the kernels lack. Fallbacks emit one [`FlashcoreFallbackWarning`][flashcore.FlashcoreFallbackWarning]
    per reason. Gradients flow (the backward recomputes through the original SDPA).

    Idempotent and thread-safe; logs (logger ``"flashcore"``) instead of printing. Modules that imported the
    function by name before patching (``from torch.nn.functional import scaled_dot_product_attention``) keep the
    original. Undo with [`unpatch_pytorch`][flashcore.unpatch_pytorch], or scope it with
    [`patched`][flashcore.patched].
    """
    global _explicit
    deprecated("flashcore.patch_pytorch", _REPLACEMENT)
    with _lock:
        _explicit = True
        _apply_locked()


def unpatch_pytorch() -> None:
    """Restore the ``torch.nn.functional.scaled_dot_product_attention`` that was there before patching.

    Deprecated along with [`patch_pytorch`][flashcore.patch_pytorch]. Idempotent and thread-safe; does nothing when
    not patched. It also ends the effect of any active [`patched`][flashcore.patched] blocks.
    """
    global _explicit, _contexts
    deprecated("flashcore.unpatch_pytorch", _REPLACEMENT)
    with _lock:
        _explicit = False
        _contexts = 0
        _restore_locked()


class _Patched:
    """Context manager / decorator returned by [`patched`][flashcore.patched]."""

    def __enter__(self) -> None:
        global _contexts
        with _lock:
            _contexts += 1
            _apply_locked()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        global _contexts
        with _lock:
            if _contexts > 0:
                _contexts -= 1
            if _contexts == 0 and not _explicit:
                _restore_locked()

    def __call__(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)

        return wrapper


def patched() -> _Patched:
    """Context manager (or decorator) that patches SDPA (process-wide) for the duration of a block.

    Deprecated along with [`patch_pytorch`][flashcore.patch_pytorch]. Blocks nest and may overlap across threads:
    SDPA stays patched while any block is active or ``patch_pytorch()`` is in effect, and is restored when the last
    block exits.

    Example:
        >>> with flashcore.patched():
        ...     out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    """
    deprecated("flashcore.patched", _REPLACEMENT)
    return _Patched()
