// Host-side dispatch of the FMHA forward kernel: validates what Python cannot, picks the tile configuration,
// raises the dynamic shared-memory limit once per instantiation and device and launches on the caller's stream.
#include <cuda_runtime.h>

#include <climits>
#include <cstdlib>
#include <cudaTypedefs.h>

#include "device_info.cuh"
#include "fmha_kernel.cuh"
#include "fmha_sm90.cuh"

namespace sparsek {

enum SkError : int {
  kErrBadHeadDim = -1,
  kErrBadIndexBlock = -2,
  kErrBadHeads = -3,
  kErrBadIndexRun = -4,
  kErrBadIntervals = -5,
};

template <int kD, int kWarps, int kMT, int kBN, typename T, bool kIntervals = false>
static cudaError_t launch(const SkFmhaParams& p, cudaStream_t stream) {
  using Tr = FmhaTraits<kD, kWarps, kMT, kBN, T, kIntervals>;
  constexpr int kBM = Tr::kBM;
  auto kernel = fmha_fwd_kernel<Tr>;
  static std::atomic<uint64_t> smem_set{0};
  if (const cudaError_t e = sparsek_device::allow_dynamic_smem(smem_set, (const void*)kernel, Tr::kSmemBytes)) return e;
  dim3 grid((p.seqlen_q + kBM - 1) / kBM, p.heads_q, p.batch);
  if (grid.x == 0 || grid.z == 0) return cudaSuccess;
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}


// Integer value of environment variable `name`, or `fallback` when it is unset or outside [lo, hi]. The knobs
// below read it once per process.
static int env_int(const char* name, int fallback, int lo = INT_MIN, int hi = INT_MAX) {
  const char* e = std::getenv(name);
  if (!e) return fallback;
  const int v = std::atoi(e);
  return (v >= lo && v <= hi) ? v : fallback;
}

// SPARSEK_FMHA_TILE=64|128 forces the query tile size (a tuning knob for benchmarks; 0/unset = heuristic).
static int tile_override() {
  static const int v = env_int("SPARSEK_FMHA_TILE", 0);
  return v;
}

static int num_sms() { return sparsek_device::num_sms(); }

// ---- Hopper path ------------------------------------------------------------------------------------------------
static PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

static int device_major() { return sparsek_device::major(); }

// 4-D map over [batch, rows, heads, dim] (innermost first: dim, rows, heads, batch), 64-column boxes, 128B swizzle.
static bool make_map(CUtensorMap* map, const void* ptr, bool bf16, int dim, int rows, int heads, int batch,
                     int64_t row_stride, int64_t head_stride, int64_t batch_stride, int box_rows) {
  auto fn = encode_fn();
  if (!fn) return false;
  if (reinterpret_cast<uintptr_t>(ptr) % 16) return false;
  const int64_t strides_el[3] = {row_stride, head_stride, batch_stride};
  cuuint64_t gdim[4] = {(cuuint64_t)dim, (cuuint64_t)rows, (cuuint64_t)heads, (cuuint64_t)batch};
  cuuint64_t gstride[3];
  for (int i = 0; i < 3; ++i) {
    int64_t st = strides_el[i] * 2;
    if (gdim[i + 1] == 1 && (st <= 0 || st % 16)) st = 16;  // unused extent: any legal stride
    if (st <= 0 || st % 16 || st >= (int64_t(1) << 40)) return false;
    gstride[i] = (cuuint64_t)st;
  }
  cuuint32_t box[4] = {64, (cuuint32_t)box_rows, 1, 1};
  cuuint32_t estride[4] = {1, 1, 1, 1};
  CUresult r = fn(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                  const_cast<void*>(ptr), gdim, gstride, box, estride, CU_TENSOR_MAP_INTERLEAVE_NONE,
                  CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

// SPARSEK_SM90_SCHED=0..3 picks the consumer schedule (bit 0 pipeline, bit 1 ping-pong; default 3, the fastest
// measured); a benchmarking knob.
static int sm90_schedule() {
  static const int v = env_int("SPARSEK_SM90_SCHED", 3, 0, 3);
  return v;
}

// SPARSEK_SM90_INDEX_PERSISTENT=0 launches index-list problems with one CTA per query tile instead of the persistent
// grid (measured faster for both block runs and token lists); a benchmarking knob.
static bool sm90_index_persistent() {
  static const bool v = env_int("SPARSEK_SM90_INDEX_PERSISTENT", 1) != 0;
  return v;
}

// SPARSEK_SM90_PERSISTENT=0: one CTA per query tile for dense/varlen launches without a causal band too (default: a
// persistent grid of one CTA per SM there); a benchmarking knob.
static bool sm90_dense_persistent() {
  static const bool v = env_int("SPARSEK_SM90_PERSISTENT", 1) != 0;
  return v;
}

// SPARSEK_SM90_D64_CONSUMERS=3: three consumer warpgroups (64 query rows each) in the dense head-dim-64 kernel
// instead of two; a benchmarking knob.
static int sm90_d64_consumers() {
  static const int v = env_int("SPARSEK_SM90_D64_CONSUMERS", 2) == 3 ? 3 : 2;
  return v;
}

// SPARSEK_SM90_SPLITS=N (1-8) forces the number of split-KV CTAs per query block (1 = never split); unset or 0 = the
// heuristic in sm90_splits; a benchmarking and testing knob.
static int sm90_splits_override() {
  static const int v = env_int("SPARSEK_SM90_SPLITS", 0, 0, 8);
  return v;
}

// The split sm90_splits starts from for `items` query blocks of `n_kv` key tiles (its fit checks only lower it):
// enough CTAs per block to fill the SMs when the grid is under half a wave, at least 4 key tiles each.
static int sm90_split_start(long items, int n_kv) {
  constexpr int kMinTilesPerSplit = 4;
  const int s = items * 2 <= num_sms() ? (int)(num_sms() / items) : 1;
  return s < n_kv / kMinTilesPerSplit ? s : n_kv / kMinTilesPerSplit;
}

// Split-KV for grids that leave most SMs idle (latency shapes, long keys with few query blocks): the keys of each
// query block are divided among up to 8 CTAs of one cluster, enough to fill the SMs, with at least 4 K/V tiles each
// (measured: 1-2 tiles per CTA lose to the unsplit kernel, the fixed cost of a CTA dominates) and no CTA left
// without a tile. `max_clusters(s)` = clusters of s CTAs that fit on the GPU at once: clusters must sit inside one
// GPC, so a split that needs a second wave of clusters is not taken.
template <typename MaxClusters>
static int sm90_splits(long items, int seqlen_k, int kBN, MaxClusters max_clusters) {
  const int n_kv = (seqlen_k + kBN - 1) / kBN;
  const int forced = sm90_splits_override();
  int s = forced ? forced : sm90_split_start(items, n_kv);
  s = s < 8 ? s : 8;
  s = s < n_kv ? s : n_kv;
  for (; s > 1; --s) {
    const int per = (n_kv + s - 1) / s;
    if ((n_kv + per - 1) / per != s) continue;  // some CTA would get no tile
    if (forced || items <= max_clusters(s)) break;
  }
  return s > 1 ? s : 1;
}

// SPARSEK_SM90_TAIL_SPLIT: unset = the heuristic in sm90_tail_splits; 0 or 1 = never split the tail; 2-8 = split it
// over that many CTAs per item where the split is possible. A benchmarking and testing knob.
static int sm90_tail_split_override() {
  static const int v = env_int("SPARSEK_SM90_TAIL_SPLIT", -1, -1, 8);
  return v;
}

// A persistent launch of `items` equal work items (`n_kv` key tiles each) on `grid` CTAs takes ceil(items / grid)
// rounds. When the last round is partial, its `tail` items can run instead as a second launch that splits each item's
// keys over s CTAs of a cluster (split-KV): ceil(tail / max_clusters(s)) waves of pieces of n_kv / s tiles, each
// piece with a fixed cost (prologue, cluster combine, epilogue) taken as kPieceTiles tile-times. Returns the s that
// finishes the tail soonest if it saves at least 15% of the last round, else 1 (no tail launch).
template <typename MaxClusters>
static int sm90_tail_splits(long items, int grid, int n_kv, MaxClusters max_clusters) {
  const long tail = items % grid;
  const int forced = sm90_tail_split_override();
  if (forced == 0 || forced == 1 || items <= grid || tail == 0) return 1;
  constexpr double kPieceTiles = 3.0;
  double best = 0.85 * n_kv;
  int best_s = 1;
  for (int s = 2; s <= 8; ++s) {
    const int per = (n_kv + s - 1) / s;
    if (per < 4 || (n_kv + per - 1) / per != s) continue;  // at least 4 tiles per piece, none empty
    if (forced > 1 && s != forced) continue;
    const int c = max_clusters(s);
    if (c <= 0) continue;
    const double cost = (double)((tail + c - 1) / c) * (per + kPieceTiles);
    if (forced > 1 || cost < best) best = cost, best_s = s;
  }
  return best_s;
}

// Query blocks of `rows` rows over all sequences and heads (the work items of a dense launch).
static long query_blocks(const SkFmhaParams& p, int rows) {
  return (long)((p.seqlen_q + rows - 1) / rows) * p.heads_q * p.batch;
}

// SPARSEK_SM90_SPLIT_KEYS=0/1 forces the split-keys kernel (two consumer warpgroups on alternate key tiles of one
// 64-row query block) off or on; unset = the heuristic in sm90_split_keys. A benchmarking and testing knob.
static int sm90_split_keys_override() {
  static const int v = env_int("SPARSEK_SM90_SPLIT_KEYS", -1, -1, 1);
  return v;
}

// Split keys when 64-row query blocks still fit in one wave of CTAs and the cluster split-KV (sm90_splits) would cut
// each block's keys at most in two: both halve a block's chain of dependent key tiles, and split keys does it inside
// one CTA without the cluster's launch and barriers. Measured on an H100 (PERF_NOTES v24/v26): with 2-7 key tiles
// per block, and with 8-16 where the cluster split would be 2 (1,8,1024,1024,64: 11.6 -> 9.6 us); a cluster split of
// 3 or more stays faster (2,8,256,1536,128: 15.8-16.1 vs 18.5 us).
static bool sm90_split_keys(const SkFmhaParams& p, int kBN) {
  const int forced = sm90_split_keys_override();
  if (forced >= 0) return forced == 1;
  if (sm90_splits_override() > 1) return false;
  const long items64 = query_blocks(p, 64), items128 = query_blocks(p, 128);
  const int n_kv = (p.seqlen_k + kBN - 1) / kBN;
  return items64 > 0 && items64 <= num_sms() && n_kv >= 2 && sm90_split_start(items128, n_kv) <= 2;
}

// Split keys with one full 256-key tile per warpgroup (wgmma n256; not pipelined: with the pipeline's registers S of
// 256 keys does not fit) instead of a chain of two 128-key tiles each: head dim 64, exactly 512 keys, no mask. H200,
// 2026-12-02, graph of 20 calls, µs: fp16 1,8,512,64 6.65-6.71 -> 6.14-6.21, bf16 6.59-6.68 -> 6.12-6.15, 128 queries
// x 512 keys 6.51-6.57 -> 5.91-5.96; slower wherever the second tile is partly empty or masked (384 keys 6.04-6.14 ->
// 7.43-7.53, 300 keys 6.40-6.54 -> 6.72-6.79; causal 512 unchanged), so it is used for unmasked full tiles only.
static bool sm90_split_keys_256(const SkFmhaParams& p) {
  return p.head_dim == 64 && p.seqlen_k == 512 && p.cu_seqlens_k == nullptr && p.window_left < 0 &&
         p.window_right < 0;
}

// SPARSEK_SM90_HALF_ROWS=0/1 forces the half-rows split-keys kernels (32 query rows per CTA) off or on wherever a
// split-keys kernel runs; unset = where twice the 64-row blocks still fit in one wave. A benchmarking and testing knob.
static bool sm90_half_rows(const SkFmhaParams& p) {
  static const int forced = env_int("SPARSEK_SM90_HALF_ROWS", -1, -1, 1);
  if (forced >= 0) return forced == 1;
  return 2 * query_blocks(p, 64) <= num_sms();
}

// SPARSEK_PDL=0 turns off programmatic dependent launch of the Hopper kernel (default on): with it, the next kernel
// on the stream may start its prologue while this one finishes, and this one waits (`griddepcontrol.wait`) for
// the previous kernel's memory before its first global access.
static bool sm90_pdl() {
  static const bool v = env_int("SPARSEK_PDL", 1) != 0;
  return v;
}

static bool sm90_disabled() {
  static const bool v = std::getenv("SPARSEK_DISABLE_SM90") != nullptr;
  return v;
}

// Launches the wgmma kernel when the call qualifies (Hopper, dense or varlen, 16-byte aligned strides); returns
// false (and launches nothing) otherwise so the caller uses the portable kernel.
template <int kD, int kBN, int kStages, typename T, int kSched, bool kIndex = false, int kConsumers = 2,
          bool kIntervals = false, bool kSplitKeys = false, bool kGather = false, bool kHalfRows = false>
static bool try_launch_sm90(const SkFmhaParams& p, cudaStream_t stream, cudaError_t* err) {
  using Tr =
      sm90::Sm90Traits<kD, kBN, kStages, T, kSched, kIndex, kConsumers, kIntervals, kSplitKeys, kGather, kHalfRows>;
  const bool varlen_q = p.cu_seqlens_q != nullptr, varlen_k = p.cu_seqlens_k != nullptr;
  const bool bf16 = p.is_bf16 != 0;
  sm90::TmaParams tma;  // item range and splits: set per launch (launch_items)
  if (!make_map(&tma.q, p.q, bf16, kD, p.total_q, p.heads_q, varlen_q ? 1 : p.batch, p.q_row_stride, p.q_head_stride,
                p.q_batch_stride, Tr::kBM) ||
      !make_map(&tma.k, p.k, bf16, kD, p.total_k, p.heads_kv, varlen_k ? 1 : p.batch, p.k_row_stride,
                p.k_head_stride, p.k_batch_stride, kBN) ||
      !make_map(&tma.v, p.v, bf16, kD, p.total_k, p.heads_kv, varlen_k ? 1 : p.batch, p.v_row_stride,
                p.v_head_stride, p.v_batch_stride, kBN))
    return false;
  // O's map for the index-list kernels' bulk-store epilogue (optional: without it they store with st.global).
  tma.o_ok = kIndex && !varlen_q &&
             make_map(&tma.o, p.o, bf16, kD, p.total_q, p.heads_q, p.batch, p.o_row_stride, p.o_head_stride,
                      p.o_batch_stride, 64);
  auto kernel = sm90::fmha_sm90_kernel<Tr>;
  static std::atomic<uint64_t> smem_set{0};
  if (const cudaError_t e = sparsek_device::allow_dynamic_smem(smem_set, (const void*)kernel, Tr::kSmemBytes)) {
    *err = e;
    return true;
  }
  // Persistent grid (one CTA per SM, each looping over work tiles) when every tile costs the same; with a causal
  // band or index lists the costs differ, and one CTA per tile lets the hardware balance them.
  const long items = query_blocks(p, Tr::kBM) * (kHalfRows ? 2 : 1);
  const bool balanced =
      kIndex ? sm90_index_persistent() : sm90_dense_persistent() && !(p.window_right >= 0 && p.window_left < 0);
  const int grid = (int)((items < num_sms() || !balanced) ? items : num_sms());
  if (grid == 0) {
    *err = cudaSuccess;
    return true;
  }
  // Split-KV decision; the launch configuration also serves the cluster-occupancy query.
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.blockDim = dim3(Tr::kThreads);
  cfg.dynamicSmemBytes = Tr::kSmemBytes;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  auto max_clusters = [&](int s) {
    // Per device and cluster size; the query is a host-side occupancy calculation.
    static std::atomic<int> cache[sparsek_device::kCachedDevices][9] = {};
    const int dev = sparsek_device::current();
    const bool cached = dev >= 0 && dev < sparsek_device::kCachedDevices;
    int v = cached ? cache[dev][s].load(std::memory_order_relaxed) : 0;
    if (v == 0) {
      attr[0].val.clusterDim.x = (unsigned)s;
      cfg.gridDim = dim3((unsigned)s);
      int n = 0;
      v = cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) == cudaSuccess && n > 0 ? n : -1;
      cudaGetLastError();
      if (cached) cache[dev][s].store(v, std::memory_order_relaxed);
    }
    return v;
  };
  // One launch of the work items [begin, end) (end 0: all of them) on `grid_x` CTAs. With `split` > 1 (split-KV) it
  // is one cluster of `split` CTAs per item (the kernel reuses its K/V ring for the partials, so every CTA must own
  // exactly one item).
  auto launch_items = [&](int begin, int end, int split, unsigned grid_x) {
    tma.item_begin = begin, tma.item_end = end, tma.splits = split;
    attr[0].val.clusterDim.x = (unsigned)split;
    cfg.gridDim = dim3(grid_x);
    cfg.attrs = split == 1 ? attr + 1 : attr;
    cfg.numAttrs = (split == 1 ? 0 : 1) + (sm90_pdl() ? 1 : 0);
    return cudaLaunchKernelEx(&cfg, kernel, p, tma);
  };
  const int splits = (kIndex || kSplitKeys) ? 1 : sm90_splits(items, p.seqlen_k, kBN, max_clusters);
  // A persistent dense launch whose last round is partial: the whole rounds in the first launch, the tail split-KV in
  // a second. Only without a window, where every item has all the key tiles (the cost model's assumption).
  const bool equal_items = !kIndex && !kSplitKeys && !varlen_q && !varlen_k && p.window_left < 0 && p.window_right < 0;
  const int tail_splits = equal_items && splits == 1 && balanced && grid == num_sms()
                              ? sm90_tail_splits(items, grid, (p.seqlen_k + kBN - 1) / kBN, max_clusters)
                              : 1;
  if (tail_splits == 1) {
    *err = launch_items(0, 0, splits, splits == 1 ? (unsigned)grid : (unsigned)(items * splits));
    return true;
  }
  const long full = items - items % grid;
  *err = launch_items(0, (int)full, 1, (unsigned)grid);
  if (*err == cudaSuccess)
    *err = launch_items((int)full, (int)items, tail_splits, (unsigned)((items - full) * tail_splits));
  return true;
}

template <typename T>
static bool dispatch_sm90(const SkFmhaParams& p, cudaStream_t stream, cudaError_t* err) {
  if (device_major() != 9 || sm90_disabled() || p.block_table || p.seqused_k) return false;
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr)) return false;
  if (p.kv_indices) {
    // Index lists: one list per 128-row query tile, runs of whole 128-key tiles, dense (not varlen) inputs.
    if (p.index_block_q != 128 || (p.kv_index_run > 1 && p.kv_index_run % 128 != 0) || p.cu_seqlens_q) return false;
    // Gathered rows (lists of single keys, not runs) are addressed by 31-bit offsets in 16-byte units from the
    // (batch, head) base, with 32-bit byte row strides.
    const int64_t max_row = p.seqlen_k > 0 ? p.seqlen_k - 1 : 0;
    auto gather_fits = [&](int64_t row_stride) {
      return row_stride < (int64_t(1) << 31) && max_row * row_stride * 2 / 16 < (int64_t(1) << 31);
    };
    if (p.kv_index_run <= 1 && !(gather_fits(p.k_row_stride) && gather_fits(p.v_row_stride))) return false;
    if (p.kv_intervals) {
      switch (p.head_dim) {
        case 64: return try_launch_sm90<64, 128, 4, T, 3, true, 2, true, false, true>(p, stream, err);
        case 128: return try_launch_sm90<128, 128, 2, T, 3, true, 2, true, false, true>(p, stream, err);
        default: return false;
      }
    }
    // Block runs arrive by TMA alone (one producer warpgroup); token lists get a second one for the V gathers.
    const bool runs = p.kv_index_run > 1;
    switch (p.head_dim) {
      case 64:
        return runs ? try_launch_sm90<64, 128, 4, T, 3, true>(p, stream, err)
                    : try_launch_sm90<64, 128, 4, T, 3, true, 2, false, false, true>(p, stream, err);
      case 128:
        return runs ? try_launch_sm90<128, 128, 2, T, 3, true>(p, stream, err)
                    : try_launch_sm90<128, 128, 2, T, 3, true, 2, false, false, true>(p, stream, err);
      default: return false;
    }
  }
  // Opt-in: three consumer warpgroups (192-row query tiles, FA3's head-dim-64 tile), round-robin ping-pong without
  // the intra-warpgroup pipeline (which spills at 160 registers per consumer). Measured slower than two consumers
  // (PERF_NOTES.md, v10-v11), so it is a benchmarking knob.
  if (p.head_dim == 64 && sm90_d64_consumers() == 3)
    return try_launch_sm90<64, 128, 4, T, 2, false, 3>(p, stream, err);
  // Small grids: two warpgroups on alternate key tiles of one 64-row query block (pipelined, no ping-pong: each
  // warpgroup's chain of dependent tiles is what bounds these shapes).
  if ((p.head_dim == 64 || p.head_dim == 128) && sm90_split_keys(p, 128)) {
    const bool half = sm90_half_rows(p);
    if (sm90_split_keys_256(p))
      return half ? try_launch_sm90<64, 256, 2, T, 0, false, 2, false, true, false, true>(p, stream, err)
                  : try_launch_sm90<64, 256, 2, T, 0, false, 2, false, true>(p, stream, err);
    if (p.head_dim == 64)
      return half ? try_launch_sm90<64, 128, 4, T, 1, false, 2, false, true, false, true>(p, stream, err)
                  : try_launch_sm90<64, 128, 4, T, 1, false, 2, false, true>(p, stream, err);
    return half ? try_launch_sm90<128, 128, 2, T, 1, false, 2, false, true, false, true>(p, stream, err)
                : try_launch_sm90<128, 128, 2, T, 1, false, 2, false, true>(p, stream, err);
  }
  switch (p.head_dim * 10 + sm90_schedule()) {
    case 640: return try_launch_sm90<64, 128, 4, T, 0>(p, stream, err);
    case 641: return try_launch_sm90<64, 128, 4, T, 1>(p, stream, err);
    case 642: return try_launch_sm90<64, 128, 4, T, 2>(p, stream, err);
    case 643: return try_launch_sm90<64, 128, 4, T, 3>(p, stream, err);
    case 1280: return try_launch_sm90<128, 128, 2, T, 0>(p, stream, err);
    case 1281: return try_launch_sm90<128, 128, 2, T, 1>(p, stream, err);
    case 1282: return try_launch_sm90<128, 128, 2, T, 2>(p, stream, err);
    case 1283: return try_launch_sm90<128, 128, 2, T, 3>(p, stream, err);
    default:
      return false;
  }
}

