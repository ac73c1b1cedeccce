// Top-k key selection for SparseK attention: block-wide radix select with an ordered compaction, so the selected
// positions come out sorted ascending. See sparse_abi.h for the contract.
//
// Order: a key is better when its score is larger, ties go to the lower position; -inf is never selected.
// Per-key (shared) scores use the prefix property: with that total order, the top-k of [0, L) for L >= L0 is
// contained in topk([0, L0)) + [L0, L). One CTA handles a chunk of consecutive rows: it selects once over the
// global prefix [0, L0) into a shared-memory pool, appends those of the chunk's new keys that beat the k-th best
// of [0, L0) (thresholds only rise along the rows), and its warps answer one row each from the pool (about
// k + rows*step elements instead of L) with warp-level radix selects. Pool CTAs have 1024 threads, one per SM: the
// prefix select dominates, so the grid has as few chunks per head as fill one wave, and each select runs 32 warps.
// Rows with their own scores (per query) run one 256-thread CTA each.
//
// The select is three histogram passes at most (11, 11 and 10 bits of the order key, 2048 bins: the first pass
// spreads typical scores over many bins, so few threads of a warp hit the same counter) and one compaction pass.
// Each warp handles 256 elements per round (8 coalesced loads per thread, the next round's issued before this
// round's work); the compaction ranks the kept elements with warp ballots and one barrier per round, so consecutive
// lanes store to consecutive output slots.
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cub/block/block_scan.cuh>

#include "device_info.cuh"
#include "sparse_abi.h"

