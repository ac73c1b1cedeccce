"""flashcore 0.5's public API, running on sparsek (package ``sparsek-flashcore-compat``). Deprecated.

Code written for flashcore keeps working unchanged:

* [`attention`][flashcore.attention]: SDPA-shaped attention on ``[B, H, N, D]`` or ``[B, N, H, D]`` tensors.
* [`patch_pytorch`][flashcore.patch_pytorch] / [`unpatch_pytorch`][flashcore.unpatch_pytorch] /
  [`patched`][flashcore.patched]: route ``torch.nn.functional.scaled_dot_product_attention`` to sparsek.
* [`FlashCoreAttention`][flashcore.FlashCoreAttention]: ``nn.MultiheadAttention``-like module (same state dicts).
* [`build_baseline`][flashcore.build_baseline]: the older build-then-``forward(Q, K, V)`` API.

Each entry point emits one ``DeprecationWarning`` per process naming its sparsek replacement. Calls sparsek cannot
serve (masks, dropout, dtypes or head dims its GPU kernels lack) run on PyTorch SDPA with one
[`FlashcoreFallbackWarning`][flashcore.FlashcoreFallbackWarning] per entry point and reason. See
``docs/migrating-from-flashcore.md``.

``flashcore.__version__`` is ``"0.5.0+sparsek.compat.<version of this distribution>"``: the flashcore API it
reproduces, with the compat release as a PEP 440 local label.
"""

from . import torch_ops as torch_ops  # 0.5 imported it here too: ``flashcore.torch_ops.X`` keeps working
from ._baseline import BaselineKernel, build_baseline
from ._functional import attention
from ._module import FlashCoreAttention
from ._patch import is_patched, patch_pytorch, patched, unpatch_pytorch
from ._version import FLASHCORE_VERSION as __version__
from ._warnings import FlashcoreFallbackWarning, FlashcoreLayoutWarning

__author__ = "GOATnote Inc. (flashcore); sparsek developers (compat layer)"
__license__ = "Apache-2.0"

__all__ = [
    "BaselineKernel",
    "FlashCoreAttention",
    "FlashcoreFallbackWarning",
    "FlashcoreLayoutWarning",
    "__version__",
    "attention",
    "build_baseline",
    "is_patched",
    "patch_pytorch",
    "patched",
    "unpatch_pytorch",
]
