// Block-union key lists with per-key query intervals (per-query SparseK selection run as block kernels): the CUDA
// version of sparsek.selection_intervals.block_union_intervals, bit-identical to it (same lists, same order, same
// intervals, same counts). See sparse_abi.h for the contract and selection_intervals.py for the construction.
//
// One CTA per (batch, head, query block m):
//   1. t_full = #{t < bs : finite keys in [0, clamp(l0 + t, 0, Sk)) < k}, l0 = off + m*bs.
//   2. The ranks of S, block m's first-query selection, sorted ascending (best first) into srt[0, n_s). By sets_mode:
//      SK_SETS_SCAN (per_query_block_lists): read off `order` (scan_first_set), already ascending;
//      SK_SETS_KEYS: the ranks of first_sets' keys through a bitmap over the rank range [0, Sk) (keys are distinct:
//      ranks are set once, then read back in order), or by a bitonic sort in shared memory when the bitmap would
//      cost more or a CTA finds a repeated entry (then the sort keeps the repeats, as the reference does).
//   3. Strong members srt[0, n_strong) go straight to the output (key = order[rank], interval = the whole block);
//      the n_w weakest srt[n_strong, n_s) are W; N = keys l0 + s entering inside the block.
//   4. One thread per candidate c of W ∪ N: the W members that beat it by a binary search of W's ascending ranks,
//      the entered beaters and `until` by a loop over the N candidates' ranks in shared memory; a block-wide scan
//      compacts the kept candidates (W in rank order, then N in position order) behind the strong members; padding
//      and the count last.
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>
#include <cub/block/block_scan.cuh>

#include "device_info.cuh"
#include "sparse_abi.h"