template <typename T>
static cudaError_t dispatch(const SkFmhaParams& p, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (dispatch_sm90<T>(p, stream, &err)) return err;
  // Small grids leave SMs idle with 128-row tiles: use 64-row tiles when 128 would give under two waves.
  bool small_tiles;
  if (p.kv_indices) {
    small_tiles = p.index_block_q == 64;
  } else if (tile_override() != 0) {
    small_tiles = tile_override() == 64;
  } else {
    small_tiles = query_blocks(p, 128) < 2L * num_sms();
  }
  if (p.kv_intervals) {  // index lists with query intervals: their own instantiations
    switch (p.head_dim) {
      case 64:
        return small_tiles ? launch<64, 4, 1, 64, T, true>(p, stream) : launch<64, 4, 2, 64, T, true>(p, stream);
      case 128:
        return small_tiles ? launch<128, 4, 1, 64, T, true>(p, stream) : launch<128, 4, 2, 32, T, true>(p, stream);
      case 256:
        if (p.index_block_q != 64) return (cudaError_t)kErrBadIndexBlock;
        return launch<256, 4, 1, 32, T, true>(p, stream);
      default:
        return (cudaError_t)kErrBadHeadDim;
    }
  }
  switch (p.head_dim) {
    case 64:
      return small_tiles ? launch<64, 4, 1, 64, T>(p, stream) : launch<64, 4, 2, 64, T>(p, stream);
    case 128:
      return small_tiles ? launch<128, 4, 1, 64, T>(p, stream) : launch<128, 4, 2, 32, T>(p, stream);
    case 256:
      if (p.kv_indices && p.index_block_q != 64) return (cudaError_t)kErrBadIndexBlock;
      return launch<256, 4, 1, 32, T>(p, stream);
    default:
      return (cudaError_t)kErrBadHeadDim;
  }
}

}  // namespace sparsek