namespace sk_sparse {

constexpr int kItems = 8;                 // elements per thread and round
constexpr int kWarpSpan = 32 * kItems;    // elements per warp and round
constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
constexpr uint32_t kDigitMask = kBins - 1;
constexpr uint32_t kNegInfKey = 0x007FFFFFu;  // order_key(-inf); keys <= this are never selected
constexpr int kRowThreads = 256;    // per-row kernel: one CTA per row
constexpr int kPoolThreads = 1024;  // pool kernel: one CTA per SM, one prefix select, 32 warps answer rows
constexpr int kMaxPoolBytes = 96 * 1024;
constexpr int kMaxRowsPerCta = 64;  // pool mode: 2 rows per warp (longer chunks grow the pool of their early rows)

// Block-level constants of a select run by T threads.
template <int T>
struct Block {
  static constexpr int kWarps = T / 32;
  static constexpr int kTile = T * kItems;          // elements per round
  static constexpr int kBinsPerThread = kBins / T;  // bins each thread scans when locating the pivot bin
  // The block histogram; in pool mode its ints also hold each warp's private 256-bin histogram.
  static constexpr int kHistInts = kWarps * 256 > kBins ? kWarps * 256 : kBins;
  static_assert(kBins % T == 0 && kTile < 65536, "bins split evenly; round totals fit 16 bits");
};

// Monotone map float -> uint32 (larger score, larger key). -0.0 is folded onto +0.0 first: the two compare equal as
// floats, so they must tie (and fall back to "lower position wins") like in the sort-based reference; without the
// fold -0.0 would rank strictly below +0.0 and rows whose k-th best score is 0 would pick different positions.
__device__ __forceinline__ uint32_t order_key(float f) {
  uint32_t u = __float_as_uint(f);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The keys a select sees, as offsets from `base`: every valid key lies in [base, base + 2^bits). Pass p's digit is
// bits [first_shift - d*p, first_shift - d*p + d) of key - base for digit width d (the last pass's shift is clamped
// to 0; its digit then overlaps bits the previous pass fixed, which only narrows the bins in use). Scores of any
// sign span all 32 bits: 11-bit digits 31..21, 20..10, 9..0. A pool of keys at or above a known threshold spans far
// fewer, so its first digit splits the actual range into bins instead of crowding it into the few bins of one sign
// and exponent.
struct KeyRange {
  uint32_t base = 0;
  int first_shift = 32 - kDigitBits;
};

__device__ __forceinline__ KeyRange key_range(uint32_t lo, uint32_t hi, int digit_bits) {
  const int bits = hi > lo ? 32 - __clz(hi - lo) : 0;
  return KeyRange{lo, max(bits - digit_bits, 0)};
}

template <int T>
using CountScan = cub::BlockScan<int, T>;

template <int T>
struct SelectSmem {
  int hist[Block<T>::kHistInts];
  int digit, need, bin;
  uint32_t lo, hi;                               // pool key range
  uint32_t warp_counts[2][Block<T>::kWarps];     // per-round warp totals of the compaction (double buffered)
  typename CountScan<T>::TempStorage count_scan;
};

// Element layout of a round of T * kItems elements starting at t0: warp w covers [t0 + w*kWarpSpan, +kWarpSpan), lane l
// holds items t0 + w*kWarpSpan + 32*i + l. Each item's load is one coalesced line per warp, and the selected items
// of one (warp, i) go to consecutive output slots, so the stores of a round are coalesced too.
__device__ __forceinline__ int lane_first() { return (threadIdx.x >> 5) * kWarpSpan + (threadIdx.x & 31); }

// Order keys of items e, e + 32, ..., e + 32 * (kItems - 1) of a row of n; 0 (never selected) beyond n.
struct GlobalSrc {
  const float* row;
  __device__ __forceinline__ void load(int e, int n, uint32_t (&key)[kItems]) const {
#pragma unroll
    for (int i = 0; i < kItems; ++i) key[i] = e + 32 * i < n ? order_key(__ldg(row + e + 32 * i)) : 0u;
  }
  __device__ __forceinline__ int pos(int e) const { return e; }
};

struct PoolSrc {
  const uint32_t* keys;
  const int* positions;
  __device__ __forceinline__ void load(int e, int n, uint32_t (&key)[kItems]) const {
#pragma unroll
    for (int i = 0; i < kItems; ++i) key[i] = e + 32 * i < n ? keys[e + 32 * i] : 0u;
  }
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

// One round of an ordered compaction: items with `take` bits (per item i, a warp ballot) are written, and items with
// `cand` bits while fewer than cand_avail candidates precede them in this round (the caller subtracts earlier rounds'
// candidates from cand_avail); each goes to slot base + the number of written items before it in source order.
// Returns the round's (taken << 16 | candidates) total; one barrier (warp totals double buffered by round parity).
template <int T, class Src, class Sink>
__device__ __forceinline__ uint32_t compact_round(const Src& src, const Sink& sink, int e,
                                                  const uint32_t (&key)[kItems],
                                                  const unsigned (&take)[kItems], const unsigned (&cand)[kItems],
                                                  int base, int cand_avail, int parity, SelectSmem<T>& sm) {
  constexpr int kWarps = Block<T>::kWarps;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned below = (1u << lane) - 1u;
  uint32_t mine = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) mine += (static_cast<uint32_t>(__popc(take[i])) << 16) + __popc(cand[i]);
  if (lane == 0) sm.warp_counts[parity][warp] = mine;
  __syncthreads();
  uint32_t before = 0, total = 0;
  if constexpr (kWarps <= 8) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const uint32_t c = sm.warp_counts[parity][w];
      before += w < warp ? c : 0u;
      total += c;
    }
  } else {  // lane w scans warp w's total
    uint32_t c = lane < kWarps ? sm.warp_counts[parity][lane] : 0u;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t t = __shfl_up_sync(0xffffffffu, c, o);
      if (lane >= o) c += t;
    }
    total = __shfl_sync(0xffffffffu, c, 31);
    before = __shfl_sync(0xffffffffu, c, warp > 0 ? warp - 1 : 0);
    before = warp > 0 ? before : 0u;
  }
  int take_run = static_cast<int>(before >> 16), cand_run = static_cast<int>(before & 0xFFFFu);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int t = take_run + __popc(take[i] & below), c = cand_run + __popc(cand[i] & below);
    const bool is_take = (take[i] >> lane) & 1u, is_cand = (cand[i] >> lane) & 1u;
    if (is_take || (is_cand && c < cand_avail))
      sink.put(base + t + min(c, cand_avail), src.pos(e + 32 * i), key[i]);
    take_run += __popc(take[i]);
    cand_run += __popc(cand[i]);
  }
  return total;
}

