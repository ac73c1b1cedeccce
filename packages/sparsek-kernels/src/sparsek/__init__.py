"""sparsek: fast dense and sparse attention kernels for NVIDIA Hopper and Blackwell GPUs.

Public API: dense [`attention`][sparsek.attention.attention] and [`varlen_attention`][sparsek.attention.varlen_attention];
SparseK sparse attention ([`sparsek_select`][sparsek.sparse.sparsek_select], [`sparsek_mask`][sparsek.sparse.sparsek_mask],
[`topk_attention`][sparsek.sparse.topk_attention], [`block_sparse_attention`][sparsek.sparse.block_sparse_attention]
with [`block_sparse_layout`][sparsek.sparse.block_sparse_layout],
[`sparsek_attention`][sparsek.sparse.sparsek_attention]); paged KV ([`paged_attention`][sparsek.paged.paged_attention],
[`reshape_and_cache`][sparsek.paged.reshape_and_cache]); the pure-PyTorch references in
[`sparsek.reference`][sparsek.reference]. Nothing is compiled at import; the CUDA library is built just in time on
first use on a GPU (see [`sparsek.build`][sparsek.build]).
"""

from . import paged, reference, sparse
from ._version import __version__
from .attention import attention, varlen_attention
from .paged import paged_attention, paged_decode, reshape_and_cache
from .sparse import (
    BlockSparseLayout,
    block_sparse_attention,
    block_sparse_layout,
    sparsek_attention,
    sparsek_mask,
    sparsek_select,
    topk_attention,
)

__all__ = [
    "BlockSparseLayout",
    "__version__",
    "attention",
    "block_sparse_attention",
    "block_sparse_layout",
    "paged",
    "paged_attention",
    "paged_decode",
    "reference",
    "reshape_and_cache",
    "sparse",
    "sparsek_attention",
    "sparsek_mask",
    "sparsek_select",
    "topk_attention",
    "varlen_attention",
]
