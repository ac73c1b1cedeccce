"""Cached launch plans for eager dense ``attention`` calls (the latency-bound path).

An eager call with plain CUDA tensors checks its arguments, allocates the output and packs the kernel parameters;
for a small problem that host work takes longer than the kernel. Everything but the tensors' data pointers is a
function of the arguments' shapes, strides, dtypes, devices and the scalar options, so the first call with a given
combination stores a `DensePlan` under that key, and later calls with the same key only allocate the output, write
the five pointers in front of the stored parameter bytes and launch. Failing calls never store a plan (plans are
made after every check passed), and keys are only built from hashable plain Python values, so an equal key means
arguments the checks would treat identically.

The same plans are also kept by a compiled fast path (``csrc/eager_fastpath.cpp``, a Python extension module built
once per PyTorch build, see [`build_eager_fastpath`][sparsek.build.build_eager_fastpath]): `attention` calls it
first, and on a hit it allocates, packs and launches without running Python code (an `attention` call took 1.7-3.7
us of host time on a CI-class CPU, against 6.0-12.9 us through the Python plan path in the same runs). It loads when the first eager dense call on a
GPU makes a plan; ``SPARSEK_EAGER_FASTPATH=0`` keeps it off, and ``sparsek info`` says whether it is built.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from . import _lib

#: Plans kept at most; the cache is emptied when it is full (a process normally uses a handful of shapes).
MAX_PLANS = 512

_plans: dict[tuple, DensePlan] = {}
_PLAIN_SCALARS = (int, float)

#: The compiled fast path's ``call(q, k, v, causal, scale, window, layout, return_lse)``: the planned call's result,
#: or ``None`` when it has no plan for these arguments. ``None`` itself while the fast path is not in use.
compiled_call: Callable | None = None
#: What `enable_compiled` did: the loaded module's path, or why the fast path is not in use.
compiled_status = "not loaded yet (it loads with the first eager dense call on a GPU)"
_compiled: ModuleType | None = None
_compiled_tried = False


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

    __slots__ = ("lib", "device", "out_size", "out_stride", "lse_size", "params", "tail")

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
        self.params = params
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


def store(key: tuple | None, plan: DensePlan, call: tuple) -> None:
    """Keep ``plan`` for later calls with ``key``; ``call`` is ``(q, k, v, causal, scale, window, layout,
    return_lse)`` as given to ``attention``, from which the compiled fast path makes its own key."""
    if key is None:
        return
    global _compiled_tried
    if not _compiled_tried and plan.device.type == "cuda":  # the first CUDA plan loads the compiled fast path
        _compiled_tried = True
        enable_compiled()
    if len(_plans) >= MAX_PLANS:
        _plans.clear()
    _plans[key] = plan
    if _compiled is not None:
        launch = _lib.function_address(plan.lib, "sk_fmha_fwd")
        if launch is not None:
            index = -1 if plan.device.index is None else plan.device.index
            _compiled.store(
                *call, launch, _lib.function_address(plan.lib, "sk_error_string") or 0, index,
                tuple(plan.out_size), tuple(plan.out_stride),
                None if plan.lse_size is None else tuple(plan.lse_size), plan.params,
            )  # fmt: skip


def clear() -> None:
    """Forget every plan (tests, benchmarks)."""
    _plans.clear()
    if _compiled is not None:
        _compiled.clear()


def _load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("_sparsek_eager", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compiled_turned_off() -> bool:
    """Whether ``SPARSEK_EAGER_FASTPATH=0`` (or ``false``) keeps the compiled fast path off."""
    return os.environ.get("SPARSEK_EAGER_FASTPATH", "1") in ("0", "false", "False")


def enable_compiled(*, cpu_for_tests: bool = False) -> bool:
    """Load the compiled fast path (building it once for this PyTorch) and route planned calls through it.

    Returns whether it is in use; if it cannot be built or loaded, eager calls keep the Python plan path and
    `compiled_status` says why. ``cpu_for_tests`` lets it take CPU tensors (the CPU tests drive it with a stand-in
    launch function).
    """
    global compiled_call, compiled_status, _compiled
    if compiled_turned_off():
        compiled_status = "off (SPARSEK_EAGER_FASTPATH=0)"
        return False
    from . import build as _build

    try:
        path = _build.build_eager_fastpath()
        module = _load_module(path)
    except (_build.BuildError, ImportError, OSError) as e:
        compiled_status = f"unavailable, eager calls use the Python plan path ({str(e).splitlines()[0]})"
        return False
    stream_of = getattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 0)
    module.configure(_lib._current_device_index, stream_of, cpu_for_tests)
    _plans.clear()  # plans made before this point are not in the module; start both caches empty
    _compiled, compiled_call = module, module.call
    compiled_status = f"in use ({path})"
    return True


def disable_compiled() -> None:
    """Route eager calls through the Python plan path again (benchmarks compare the two)."""
    global compiled_call, _compiled
    compiled_call = _compiled = None
