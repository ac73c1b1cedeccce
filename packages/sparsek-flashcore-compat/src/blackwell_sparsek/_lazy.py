"""Lazy re-exports of the framework integrations blackwell_sparsek 0.1 promised, from the sparsek packages."""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

from flashcore._warnings import deprecated

__all__ = ["LAZY_NAMES", "resolve"]


class _Target(NamedTuple):
    module: str
    attr: str
    dist: str


#: Old name -> where it lives now (module, attribute) and the distribution to install.
LAZY_NAMES: dict[str, _Target] = {
    "SparseKAttention": _Target("sparsek_xformers", "SparseKAttention", "sparsek-xformers"),
    "SparseKBackend": _Target("sparsek_vllm", "SparsekAttentionBackend", "sparsek-vllm"),
    "register_vllm_backend": _Target("sparsek_vllm", "register", "sparsek-vllm"),
}


def resolve(namespace: str, name: str) -> Any:
    """Import ``namespace.name``'s replacement, emitting its one-time ``DeprecationWarning``.

    Raises:
        ImportError: the package providing the replacement (or what it needs) is not installed; the message names
            the pip distribution to install.
        AttributeError: ``name`` is not a lazily re-exported name.
    """
    target = LAZY_NAMES.get(name)
    if target is None:
        raise AttributeError(f"module {namespace!r} has no attribute {name!r}")
    old, new = f"{namespace}.{name}", f"{target.module}.{target.attr}"
    try:
        module = importlib.import_module(target.module)
    except ImportError as e:
        raise ImportError(
            f"{old} now lives in the {target.dist!r} package ({new}), which is not installed: "
            f"pip install {target.dist}  (or: pip install 'sparsek-flashcore-compat[{target.dist.split('-')[1]}]')"
        ) from e
    try:
        value = getattr(module, target.attr)
    except ImportError as e:
        raise ImportError(
            f"{old} is {new}, which could not be loaded ({e}); pip install {target.dist} and the framework it "
            "integrates"
        ) from e
    deprecated(old, f"{new} (pip install {target.dist})", stacklevel=3)
    return value