extern "C" int sk_fmha_fwd(const SkFmhaParams* params, void* stream) {
  const SkFmhaParams& p = *params;
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) return sparsek::kErrBadHeads;
  if (p.kv_indices && p.index_block_q != 64 && p.index_block_q != 128) return sparsek::kErrBadIndexBlock;
  if (p.kv_indices && p.kv_index_run > 1 && p.kv_index_run % 64 != 0) return sparsek::kErrBadIndexRun;
  if (p.kv_intervals && (!p.kv_indices || p.kv_index_run > 1)) return sparsek::kErrBadIntervals;
  auto s = static_cast<cudaStream_t>(stream);
  return p.is_bf16 ? sparsek::dispatch<__nv_bfloat16>(p, s) : sparsek::dispatch<half>(p, s);
}

extern "C" const char* sk_error_string(int code) {
  switch (code) {
    case sparsek::kErrBadHeadDim:
      return "unsupported head dim (kernels exist for 64, 128 and 256)";
    case sparsek::kErrBadIndexBlock:
      return "index_block_q must be 64 or 128 (64 for head dim 256)";
    case sparsek::kErrBadHeads:
      return "heads_q must be a positive multiple of heads_kv";
    case sparsek::kErrBadIndexRun:
      return "kv_index_run must be 0, 1 or a multiple of 64";
    case sparsek::kErrBadIntervals:
      return "kv_intervals needs token lists (kv_indices with kv_index_run 0 or 1)";
    default:
      return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}

extern "C" int sk_abi_version(void) { return 4; }
