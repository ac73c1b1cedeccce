// Top-k key selection for SparseK attention: block-wide radix select with an ordered compaction, so the selected
// positions come out sorted ascending. See sparse_abi.h for the contract.
//
// Order: a key is better when its score is larger, ties go to the lower position; -inf is never selected.
// Per-key (shared) scores use the prefix property: with that total order, the top-k of [0, L) for L >= L0 is
// contained in topk([0, L0)) + [L0, L). One CTA handles a chunk of consecutive rows: it selects once over the
// global prefix [0, L0) into a shared-memory pool, appends the chunk's new keys, and answers every row of the
// chunk from the pool (about k + rows*step elements instead of L).
#include <cuda_runtime.h>
#include <stdint.h>

#include <cub/block/block_scan.cuh>

#include "sparse_abi.h"

namespace sk_sparse {

constexpr int kThreads = 256;
constexpr uint32_t kNegInfKey = 0x007FFFFFu;  // order_key(-inf)
constexpr int kMaxPoolBytes = 64 * 1024;

// Monotone map float -> uint32 (larger score, larger key). -0.0 is folded onto +0.0 first: the two compare equal as
// floats, so they must tie (and fall back to "lower position wins") like in the sort-based reference; without the
// fold -0.0 would rank strictly below +0.0 and rows whose k-th best score is 0 would pick different positions.
__device__ __forceinline__ uint32_t order_key(float f) {
  uint32_t u = __float_as_uint(f);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

using BlockScan = cub::BlockScan<uint32_t, kThreads>;

struct SelectSmem {
  int hist[256];
  int digit, need, bin, take_all;
  typename BlockScan::TempStorage scan;
};

struct GlobalSrc {
  const float* row;
  __device__ __forceinline__ uint32_t key(int e) const { return order_key(__ldg(row + e)); }
  __device__ __forceinline__ int pos(int e) const { return e; }
};

struct PoolSrc {
  const uint32_t* keys;
  const int* positions;
  __device__ __forceinline__ uint32_t key(int e) const { return keys[e]; }
  __device__ __forceinline__ int pos(int e) const { return positions[e]; }
};

struct GlobalSink {
  int32_t* out;
  __device__ __forceinline__ void put(int slot, int pos, uint32_t) const { out[slot] = pos; }
};

struct PoolSink {
  uint32_t* keys;
  int* positions;
  __device__ __forceinline__ void put(int slot, int pos, uint32_t key) const {
    keys[slot] = key;
    positions[slot] = pos;
  }
};

// Selects the best min(k, #valid) of src[0, n) and writes them through sink in source order (slots 0..count-1).
// Every thread of the CTA must call it; returns the count (uniform).
template <class Src, class Sink>
__device__ int block_topk(const Src& src, int n, int k, const Sink& sink, SelectSmem& sm) {
  const int tid = threadIdx.x;
  uint32_t prefix = 0, mask = 0;
  int need = k;
  bool take_all = false;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kThreads) sm.hist[i] = 0;
    __syncthreads();
    for (int e = tid; e < n; e += kThreads) {
      const uint32_t key = src.key(e);
      if (key > kNegInfKey && (key & mask) == prefix) atomicAdd(&sm.hist[(key >> shift) & 255u], 1);
    }
    __syncthreads();
    if (tid < 32) {  // warp 0 finds the bin holding the need-th best element, scanning from the top bin down
      const int lane = tid;
      const int top = 255 - lane * 8;
      int h[8];
      int s = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        h[j] = sm.hist[top - j];
        s += h[j];
      }
      int incl = s;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
      }
      const int excl = incl - s;
      const bool crosses = excl < need && incl >= need;
      const unsigned ballot = __ballot_sync(0xffffffffu, crosses);
      if (ballot == 0u) {
        if (lane == 0) sm.take_all = 1;
      } else if (crosses) {
        int cum = excl;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (cum + h[j] >= need) {
            sm.digit = top - j;
            sm.need = need - cum;
            sm.bin = h[j];
            sm.take_all = 0;
            break;
          }
          cum += h[j];
        }
      }
    }
    __syncthreads();
    if (sm.take_all) {  // fewer valid elements than needed (first pass only): take them all
      take_all = true;
      break;
    }
    prefix |= static_cast<uint32_t>(sm.digit) << shift;
    mask |= 0xFFu << shift;
    need = sm.need;
    const bool done = sm.bin == need;  // every element of the bin is taken: no need to refine further
    __syncthreads();
    if (done) break;
  }

  int out_base = 0, eq_base = 0;
  for (int t0 = 0; t0 < n; t0 += kThreads) {
    const int e = t0 + tid;
    const uint32_t key = e < n ? src.key(e) : 0u;
    const bool valid = e < n && key > kNegInfKey;
    const bool gt = valid && (take_all || (key & mask) > prefix);
    const bool eq = valid && !take_all && (key & mask) == prefix;
    const uint32_t packed = (static_cast<uint32_t>(gt) << 16) | static_cast<uint32_t>(eq);
    uint32_t excl, agg;
    BlockScan(sm.scan).ExclusiveSum(packed, excl, agg);
    const int eq_avail = max(need - eq_base, 0);
    const int gt_before = static_cast<int>(excl >> 16), eq_before = static_cast<int>(excl & 0xFFFFu);
    if (gt || (eq && eq_before < eq_avail)) sink.put(out_base + gt_before + min(eq_before, eq_avail), src.pos(e), key);
    out_base += static_cast<int>(agg >> 16) + min(static_cast<int>(agg & 0xFFFFu), eq_avail);
    eq_base += static_cast<int>(agg & 0xFFFFu);
    __syncthreads();
  }
  __syncthreads();
  return out_base;
}

