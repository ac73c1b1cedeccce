"""GPU architecture detection and kernel selection: the one place that maps a device to a build target."""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Build targets sparsek knows by name, with the nvcc ``-gencode`` flag each uses.
GENCODE = {
    "sm90a": "-gencode=arch=compute_90a,code=sm_90a",
    "sm100a": "-gencode=arch=compute_100a,code=sm_100a",
}


@dataclass(frozen=True)
class KernelChoice:
    """Which build target and which kernel family serve a device."""

    capability: tuple[int, int]
    target: str
    family: str
    note: str


def target_for_capability(capability: tuple[int, int]) -> KernelChoice:
    """Map a CUDA compute capability to the build target and kernel family sparsek runs there.

    Hopper (9.0) builds ``sm90a``; Blackwell datacenter (10.x) builds ``sm100a`` and runs the portable
    tensor-core kernel until a Blackwell-native kernel is validated on hardware; other GPUs from
    Ampere (8.0) on build the portable kernel for their own ``sm_XY``. Older GPUs raise ``RuntimeError``.
    """
    major, minor = capability
    if major == 9:
        return KernelChoice(
            capability,
            "sm90a",
            "hopper-wgmma",
            "Hopper build (sm_90a): wgmma/TMA warp-specialized kernel for dense and varlen attention at head dims "
            "64/128 and for sparse index lists of 128-query blocks; mma.sync kernel for head dim 256, paged K/V and "
            "64-query index lists",
        )
    if major == 10:
        return KernelChoice(
            capability, "sm100a", "portable-mma", "Blackwell build (sm_100a), portable kernel (no native kernel yet)"
        )
    if major >= 8:
        return KernelChoice(capability, f"sm{major}{minor}", "portable-mma", f"portable kernel for sm_{major}{minor}")
    raise RuntimeError(
        f"sparsek needs a CUDA GPU of compute capability 8.0 or newer; this one is {major}.{minor}. "
        "Use CPU tensors (reference path) or set SPARSEK_ALLOW_FALLBACK=1."
    )


def gencode_flag(target: str) -> str:
    """The nvcc ``-gencode`` flag for a target name such as ``sm90a``, ``sm100a`` or ``sm86``."""
    if target in GENCODE:
        return GENCODE[target]
    digits = target.removeprefix("sm").removeprefix("_")
    if not digits.isdigit() or len(digits) < 2:
        raise ValueError(f"unknown architecture {target!r}; use e.g. sm90a, sm100a or sm86")
    return f"-gencode=arch=compute_{digits},code=sm_{digits}"


def device_choice(device: torch.device | int | None = None) -> KernelChoice:
    """Kernel choice for a CUDA device (default: the current one)."""
    return target_for_capability(torch.cuda.get_device_capability(device))
