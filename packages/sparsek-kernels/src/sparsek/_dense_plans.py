"""Cached launch plans for eager dense ``attention`` calls (the latency-bound path).

An eager call with plain CUDA tensors checks its arguments, allocates the output and packs the kernel parameters;
for a small problem that host work takes longer than the kernel. Everything but the tensors' data pointers is a
function of the arguments' shapes, strides, dtypes, devices and the scalar options, so the first call with a given
combination stores a `DensePlan` under that key, and later calls with the same key only allocate the output, write
the five pointers in front of the stored parameter bytes and launch. Failing calls never store a plan (plans are
made after every check passed), and keys are only built from hashable plain Python values, so an equal key means
arguments the checks would treat identically.
"""

from __future__ import annotations

import ctypes

import torch

from . import _lib

#: Plans kept at most; the cache is emptied when it is full (a process normally uses a handful of shapes).
MAX_PLANS = 512

_plans: dict[tuple, DensePlan] = {}
_PLAIN_SCALARS = (int, float)


def plan_key(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: object,
    scale: object,
    window: object,
    layout: object,
    return_lse: object,
) -> tuple | None:
    """The cache key of a call, or ``None`` when an option is not a plain Python value (such calls are not cached)."""
    if not (
        (scale is None or type(scale) in _PLAIN_SCALARS)
        and (window is None or (type(window) is tuple and len(window) == 2 and all(type(w) is int for w in window)))
        and type(causal) is bool
        and type(return_lse) is bool
        and type(layout) is str
    ):
        return None
    return (
        q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype,
        q.device, k.device, v.device, causal, scale, window, layout, return_lse,
    )  # fmt: skip


class DensePlan:
    """What an eager dense call with one key needs: the library, the output's (and LSE's) size and strides, and the
    packed launch parameters after the five pointers, taken from the call that made the plan (``out`` in the caller's
    layout, ``lse`` ``None`` unless it was asked for)."""

    __slots__ = ("lib", "device", "out_size", "out_stride", "lse_size", "tail")

    def __init__(
        self,
        lib: ctypes.CDLL,
        params: bytes,
        out: torch.Tensor,
        lse: torch.Tensor | None,
    ) -> None:
        self.lib = lib
        self.device = out.device
        self.out_size, self.out_stride = out.size(), out.stride()
        self.lse_size = None if lse is None else lse.size()
        self.tail = params[_lib.FMHA_POINTERS.size :]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Allocate the output (and LSE) and launch; ``q``, ``k``, ``v`` as given to ``attention``."""
        # `q.new_empty_strided`: q has the plan's dtype and device (both are in the key), and the method skips the
        # keyword parsing of `torch.empty_strided` (~0.6 us per call).
        out = q.new_empty_strided(self.out_size, self.out_stride)
        if self.lse_size is None:
            lse, lse_ptr = None, 0
        else:
            lse = torch.empty(self.lse_size, dtype=torch.float32, device=self.device)
            lse_ptr = lse.data_ptr()
        head = _lib.FMHA_POINTERS.pack(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse_ptr)
        _lib.launch_fmha(self.lib, self.device, head + self.tail)
        return out, lse


def lookup(key: tuple | None) -> DensePlan | None:
    """The stored plan for ``key`` (``None`` if there is none)."""
    return None if key is None else _plans.get(key)


def store(key: tuple | None, plan: DensePlan) -> None:
    """Keep ``plan`` for later calls with ``key``."""
    if key is None:
        return
    if len(_plans) >= MAX_PLANS:
        _plans.clear()
    _plans[key] = plan


def clear() -> None:
    """Forget every plan (tests, benchmarks)."""
    _plans.clear()
