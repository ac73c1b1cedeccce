"""Pure-PyTorch references for every sparsek op.

They define the semantics the CUDA kernels are tested against, and they are the execution path on CPU tensors.
They compute in float32 (float64 for float64 inputs) and perform no input validation.
"""

from .dense import attention_ref, band_mask, masked_softmax_attention, varlen_attention_ref
from .paged import gather_paged_kv, paged_attention_ref, paged_decode_ref, reshape_and_cache_ref
from .sparse import (
    block_mask_from_indices,
    block_sparse_attention_ref,
    sparsek_attention_ref,
    sparsek_mask_ref,
    sparsek_select_ref,
    topk_attention_ref,
    topk_index_mask,
)

__all__ = [
    "attention_ref",
    "band_mask",
    "block_mask_from_indices",
    "block_sparse_attention_ref",
    "gather_paged_kv",
    "masked_softmax_attention",
    "paged_attention_ref",
    "paged_decode_ref",
    "reshape_and_cache_ref",
    "sparsek_attention_ref",
    "sparsek_mask_ref",
    "sparsek_select_ref",
    "topk_attention_ref",
    "topk_index_mask",
    "varlen_attention_ref",
]
