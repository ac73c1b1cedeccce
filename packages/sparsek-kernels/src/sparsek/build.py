"""Just-in-time and ahead-of-time build of the CUDA sources with ninja.

The sources in ``sparsek/csrc`` are compiled into one shared library per architecture target
(``libsparsek.so``), exporting plain C functions that :mod:`sparsek._lib` calls through ``ctypes``.
Builds land in a cache directory keyed by package version, source hash, CUDA version and target;
a file lock (``fcntl.flock``, released by the OS when a process dies) keeps concurrent processes from
building the same module twice and can never go stale.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ._version import __version__
from .arch import gencode_flag

CSRC = Path(__file__).parent / "csrc"
LIB_NAME = "libsparsek.so"
NVCC_FLAGS = (
    "-O3",
    "-std=c++17",
    "-Xcompiler=-fPIC",
    "-Xptxas=-v",
    "--expt-relaxed-constexpr",
    "-lineinfo",
)


class BuildError(RuntimeError):
    """The CUDA build failed or cannot run (no nvcc, no ninja); the message says why."""


def cache_root() -> Path:
    """Root of the build cache: ``$SPARSEK_CACHE_DIR`` or ``~/.cache/sparsek``."""
    env = os.environ.get("SPARSEK_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparsek"


def sources(csrc: Path = CSRC) -> list[Path]:
    """The ``.cu`` translation units, sorted."""
    return sorted(csrc.glob("*.cu"))


def source_hash(csrc: Path = CSRC) -> str:
    """Hash of every ``.cu``/``.cuh``/``.h`` file's name and content (12 hex digits)."""
    h = hashlib.sha256()
    for p in sorted(list(csrc.glob("*.cu")) + list(csrc.glob("*.cuh")) + list(csrc.glob("*.h"))):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def find_nvcc() -> str | None:
    """Path to nvcc from ``$CUDA_HOME``/``$CUDA_PATH``, ``PATH`` or ``/usr/local/cuda``, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cand = Path(os.environ[var]) / "bin" / "nvcc"
            if cand.exists():
                return str(cand)
    found = shutil.which("nvcc")
    if found:
        return found
    cand = Path("/usr/local/cuda/bin/nvcc")
    return str(cand) if cand.exists() else None


def cuda_version(nvcc: str) -> str:
    """CUDA release reported by ``nvcc --version``, e.g. ``13.0``."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    if not m:
        raise BuildError(f"cannot read the CUDA version from `{nvcc} --version`:\n{out}")
    return m.group(1)


@dataclass(frozen=True)
class BuildSpec:
    """Everything that identifies one build of the library."""

    target: str
    cuda: str
    src_hash: str
    version: str = __version__

    @property
    def key(self) -> str:
        """Cache key, e.g. ``0.1.0-1a2b3c4d5e6f-cuda13.0-sm90a``."""
        return f"{self.version}-{self.src_hash}-cuda{self.cuda}-{self.target}"

    def directory(self, root: Path | None = None) -> Path:
        """Build directory of this spec under the cache root."""
        return (root or cache_root()) / self.key


def ninja_file(spec: BuildSpec, nvcc: str, srcs: list[Path], extra_flags: tuple[str, ...] = ()) -> str:
    """Text of the ``build.ninja`` that compiles ``srcs`` for ``spec.target`` and links ``libsparsek.so``."""
    flags = " ".join((*NVCC_FLAGS, gencode_flag(spec.target), *extra_flags))
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {nvcc}",
        f"flags = {flags}",
        f"includes = -I{srcs[0].parent if srcs else CSRC}",
        "rule cu",
        "  command = $nvcc $flags $includes -c $in -o $out",
        "  description = NVCC $out",
        "rule link",
        "  command = $nvcc -shared $flags $in -o $out",
        "  description = LINK $out",
    ]
    objs = []
    for s in srcs:
        obj = f"{s.stem}.o"
        objs.append(obj)
        lines.append(f"build {obj}: cu {s}")
    lines.append(f"build {LIB_NAME}: link {' '.join(objs)}")
    lines.append(f"default {LIB_NAME}")
    return "\n".join(lines) + "\n"


class _FileLock:
    """Exclusive ``flock`` on a file; the kernel drops it when the holder exits, so it never goes stale."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> _FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def make_spec(target: str, nvcc: str | None = None) -> BuildSpec:
    """The build spec for ``target`` with the nvcc found on this machine."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    return BuildSpec(target=target, cuda=cuda_version(nvcc), src_hash=source_hash())


def build(target: str, *, root: Path | None = None, verbose: bool = False, force: bool = False) -> Path:
    """Build (or reuse) ``libsparsek.so`` for ``target`` (``sm90a``, ``sm100a``, ``sm86``, ...); return its path.

    Raises [`BuildError`][sparsek.build.BuildError] with the compiler output when the build fails.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found: install the CUDA toolkit or set CUDA_HOME to build sparsek's kernels")
    ninja = shutil.which("ninja")
    if ninja is None:
        raise BuildError("ninja not found: `pip install ninja`")
    spec = make_spec(target, nvcc)
    out_dir = spec.directory(root)
    lib = out_dir / LIB_NAME
    if lib.exists() and not force:
        return lib
    with _FileLock(out_dir.with_suffix(".lock")):
        if lib.exists() and not force:  # another process finished while we waited
            return lib
        tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "build.ninja").write_text(ninja_file(spec, nvcc, sources()))
        proc = subprocess.run([ninja, "-C", str(tmp)], capture_output=True, text=True)
        (tmp / "build.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise BuildError(
                f"building sparsek for {target} failed (log in {tmp}/build.log):\n{proc.stdout}{proc.stderr}"
            )
        if verbose:
            print(proc.stdout + proc.stderr)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    return lib


def built_targets(root: Path | None = None) -> list[str]:
    """Cache keys that hold a finished library."""
    root = root or cache_root()
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if (p / LIB_NAME).exists())