namespace sk_intervals {

constexpr int kThreads = 256;
constexpr int kBig = 0x7fffffff;  // rank of padding / invalid candidates (every valid rank is < Sk <= kBig)
constexpr int kShift = 16;        // INTERVAL_SHIFT
constexpr int kMaxBlock = 1024;   // largest block_size the kernel takes
constexpr int kScanPer = 8;       // order entries per thread and round of scan_first_set

using BlockScan = cub::BlockScan<int, kThreads>;

struct StaticSmem {  // all of the kernel's static shared memory: the launcher gives the rest of the opt-in to smem[]
  typename BlockScan::TempStorage scan;
  int warp_counts[kThreads / 32];  // scan_first_set
};

// Block m's first-query selection read off the key order. Its first query sees keys [0, L), L = clamp(off + m * bs,
// 0, Sk), and selects the target = min(k, fin_prefix[L]) best of them whose score is not -inf, i.e. the first entries
// of `order` (keys by rank, -inf keys last) that lie below L. The CTA scans `order` from the best key until it has
// found them (about k * Sk / L entries for long prefixes, the whole order only while L < k) and writes their ranks,
// ascending, to srt[0, target). Each round reads kScanPer consecutive entries per thread (independent loads in
// flight) and places them by a warp scan plus the warps' totals. Needs a barrier before srt is read.
__device__ __forceinline__ void scan_first_set(const int32_t* __restrict__ ord, int sk, int L, int target, int* srt,
                                               int* warp_counts) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int found = 0;  // entries placed so far (the same in every thread)
  for (int64_t start = 0; start < sk && found < target; start += kThreads * kScanPer) {
    const int64_t i0 = start + static_cast<int64_t>(threadIdx.x) * kScanPer;
    int keys[kScanPer];
    int mine = 0;
#pragma unroll
    for (int e = 0; e < kScanPer; ++e) {
      keys[e] = i0 + e < sk ? __ldg(ord + i0 + e) : sk;
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
    for (int e = 0; e < kScanPer; ++e) {
      if (keys[e] < L) {
        if (pos < target) srt[pos] = static_cast<int>(i0 + e);
        ++pos;
      }
    }
    found += total;
    __syncthreads();  // warp_counts is rewritten in the next round
  }
}

struct Args {
  const int32_t* ranks;       // [B, H, Sk]
  const int32_t* order;       // [B, H, Sk]: key of each rank
  const int32_t* fin_prefix;  // [B, H, Sk + 1]: selectable (not -inf) keys in [0, j)
  const int32_t* first_sets;  // [B, H, nb, K1] (unused with SK_SETS_SCAN)
  int32_t* lists;             // [B, H, nb, n]
  int32_t* intervals;         // [B, H, nb, n]
  int32_t* counts;            // [B, H, nb]
  int64_t off, seqlen_q;
  int32_t nb, sets, pow2, sk, k, bs, nw, n, words;  // words = 0: sort mode (no bitmap)
  int32_t sets_mode;                                // SK_SETS_KEYS or SK_SETS_SCAN
};

__device__ __forceinline__ void bitonic_sort(int* s, int p) {
  for (int size = 2; size <= p; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < (p >> 1); i += kThreads) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const bool asc = (lo & size) == 0;
        const int a = s[lo], b = s[hi];
        if ((a > b) == asc) {
          s[lo] = b;
          s[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

__global__ void __launch_bounds__(kThreads) interval_build_kernel(const Args a) {
  __shared__ StaticSmem st;
  typename BlockScan::TempStorage& scan = st.scan;
  extern __shared__ __align__(16) int smem[];
  const int C = a.nw + a.bs - 1;
  int* srt = smem;                                            // [pow2] sorted ranks of S
  uint32_t* bitmap = reinterpret_cast<uint32_t*>(srt + a.pow2);  // [words]
  int* cr = reinterpret_cast<int*>(bitmap + a.words);         // [C] candidate ranks: W then N
  int* wkey = cr + C;                                         // [nw] keys of W

  const int tid = threadIdx.x;
  const int64_t cta = blockIdx.x;  // (b * H + h) * nb + m
  const int m = static_cast<int>(cta % a.nb);
  const int64_t bh = cta / a.nb;
  const int sk = a.sk;
  const int32_t* rk = a.ranks + bh * sk;
  const int32_t* ord = a.order + bh * sk;
  const int32_t* fp = a.fin_prefix + bh * (static_cast<int64_t>(sk) + 1);
  const int32_t* fs = a.sets_mode == SK_SETS_KEYS ? a.first_sets + cta * a.sets : nullptr;  // null with SK_SETS_SCAN
  int32_t* out_l = a.lists + cta * a.n;
  int32_t* out_i = a.intervals + cta * a.n;
  const int64_t l0 = a.off + static_cast<int64_t>(m) * a.bs;  // unclamped prefix of the block's first query
  const int64_t rem = a.seqlen_q - static_cast<int64_t>(m) * a.bs;
  const int64_t nq = rem < a.bs ? rem : a.bs;  // queries in the block (may be <= 0)

  // 1. t_full (fin_prefix is non-decreasing in the prefix length).
  int t_full = 0;
  for (int t0 = 0; t0 < a.bs; t0 += kThreads) {
    const int t = t0 + tid;
    bool below = false;
    if (t < a.bs) {
      int64_t lt = l0 + t;
      lt = lt < 0 ? 0 : (lt > sk ? sk : lt);
      below = fp[lt] < a.k;
    }
    t_full += __syncthreads_count(below);
  }

  // 2. S's ranks, sorted ascending, into srt[0, n_s).
  int n_s = 0;
  bool sort = a.words == 0 && a.sets_mode == SK_SETS_KEYS;
  if (a.sets_mode == SK_SETS_SCAN) {
    const int L = static_cast<int>(l0 < 0 ? 0 : (l0 > sk ? sk : l0));
    n_s = min(a.k, fp[L]);
    scan_first_set(ord, sk, L, n_s, srt, st.warp_counts);
  } else if (!sort) {
    for (int w = tid; w < a.words; w += kThreads) bitmap[w] = 0u;
    __syncthreads();
    int repeated = 0;
    for (int i0 = 0; i0 < a.sets; i0 += kThreads) {
      const int i = i0 + tid;
      bool valid = false, rep = false;
      if (i < a.sets) {
        const int key = fs[i];
        valid = key >= 0 && key < sk;
        if (valid) {
          const int r = __ldg(rk + key);
          const uint32_t bit = 1u << (r & 31);
          rep = (atomicOr(bitmap + (r >> 5), bit) & bit) != 0u;
        }
      }
      n_s += __syncthreads_count(valid);
      repeated |= __syncthreads_or(rep);
    }
    if (repeated) {
      sort = true;  // uniform: a repeated entry must stay repeated, as in the reference's sort
    } else {
      int base = 0;
      for (int w0 = 0; w0 < a.words; w0 += kThreads) {
        const int w = w0 + tid;
        uint32_t x = w < a.words ? bitmap[w] : 0u;
        int excl, agg;
        BlockScan(scan).ExclusiveSum(__popc(x), excl, agg);
        int p = base + excl;
        while (x) {
          const int bitpos = __ffs(x) - 1;
          x &= x - 1u;
          srt[p++] = w * 32 + bitpos;
        }
        base += agg;
        __syncthreads();  // scan storage reuse
      }
    }
  }
  if (sort) {
    int valid_count = 0;
    for (int i0 = 0; i0 < a.pow2; i0 += kThreads) {
      const int i = i0 + tid;
      bool valid = false;
      if (i < a.pow2) {
        int r = kBig;
        if (i < a.sets) {
          const int key = fs[i];
          valid = key >= 0 && key < sk;
          if (valid) r = __ldg(rk + key);
        }
        srt[i] = r;
      }
      valid_count += __syncthreads_count(valid);
    }
    n_s = valid_count;
    bitonic_sort(srt, a.pow2);  // begins after the barrier above, ends with one
  }
  __syncthreads();

  // 3. Strong members to the output; W and N ranks into cr.
  const int n_w = n_s < a.nw ? n_s : a.nw;
  const int n_strong = n_s - n_w;
  const int32_t strong_iv = static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint64_t>(nq) << kShift));
  for (int p = tid; p < n_s; p += kThreads) {
    const int r = srt[p];
    const int key = __ldg(ord + r);
    if (p < n_strong) {
      if (p < a.n) {
        out_l[p] = key;
        out_i[p] = strong_iv;
      }
    } else {
      cr[p - n_strong] = r;
      wkey[p - n_strong] = key;
    }
  }
  for (int j = n_w + tid; j < a.nw; j += kThreads) {
    cr[j] = kBig;
    wkey[j] = -1;
  }
  for (int s = tid; s < a.bs - 1; s += kThreads) {
    const int64_t key = l0 + s;
    const bool ok = key >= 0 && key < sk && s + 1 < nq;
    cr[a.nw + s] = ok ? __ldg(rk + key) : kBig;
  }
  __syncthreads();

  // 4. Candidates: keep, interval, compaction behind the strong members.
  const int64_t room0 = static_cast<int64_t>(a.k) - n_strong;
  int kept = 0;
  for (int c0 = 0; c0 < C; c0 += kThreads) {
    const int c = c0 + tid;
    bool keep = false;
    int key = -1;
    int32_t iv = 0;
    if (c < C) {
      const int rc = cr[c];
      if (rc != kBig) {  // a valid candidate (W slot < n_w, or an N key inside [0, Sk) and the block)
        const int64_t key64 = c < a.nw ? static_cast<int64_t>(wkey[c]) : l0 + (c - a.nw);
        key = static_cast<int>(key64);
        const bool fin = fp[key64 + 1] != fp[key64];
        const int64_t lo_raw = key64 - l0 + 1;
        const int64_t lo = lo_raw < 0 ? 0 : lo_raw;
        int beaten = 0, hi_w = a.nw;  // W members with a rank below rc: cr[0, nw) ascends (kBig padding last)
        while (beaten < hi_w) {
          const int mid = (beaten + hi_w) >> 1;
          if (cr[mid] < rc) {
            beaten = mid + 1;
          } else {
            hi_w = mid;
          }
        }
        const int64_t room = room0 - beaten;
        int64_t until = room > 0 ? 1 : 0;
        int entered = 0;
        for (int s = 0; s < a.bs - 1; ++s) {
          entered += cr[a.nw + s] < rc;
          if (entered >= room) break;  // entered only grows: no later s counts
          ++until;
        }
        int64_t hi = until > t_full ? until : t_full;
        hi = hi < nq ? hi : nq;
        keep = fin && lo < hi;
        if (keep) iv = static_cast<int32_t>(lo | (hi << kShift));
      }
    }
    int excl, agg;
    BlockScan(scan).ExclusiveSum(keep ? 1 : 0, excl, agg);
    const int64_t pos = static_cast<int64_t>(n_strong) + kept + excl;
    if (keep && pos < a.n) {
      out_l[pos] = key;
      out_i[pos] = iv;
    }
    kept += agg;
    __syncthreads();  // scan storage reuse
  }

  // 5. Padding and the count.
  const int64_t total = static_cast<int64_t>(n_strong) + kept;
  const int count = static_cast<int>(total < a.n ? total : a.n);
  for (int p = count + tid; p < a.n; p += kThreads) {
    out_l[p] = -1;
    out_i[p] = 0;
  }
  if (tid == 0) a.counts[cta] = count;
}

std::atomic<uint64_t> g_smem_raised{0};

}  // namespace sk_intervals

extern "C" int sk_interval_build(const int32_t* ranks, const int32_t* order, const int32_t* fin_prefix,
                                 const int32_t* first_sets, int32_t sets_mode, int32_t batch, int32_t heads,
                                 int32_t num_blocks, int32_t num_sets, int32_t seqlen_k, int32_t k, int64_t seqlen_q,
                                 int64_t off, int32_t block_size, int32_t width, int32_t* lists, int32_t* intervals,
                                 int32_t* counts, void* stream) {
  using namespace sk_intervals;
  if (batch < 0 || heads < 0 || num_blocks < 0 || num_sets < 1 || seqlen_k < 0 || seqlen_k == kBig || k < 1 ||
      block_size < 1 || block_size > kMaxBlock || width < 0 || sets_mode < SK_SETS_KEYS ||
      sets_mode > SK_SETS_SCAN || (sets_mode == SK_SETS_SCAN && num_sets != k))
    return cudaErrorInvalidValue;
  const int64_t ctas = static_cast<int64_t>(batch) * heads * num_blocks;
  if (ctas == 0) return cudaSuccess;
  if (ctas > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  int pow2 = 1;
  while (pow2 < num_sets) pow2 <<= 1;
  const int nw = block_size - 1 < k ? block_size - 1 : k;
  const int cands = nw + block_size - 1;
  const int words = static_cast<int>((static_cast<int64_t>(seqlen_k) + 31) / 32);
  int optin = 0;
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, sparsek_device::current());
  const int64_t avail = static_cast<int64_t>(optin) - static_cast<int64_t>(sizeof(StaticSmem));
  const int64_t base_bytes = 4 * (static_cast<int64_t>(pow2) + cands + nw);
  // The bitmap costs ~3 passes over Sk/32 words; the bitonic sort ~log2(p)^2/4 passes over p ranks.
  int lg = 0;
  while ((1 << lg) < pow2) ++lg;
  const int64_t sort_cost = static_cast<int64_t>(pow2 / 2) * lg * (lg + 1) / 2 + 64 * lg * (lg + 1) / 2;
  const int64_t bitmap_cost = 3 * static_cast<int64_t>(words) + num_sets;
  const bool bitmap = sets_mode == SK_SETS_KEYS && pow2 > 1 && bitmap_cost < sort_cost &&
                      base_bytes + 4 * static_cast<int64_t>(words) <= avail;
  const int64_t bytes = base_bytes + (bitmap ? 4 * static_cast<int64_t>(words) : 0);
  if (bytes > avail) return cudaErrorInvalidValue;
  if (bytes > 48 * 1024) {
    const cudaError_t err =
        sparsek_device::allow_dynamic_smem(g_smem_raised, reinterpret_cast<const void*>(interval_build_kernel),
                                           static_cast<int>(avail));
    if (err != cudaSuccess) return err;
  }
  Args a;
  a.ranks = ranks;
  a.order = order;
  a.fin_prefix = fin_prefix;
  a.first_sets = first_sets;
  a.lists = lists;
  a.intervals = intervals;
  a.counts = counts;
  a.off = off;
  a.seqlen_q = seqlen_q;
  a.nb = num_blocks;
  a.sets = num_sets;
  a.pow2 = pow2;
  a.sk = seqlen_k;
  a.k = k;
  a.bs = block_size;
  a.nw = nw;
  a.n = width;
  a.words = bitmap ? words : 0;
  a.sets_mode = sets_mode;
  interval_build_kernel<<<static_cast<unsigned>(ctas), kThreads, static_cast<size_t>(bytes),
                          static_cast<cudaStream_t>(stream)>>>(a);
  return cudaGetLastError();
}
