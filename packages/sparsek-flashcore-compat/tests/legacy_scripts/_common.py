"""Helpers shared by the legacy scripts (importable because a script's own directory is on sys.path).

Device: ``FLASHCORE_TEST_DEVICE`` (default ``cpu``). On CUDA the scripts use float16 (head dim 64), on the CPU
float32, where flashcore's calls run sparsek's PyTorch reference.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
from sparsek.testing import rel_error, tolerance

DEVICE = torch.device(os.environ.get("FLASHCORE_TEST_DEVICE", "cpu"))
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
#: tolerance for gradients: the backward recomputes through SDPA in the input dtype
GRAD_TOL = 2e-2 if DTYPE == torch.float16 else 1e-4
FAILURES: list[str] = []


def check(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float | None = None) -> float:
    """Record a failure unless ``out`` matches ``ref`` (same shape, relative error within ``tol``)."""
    tol = tolerance(out.dtype) if tol is None else tol
    if tuple(out.shape) != tuple(ref.shape):
        print(f"FAIL {name}: shape {tuple(out.shape)} != {tuple(ref.shape)}")
        FAILURES.append(name)
        return float("inf")
    err = rel_error(out, ref)
    ok = err <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {name}: rel_err={err:.2e} (tol {tol:.1e})")
    if not ok:
        FAILURES.append(name)
    return err


def expect(name: str, condition: bool, detail: str = "") -> None:
    """Record a failure unless ``condition``."""
    print(f"{'ok  ' if condition else 'FAIL'} {name}{': ' + detail if detail and not condition else ''}")
    if not condition:
        FAILURES.append(name)


def record_warnings() -> list[warnings.WarningMessage]:
    """Start recording every warning of the process (filter 'always', so only flashcore's own once-logic dedups)."""
    catcher = warnings.catch_warnings(record=True)
    log = catcher.__enter__()
    warnings.simplefilter("always")
    return log


def count(log: list[warnings.WarningMessage], category: type[Warning], *fragments: str) -> int:
    """How many recorded warnings are of ``category`` and contain every fragment."""
    return sum(1 for w in log if issubclass(w.category, category) and all(f in str(w.message) for f in fragments))


def expect_once(log: list[warnings.WarningMessage], category: type[Warning], *fragments: str) -> None:
    """Record a failure unless exactly one warning of ``category`` contains every fragment."""
    n = count(log, category, *fragments)
    expect(f"exactly one {category.__name__} {fragments}", n == 1, f"got {n}")


def seeded(*shape: int, seed: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A reproducible normal tensor on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype or DTYPE)


def finish(script: str) -> None:
    """Print the summary and exit non-zero when anything failed."""
    if FAILURES:
        print(f"{script}: {len(FAILURES)} FAILED on {DEVICE}: {FAILURES}")
        sys.exit(1)
    print(f"{script}: all checks passed on {DEVICE} ({DTYPE})")