// Selects the best min(k, #valid) of src[0, n) and writes them through sink in source order (slots 0..count-1).
// Every thread of the CTA must call it; returns the count (uniform).
template <int T, class Src, class Sink>
__device__ int block_topk(const Src& src, int n, int k, const Sink& sink, SelectSmem<T>& sm, KeyRange range = {}) {
  constexpr int kThreads = T, kTile = Block<T>::kTile, kBinsPerThread = Block<T>::kBinsPerThread;
  const int tid = threadIdx.x;
  const int first = lane_first();
  uint32_t prefix = 0, mask = 0;
  int need = k;
  bool take_all = false;
  int valid_total = 0;
  uint32_t key[kItems], next[kItems];
  for (int pass = 0, shift = range.first_shift;; ++pass, shift = max(shift - kDigitBits, 0)) {
    int4* hist4 = reinterpret_cast<int4*>(sm.hist);
    for (int i = tid; i < kBins / 4; i += kThreads) hist4[i] = make_int4(0, 0, 0, 0);
    __syncthreads();
    src.load(first, n, key);
    for (int t0 = 0; t0 < n; t0 += kTile) {
      src.load(t0 + kTile + first, n, next);
#pragma unroll
      for (int i = 0; i < kItems; ++i)
        if (key[i] > kNegInfKey && ((key[i] - range.base) & mask) == prefix)
          atomicAdd(&sm.hist[((key[i] - range.base) >> shift) & kDigitMask], 1);
#pragma unroll
      for (int i = 0; i < kItems; ++i) key[i] = next[i];
    }
    __syncthreads();
    // Locate the bin holding the need-th best element: thread t owns bins top, top-1, ... (best first).
    const int top = kBins - 1 - tid * kBinsPerThread;
    int h[kBinsPerThread];
    int s = 0;
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      h[j] = sm.hist[top - j];
      s += h[j];
    }
    int incl, total;
    CountScan<T>(sm.count_scan).InclusiveSum(s, incl, total);
    if (pass == 0) valid_total = total;
    if (total < need) {  // fewer valid elements than k (first pass only): take them all
      take_all = true;
      break;
    }
    const int excl = incl - s;
    if (excl < need && incl >= need) {
      int cum = excl;
#pragma unroll
      for (int j = 0; j < kBinsPerThread; ++j) {
        if (cum < need && cum + h[j] >= need) {
          sm.digit = top - j;
          sm.need = need - cum;
          sm.bin = h[j];
        }
        cum += h[j];
      }
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(sm.digit) << shift;
    mask |= kDigitMask << shift;
    need = sm.need;
    if (sm.bin == need || shift == 0) break;  // every element of the bin is taken, or no bits left to refine
  }

  // Ordered compaction: elements above the pivot prefix, and the first `need` (by position) equal to it.
  const int count = take_all ? valid_total : k;
  int out_base = 0, eq_base = 0, parity = 0;
  src.load(first, n, key);
  for (int t0 = 0; t0 < n && out_base < count; t0 += kTile, parity ^= 1) {
    src.load(t0 + kTile + first, n, next);
    unsigned gt[kItems], eq[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const bool valid = key[i] > kNegInfKey;
      const uint32_t rel = (key[i] - range.base) & mask;
      gt[i] = __ballot_sync(0xffffffffu, valid && (take_all || rel > prefix));
      eq[i] = __ballot_sync(0xffffffffu, valid && !take_all && rel == prefix);
    }
    const int eq_avail = max(need - eq_base, 0);
    const uint32_t agg = compact_round(src, sink, t0 + first, key, gt, eq, out_base, eq_avail, parity, sm);
    out_base += static_cast<int>(agg >> 16) + min(static_cast<int>(agg & 0xFFFFu), eq_avail);
    eq_base += static_cast<int>(agg & 0xFFFFu);
#pragma unroll
    for (int i = 0; i < kItems; ++i) key[i] = next[i];
  }
  __syncthreads();
  return out_base;
}

