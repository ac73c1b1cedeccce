// First-query selection of every query block from the keys' selection order (per-key SparseK scores).
// Block m's first query sees keys [0, L), L = clamp(off + m * step, 0, Sk); its selection is the min(k, prefix[L])
// best keys of that range whose score is not -inf, i.e. the first entries of `order` (keys by rank, -inf keys last)
// that lie below L. One CTA per (b, h, block) scans `order` from the best key until it has found them; the scan is
// short for long prefixes (about k * Sk / L entries) and covers the whole order only while L < k. With `as_ranks` the
// rows hold the selected keys' ranks (their places in `order`, ascending) instead of the keys.
#include <cuda_runtime.h>
#include <stdint.h>

#include "device_info.cuh"
#include "sparse_abi.h"

namespace sk_firstsets {

constexpr int kThreads = 256;
constexpr int kPer = 8;  // order entries per thread and round

__global__ void __launch_bounds__(kThreads) first_sets_kernel(const int32_t* __restrict__ order,
                                                              const int32_t* __restrict__ prefix, int32_t seqlen_k,
                                                              int32_t num_blocks, int32_t k, int64_t off, int32_t step,
                                                              int32_t as_ranks, int32_t* __restrict__ out,
                                                              int32_t* __restrict__ counts) {
  __shared__ int warp_counts[kThreads / 32];
  const int64_t cta = blockIdx.x;
  const int64_t row = cta / num_blocks;  // (b, h)
  const int m = static_cast<int>(cta % num_blocks);
  const int32_t* ord = order + row * seqlen_k;
  const int64_t l0 = off + static_cast<int64_t>(m) * step;
  const int L = static_cast<int>(l0 < 0 ? 0 : (l0 > seqlen_k ? seqlen_k : l0));
  const int target = min(k, __ldg(prefix + row * (static_cast<int64_t>(seqlen_k) + 1) + L));
  int32_t* o = out + cta * k;
  for (int i = target + threadIdx.x; i < k; i += kThreads) o[i] = -1;
  if (threadIdx.x == 0 && counts) counts[cta] = target;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int found = 0;  // entries written so far (the same in every thread)
  // Each round reads kPer consecutive entries per thread (independent loads in flight), so a CTA needs few rounds.
  for (int64_t start = 0; start < seqlen_k && found < target; start += kThreads * kPer) {
    const int64_t i0 = start + static_cast<int64_t>(threadIdx.x) * kPer;
    int keys[kPer];
    int mine = 0;
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      keys[e] = i0 + e < seqlen_k ? __ldg(ord + i0 + e) : seqlen_k;
      mine += keys[e] < L;
    }
    int incl = mine;  // inclusive scan over the warp's lanes
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += v;
    }
    if (lane == 31) warp_counts[warp] = incl;
    __syncthreads();
    int before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) {
      const int c = warp_counts[w];
      before += w < warp ? c : 0;
      total += c;
    }
    int pos = found + before + incl - mine;
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      if (keys[e] < L) {
        if (pos < target) o[pos] = as_ranks ? static_cast<int32_t>(i0 + e) : keys[e];
        ++pos;
      }
    }
    found += total;
    __syncthreads();  // warp_counts is rewritten in the next round
  }
}

}  // namespace sk_firstsets

extern "C" int sk_first_sets(const int32_t* order, const int32_t* prefix, int32_t batch, int32_t heads,
                             int32_t seqlen_k, int32_t num_blocks, int32_t k, int64_t off, int32_t step,
                             int32_t as_ranks, int32_t* out, int32_t* counts, void* stream) {
  if (batch < 0 || heads < 0 || num_blocks < 0 || seqlen_k < 0 || k < 1 || step < 0) return cudaErrorInvalidValue;
  const int64_t ctas = static_cast<int64_t>(batch) * heads * num_blocks;
  if (ctas == 0) return cudaSuccess;
  if (ctas > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  sk_firstsets::first_sets_kernel<<<static_cast<unsigned>(ctas), sk_firstsets::kThreads, 0,
                                     static_cast<cudaStream_t>(stream)>>>(order, prefix, seqlen_k, num_blocks, k, off,
                                                                          step, as_ranks, out, counts);
  return cudaGetLastError();
}
