"""sparsek-xformers: sparsek as a forward operator for ``xformers.ops.memory_efficient_attention``.

* [`FwOp`][sparsek_xformers.FwOp]: pass ``op=(sparsek_xformers.FwOp, None)`` to any ``memory_efficient_attention*``
  call; [`BwOp`][sparsek_xformers.BwOp] is a placeholder that refuses (no backward yet).
* [`use_sparsek`][sparsek_xformers.use_sparsek]: context manager that makes sparsek the default operator in a block.
* [`SparseKAttention`][sparsek_xformers.SparseKAttention]: an attention ``nn.Module`` on top of the op.
* [`SUPPORTED_ATTN_BIAS_TYPES`][sparsek_xformers.SUPPORTED_ATTN_BIAS_TYPES]: the ``attn_bias`` types implemented,
  mapped onto sparsek's bottom-right causal / sliding-window masks by [`sparsek_xformers.bias`][sparsek_xformers.bias].

CPU tensors run sparsek's PyTorch reference (any float dtype, bf16 included); CUDA tensors run its kernels.
"""

from ._version import __version__
from .bias import SUPPORTED_ATTN_BIAS_TYPES
from .context import is_sparsek_active, use_sparsek
from .module import SparseKAttention
from .op import KERNEL_HEAD_DIMS, NO_BACKWARD_MESSAGE, BwOp, FwOp

__all__ = [
    "KERNEL_HEAD_DIMS",
    "NO_BACKWARD_MESSAGE",
    "SUPPORTED_ATTN_BIAS_TYPES",
    "BwOp",
    "FwOp",
    "SparseKAttention",
    "__version__",
    "is_sparsek_active",
    "use_sparsek",
]