// One warp's select of the best min(k, #valid) pool entries [0, n) into out (positions ascending, -1 padded to k):
// the same order and result as block_topk, with 8-bit digits of key - range.base and a private 256-bin histogram,
// and only warp-level synchronization, so the CTA's warps answer different rows at once. Returns the count.
__device__ int warp_topk(const PoolSrc& src, int n, int k, int32_t* __restrict__ out, int* hist, KeyRange range) {
  constexpr int kWarpBins = 256, kPerLane = kWarpBins / 32;
  const int lane = threadIdx.x & 31;
  const unsigned below = (1u << lane) - 1u;
  uint32_t prefix = 0, mask = 0;
  int need = k, valid_total = 0;
  bool take_all = false;
  for (int pass = 0, shift = range.first_shift;; ++pass, shift = max(shift - 8, 0)) {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) hist[lane + 32 * j] = 0;
    __syncwarp();
    for (int e = lane; e < n; e += 32) {
      const uint32_t rel = src.keys[e] - range.base;
      if ((rel & mask) == prefix) atomicAdd(&hist[(rel >> shift) & 0xFFu], 1);
    }
    __syncwarp();
    const int top = kWarpBins - 1 - lane * kPerLane;  // lane owns bins top .. top-7 (best first)
    int h[kPerLane], sum = 0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) sum += (h[j] = hist[top - j]);
    int incl = sum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int t = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += t;
    }
    const int total = __shfl_sync(0xffffffffu, incl, 31);
    if (pass == 0) valid_total = total;
    if (total < need) {  // fewer entries than k (first pass only): take them all
      take_all = true;
      break;
    }
    const int excl = incl - sum;
    int digit = 0, rest = 0, bin = 0;
    if (excl < need && incl >= need) {
      int cum = excl;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        if (cum < need && cum + h[j] >= need) digit = top - j, rest = need - cum, bin = h[j];
        cum += h[j];
      }
    }
    const int src_lane = __ffs(__ballot_sync(0xffffffffu, excl < need && incl >= need)) - 1;
    digit = __shfl_sync(0xffffffffu, digit, src_lane);
    need = __shfl_sync(0xffffffffu, rest, src_lane);
    bin = __shfl_sync(0xffffffffu, bin, src_lane);
    prefix |= static_cast<uint32_t>(digit) << shift;
    mask |= 0xFFu << shift;
    __syncwarp();  // the histogram is cleared again next pass
    if (bin == need || shift == 0) break;
  }
  const int count = take_all ? valid_total : k;
  int out_base = 0, eq_seen = 0;
  for (int e0 = 0; e0 < n && out_base < count; e0 += 32) {
    const int e = e0 + lane;
    const uint32_t rel = e < n ? ((src.keys[e] - range.base) & mask) : 0u;
    const bool in = e < n;
    const unsigned gt = __ballot_sync(0xffffffffu, in && (take_all || rel > prefix));
    const unsigned eq = __ballot_sync(0xffffffffu, in && !take_all && rel == prefix);
    const int eq_avail = max(need - eq_seen, 0);
    const int c = __popc(eq & below);
    if (((gt >> lane) & 1u) || (((eq >> lane) & 1u) && c < eq_avail))
      out[out_base + __popc(gt & below) + min(c, eq_avail)] = src.positions[e];
    out_base += __popc(gt) + min(__popc(eq), eq_avail);
    eq_seen += __popc(eq);
  }
  for (int s = count + lane; s < k; s += 32) out[s] = -1;
  return count;
}

// Appends the keys of src[0, n) (positions first_pos + e) above `keep_above` through sink in order and folds their
// range into sm.lo / sm.hi; returns how many (uniform). Every thread of the CTA must call it.
template <int T, class Src, class Sink>
__device__ int append_new_keys(const Src& src, int n, int first_pos, uint32_t keep_above, const Sink& sink,
                               SelectSmem<T>& sm) {
  constexpr int kTile = Block<T>::kTile;
  struct Shifted {  // positions first_pos + e
    const Src& src;
    int first_pos;
    __device__ __forceinline__ int pos(int e) const { return first_pos + e; }
  } shifted{src, first_pos};
  const int first = lane_first();
  uint32_t lo = 0xFFFFFFFFu, hi = 0u;
  int out_base = 0, parity = 0;
  for (int t0 = 0; t0 < n; t0 += kTile, parity ^= 1) {
    uint32_t key[kItems];
    src.load(t0 + first, n, key);
    unsigned take[kItems], none[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const bool keep = key[i] > keep_above;
      take[i] = __ballot_sync(0xffffffffu, keep);
      none[i] = 0u;
      if (keep) lo = min(lo, key[i]), hi = max(hi, key[i]);
    }
    const uint32_t kept = compact_round(shifted, sink, t0 + first, key, take, none, out_base, 0, parity, sm);
    out_base += static_cast<int>(kept >> 16);
  }
  if (lo <= hi) atomicMin(&sm.lo, lo), atomicMax(&sm.hi, hi);
  __syncthreads();
  return out_base;
}

__device__ __forceinline__ int row_limit(int r, int off, int step, int sk) {
  const long long l = static_cast<long long>(off) + static_cast<long long>(r) * step;
  return static_cast<int>(l < 0 ? 0 : (l > sk ? sk : l));
}

