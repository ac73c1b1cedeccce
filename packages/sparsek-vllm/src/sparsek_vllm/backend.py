"""sparsek's vLLM V1 attention backend: backend class, metadata, metadata builder and implementation.

The KV cache is vLLM's packed per-layer view ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` (K in the first
half of the last dim, V in the second) in whatever physical layout vLLM resolved; it is split into strided
``[num_blocks, block_size, num_kv_heads, head_size]`` views and read through their strides, so every layout works.

Per step, ``do_kv_cache_update`` writes the new tokens' K/V (``torch.ops.sparsek.reshape_and_cache``) and ``forward``
runs ``torch.ops.sparsek.paged_attention_out`` over the whole batch: on CUDA the decode requests (placed first by
vLLM's batch reordering) go to sparsek's GQA paged-decode kernel, the rest (prefills, with or without a cached prefix)
to sparsek's paged FMHA kernel. On CPU tensors the same ops run the pure-PyTorch references.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

# Importing sparsek.paged registers torch.ops.sparsek.reshape_and_cache / paged_attention_out.
import sparsek.paged  # noqa: F401
import torch
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import KVCacheLayout

logger = init_logger("vllm.sparsek")  # a child of vLLM's logger, so messages use its handler

__all__ = [
    "SparsekAttentionBackend",
    "SparsekAttentionImpl",
    "SparsekAttentionMetadata",
    "SparsekAttentionMetadataBuilder",
    "SparsekCpuAttnReplacementBackend",
]

#: Head sizes sparsek's CUDA kernels are compiled for.
KERNEL_HEAD_SIZES = (64, 128, 256)
#: Block sizes are multiples of this (the GPU tests cover 16 and 64; any multiple works: keys are looked up one by one).
BLOCK_SIZE_MULTIPLE = 16


@dataclass
class SparsekAttentionMetadata:
    """Per-batch metadata of the sparsek backend (shared by all layers of a KV-cache group).

    Attributes:
        num_actual_tokens: tokens of the batch to compute (rows of ``query``/``output`` to use).
        max_query_len: longest query of the batch.
        max_seq_len: upper bound of the longest ``seq_lens`` entry.
        query_start_loc: int32 ``[num_reqs + 1]`` prefix sums of the query lengths (device).
        seq_lens: int32 ``[num_reqs]`` keys per request, cached prefix plus new tokens (device).
        block_table: int32 ``[num_reqs, max_blocks]`` block ids of each request (device).
        slot_mapping: int64 ``[num_tokens]`` cache slot of each new token, ``-1`` for padding (device).
        num_decodes: the first ``num_decodes`` requests have one query token each (decode kernel).
        num_decode_tokens: tokens of those requests.
        num_prefills: remaining requests (paged FMHA kernel).
        causal: bottom-right causal masking per request (always True for decoder attention).
    """

    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    num_decodes: int
    num_decode_tokens: int
    num_prefills: int
    causal: bool = True


class SparsekAttentionMetadataBuilder(AttentionMetadataBuilder[SparsekAttentionMetadata]):
    """Builds [`SparsekAttentionMetadata`][sparsek_vllm.backend.SparsekAttentionMetadata] from vLLM's common metadata.

    Asks vLLM to reorder batches so that single-token (decode) requests come first. CUDA-graph support is not
    declared (``NEVER``): the kernels are capture-safe, but full-graph replay inside vLLM has not been validated, so
    vLLM keeps attention out of its CUDA graphs (piecewise graphs still cover the rest of the model).
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device) -> None:
        """Set up a builder for one KV-cache group (``kv_cache_spec``) of ``layer_names`` on ``device``."""
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> SparsekAttentionMetadata:
        """Metadata for one batch; ``common_prefix_len`` (deprecated, always 0) and ``fast_build`` are ignored."""
        cam = common_attn_metadata
        if isinstance(cam.causal, torch.Tensor):
            raise NotImplementedError("sparsek's vLLM backend does not support per-request (tensor) causal flags")
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(cam, decode_threshold=1)
        if num_prefills and not _SEEN.get("batch_kinds"):  # diagnostics: cheap host ints, first 1000 batches only
            _log_batch_kinds(cam, num_decodes, num_prefills)
        return SparsekAttentionMetadata(
            num_actual_tokens=cam.num_actual_tokens,
            max_query_len=cam.max_query_len,
            max_seq_len=cam.max_seq_len,
            query_start_loc=cam.query_start_loc,
            seq_lens=cam.seq_lens,
            block_table=cam.block_table_tensor,
            slot_mapping=cam.slot_mapping,
            num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens,
            num_prefills=num_prefills,
            causal=bool(cam.causal),
        )


