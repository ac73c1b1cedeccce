// Selection order, ranks and selectable-key prefix counts of per-key scores: the CUDA version of
// sparsek.selection_intervals.key_order_and_ranks and selectable_prefix (the inputs of interval_build.cu), as a few
// asynchronous launches on the caller's stream (no host synchronization, no allocation: the caller passes a
// workspace of sk_key_order_workspace_bytes bytes). See sparse_abi.h for the contract.
//
//   1. prepare (one CTA per (row, tile)): 64-bit sort keys (row << 32 | ~ordered(score)), the positions 0..Sk-1 as
//      the values (written into `order`), and each tile's count of selectable keys.
//   2. cub::DeviceRadixSort::SortPairs over all rows at once (stable, ascending): rows stay apart (row in the high
//      bits), scores descend inside a row and equal scores keep the lower position first, as torch.sort(descending,
//      stable) does. One device-wide sort uses the whole GPU, where a segmented sort would run one CTA per row.
//   3. finish (one CTA per (row, tile)): the ranks (ranks[order[r]] = r), the order copied out of CUB's alternate
//      buffer when the sort ended there, and the prefix counts (tile offsets from step 1's counts, then warp ballots).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <climits>
#include <cub/block/block_reduce.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/util_type.cuh>

#include "sparse_abi.h"

