"""Just-in-time and ahead-of-time build of the CUDA sources with ninja.

The sources in ``sparsek/csrc`` are compiled into one shared library per architecture target
(``libsparsek.so``), exporting plain C functions that :mod:`sparsek._lib` calls through ``ctypes``.
A small Python extension module, the compiled fast path of eager dense calls (``csrc/eager_fastpath.cpp``, see
:mod:`sparsek._dense_plans`), is built with the host C++ compiler against the running PyTorch.
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
import sys
import sysconfig
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

    def compile_into(tmp: Path) -> subprocess.CompletedProcess:
        (tmp / "build.ninja").write_text(ninja_file(spec, nvcc, sources()))
        return subprocess.run([ninja, "-C", str(tmp)], capture_output=True, text=True)

    return _build_cached(spec.directory(root), LIB_NAME, compile_into, f"sparsek for {target}", verbose, force)


def _build_cached(
    out_dir: Path,
    product: str,
    compile_into,
    what: str,
    verbose: bool,
    force: bool,
) -> Path:
    """``out_dir / product``, made by ``compile_into(tmp)`` in a temporary directory renamed into place on success,
    under an exclusive lock (unless it exists and ``force`` is false)."""
    lib = out_dir / product
    if lib.exists() and not force:
        return lib
    with _FileLock(out_dir.with_suffix(".lock")):
        if lib.exists() and not force:  # another process finished while we waited
            return lib
        tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        proc = compile_into(tmp)
        (tmp / "build.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise BuildError(f"building {what} failed (log in {tmp}/build.log):\n{proc.stdout}{proc.stderr}")
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


EAGER_SOURCE = CSRC / "eager_fastpath.cpp"
EAGER_MODULE = "_sparsek_eager"


def eager_fastpath_key() -> str:
    """Cache key of the eager fast path: package version, source hash, PyTorch build and Python version."""
    import torch

    h = hashlib.sha256(EAGER_SOURCE.read_bytes()).hexdigest()[:12]
    torch_id = f"{torch.__version__}-{(torch.version.git_version or '')[:12]}".replace("+", "_")
    return f"eager-{__version__}-{h}-torch{torch_id}-{sys.implementation.cache_tag}"


def eager_fastpath_path(root: Path | None = None) -> Path:
    """Where the eager fast path for the running PyTorch is (or will be) built under the cache root."""
    return (root or cache_root()) / eager_fastpath_key() / f"{EAGER_MODULE}.so"


def _eager_compile_command(cxx: str, src: Path, out: Path) -> list[str]:
    import torch
    from torch.utils.cpp_extension import include_paths

    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return [
        cxx, "-O2", "-std=c++20", "-fPIC", "-shared", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}",
        str(src), "-o", str(out),
        f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch_python", f"-Wl,-rpath,{torch_lib}",
    ]  # fmt: skip


def build_eager_fastpath(*, root: Path | None = None, verbose: bool = False, force: bool = False) -> Path:
    """Build (or reuse) the compiled fast path of eager dense calls for the running PyTorch; return its path.

    Uses ``$CXX`` (default ``c++``) with PyTorch's and Python's headers, about 20 s once per PyTorch build. Raises
    [`BuildError`][sparsek.build.BuildError] when no compiler or headers are found or the compile fails; a failed
    compile leaves a ``.failed`` marker beside the cache entry, so later processes do not retry it until ``force``
    (``sparsek build --force``).
    """
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise BuildError("no C++ compiler found (set CXX) to build sparsek's eager fast path")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        raise BuildError(f"Python.h not found in {sysconfig.get_paths()['include']} (install the Python headers)")

    def compile_into(tmp: Path) -> subprocess.CompletedProcess:
        command = _eager_compile_command(cxx, EAGER_SOURCE, tmp / f"{EAGER_MODULE}.so")
        return subprocess.run(command, capture_output=True, text=True)

    lib_path = eager_fastpath_path(root)
    out_dir = lib_path.parent
    failed = out_dir.with_suffix(".failed")
    if failed.exists() and not force:
        raise BuildError(f"an earlier build of sparsek's eager fast path failed ({failed}); `--force` tries again")
    try:
        lib = _build_cached(out_dir, lib_path.name, compile_into, "sparsek's eager fast path", verbose, force)
    except BuildError as e:
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(str(e))
        raise
    failed.unlink(missing_ok=True)
    return lib