__device__ __forceinline__ int row_limit(int r, int off, int step, int sk) {
  const long long l = static_cast<long long>(off) + static_cast<long long>(r) * step;
  return static_cast<int>(l < 0 ? 0 : (l > sk ? sk : l));
}

__device__ __forceinline__ void finish_row(int32_t* out, int32_t* count, int cnt, int k) {
  for (int s = cnt + threadIdx.x; s < k; s += kThreads) out[s] = -1;
  if (threadIdx.x == 0) *count = cnt;
}

// kPool: shared score vector, rows answered from a shared-memory pool; otherwise each row is scanned in global memory.
template <bool kPool>
__global__ void __launch_bounds__(kThreads) topk_select_kernel(const float* __restrict__ scores, int64_t sb,
                                                               int64_t sh, int64_t srow, int heads, int rows, int sk,
                                                               int k, int off, int step, int rows_per_cta,
                                                               int32_t* __restrict__ out, int32_t* __restrict__ counts) {
  __shared__ SelectSmem sm;
  extern __shared__ __align__(16) unsigned char pool_raw[];
  const int bh = blockIdx.y;
  const int b = bh / heads, h = bh % heads;
  const int r0 = blockIdx.x * rows_per_cta;
  const int r1 = min(r0 + rows_per_cta, rows);
  const float* base = scores + b * sb + h * sh;
  int32_t* out_bh = out + static_cast<int64_t>(bh) * rows * k;
  int32_t* cnt_bh = counts + static_cast<int64_t>(bh) * rows;
  if constexpr (kPool) {
    const int l0 = row_limit(r0, off, step, sk);
    const int l1 = row_limit(r1 - 1, off, step, sk);
    const int cap = k + (l1 - l0);
    uint32_t* pool_keys = reinterpret_cast<uint32_t*>(pool_raw);
    int* pool_pos = reinterpret_cast<int*>(pool_keys + cap);
    const int n0 = block_topk(GlobalSrc{base}, l0, k, PoolSink{pool_keys, pool_pos}, sm);
    for (int e = threadIdx.x; e < l1 - l0; e += kThreads) {
      pool_keys[n0 + e] = order_key(__ldg(base + l0 + e));
      pool_pos[n0 + e] = l0 + e;
    }
    __syncthreads();
    const PoolSrc src{pool_keys, pool_pos};
    for (int r = r0; r < r1; ++r) {
      const int n = n0 + (row_limit(r, off, step, sk) - l0);
      int32_t* o = out_bh + static_cast<int64_t>(r) * k;
      const int cnt = block_topk(src, n, k, GlobalSink{o}, sm);
      finish_row(o, cnt_bh + r, cnt, k);
    }
  } else {
    for (int r = r0; r < r1; ++r) {
      int32_t* o = out_bh + static_cast<int64_t>(r) * k;
      const int cnt = block_topk(GlobalSrc{base + r * srow}, row_limit(r, off, step, sk), k, GlobalSink{o}, sm);
      finish_row(o, cnt_bh + r, cnt, k);
    }
  }
}

}  // namespace sk_sparse

