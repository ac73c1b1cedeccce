"""Input checks shared by every public op: one place for shape, dtype and device rules."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
#: Head dimensions the CUDA kernels are compiled for. The reference path accepts any.
KERNEL_HEAD_DIMS = (64, 128, 256)
LAYOUTS = ("bshd", "bhsd")


def check_tensor(name: str, t: object, ndim: int) -> torch.Tensor:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``t`` is a tensor of ``ndim`` dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], *, what: str = "dtype") -> None:
    """Raise ``ValueError`` unless every tensor shares the attribute ``what`` (dtype or device)."""
    values = [getattr(t, what) for t in tensors]
    if any(v != values[0] for v in values):
        pairs = ", ".join(f"{n}={v}" for n, v in zip(names, values))
        raise ValueError(f"{', '.join(names)} must have the same {what}; got {pairs}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ndim: int) -> None:
    """Common checks for query/key/value: tensors, ndim, dtype, device, contiguous last dim."""
    if (  # the common, valid case in a few attribute reads (the checks below name the culprit otherwise)
        type(q) is torch.Tensor
        and type(k) is torch.Tensor
        and type(v) is torch.Tensor
        and q.dim() == ndim
        and k.dim() == ndim
        and v.dim() == ndim
        and q.dtype in SUPPORTED_DTYPES
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and q.stride(-1) == 1
        and k.stride(-1) == 1
        and v.stride(-1) == 1
        and q.shape[-1] == k.shape[-1] == v.shape[-1]
        and q.device == k.device == v.device
    ):
        return
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim)
        if t.dtype not in SUPPORTED_DTYPES and t.device.type != "cpu":
            raise TypeError(f"{name} must be float16 or bfloat16 on the GPU, got {t.dtype}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")
        if t.stride(-1) != 1 and t.numel() > 0:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got stride {t.stride(-1)}")
    check_same(("q", "k", "v"), (q, k, v), what="dtype")
    check_same(("q", "k", "v"), (q, k, v), what="device")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"v must have the same head dim as q ({q.shape[-1]}), got {v.shape[-1]}")


def check_heads(hq: int, hk: int, hv: int) -> None:
    """GQA/MQA rule: K and V have the same number of heads, which divides the query heads."""
    if hk != hv:
        raise ValueError(f"k and v must have the same number of heads, got {hk} and {hv}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"number of query heads ({hq}) must be divisible by the number of key/value heads ({hk})")


def normalize_window(window: tuple[int, int] | None, causal: bool) -> tuple[int, int]:
    """Return ``(left, right)`` with -1 meaning unbounded; causal clamps ``right`` to 0."""
    if window is None:
        left, right = -1, -1
    else:
        if not (isinstance(window, (tuple, list)) and len(window) == 2):
            raise ValueError(f"window must be a (left, right) pair of ints, got {window!r}")
        left, right = (int(w) for w in window)
        if left < -1 or right < -1:
            raise ValueError(f"window entries must be >= 0 or -1 (unbounded), got {window!r}")
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def check_scale(scale: float | None, head_dim: int) -> float:
    """Default softmax scale 1/sqrt(head_dim); reject non-finite or non-positive values."""
    if scale is None:
        return head_dim**-0.5
    scale = float(scale)
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return scale


def check_layout(layout: str) -> str:
    """Reject unknown layouts by name."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def check_cu_seqlens(name: str, host: torch.Tensor, total: int) -> int:
    """Values of a cu_seqlens tensor from its CPU copy ``host``: starts at 0, non-decreasing, ends at ``total``.

    The caller checks the form (1-D int32 on the right device, at least one element) without a device sync and
    copies the values to the host once for both cu_seqlens tensors. Returns the longest sequence length.
    """
    if int(host[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(host[0])}")
    if bool((host[1:] < host[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing, got {host.tolist()}")
    if int(host[-1]) != total:
        raise ValueError(f"{name}[-1] must equal the packed length {total}, got {int(host[-1])}")
    return int((host[1:] - host[:-1]).max()) if host.numel() > 1 else 0
