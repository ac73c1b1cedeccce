"""[`use_sparsek`][sparsek_xformers.use_sparsek]: make sparsek xFormers' forward operator for a block of code."""

from __future__ import annotations

import contextlib
import contextvars
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .op import FwOp

__all__ = ["is_sparsek_active", "use_sparsek"]


@dataclass(frozen=True)
class _State:
    fallback: bool


# Which thread / asyncio task has sparsek switched on (None: xFormers' own dispatch).
_ACTIVE: contextvars.ContextVar[_State | None] = contextvars.ContextVar("sparsek_xformers_active", default=None)
_lock = threading.Lock()
_users = 0
_module: ModuleType | None = None
_original: Callable[..., Any] | None = None


def _dispatch_module() -> ModuleType:
    """The module whose global ``_dispatch_fw`` every ``memory_efficient_attention*`` entry point calls when no op
    is given (``xformers.ops.fmha`` in xFormers 0.0.30-0.0.35; found through the function so that a re-export from
    another package also works)."""
    from xformers.ops import fmha

    fn = getattr(fmha, "_memory_efficient_attention_forward", None)
    module = sys.modules.get(getattr(fn, "__module__", ""), None)
    if module is None or not callable(getattr(module, "_dispatch_fw", None)):
        raise RuntimeError(
            "use_sparsek(): this xFormers version has no `_dispatch_fw` hook next to "
            "`_memory_efficient_attention_forward`; pass op=(sparsek_xformers.FwOp, None) explicitly instead"
        )
    return module


def _sparsek_dispatch_fw(inp: Any, needs_gradient: bool) -> Any:
    """Replacement for xFormers' ``_dispatch_fw``: sparsek's op where switched on, xFormers' choice elsewhere."""
    state = _ACTIVE.get()
    original = _original
    assert original is not None
    if state is None:
        return original(inp, needs_gradient)
    reasons = FwOp.not_supported_reasons(inp)
    if not reasons:
        return FwOp
    if state.fallback:
        return original(inp, needs_gradient)
    raise ValueError(
        "use_sparsek(): sparsek cannot run these memory_efficient_attention inputs:\n"
        f"     query: shape={tuple(inp.query.shape)} ({inp.query.dtype}, {inp.query.device})\n"
        f"     key  : shape={tuple(inp.key.shape)}\n"
        f"     attn_bias: {type(inp.attn_bias)}\n"
        f"`{FwOp.NAME}` is not supported because:\n"
        + textwrap.indent("\n".join(reasons), "    ")
        + "\nUse use_sparsek(fallback=True) to let xFormers pick its own operator for such inputs."
    )


def _install() -> None:
    global _users, _module, _original
    with _lock:
        if _users == 0:
            module = _dispatch_module()
            current = module._dispatch_fw
            if current is not _sparsek_dispatch_fw:
                _original = current
            _module = module
            module._dispatch_fw = _sparsek_dispatch_fw
        _users += 1


def _uninstall() -> None:
    global _users
    with _lock:
        _users -= 1
        if _users == 0 and _module is not None and _module._dispatch_fw is _sparsek_dispatch_fw:
            _module._dispatch_fw = _original  # only if nobody re-patched it in between


@contextlib.contextmanager
def use_sparsek(*, fallback: bool = False) -> Iterator[None]:
    """Make sparsek's [`FwOp`][sparsek_xformers.FwOp] the operator of every xFormers attention call without an
    explicit ``op`` inside the block.

    Covers ``xformers.ops.memory_efficient_attention``, ``memory_efficient_attention_forward``,
    ``memory_efficient_attention_forward_requires_grad`` (and everything built on them, such as xFormers-based
    modules), including references imported before the block, because it hooks xFormers' forward dispatcher rather
    than the public names. Calls that pass ``op=`` explicitly are left alone. The hook is installed on first entry
    and removed when the last block exits.

    Thread-safe: only the thread (or asyncio task) that entered the block is switched to sparsek, via a context
    variable; other threads keep xFormers' dispatch. Threads started inside the block do not inherit it. Blocks nest.
    Also usable as a decorator.

    Args:
        fallback: for inputs sparsek does not support (see ``FwOp.not_supported_reasons``), let xFormers dispatch
            to its own operator instead of raising ``ValueError``.

    Example:
        ```python
        import xformers.ops as xops
        import sparsek_xformers

        with sparsek_xformers.use_sparsek():
            out = xops.memory_efficient_attention(q, k, v, attn_bias=xops.LowerTriangularMask())
        ```

    Training is not covered: inputs that require grad are refused (sparsek has no backward yet), or handed to
    xFormers with ``fallback=True``.
    """
    _install()
    token = _ACTIVE.set(_State(fallback=fallback))
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        _uninstall()


def is_sparsek_active() -> bool:
    """Whether the calling thread / task is inside a [`use_sparsek`][sparsek_xformers.use_sparsek] block."""
    return _ACTIVE.get() is not None