namespace sk_keyorder {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kIters = 16;                        // 32-key steps of each warp per chunk
constexpr int kChunk = kThreads * kIters;         // keys per chunk (4096)
constexpr int kMaxTiles = kThreads;               // tiles per row: one count per thread in finish
constexpr size_t kAlign = 256;                    // sub-buffer alignment inside the workspace
constexpr int64_t kMaxRows = int64_t(1) << 31;    // rows fit the high 32 bits of the sort key

using BlockReduce = cub::BlockReduce<int, kThreads>;

// Scores as fp32 (as scores.float() converts them) and selectability (score other than -inf, in the input type).
template <typename T>
struct Score;
template <>
struct Score<float> {
  static __device__ __forceinline__ float f32(float x) { return x; }
  static __device__ __forceinline__ bool selectable(float x) { return x != -INFINITY; }
};
template <>
struct Score<__half> {
  static __device__ __forceinline__ float f32(__half x) { return __half2float(x); }
  static __device__ __forceinline__ bool selectable(__half x) { return __half2float(x) != -INFINITY; }
};
template <>
struct Score<__nv_bfloat16> {
  static __device__ __forceinline__ float f32(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ bool selectable(__nv_bfloat16 x) { return __bfloat162float(x) != -INFINITY; }
};
template <>
struct Score<double> {
  static __device__ __forceinline__ float f32(double x) { return __double2float_rn(x); }
  static __device__ __forceinline__ bool selectable(double x) { return x != -static_cast<double>(INFINITY); }
};

// Low 32 bits of the sort key: ascending key <=> descending score. -0.0 is made +0.0 first (torch.sort compares
// values, so the two zeros tie and keep their positions' order); NaN never occurs.
__device__ __forceinline__ uint32_t descending_bits(float f) {
  uint32_t u = __float_as_uint(f);
  if (u == 0x80000000u) u = 0u;
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // ascending u <=> ascending f
  return ~u;
}

struct Geo {
  int64_t sb, sh, sj;  // score strides (elements): batch, head, key
  int64_t span;        // keys per tile (a multiple of kChunk)
  int32_t heads, sk, tiles;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    prepare_kernel(const T* __restrict__ scores, const Geo g, uint64_t* __restrict__ keys,
                   int32_t* __restrict__ vals, int32_t* __restrict__ tile_counts) {
  __shared__ typename BlockReduce::TempStorage red;
  const int64_t cta = blockIdx.x;
  const int64_t row = cta / g.tiles;
  const int64_t tile = cta - row * g.tiles;
  const int64_t b = row / g.heads, h = row - b * g.heads;
  const T* src = scores + b * g.sb + h * g.sh;
  const int64_t base = row * g.sk;
  const uint64_t hi = static_cast<uint64_t>(row) << 32;
  const int64_t begin = tile * g.span;
  const int64_t end = begin + g.span < g.sk ? begin + g.span : g.sk;
  int cnt = 0;
  for (int64_t p = begin + threadIdx.x; p < end; p += kThreads) {
    const T x = src[p * g.sj];
    keys[base + p] = hi | descending_bits(Score<T>::f32(x));
    vals[base + p] = static_cast<int32_t>(p);
    cnt += Score<T>::selectable(x) ? 1 : 0;
  }
  const int total = BlockReduce(red).Sum(cnt);
  if (threadIdx.x == 0) tile_counts[cta] = total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    finish_kernel(const T* __restrict__ scores, const Geo g, const int32_t* sorted, int32_t* order,
                  int32_t* __restrict__ ranks, int32_t* __restrict__ prefix, const int32_t* __restrict__ tile_counts) {
  __shared__ typename BlockReduce::TempStorage red;
  __shared__ int warp_total[kWarps];
  __shared__ int tile_base;
  const int64_t cta = blockIdx.x;
  const int64_t row = cta / g.tiles;
  const int tile = static_cast<int>(cta - row * g.tiles);
  const int64_t b = row / g.heads, h = row - b * g.heads;
  const T* src = scores + b * g.sb + h * g.sh;
  const int64_t base = row * g.sk;
  const int64_t begin = tile * g.span;
  const int64_t end = begin + g.span < g.sk ? begin + g.span : g.sk;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  // Ranks, and the order out of CUB's alternate buffer (the sort's values: key positions, best first).
  const int32_t* srt = sorted + base;
  for (int64_t p = begin + tid; p < end; p += kThreads) {
    const int32_t key = srt[p];
    ranks[base + key] = static_cast<int32_t>(p);
    if (order != sorted) order[base + p] = key;
  }

  // Prefix counts: selectable keys of the row's earlier tiles, then a running count through this tile's chunks.
  const int earlier = tid < tile ? tile_counts[row * g.tiles + tid] : 0;  // tiles <= kThreads
  const int sum = BlockReduce(red).Sum(earlier);
  if (tid == 0) tile_base = sum;
  __syncthreads();
  int running = tile_base;
  int32_t* pf = prefix + row * (static_cast<int64_t>(g.sk) + 1);
  if (tile == 0 && tid == 0) pf[0] = 0;
  const uint32_t upto = (2u << lane) - 1u;  // lanes <= this one (2u << 31 wraps to 0: all lanes)
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int64_t w0 = c0 + static_cast<int64_t>(warp) * (32 * kIters) + lane;
    uint32_t mask[kIters];
    int count = 0;
#pragma unroll
    for (int j = 0; j < kIters; ++j) {
      const int64_t p = w0 + 32 * j;
      const bool sel = p < end && Score<T>::selectable(src[p * g.sj]);
      mask[j] = __ballot_sync(0xffffffffu, sel);
      count += __popc(mask[j]);
    }
    if (lane == 0) warp_total[warp] = count;
    __syncthreads();
    int wbase = running, chunk_total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int t = warp_total[w];
      wbase += w < warp ? t : 0;
      chunk_total += t;
    }
#pragma unroll
    for (int j = 0; j < kIters; ++j) {
      const int64_t p = w0 + 32 * j;
      if (p < end) pf[p + 1] = wbase + __popc(mask[j] & upto);
      wbase += __popc(mask[j]);
    }
    running += chunk_total;
    __syncthreads();  // warp_total reuse
  }
}

struct Layout {
  size_t keys_a = 0, keys_b = 0, vals_b = 0, counts = 0, temp = 0, temp_bytes = 0, total = 0;
  int64_t span = 0;
  int32_t tiles = 0;
  int begin_bit = 0, end_bit = 32;
};

// The key bits that can differ: fp16 and bf16 scores become fp32 with their low 13 / 16 mantissa bits zero, so two
// keys of equal upper bits have the same sign and equal low bits (0s, or 1s for the negatives' complement).
inline int first_key_bit(int32_t dtype) {
  switch (dtype) {
    case SK_SCORES_F16:
      return 13;
    case SK_SCORES_BF16:
      return 16;
    default:
      return 0;
  }
}

template <typename NumItemsT>
cudaError_t radix_sort(void* temp, size_t& temp_bytes, cub::DoubleBuffer<uint64_t>& keys,
                       cub::DoubleBuffer<int32_t>& vals, int64_t n, int begin_bit, int end_bit, cudaStream_t stream) {
  return cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys, vals, static_cast<NumItemsT>(n), begin_bit, end_bit,
                                         stream);
}

// Sort with `int` item counts where they fit (every CUB release takes them), 64-bit ones beyond.
inline cudaError_t sort_pairs(void* temp, size_t& temp_bytes, cub::DoubleBuffer<uint64_t>& keys,
                              cub::DoubleBuffer<int32_t>& vals, int64_t n, int begin_bit, int end_bit,
                              cudaStream_t stream) {
  if (n <= INT_MAX) return radix_sort<int>(temp, temp_bytes, keys, vals, n, begin_bit, end_bit, stream);
  return radix_sort<int64_t>(temp, temp_bytes, keys, vals, n, begin_bit, end_bit, stream);
}

inline cudaError_t layout(int64_t rows, int32_t sk, int32_t dtype, Layout& L) {
  if (rows < 0 || rows > kMaxRows || sk < 0 || sk == INT_MAX) return cudaErrorInvalidValue;
  if (dtype != SK_SCORES_F32 && dtype != SK_SCORES_F16 && dtype != SK_SCORES_BF16 && dtype != SK_SCORES_F64)
    return cudaErrorInvalidValue;
  L = Layout();
  const int64_t n = rows * sk;
  if (n == 0) return cudaSuccess;
  const int64_t chunks = (static_cast<int64_t>(sk) + kChunk - 1) / kChunk;
  const int64_t per_tile = (chunks + kMaxTiles - 1) / kMaxTiles;
  L.span = per_tile * kChunk;
  L.tiles = static_cast<int32_t>((chunks + per_tile - 1) / per_tile);
  if (rows * L.tiles > INT_MAX) return cudaErrorInvalidConfiguration;  // grid size
  L.begin_bit = first_key_bit(dtype);
  int row_bits = 0;
  while ((int64_t(1) << row_bits) < rows) ++row_bits;
  L.end_bit = 32 + row_bits;
  size_t off = 0;
  auto take = [&off](size_t bytes) {
    const size_t at = off;
    off = (off + bytes + kAlign - 1) / kAlign * kAlign;
    return at;
  };
  const size_t un = static_cast<size_t>(n);
  L.keys_a = take(8 * un);
  L.keys_b = take(8 * un);
  L.vals_b = take(4 * un);
  L.counts = take(4 * static_cast<size_t>(rows) * L.tiles);
  cub::DoubleBuffer<uint64_t> keys(nullptr, nullptr);
  cub::DoubleBuffer<int32_t> vals(nullptr, nullptr);
  size_t temp_bytes = 0;
  const cudaError_t err = sort_pairs(nullptr, temp_bytes, keys, vals, n, L.begin_bit, L.end_bit, nullptr);
  if (err != cudaSuccess) return err;
  L.temp_bytes = temp_bytes;
  L.temp = take(temp_bytes);
  L.total = off;
  return cudaSuccess;
}

template <typename T>
cudaError_t run(const void* scores_v, const Layout& L, const Geo& g, int64_t rows, int32_t* order, int32_t* ranks,
                int32_t* prefix, uint8_t* ws, cudaStream_t stream) {
  const T* scores = static_cast<const T*>(scores_v);
  uint64_t* keys_a = reinterpret_cast<uint64_t*>(ws + L.keys_a);
  uint64_t* keys_b = reinterpret_cast<uint64_t*>(ws + L.keys_b);
  int32_t* vals_b = reinterpret_cast<int32_t*>(ws + L.vals_b);
  int32_t* counts = reinterpret_cast<int32_t*>(ws + L.counts);
  const unsigned ctas = static_cast<unsigned>(rows * L.tiles);
  prepare_kernel<T><<<ctas, kThreads, 0, stream>>>(scores, g, keys_a, order, counts);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  cub::DoubleBuffer<uint64_t> keys(keys_a, keys_b);
  cub::DoubleBuffer<int32_t> vals(order, vals_b);
  size_t temp_bytes = L.temp_bytes;
  err = sort_pairs(ws + L.temp, temp_bytes, keys, vals, rows * g.sk, L.begin_bit, L.end_bit, stream);
  if (err != cudaSuccess) return err;
  finish_kernel<T><<<ctas, kThreads, 0, stream>>>(scores, g, vals.Current(), order, ranks, prefix, counts);
  return cudaGetLastError();
}

}  // namespace sk_keyorder