_SEEN: dict[str, int] = {}


def _log_batch_kinds(cam: CommonAttentionMetadata, num_decodes: int, num_prefills: int) -> None:
    """Log (once per process) the first mixed decode + prefill batch and the first prefill over cached context."""
    if num_decodes and not _SEEN.get("mixed"):
        _SEEN["mixed"] = True
        logger.info("sparsek: mixed batch of %d decode + %d prefill requests", num_decodes, num_prefills)
    seq_cpu = cam.seq_lens_cpu_upper_bound  # exact for prefill rows
    if seq_cpu is not None and not _SEEN.get("context"):
        q = cam.query_start_loc_cpu[: cam.num_reqs + 1]
        q_lens = q[1:] - q[:-1]
        ctx = (seq_cpu[: cam.num_reqs] - q_lens)[q_lens > 1]
        if ctx.numel() and int(ctx.max()) > 0:
            _SEEN["context"] = True
            logger.info("sparsek: prefill over %d cached tokens (prefix cache or earlier chunk)", int(ctx.max()))
    _SEEN["builds"] = _SEEN.get("builds", 0) + 1
    _SEEN["batch_kinds"] = (_SEEN.get("mixed", 0) and _SEEN.get("context", 0)) or _SEEN["builds"] >= 1000


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split vLLM's packed ``[num_blocks, H, block_size, 2 * head_size]`` cache into K and V views.

    Returns two strided ``[num_blocks, block_size, H, head_size]`` views (no copy), the layout the sparsek ops take.
    """
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
        raise ValueError(
            f"expected vLLM's packed KV cache [num_blocks, num_kv_heads, block_size, 2 * {head_size}], "
            f"got shape {tuple(kv_cache.shape)}"
        )
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key_cache, value_cache


class SparsekAttentionImpl(AttentionImpl[SparsekAttentionMetadata]):
    """Attention layer implementation: KV-cache write plus paged attention over mixed prefill/decode batches."""

    can_return_lse_for_decode: bool = False

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Arguments as passed by vLLM's ``Attention`` layer; unsupported features raise ``NotImplementedError``.

        ``sliding_window=w`` (vLLM: the query and the ``w - 1`` keys before it) maps to ``window=(w - 1, 0)``.
        Extra model-specific keyword arguments are accepted; ``sinks`` must be None.
        """
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        if self.num_kv_heads <= 0 or num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if alibi_slopes is not None:
            raise NotImplementedError("sparsek's vLLM backend does not support ALiBi")
        if logits_soft_cap not in (None, 0, 0.0):
            raise NotImplementedError("sparsek's vLLM backend does not support logits soft-capping")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"sparsek's vLLM backend supports decoder attention only, got {attn_type}")
        if kv_cache_dtype not in SparsekAttentionBackend.supported_kv_cache_dtypes:
            raise NotImplementedError(f"sparsek's vLLM backend does not support kv_cache_dtype={kv_cache_dtype!r}")
        if kwargs.get("sinks") is not None:
            raise NotImplementedError("sparsek's vLLM backend does not support attention sinks")
        if sliding_window is None or sliding_window <= 0:
            self.window = (-1, 0)
        else:
            self.window = (int(sliding_window) - 1, 0)
        self._empty_lse: dict[torch.device, torch.Tensor] = {}

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Write the step's new keys/values (``[num_tokens, num_kv_heads, head_size]``) into their cache slots.

        Tokens ``i < slot_mapping.shape[0]`` with ``slot_mapping[i] >= 0`` are written; the rest is padding.
        """
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        if slot_mapping.dtype != torch.int64:
            slot_mapping = slot_mapping.to(torch.int64)
        torch.ops.sparsek.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        kv_cache: torch.Tensor,
        attn_metadata: SparsekAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of ``query[:num_actual_tokens]`` over the paged cache, written into ``output`` (returned).

        ``query`` is ``[num_tokens, num_heads, head_size]`` and ``output`` ``[num_tokens, num_heads, head_size]``;
        rows past ``num_actual_tokens`` (CUDA-graph padding) are left untouched. The new tokens' K/V must already be
        in the cache (``do_kv_cache_update``). ``attn_metadata is None`` (vLLM's profiling run) zero-fills ``output``.
        """
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("sparsek's vLLM backend does not support fused output quantization")
        if attn_metadata is None:
            return output.fill_(0)
        md = attn_metadata
        n = md.num_actual_tokens
        logger.info_once(
            "sparsek attention backend active (%s path)", "CUDA kernel" if query.is_cuda else "PyTorch reference"
        )
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        lse = self._empty_lse.get(query.device)
        if lse is None:
            lse = self._empty_lse[query.device] = torch.empty(0, dtype=torch.float32, device=query.device)
        left, right = self.window if md.causal else (self.window[0], -1)
        torch.ops.sparsek.paged_attention_out(
            query[:n], key_cache, value_cache, md.block_table, md.query_start_loc, md.seq_lens,
            md.max_query_len, md.max_seq_len, self.scale, left, right, md.num_decodes, output[:n], lse,
        )  # fmt: skip
        return output


