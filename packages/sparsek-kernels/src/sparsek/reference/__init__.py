"""Pure-PyTorch references for every sparsek op.

They define the semantics the CUDA kernels are tested against, and they are the execution path on CPU tensors.
They compute in float32 (float64 for float64 inputs) and perform no input validation.
"""

from .dense import attention_ref, band_mask, masked_softmax_attention, varlen_attention_ref

__all__ = ["attention_ref", "band_mask", "masked_softmax_attention", "varlen_attention_ref"]
