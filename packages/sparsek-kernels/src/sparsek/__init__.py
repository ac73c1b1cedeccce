"""sparsek: fast dense and sparse attention kernels for NVIDIA Hopper and Blackwell GPUs.

Public API: [`attention`][sparsek.attention], [`varlen_attention`][sparsek.varlen_attention] and the
pure-PyTorch references in [`sparsek.reference`][sparsek.reference]. Nothing is compiled at import; the CUDA
library is built just in time on first use on a GPU (see [`sparsek.build`][sparsek.build]).
"""

from . import reference
from ._version import __version__
from .attention import attention, varlen_attention

__all__ = ["__version__", "attention", "reference", "varlen_attention"]
