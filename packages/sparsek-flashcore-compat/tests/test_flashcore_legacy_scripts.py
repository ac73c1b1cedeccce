"""Run every legacy user script in its own process (fresh once-per-process warning state), on CPU and CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).parent / "legacy_scripts"
SCRIPTS = sorted(p.name for p in SCRIPTS_DIR.glob("legacy_*.py"))
SRC = Path(__file__).resolve().parents[1] / "src"


def _child_pythonpath() -> str:
    """This package's source first, then the caller's PYTHONPATH made absolute (the child runs in SCRIPTS_DIR)."""
    inherited = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([str(SRC), *inherited])


def _run(script: str, device: str, timeout: float) -> None:
    env = dict(os.environ, FLASHCORE_TEST_DEVICE=device, PYTHONPATH=_child_pythonpath())
    env.pop("FLASHCORE_LAYOUT_GUESS", None)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS_DIR / script)],
        cwd=SCRIPTS_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} on {device} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "all checks passed" in proc.stdout, proc.stdout


def test_scripts_found() -> None:
    assert len(SCRIPTS) == 5, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_legacy_script_cpu(script: str) -> None:
    _run(script, "cpu", timeout=120)


@pytest.mark.gpu
@pytest.mark.parametrize("script", SCRIPTS)
def test_legacy_script_cuda(script: str) -> None:
    # generous: the first process may JIT-build sparsek's CUDA library
    _run(script, "cuda", timeout=1200)