extern "C" int sk_sparse_abi_version(void) { return 4; }

extern "C" int sk_topk_select(const float* scores, int64_t score_batch_stride, int64_t score_head_stride,
                              int64_t score_row_stride, int32_t batch, int32_t heads, int32_t rows, int32_t seqlen_k,
                              int32_t k, int32_t off, int32_t step, int32_t* out_indices, int32_t* out_counts,
                              void* stream) {
  using namespace sk_sparse;
  if (batch < 0 || heads < 0 || rows < 0 || seqlen_k < 0 || k < 1 || step < 0) return cudaErrorInvalidValue;
  if (batch == 0 || heads == 0 || rows == 0) return cudaSuccess;
  if (static_cast<int64_t>(batch) * heads > 65535) return cudaErrorInvalidConfiguration;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  int dev = 0, sms = 132;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int bh = batch * heads;
  const int64_t max_pool = kMaxPoolBytes / 8;
  const bool pool = score_row_stride == 0 && static_cast<int64_t>(k) + step <= max_pool;
  if (pool) {
    // Rows per CTA: as few as fill one wave of resident CTAs (each row's selection is a chain of block-wide barrier
    // rounds, so resident CTAs, not the rows they share a pool with, hide each other's latency), at most 64 and no
    // more than the pool allows.
    const int64_t fit = step > 0 ? (max_pool - k) / step + 1 : 64;
    const auto pool_bytes = [&](int64_t per) { return static_cast<size_t>(k + (per - 1) * step) * 8; };
    cudaError_t err = cudaFuncSetAttribute(topk_select_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           kMaxPoolBytes);
    if (err != cudaSuccess) return err;
    int resident = 1;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, topk_select_kernel<true>, kThreads,
                                                        pool_bytes(fit < 8 ? fit : 8));
    if (err != cudaSuccess) return err;
    const int64_t slots = static_cast<int64_t>(resident < 1 ? 1 : resident) * sms;
    int64_t per = (static_cast<int64_t>(rows) * bh + slots - 1) / slots;
    per = per < 1 ? 1 : (per > 64 ? 64 : per);
    per = per > fit ? fit : per;
    const int rpc = static_cast<int>(per);
    const size_t smem = pool_bytes(per);
    dim3 grid((rows + rpc - 1) / rpc, bh);
    topk_select_kernel<true><<<grid, kThreads, smem, st>>>(scores, score_batch_stride, score_head_stride, 0, heads,
                                                           rows, seqlen_k, k, off, step, rpc, out_indices, out_counts);
  } else {
    dim3 grid(rows, bh);
    topk_select_kernel<false><<<grid, kThreads, 0, st>>>(scores, score_batch_stride, score_head_stride,
                                                         score_row_stride, heads, rows, seqlen_k, k, off, step, 1,
                                                         out_indices, out_counts);
  }
  return cudaGetLastError();
}