__device__ __forceinline__ void finish_row(int32_t* out, int32_t* count, int cnt, int k) {
  for (int s = cnt + threadIdx.x; s < k; s += kRowThreads) out[s] = -1;
  if (threadIdx.x == 0) *count = cnt;
}

// kPool: shared score vector, rows answered from a shared-memory pool; otherwise each row is scanned in global memory.
template <bool kPool>
__global__ void __launch_bounds__(kPool ? kPoolThreads : kRowThreads)
    topk_select_kernel(const float* __restrict__ scores, int64_t sb, int64_t sh, int64_t srow, int heads, int rows,
                       int sk, int k, int off, int step, int rows_per_cta, int32_t* __restrict__ out,
                       int32_t* __restrict__ counts) {
  constexpr int T = kPool ? kPoolThreads : kRowThreads;
  __shared__ SelectSmem<T> sm;
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
    // Thresholds only rise along the rows, so a new key no better than the k-th best of [0, l0) is never selected:
    // the pool keeps the new keys above it (all valid new keys while [0, l0) has fewer than k).
    if (threadIdx.x == 0) sm.lo = 0xFFFFFFFFu, sm.hi = 0u;
    __syncthreads();
    uint32_t lo = 0xFFFFFFFFu, hi = 0u;
    for (int e = threadIdx.x; e < n0; e += T) lo = min(lo, pool_keys[e]), hi = max(hi, pool_keys[e]);
    if (n0 > 0) atomicMin(&sm.lo, lo), atomicMax(&sm.hi, hi);
    __syncthreads();
    const uint32_t keep_above = n0 >= k ? sm.lo : kNegInfKey;
    __syncthreads();  // every thread has read sm.lo before the append folds new keys into it
    const int n_new = append_new_keys(GlobalSrc{base + l0}, l1 - l0, l0, keep_above,
                                      PoolSink{pool_keys + n0, pool_pos + n0}, sm);
    const int n_all = n0 + n_new;
    // Each warp answers every (T / 32)-th row of the chunk from the pool, with its own slice of the histogram.
    const KeyRange range = key_range(sm.lo, sm.hi, 8);
    const PoolSrc src{pool_keys, pool_pos};
    const int warp = threadIdx.x >> 5;
    for (int r = r0 + warp; r < r1; r += Block<T>::kWarps) {
      // Pool entries of row r: the first selection and the kept new keys below its limit (binary search).
      const int lim = row_limit(r, off, step, sk);
      int a = n0, b = n_all;
      while (a < b) {
        const int m = (a + b) >> 1;
        if (pool_pos[m] < lim) a = m + 1; else b = m;
      }
      const int cnt = warp_topk(src, a, k, out_bh + static_cast<int64_t>(r) * k, sm.hist + warp * 256, range);
      if ((threadIdx.x & 31) == 0) cnt_bh[r] = cnt;
    }
  } else {
    for (int r = r0; r < r1; ++r) {
      int32_t* o = out_bh + static_cast<int64_t>(r) * k;
      const float* row = base + r * srow;
      const int cnt = block_topk(GlobalSrc{row}, row_limit(r, off, step, sk), k, GlobalSink{o}, sm);
      finish_row(o, cnt_bh + r, cnt, k);
    }
  }
}

// Pool bytes of a CTA answering `per` rows (keys and positions of k + (per - 1) * step entries).
inline size_t pool_bytes(int64_t k, int64_t step, int64_t per) { return static_cast<size_t>((k + (per - 1) * step) * 8); }

// Resident pool-mode CTAs per SM for `smem` dynamic bytes: the last answer per device is cached (repeated calls of
// one shape skip the occupancy query).
inline cudaError_t resident_ctas(size_t smem, int* resident) {
  static std::atomic<uint64_t> cache[sparsek_device::kCachedDevices] = {};  // smem << 16 | resident, 0 = none
  const int dev = sparsek_device::current();
  const bool cacheable = dev >= 0 && dev < sparsek_device::kCachedDevices;
  if (cacheable) {
    const uint64_t c = cache[dev].load(std::memory_order_relaxed);
    if (c != 0 && (c >> 16) == smem) {
      *resident = static_cast<int>(c & 0xFFFFu);
      return cudaSuccess;
    }
  }
  int n = 1;
  const cudaError_t err =
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, topk_select_kernel<true>, kPoolThreads, smem);
  if (err != cudaSuccess) return err;
  n = n < 1 ? 1 : (n > 0xFFFF ? 0xFFFF : n);
  if (cacheable)
    cache[dev].store((static_cast<uint64_t>(smem) << 16) | static_cast<uint64_t>(n), std::memory_order_relaxed);
  *resident = n;
  return cudaSuccess;
}

