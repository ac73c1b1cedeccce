"""vLLM plugin entry point (group ``vllm.general_plugins``): registers sparsek's attention backend.

vLLM calls [`register`][sparsek_vllm.plugin.register] in every process it starts (API server, engine core,
workers), so registration holds across processes. After it:

* ``AttentionBackendEnum.CUSTOM`` resolves to [`SparsekAttentionBackend`][sparsek_vllm.backend.SparsekAttentionBackend]
  (``--attention-backend CUSTOM``);
* the names ``SPARSEK`` and ``SPARSEK_XFORMERS`` are aliases of that ``CUSTOM`` member
  (``--attention-backend SPARSEK``). They are enum *aliases*, not new members, on purpose: vLLM pickles enum members
  by value when it hands its config to spawned processes, and a dynamically created member would not exist yet in a
  child that unpickles the config before loading plugins. An alias resolves to ``CUSTOM`` (value ``None``), which
  every process knows;
* with ``SPARSEK_VLLM_REPLACE=CPU_ATTN`` in the environment the backend also replaces vLLM's CPU backend (the CPU
  platform ignores ``--attention-backend``); used by the CPU end-to-end test.

Set ``SPARSEK_VLLM_DISABLE=1`` to make the plugin do nothing (or list other plugins in ``VLLM_PLUGINS``).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)  # replaced by vLLM's logger in register()

BACKEND_PATH = "sparsek_vllm.backend.SparsekAttentionBackend"
#: Built-in members the backend can replace (``SPARSEK_VLLM_REPLACE``) and the class used for each.
REPLACEMENTS = {"CPU_ATTN": "sparsek_vllm.backend.SparsekCpuAttnReplacementBackend"}
#: Names that select the backend (aliases of ``AttentionBackendEnum.CUSTOM``).
ALIASES = ("SPARSEK", "SPARSEK_XFORMERS")
#: vLLM releases this plugin is tested against / written for (``>=`` lower, ``<`` upper).
SUPPORTED_VLLM = ((0, 32), (0, 34))


def _vllm_version() -> tuple[int, int] | None:
    try:
        import vllm

        parts = str(vllm.__version__).split(".")
        return int(parts[0]), int(parts[1])
    except Exception:  # dev builds ("dev", "0.0.0+...")
        return None


def _add_alias(enum_cls: type, name: str, member: object) -> None:
    """Make ``enum_cls[name]`` and ``enum_cls.<name>`` return ``member`` (an Enum alias; idempotent)."""
    existing = enum_cls._member_map_.get(name)
    if existing is member:
        return
    if existing is not None:
        logger.warning("sparsek: attention backend name %s is already taken; not aliasing it to CUSTOM", name)
        return
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member


def register() -> None:
    """Register sparsek's backend with vLLM (idempotent; safe to call in every process).

    Registers ``AttentionBackendEnum.CUSTOM`` → ``sparsek_vllm.backend.SparsekAttentionBackend`` (unless another
    plugin already claimed ``CUSTOM``), adds the selection names ``SPARSEK``/``SPARSEK_XFORMERS`` as aliases of
    ``CUSTOM``, and replaces the members listed in ``$SPARSEK_VLLM_REPLACE`` (comma-separated; ``CPU_ATTN``).
    """
    if os.environ.get("SPARSEK_VLLM_DISABLE", "0") not in ("", "0"):
        return
    global logger
    from vllm.logger import init_logger
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    logger = init_logger("vllm.sparsek")  # a child of vLLM's logger, so messages use its handler

    version = _vllm_version()
    lo, hi = SUPPORTED_VLLM
    if version is not None and not (lo <= version < hi):
        logger.warning(
            "sparsek-vllm supports vLLM >=%d.%d,<%d.%d; found %d.%d, registering anyway",
            *lo, *hi, *version,
        )  # fmt: skip

    custom = AttentionBackendEnum.CUSTOM
    current = custom.get_path() if custom.is_overridden() else None
    if current not in (None, BACKEND_PATH):
        logger.warning("sparsek: AttentionBackendEnum.CUSTOM is already registered to %s; leaving it", current)
    else:
        register_backend(custom, BACKEND_PATH)
        for name in ALIASES:
            _add_alias(AttentionBackendEnum, name, custom)

    wanted = [s.strip().upper() for s in os.environ.get("SPARSEK_VLLM_REPLACE", "").split(",") if s.strip()]
    for name in wanted:
        if name not in REPLACEMENTS:
            raise ValueError(
                f"SPARSEK_VLLM_REPLACE: sparsek cannot replace {name!r} (supported: {', '.join(REPLACEMENTS)})"
            )
        register_backend(AttentionBackendEnum[name], REPLACEMENTS[name])
        logger.info("sparsek: attention backend %s replaced by %s", name, REPLACEMENTS[name])
