"""``flashcore.attention``: flashcore 0.5's SDPA-shaped function, on sparsek."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ._dispatch import run_attention
from ._warnings import FlashcoreLayoutWarning, deprecated, warn_once

__all__ = ["LAYOUT_GUESS_ENV", "attention", "guess_layout", "normalize_layout"]

#: Environment variable choosing how ``flashcore.attention`` guesses an unspecified layout: ``"shape"`` (default)
#: or ``"legacy"`` (flashcore 0.5.0's rule, bug for bug).
LAYOUT_GUESS_ENV = "FLASHCORE_LAYOUT_GUESS"

_ALIASES = {"bhsd": "bhsd", "bhnd": "bhsd", "bshd": "bshd", "bnhd": "bshd"}
_NAMES = {"bhsd": "[B, H, N, D]", "bshd": "[B, N, H, D]"}


def normalize_layout(layout: str) -> str:
    """Map ``"bhsd"``/``"bhnd"`` to ``"bhsd"`` and ``"bshd"``/``"bnhd"`` to ``"bshd"``; reject anything else."""
    try:
        return _ALIASES[str(layout).lower()]
    except KeyError:
        raise ValueError(
            f"layout must be 'bhsd' ([B, H, N, D], SDPA's) or 'bshd' ([B, N, H, D]), got {layout!r}"
        ) from None


def guess_layout(shape: Sequence[int], policy: str | None = None) -> tuple[str, str | None]:
    """Guess the layout of a 4-D query of ``shape`` the way ``flashcore.attention`` does when ``layout`` is omitted.

    flashcore 0.5.0 treated every shape with ``shape[1] != shape[2]`` as ``[B, N, H, D]`` and the rest as
    ``[B, H, N, D]``. That reads SDPA-layout inputs (its own documented usage, e.g. ``[16, 8, 512, 64]``) as
    ``[B, N, H, D]`` and attends over the heads axis. The default ``"shape"`` policy keeps 0.5.0's answer where it
    was consistent with SDPA and fixes the rest: the shorter of dims 1 and 2 is the heads axis, and on a tie it
    answers ``[B, H, N, D]`` like 0.5.0. ``policy="legacy"`` (or ``FLASHCORE_LAYOUT_GUESS=legacy``) reproduces
    0.5.0's rule exactly.

    Args:
        shape: the query's shape (4 dims).
        policy: ``"shape"`` or ``"legacy"``; default from ``FLASHCORE_LAYOUT_GUESS``, else ``"shape"``.

    Returns:
        ``(layout, note)`` where ``layout`` is ``"bhsd"`` or ``"bshd"`` and ``note`` is ``"ambiguous"`` (dims 1 and
        2 are equal), ``"differs-from-0.5"`` (0.5.0 would have answered the other layout) or None.
    """
    if policy is None:
        policy = os.environ.get(LAYOUT_GUESS_ENV, "shape").strip().lower() or "shape"
    if policy not in ("shape", "legacy"):
        raise ValueError(f"{LAYOUT_GUESS_ENV} must be 'shape' or 'legacy', got {policy!r}")
    d1, d2 = int(shape[1]), int(shape[2])
    if d1 == d2:
        return "bhsd", "ambiguous"
    if policy == "legacy" or d1 > d2:
        return "bshd", None
    return "bhsd", "differs-from-0.5"


def _resolve_layout(query: torch.Tensor, layout: str | None) -> str:
    """The layout to use for a call; warns (once) about guesses that may not be what the caller meant."""
    if layout is not None:
        layout = normalize_layout(layout)
        if query.dim() != 4:
            raise ValueError(f"layout= applies to 4-D tensors; got a query of shape {tuple(query.shape)}")
        return layout
    if query.dim() != 4:
        return "bhsd"  # SDPA's [..., N, D] convention; no guess involved
    guessed, note = guess_layout(query.shape)
    shape = tuple(query.shape)
    if note == "ambiguous":
        warn_once(
            "layout:ambiguous",
            f"flashcore.attention: the layout of a query of shape {shape} is ambiguous (dims 1 and 2 are equal); "
            f"treating it as {_NAMES[guessed]} like flashcore 0.5.0. Pass layout='bhsd' or layout='bshd' "
            "(this warning is shown once per process).",
            FlashcoreLayoutWarning,
            stacklevel=3,
        )
    elif note == "differs-from-0.5":
        warn_once(
            "layout:differs",
            f"flashcore.attention: treating a query of shape {shape} as {_NAMES[guessed]} (dim 1 is shorter, so it "
            "is the heads axis). flashcore 0.5.0 read every shape with dim1 != dim2 as [B, N, H, D], which attended "
            "over the heads axis of SDPA-layout inputs. Pass layout='bhsd' or layout='bshd' to silence this, or set "
            f"{LAYOUT_GUESS_ENV}=legacy to reproduce 0.5.0 (this warning is shown once per process).",
            FlashcoreLayoutWarning,
            stacklevel=3,
        )
    return guessed


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    layout: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with flashcore 0.5's signature, computed by sparsek.

    Deprecated: use ``sparsek.attention(q, k, v, causal=..., scale=..., layout="bhsd" | "bshd")``.

    Runs on sparsek whenever it can (any float dtype on the CPU; fp16/bf16 with head dims 64/128/256 on CUDA),
    including ``is_causal=True``, which flashcore 0.5 rejected. Calls sparsek cannot serve (an ``attn_mask``,
    ``dropout_p > 0``, an unsupported dtype or head dim on the GPU, ``is_causal`` with different query and key
    lengths) run on PyTorch SDPA with a one-time [`FlashcoreFallbackWarning`][flashcore.FlashcoreFallbackWarning]
    instead of raising ``NotImplementedError``. Autograd works: the backward recomputes through SDPA.

    Args:
        query: ``[B, H, N, D]`` or ``[B, N, H, D]`` (see ``layout``); other ranks follow SDPA's ``[..., N, D]``.
        key: keys in the same layout; fewer heads than ``query`` is allowed (GQA).
        value: values, same shape as ``key``.
        attn_mask: SDPA attention mask (boolean: True = attend; or additive float), broadcast to
            ``[B, H, N_q, N_k]`` whatever the layout.
        dropout_p: attention dropout probability, applied as SDPA does (also outside training).
        is_causal: causal mask, top-left aligned as in SDPA.
        scale: softmax scale, default ``1 / sqrt(D)``.
        layout: ``"bhsd"`` (alias ``"bhnd"``) or ``"bshd"`` (alias ``"bnhd"``). When omitted the layout is guessed
            from ``query``'s shape (see [`guess_layout`][flashcore._functional.guess_layout]) and a one-time
            [`FlashcoreLayoutWarning`][flashcore.FlashcoreLayoutWarning] flags ambiguous shapes.

    Returns:
        The attention output, same shape and layout as ``query``.

    Example:
        >>> q = torch.randn(16, 8, 512, 64, device="cuda", dtype=torch.float16)
        >>> out = flashcore.attention(q, q, q, layout="bhsd")
    """
    deprecated(
        "flashcore.attention",
        "sparsek.attention(q, k, v, causal=..., scale=..., layout='bhsd' or 'bshd')",
    )
    resolved = _resolve_layout(query, layout) if isinstance(query, torch.Tensor) else "bhsd"
    return run_attention(
        query,
        key,
        value,
        layout=resolved,
        caller="flashcore.attention",
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        gqa=True,
        stacklevel=2,
    )
