// KV-cache write (vLLM's reshape_and_cache_flash semantics): scatter new K/V tokens into their paged-cache slots.
//
// One CTA per token; its threads copy the token's heads_kv * head_dim keys and values, 16 bytes per thread and
// step when every pointer and stride allows it, else one element at a time. The copy is a bit copy: key/value and
// the caches must have the same element type (checked in Python).
#include <cuda_runtime.h>
#include <stdint.h>

#include "paged_abi.h"

namespace sparsek_paged {

constexpr int kCopyThreads = 128;

template <typename V>
__global__ void __launch_bounds__(kCopyThreads) reshape_and_cache_kernel(const SkCacheWriteParams p) {
  const int64_t i = blockIdx.x;
  const int64_t slot = p.slot_mapping[i];
  if (slot < 0) return;
  const int64_t blk = slot / p.block_size;
  const int64_t row = slot % p.block_size;
  // Strides arrive in elements; V is the copy unit (elem_bytes * per_unit == sizeof(V)).
  const int per_unit = static_cast<int>(sizeof(V)) / p.elem_bytes;
  const int units_per_head = p.head_dim / per_unit;
  const int total = p.heads_kv * units_per_head;
  const char* kbase = static_cast<const char*>(p.key) + i * p.key_token_stride * p.elem_bytes;
  const char* vbase = static_cast<const char*>(p.value) + i * p.value_token_stride * p.elem_bytes;
  char* kcb = static_cast<char*>(p.key_cache) + (blk * p.kc_block_stride + row * p.kc_row_stride) * p.elem_bytes;
  char* vcb = static_cast<char*>(p.value_cache) + (blk * p.vc_block_stride + row * p.vc_row_stride) * p.elem_bytes;
  for (int u = threadIdx.x; u < total; u += kCopyThreads) {
    const int h = u / units_per_head;
    const int64_t off = static_cast<int64_t>(u % units_per_head) * sizeof(V);
    const V kx = *reinterpret_cast<const V*>(kbase + h * p.key_head_stride * p.elem_bytes + off);
    const V vx = *reinterpret_cast<const V*>(vbase + h * p.value_head_stride * p.elem_bytes + off);
    *reinterpret_cast<V*>(kcb + h * p.kc_head_stride * p.elem_bytes + off) = kx;
    *reinterpret_cast<V*>(vcb + h * p.vc_head_stride * p.elem_bytes + off) = vx;
  }
}

static bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

static bool vec16_ok(const SkCacheWriteParams& p) {
  const int64_t eb = p.elem_bytes;
  const int64_t strides[] = {p.key_token_stride, p.key_head_stride, p.value_token_stride, p.value_head_stride,
                             p.kc_block_stride,  p.kc_row_stride,   p.kc_head_stride,     p.vc_block_stride,
                             p.vc_row_stride,    p.vc_head_stride};
  for (int64_t s : strides)
    if ((s * eb) % 16 != 0) return false;
  return (p.head_dim * eb) % 16 == 0 && aligned16(p.key) && aligned16(p.value) && aligned16(p.key_cache) &&
         aligned16(p.value_cache);
}

}  // namespace sparsek_paged

extern "C" int sk_reshape_and_cache(const SkCacheWriteParams* params, void* stream) {
  using namespace sparsek_paged;
  const SkCacheWriteParams& p = *params;
  if (p.elem_bytes != 1 && p.elem_bytes != 2 && p.elem_bytes != 4) return SK_PAGED_ERR_ELEM_BYTES;
  if (p.head_dim <= 0) return SK_PAGED_ERR_HEAD_DIM;
  if (p.heads_kv <= 0) return SK_PAGED_ERR_HEADS;
  if (p.block_size <= 0) return SK_PAGED_ERR_BLOCK_SIZE;
  if (p.num_tokens <= 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  const dim3 grid(p.num_tokens);
  if (vec16_ok(p)) {
    reshape_and_cache_kernel<uint4><<<grid, kCopyThreads, 0, s>>>(p);
  } else if (p.elem_bytes == 4) {
    reshape_and_cache_kernel<uint32_t><<<grid, kCopyThreads, 0, s>>>(p);
  } else if (p.elem_bytes == 2) {
    reshape_and_cache_kernel<uint16_t><<<grid, kCopyThreads, 0, s>>>(p);
  } else {
    reshape_and_cache_kernel<uint8_t><<<grid, kCopyThreads, 0, s>>>(p);
  }
  return cudaGetLastError();
}

extern "C" const char* sk_paged_error_string(int code) {
  using namespace sparsek_paged;
  switch (code) {
    case SK_PAGED_ERR_ELEM_BYTES:
      return "unsupported element size (1, 2 or 4 bytes)";
    case SK_PAGED_ERR_HEAD_DIM:
      return "unsupported head dim (paged decode: 64, 128 or 256)";
    case SK_PAGED_ERR_HEADS:
      return "heads_q must be a positive multiple of heads_kv";
    case SK_PAGED_ERR_BLOCK_SIZE:
      return "block_size must be positive";
    case SK_PAGED_ERR_SPLITS:
      return "num_splits must be >= 1 and a workspace must be given when it is > 1";
    default:
      return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}

extern "C" int sk_paged_abi_version(void) { return 1; }