class SparsekAttentionBackend(AttentionBackend):
    """sparsek as a vLLM attention backend, registered as ``AttentionBackendEnum.CUSTOM``.

    Capabilities (what ``validate_configuration`` checks): fp16/bf16 activations with a KV cache of the same dtype
    (no fp8), head sizes 64/128/256, block sizes that are multiples of 16, every KV-cache layout (read via strides,
    head-major preferred), GQA/MQA, sliding window, decoder attention only; no ALiBi, soft-cap, sinks, MLA, sparse
    (top-k) attention, non-causal decoders, DCP/PCP or fused output quantization. Needs an NVIDIA GPU of compute
    capability 8.0 or newer (validated on H100).
    """

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        """The ``AttentionBackendEnum`` member this class is registered under."""
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[SparsekAttentionImpl]:
        """The attention implementation class."""
        return SparsekAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SparsekAttentionMetadataBuilder]:
        """The metadata builder class."""
        return SparsekAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[int | MultipleOf]:
        """Block sizes: any multiple of 16."""
        return [MultipleOf(BLOCK_SIZE_MULTIPLE)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        """Head sizes of the CUDA kernels."""
        return list(KERNEL_HEAD_SIZES)

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        """Every layout (the kernels read strides); head-major first (a CTA streams one head's keys)."""
        preferred = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")
        members = {m.name: m for m in KVCacheLayout}
        return tuple(members[n] for n in preferred if n in members) + tuple(
            m for m in KVCacheLayout if m.name not in preferred
        )

    @classmethod
    def supports_sliding_window(cls) -> bool:
        """Sliding-window attention is supported."""
        return True

    @classmethod
    def supports_compute_capability(cls, capability: Any) -> bool:
        """sparsek's CUDA kernels need compute capability 8.0 or newer."""
        major = getattr(capability, "major", None)
        if major is None:
            major = capability[0]
        return int(major) >= 8


class SparsekCpuAttnReplacementBackend(SparsekAttentionBackend):
    """The same backend registered over ``CPU_ATTN`` (testing on CPU-only machines).

    vLLM's CPU platform always runs ``CPU_ATTN`` and ignores ``--attention-backend``, so CPU tests replace that member
    (``SPARSEK_VLLM_REPLACE=CPU_ATTN``). The CPU path runs sparsek's PyTorch references, which accept float32 and
    any head size too.
    """

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]

    @staticmethod
    def get_name() -> str:
        """The ``AttentionBackendEnum`` member this class is registered under."""
        return "CPU_ATTN"

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        """Any head size (reference path)."""
        return []

    @classmethod
    def supports_compute_capability(cls, capability: Any) -> bool:
        """No GPU needed."""
        return True