// SPARSEK_SELECT_ROWS_PER_CTA=n (1-kMaxRowsPerCta) forces the pool mode's rows per CTA (a tuning knob; unset = heuristic).
inline int rows_per_cta_override() {
  static const int v = [] {
    const char* e = std::getenv("SPARSEK_SELECT_ROWS_PER_CTA");
    const int n = e ? std::atoi(e) : 0;
    return n >= 1 && n <= kMaxRowsPerCta ? n : 0;
  }();
  return v;
}

}  // namespace sk_sparse

extern "C" int sk_sparse_abi_version(void) { return 6; }

extern "C" int sk_topk_select(const float* scores, int64_t score_batch_stride, int64_t score_head_stride,
                              int64_t score_row_stride, int32_t batch, int32_t heads, int32_t rows, int32_t seqlen_k,
                              int32_t k, int32_t off, int32_t step, int32_t* out_indices, int32_t* out_counts,
                              void* stream) {
  using namespace sk_sparse;
  if (batch < 0 || heads < 0 || rows < 0 || seqlen_k < 0 || k < 1 || step < 0) return cudaErrorInvalidValue;
  if (batch == 0 || heads == 0 || rows == 0) return cudaSuccess;
  if (static_cast<int64_t>(batch) * heads > 65535) return cudaErrorInvalidConfiguration;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int bh = batch * heads;
  // Pool bytes: kMaxPoolBytes, or what the device's shared memory leaves beside the kernel's static part.
  const int64_t pool_limit = std::min<int64_t>(
      kMaxPoolBytes, sparsek_device::max_smem_optin() - static_cast<int64_t>(sizeof(SelectSmem<kPoolThreads>)) - 1024);
  const int64_t max_pool = pool_limit / 8;
  const bool pool = score_row_stride == 0 && static_cast<int64_t>(k) + step <= max_pool;
  if (pool) {
    // Rows per CTA: as few as let the grid fill one wave of resident CTAs (each CTA first selects over its global
    // prefix, the dominant cost, so fewer CTAs per head repeat it less often), at most kMaxRowsPerCta and no more
    // than the pool allows.
    const int64_t fit = step > 0 ? (max_pool - k) / step + 1 : kMaxRowsPerCta;
    static std::atomic<uint64_t> smem_raised{0};
    const void* pool_kernel = reinterpret_cast<const void*>(topk_select_kernel<true>);
    cudaError_t err = sparsek_device::allow_dynamic_smem(smem_raised, pool_kernel, static_cast<int>(pool_limit));
    if (err != cudaSuccess) return err;
    int resident = 1;
    err = resident_ctas(pool_bytes(k, step, fit < 8 ? fit : 8), &resident);
    if (err != cudaSuccess) return err;
    const int64_t slots = static_cast<int64_t>(resident) * sparsek_device::num_sms();
    const int64_t chunks = slots >= bh ? slots / bh : 1;  // CTAs per (batch, head) within one wave
    int64_t per = (rows + chunks - 1) / chunks;
    if (rows_per_cta_override() > 0) per = rows_per_cta_override();
    per = per < 1 ? 1 : (per > kMaxRowsPerCta ? kMaxRowsPerCta : per);
    per = per > fit ? fit : per;
    const int rpc = static_cast<int>(per);
    dim3 grid((rows + rpc - 1) / rpc, bh);
    topk_select_kernel<true><<<grid, kPoolThreads, pool_bytes(k, step, per), st>>>(
        scores, score_batch_stride, score_head_stride, 0, heads, rows, seqlen_k, k, off, step, rpc, out_indices,
        out_counts);
  } else {
    dim3 grid(rows, bh);
    topk_select_kernel<false><<<grid, kRowThreads, 0, st>>>(scores, score_batch_stride, score_head_stride,
                                                         score_row_stride, heads, rows, seqlen_k, k, off, step, 1,
                                                         out_indices, out_counts);
  }
  return cudaGetLastError();
}