extern "C" int sk_key_order_workspace_bytes(int64_t rows, int32_t seqlen_k, int32_t dtype, int64_t* bytes) {
  sk_keyorder::Layout L;
  const cudaError_t err = sk_keyorder::layout(rows, seqlen_k, dtype, L);
  if (err != cudaSuccess) return err;
  *bytes = static_cast<int64_t>(L.total);
  return cudaSuccess;
}

extern "C" int sk_key_order(const void* scores, int32_t dtype, int64_t score_batch_stride, int64_t score_head_stride,
                            int64_t score_key_stride, int32_t batch, int32_t heads, int32_t seqlen_k, int32_t* order,
                            int32_t* ranks, int32_t* prefix, void* workspace, int64_t workspace_bytes,
                            void* stream) {
  using namespace sk_keyorder;
  if (batch < 0 || heads < 0) return cudaErrorInvalidValue;
  const int64_t rows = static_cast<int64_t>(batch) * heads;
  Layout L;
  cudaError_t err = layout(rows, seqlen_k, dtype, L);
  if (err != cudaSuccess) return err;
  if (rows == 0) return cudaSuccess;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (seqlen_k == 0) return cudaMemsetAsync(prefix, 0, static_cast<size_t>(rows) * sizeof(int32_t), s);
  if (workspace_bytes < 0 || static_cast<uint64_t>(workspace_bytes) < L.total || workspace == nullptr)
    return cudaErrorInvalidValue;
  Geo g;
  g.sb = score_batch_stride;
  g.sh = score_head_stride;
  g.sj = score_key_stride;
  g.span = L.span;
  g.heads = heads;
  g.sk = seqlen_k;
  g.tiles = L.tiles;
  uint8_t* ws = static_cast<uint8_t*>(workspace);
  switch (dtype) {
    case SK_SCORES_F32:
      return run<float>(scores, L, g, rows, order, ranks, prefix, ws, s);
    case SK_SCORES_F16:
      return run<__half>(scores, L, g, rows, order, ranks, prefix, ws, s);
    case SK_SCORES_BF16:
      return run<__nv_bfloat16>(scores, L, g, rows, order, ranks, prefix, ws, s);
    default:
      return run<double>(scores, L, g, rows, order, ranks, prefix, ws, s);
  }
}
