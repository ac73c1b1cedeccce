// Hopper (sm_90a) FMHA forward: TMA loads completing on mbarriers, wgmma tensor-core GEMMs, warp specialization.
//
// CTA = 3 warpgroups (4 with three consumers or with token lists). Warpgroup 0 is the producer: one thread issues bulk
// tensor copies (TMA) of each work item's Q tile (two buffers, so the next item's Q loads early) and of K/V tiles into
// a kStages-deep ring, gated by "empty" mbarriers; it gives registers back with setmaxnreg.dec.
// Warpgroups 1.. are consumers (setmaxnreg.inc), each owning 64 query rows: S = Q K^T with both operands in shared
// memory (wgmma, 128-byte swizzle as written by TMA; dense head dim 64: Q from registers, kQInRegs), online softmax on
// the accumulators, then O += P V with P from registers and V in shared memory (transpose-B). Only compiled for
// sm_90a; dense and varlen, any causal/window band.
// Split-KV (TmaParams::splits > 1): the CTAs of a cluster share one query block, each taking a run of its key tiles,
// and combine their partial rows through distributed shared memory.
//
// Index-list (sparse) mode (kIndex): a 128-row query block also attends the keys of its list. Runs of 128 keys
// (block-sparse lists) and the band arrive by TMA; token lists are gathered with cp.async into the same
// 128-byte-swizzled layout, completing on the same mbarriers, by two producer warpgroups (K by warpgroup 0, V by a
// fourth one; 32 key rows per warp, 4 rows x 128 bytes per request), so both operands' copies are in flight at once.
// The key position of every tile row is published in shared memory with the K tile for the consumers' mask (they
// release K's slot once they have read both); the gathering warps take their rows' keys from the lanes that own them
// (shuffles). Measured: one-row TMA boxes gather 15-25% slower than cp.async (PERF_NOTES s7, s15).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "fmha_kernel.cuh"
#include "wgmma_ops.cuh"

namespace sparsek {
namespace sm90 {

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SPARSEK_SM90_ENABLED 1
#endif

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes));
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)));
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(smem_u32(bar)),
      "r"(parity));
}

// Arrives on `bar` once all of this thread's earlier cp.async copies have landed (the pending count is raised first,
// so the thread still arrives normally as well).
__device__ __forceinline__ void cp_async_mbar_arrive(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// Orders generic-proxy shared-memory writes (cp.async) before the async proxy (wgmma) reads them.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}
__device__ __forceinline__ void st_shared_v4(uint32_t addr, int4 v) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}
__device__ __forceinline__ void st_global_v4(void* ptr, uint4 v) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(ptr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_u32(bar))
      : "memory");
}

__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Single-thread steps inside the consumers' item loop as predicated instructions, not branches (v15 found that a
// divergent branch there can move the tile loop's descriptor arithmetic to vector registers; PERF_NOTES v50).
// O tile rows (64 columns x box rows, 128-byte swizzle) from shared memory to global by the bulk copy engine, issued
// where `pred` holds; rows past the tensor's extent are not written.
__device__ __forceinline__ void tma_store_4d_if(bool pred, const CUtensorMap* map, const void* src, int c0, int c1,
                                                int c2, int c3) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %6, 0;\n"
      "@p cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%1, %2, %3, %4}], [%5];\n}\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_u32(src)), "r"((int)pred)
      : "memory");
}
__device__ __forceinline__ void mbar_arrive_if(bool pred, uint64_t* bar) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %1, 0;\n@p mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n" ::"r"(
                   smem_u32(bar)),
               "r"((int)pred)
               : "memory");
}
// Waits until the committed bulk stores have read their shared memory (Read) or completed.
template <bool kRead>
__device__ __forceinline__ void bulk_wait_all() {
  if constexpr (kRead) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
  else asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator reads/writes across the asynchronous wgmma boundary.
template <int N>
__device__ __forceinline__ void fence_operands(float* r) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
#ifdef SPARSEK_SM90_ENABLED
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
#ifdef SPARSEK_SM90_ENABLED
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}

// Shared-memory matrix descriptor for a 128-byte-swizzled tile (layout type 1 in bits 62-63).
__device__ __forceinline__ uint64_t make_desc(const void* smem, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  const uint32_t addr = smem_u32(smem);
  uint64_t d = 0;
  d |= (uint64_t)((addr & 0x3FFFF) >> 4);
  d |= (uint64_t)((lbo_bytes >> 4) & 0x3FFF) << 16;
  d |= (uint64_t)((sbo_bytes >> 4) & 0x3FFF) << 32;
  d |= (uint64_t)1 << 62;
  return d;
}

// O += P V for one K/V tile: P from registers (A), V tile MN-major in shared memory (transpose-B): its 64-column
// blocks lie kBN*128 bytes apart (leading byte offset) and 8-key swizzle atoms 1024 bytes apart (stride byte offset).
template <typename Tr>
__device__ __forceinline__ void issue_pv(float* acc_o, const uint32_t (*pa)[4], const typename Tr::T* cV) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < Tr::kBN / 16; ++kk) {
    const uint64_t dv = make_desc(cV + kk * 16 * 64, Tr::kBN * 128, 1024);
    wgmma_rs_tb<Tr::kD, typename Tr::T>(acc_o, pa[kk], dv, 1);
  }
  wgmma_commit();
}

// Index-list mode: producer warp `warp` copies key rows into rows [32 warp, 32 warp + 32) of a [kBlocksD][kBN][64]
// tile with the 128-byte swizzle TMA uses (16-byte chunk c of row r at c ^ (r % 8)). Eight lanes share a row (lane l
// takes 16-byte chunk l % 8 of each of its 128-byte halves), so one request reads 4 rows x 128 contiguous bytes, and a
// lane copies rows l / 8 + 4 s (s = 0..7): 8 row offsets by shuffle from the lanes that own them, one address per row
// for both halves, and a destination that only alternates between two swizzle phases (rows 4 apart differ in r % 8
// by 4) plus constant offsets. Lane l holds in `off_own` where the warp's row l starts, in 16-byte units after `base`,
// or kNoRow (zeros). The address arithmetic stays on the integer ALU (shift-adds): the consumers' softmax needs the
// FMA pipe, which 64-bit multiply-adds would share (measured at head dim 64).
constexpr uint32_t kNoRow = 0x80000000u;
__device__ __forceinline__ uint32_t row_offset16(int j, uint32_t row_bytes) {
  return j >= 0 ? (uint32_t)j * (row_bytes >> 4) : kNoRow;
}
// The 16-byte chunk at `src0` + 16 * (off without its top bit) of each of the row's kBlocksD 128-byte halves, to
// `dst` and `dst` + kBN * 128; off's top bit set (kNoRow): zero fill, nothing read. The PTX below is the copy of the
// first half; the second half reuses its predicate and address.
#define SPARSEK_CP_ASYNC_KEY_ROW_FIRST_HALF \
  "{\n"                                    \
  ".reg .pred skip;\n"                     \
  ".reg .b32 o;\n"                         \
  ".reg .b64 a;\n"                         \
  "setp.lt.s32 skip, %2, 0;\n"             \
  "and.b32 o, %2, 0x7fffffff;\n"           \
  "mad.wide.u32 a, o, 16, %1;\n"           \
  "cp.async.cg.shared.global [%0], [a], 16, skip;\n"
template <int kBlocksD>
__device__ __forceinline__ void cp_async_key_row(uint32_t dst, uint64_t src0, uint32_t off) {
  static_assert(kBlocksD == 1 || kBlocksD == 2, "head dims 64 and 128");
  if constexpr (kBlocksD == 1) {
    asm volatile(SPARSEK_CP_ASYNC_KEY_ROW_FIRST_HALF "}\n" ::"r"(dst), "l"(src0), "r"(off));
  } else {
    asm volatile(SPARSEK_CP_ASYNC_KEY_ROW_FIRST_HALF
                 "cp.async.cg.shared.global [%0+%3], [a+128], 16, skip;\n"
                 "}\n" ::"r"(dst),
                 "l"(src0), "r"(off), "n"(128 * 128));
  }
}
#undef SPARSEK_CP_ASYNC_KEY_ROW_FIRST_HALF
__device__ __forceinline__ void st_shared_b32(uint32_t addr, int v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
template <int kD, int kBN, typename T>
__device__ __forceinline__ void gather_rows(T* tile, const T* base, int warp, int lane, uint32_t off_own) {
  static_assert(kBN == 128, "the second half-row lies kBN * 128 bytes on");
  const int sub = lane % 8, m = lane / 8;  // chunk within a 128-byte half-row; first row (0..3)
  const uint64_t src0 = reinterpret_cast<uint64_t>(base) + sub * 16;
  // Row m + 4 s: (m + 4 s) % 8 = m ^ 4 (s % 2), so chunk sub lands at (sub ^ m ^ 4 (s % 2)) * 16 in the row.
  const uint32_t dst_even = smem_u32(tile) + (warp * 32 + m) * 128 + ((sub ^ m) << 4);
  const uint32_t dst_odd = dst_even ^ 64;
#pragma unroll
  for (int s = 0; s < 8; ++s) {
    const uint32_t off = __shfl_sync(0xffffffffu, off_own, m + 4 * s);
    cp_async_key_row<kD / 64>((s % 2 ? dst_odd : dst_even) + s * 4 * 128, src0, off);
  }
}

struct TmaParams {
  CUtensorMap q, k, v;
  // Index-list kernels (not varlen): O's map (64-row boxes, one per consumer warpgroup) when O's layout allows one
  // (o_ok), for the epilogue's bulk stores.
  CUtensorMap o;
  int o_ok;
  // Split-KV (dense/varlen only): the keys of one query block are divided among `splits` CTAs of one thread-block
  // cluster (cluster rank = split), which combine their partial results through distributed shared memory.
  int splits;
  // The work items of this launch: [item_begin, item_end), or all of them when item_end is 0. A persistent launch
  // whose last round would leave SMs idle takes the whole rounds, and a second, split-KV launch the rest (the tail).
  int item_begin, item_end;
};

__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r = 0;
#ifdef SPARSEK_SM90_ENABLED
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
#endif
  return r;
}
// All non-exited threads of the cluster; release/acquire orders shared-memory writes before remote reads.
__device__ __forceinline__ void cluster_sync() {
#ifdef SPARSEK_SM90_ENABLED
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}
// Address of the same shared-memory location in cluster CTA `rank`.
__device__ __forceinline__ uint32_t cluster_map(uint32_t smem_addr, uint32_t rank) {
  uint32_t r = smem_addr;
#ifdef SPARSEK_SM90_ENABLED
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(smem_addr), "r"(rank));
#endif
  return r;
}
__device__ __forceinline__ float2 ld_cluster_f2(uint32_t addr) {
  float2 v = make_float2(0.f, 0.f);
#ifdef SPARSEK_SM90_ENABLED
  asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr) : "memory");
#endif
  return v;
}
__device__ __forceinline__ float4 ld_cluster_f4(uint32_t addr) {
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#ifdef SPARSEK_SM90_ENABLED
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(addr)
               : "memory");
#endif
  return v;
}

// kSched bit 0: software-pipelined consumer (softmax of S_j overlaps P_{j-1} V_{j-1});
// kSched bit 1: ping-pong between the consumer warpgroups (named barriers order their GEMM issue, round robin).
// kIndex_: index-list (sparse) mode. kConsumers_: consumer warpgroups of 64 query rows each (2 or 3).
// kIntervals_: index mode with a query interval per listed key (kv_intervals).
// kSplitKeys_: small grids (dense/varlen): both consumer warpgroups share one 64-row query block and take alternate
// key tiles (even / odd), then combine their partial rows through shared memory, which halves each warpgroup's chain
// of dependent tiles and doubles the CTAs for the same problem.
// kHalfRows_ (split keys only): grids under half a wave take each 64-row block as two work items of 32 rows, rows
// r0 = 16 w + g of the tile loaded 8·h rows further (h = 0, 1), so each CTA's softmax covers one accumulator row per
// thread: half the exponentials per SM (the MUFU rate and the softmax's chains bound these shapes), twice the CTAs.
template <int kD_, int kBN_, int kStages_, typename T_, int kSched_ = 1, bool kIndex_ = false, int kConsumers_ = 2,
          bool kIntervals_ = false, bool kSplitKeys_ = false, bool kGather_ = false, bool kHalfRows_ = false>
struct Sm90Traits {
  using T = T_;
  static constexpr int kD = kD_, kBN = kBN_, kStages = kStages_, kSched = kSched_;
  static constexpr bool kIndex = kIndex_;
  static constexpr bool kIntervals = kIntervals_;
  static_assert(kIndex || !kIntervals, "query intervals belong to index lists");
  static constexpr bool kGather = kGather_;  // index lists with token tiles (gathered by cp.async)
  static_assert(kIndex || !kGather, "gathered tiles belong to index lists");
  static constexpr int kConsumers = kConsumers_;
  static_assert(kConsumers == 2 || (kConsumers == 3 && !kIndex), "3 consumer warpgroups: dense/varlen only");
  static constexpr bool kPipeline = kSched & 1, kPingPong = kSched & 2;
  static constexpr bool kSplitKeys = kSplitKeys_;
  static_assert(!kSplitKeys || (!kIndex && kConsumers == 2 && !kPingPong),
                "split keys: dense, two consumers, no ping-pong");
  static constexpr bool kHalfRows = kHalfRows_;
  static_assert(!kHalfRows || kSplitKeys, "half rows: split-keys kernels only");
  static constexpr int kRows = kHalfRows ? 1 : 2;  // accumulator rows per thread that hold queries (r0, r0 + 8)
  // Dense head dim 64: each consumer warpgroup keeps its Q rows in registers (16 per thread, loaded with ldmatrix
  // once per work item) and issues S = Q K^T with A from registers (wgmma RS), so the S GEMM reads only K from shared
  // memory.
  static constexpr bool kQInRegs = !kIndex && !kSplitKeys && kConsumers == 2 && kD == 64;
  static constexpr int kBM = kSplitKeys ? 64 : 64 * kConsumers;
  // Each K/V tile is read by every consumer warpgroup, or (split keys) by one.
  static constexpr int kTileReaders = kSplitKeys ? 128 : 128 * kConsumers;
  // Split keys: what each consumer warpgroup hands the other (per thread: half of its partial O, its two row maxima
  // and two row sums), element-major, for both warpgroups.
  static constexpr int kPartialFloats = kD / 2 + 8;
  static constexpr int kPartialBytes = kSplitKeys ? 128 * kPartialFloats * 4 : 0;
  // Token lists (with or without query intervals) have two producer warpgroups: warpgroup 0 gathers K (and loads Q),
  // the last one gathers V, so the two operands' copies are issued in parallel (PERF_NOTES s15: one warp's cp.async
  // chain bounds a gathered tile); each warp shuffles its rows' offsets from the lanes that own them.
  static constexpr int kProducerWGs = kGather ? 2 : 1;
  static constexpr int kThreads = 128 * (kConsumers + kProducerWGs);
  static constexpr int kConsumerThreads = 128 * kConsumers;
  static constexpr int kBlocksD = kD / 64;  // 64-column (128-byte) swizzle blocks per row
  static constexpr int kQBytes = kBM * kD * 2;  // one Q tile; two are kept so the next work item's Q loads early
  static constexpr int kKVBytes = kBN * kD * 2;  // one K (or V) tile
  // Register split (setmaxnreg): the CTA starts with kLaunchRegs per thread and setmaxnreg.inc only takes what .dec
  // released, so the split must not exceed them (it hangs otherwise). Token lists (with or without query intervals):
  // 2*128*40 + 256*216 = 512*128; block runs 128*56 + 256*224 = 384*168; dense 128*40 + 256*232 = 384*168;
  // 3 consumers 128*32 + 384*160 = 512*128.
  static constexpr int kProducerRegs = kConsumers == 3 ? 32 : (kIndex && kProducerWGs == 1 ? 56 : 40);
  static constexpr int kConsumerRegs = kConsumers == 3 ? 160 : (kProducerWGs == 2 ? 216 : (kIndex ? 224 : 232));
  static constexpr int kLaunchRegs = (65536 / kThreads) & ~7;
  static_assert(128 * kProducerWGs * kProducerRegs + 128 * kConsumers * kConsumerRegs <= kThreads * kLaunchRegs,
                "setmaxnreg split exceeds the registers the CTA is launched with");
  static constexpr int kPosBytes = kIndex ? kStages * kBN * 4 : 0;  // key position of every K/V tile row
  // Position arrays: K's (read by the consumers), the query intervals.
  // (Every KB counts: past 196 KB of shared memory the L1 carve-out drops from ~60 KB to ~28 KB.)
  static constexpr int kPosArrays = 1 + (kIntervals ? 1 : 0);
  static constexpr int kSmemMax = 232448;  // 227 KB: the most dynamic shared memory one CTA may use
  // Barriers (bytes 0-191), index-mode tile maxima (192-255), the two Q buffers' work items (256-383, publish_item).
  static constexpr int kBarrierBytes = 384;
  static constexpr int kSmemBytes = 1024 /*alignment slack*/ + 2 * kQBytes + 2 * kStages * kKVBytes +
                                    kBarrierBytes + kPosArrays * kPosBytes /*positions, intervals*/ + kPartialBytes;
  static_assert(kSmemBytes <= kSmemMax, "shared memory: too many stages");
};

// One unit of work of the persistent kernel: a 128-row query block of one (sequence, head).
// In index-list mode the first n_list tiles come from the list, the rest from the band [lo, hi).
struct WorkTile {
  int b, h, m0, q_start, sq, k_start, sk, off, pos_min, pos_max, lo, hi, n_tiles;
  const int32_t* list;
  const int32_t* ivlist;  // query interval (lo | hi << 16) of every list entry, or null
  int list_n, n_list;
  bool valid;
};

// What the consumers need of a work item. The thread that loads the item's Q computes the item (a chain of integer
// divisions by run-time sizes, and for index lists a global load of the list length) and publishes it next to the Q
// buffer with the Q load's barrier arrival, so the consumers only read 64 bytes of shared memory between items
// (PERF_NOTES v37: computing it themselves took 530-900 cycles on their critical path at every item boundary).
// A slot holds, as 32-bit words: b, h, m0, q_start | sq, off, pos_min, pos_max | lo, hi, n_tiles, n_list | item;
// n_tiles < 0 marks the end of the CTA's work. Two slots (one per Q buffer) fill bytes 256-383 of the barrier block.
constexpr uint32_t kItemSlotBytes = 64, kItemSlotNTiles = 40;  // slot size, byte offset of n_tiles

__device__ __forceinline__ void publish_item(uint32_t slot, const WorkTile& w, int item) {
  st_shared_v4(slot, make_int4(w.b, w.h, w.m0, w.q_start));
  st_shared_v4(slot + 16, make_int4(w.sq, w.off, w.pos_min, w.pos_max));
  st_shared_v4(slot + 32, make_int4(w.lo, w.hi, w.n_tiles, w.n_list));
  st_shared_b32(slot + 48, (uint32_t)item);
}
__device__ __forceinline__ void publish_end(uint32_t slot) { st_shared_b32(slot + kItemSlotNTiles, (uint32_t)-1); }

// Reads a published work item (after its Q barrier completed). The fields the consumers do not use stay zero.
__device__ __forceinline__ WorkTile read_item(uint32_t slot, int* item) {
  WorkTile w{};
  const uint4 a = ld_shared_v4(slot), b = ld_shared_v4(slot + 16), c = ld_shared_v4(slot + 32),
              d = ld_shared_v4(slot + 48);
  w.b = (int)a.x, w.h = (int)a.y, w.m0 = (int)a.z, w.q_start = (int)a.w;
  w.sq = (int)b.x, w.off = (int)b.y, w.pos_min = (int)b.z, w.pos_max = (int)b.w;
  w.lo = (int)c.x, w.hi = (int)c.y, w.n_tiles = (int)c.z, w.n_list = (int)c.w;
  w.valid = w.n_tiles >= 0;
  *item = (int)d.x;
  return w;
}

// Work item i -> tile. The query block varies fastest, so CTAs running at the same time share one head's K/V in L2;
// causal problems visit each head's heaviest (last) query blocks first. With `splits` > 1 (split-KV, no index lists)
// the key range is cut into `splits` nearly equal runs of whole tiles and this CTA takes run `split`.
// Half rows (kHalf): num_m counts half blocks; half h of block m starts at row m * kBM + 8 h (its queries are the tile's
// rows 16 w + g, see Sm90Traits::kHalfRows), and pos_max stays the full tile's (a bound, as masks are per row).
template <int kBM, int kBN, bool kHalf = false>
__device__ __forceinline__ WorkTile work_tile(const SkFmhaParams& p, int item, int num_m, int split = 0,
                                              int splits = 1) {
  WorkTile w{};
  const int m_idx = item % num_m, rem = item / num_m;
  w.h = rem % p.heads_q;
  w.b = rem / p.heads_q;
  const int m_block = (p.window_right >= 0 && p.window_left < 0) ? num_m - 1 - m_idx : m_idx;
  w.m0 = kHalf ? (m_block >> 1) * kBM + 8 * (m_block & 1) : m_block * kBM;
  w.q_start = 0, w.sq = p.seqlen_q, w.k_start = 0, w.sk = p.seqlen_k;
  if (p.cu_seqlens_q) {
    w.q_start = p.cu_seqlens_q[w.b];
    w.sq = p.cu_seqlens_q[w.b + 1] - w.q_start;
  }
  if (p.cu_seqlens_k) {
    w.k_start = p.cu_seqlens_k[w.b];
    w.sk = p.cu_seqlens_k[w.b + 1] - w.k_start;
  }
  w.valid = w.m0 < w.sq;
  w.off = w.sk - w.sq;
  w.pos_min = w.m0 + w.off;
  w.pos_max = min(w.m0 + kBM, w.sq) - 1 + w.off;
  int lo = p.window_left >= 0 ? max(0, w.pos_min - p.window_left) : 0;
  int hi = p.window_right >= 0 ? min(w.sk, w.pos_max + p.window_right + 1) : w.sk;
  lo = (lo / kBN) * kBN;
  if (hi < lo) hi = lo;
  w.list = nullptr;
  w.list_n = w.n_list = 0;
  if (p.kv_indices) {
    if (p.window_left < 0) lo = hi = 0;  // no band: only the listed keys
    if (w.valid) {
      const int hk = w.h / (p.heads_q / p.heads_kv), ib = w.m0 / p.index_block_q;
      const int64_t at =
          w.b * p.kv_indices_batch_stride + hk * p.kv_indices_head_stride + ib * p.kv_indices_block_stride;
      w.list = p.kv_indices + at;
      w.ivlist = p.kv_intervals ? p.kv_intervals + at : nullptr;
      w.list_n = p.kv_counts[w.b * p.kv_counts_batch_stride + hk * p.kv_counts_head_stride + ib];
      w.n_list = p.kv_index_run > 1 ? w.list_n * (p.kv_index_run / kBN) : (w.list_n + kBN - 1) / kBN;
    }
  }
  if (splits > 1) {
    const int n_all = (hi - lo + kBN - 1) / kBN, per = (n_all + splits - 1) / splits;
    const int t0 = min(n_all, split * per), t1 = min(n_all, t0 + per);
    hi = min(hi, lo + t1 * kBN);
    lo += t0 * kBN;
    if (hi < lo) hi = lo;
  }
  w.lo = lo;
  w.hi = hi;
  w.n_tiles = w.valid ? w.n_list + (hi - lo + kBN - 1) / kBN : 0;
  return w;
}

template <typename Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    fmha_sm90_kernel(const __grid_constant__ SkFmhaParams p, const __grid_constant__ TmaParams tma) {
#ifdef SPARSEK_SM90_ENABLED
  using T = typename Tr::T;
  constexpr int kD = Tr::kD, kBN = Tr::kBN, kBM = Tr::kBM, kStages = Tr::kStages, kBlocksD = Tr::kBlocksD;
  constexpr int kNT = kBN / 8, kDT = kD / 8;

  extern __shared__ unsigned char smem_raw[];
  unsigned char* base = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  // Work item n uses Q buffer n % 2: the producer loads the next item's Q while the current one is consumed.
  T* sQ = reinterpret_cast<T*>(base);                                // [2][kBlocksD][kBM][64]
  T* sK = reinterpret_cast<T*>(base + 2 * Tr::kQBytes);              // [kStages][kBlocksD][kBN][64]
  T* sV = reinterpret_cast<T*>(base + 2 * Tr::kQBytes + kStages * Tr::kKVBytes);
  uint64_t* bars = reinterpret_cast<uint64_t*>(base + 2 * Tr::kQBytes + 2 * kStages * Tr::kKVBytes);
  uint64_t* q_full = bars;  // [2]
  uint64_t* k_full = bars + 2;
  uint64_t* v_full = k_full + kStages;
  uint64_t* k_empty = v_full + kStages;
  uint64_t* v_empty = k_empty + kStages;

  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int group = p.heads_q / p.heads_kv;
  const int num_m = (p.seqlen_q + kBM - 1) / kBM * (Tr::kHalfRows ? 2 : 1);
  // Only the dense kernels (not split keys) take a launch's item range and split-KV factor. (Reading the item range
  // in the split-keys kernels cost them spills.)
  constexpr bool kItemRange = !Tr::kIndex && !Tr::kSplitKeys;
  const int num_items = kItemRange && tma.item_end > 0 ? tma.item_end : num_m * p.heads_q * p.batch;
  // Split-KV: the CTAs of one cluster share a work item; cluster rank = which run of its keys this CTA takes.
  const int splits = kItemRange ? tma.splits : 1;
  const int split = splits > 1 ? (int)cluster_ctarank() : 0;
  const int first_item = (kItemRange ? tma.item_begin : 0) + (int)blockIdx.x / splits;
  const int item_stride = gridDim.x / splits;
  uint64_t* q_empty = v_empty + kStages;  // [2]
  // [kStages][kBN]
  int* sPos = reinterpret_cast<int*>(base + 2 * Tr::kQBytes + 2 * kStages * Tr::kKVBytes + Tr::kBarrierBytes);
  // The work item published with Q buffer i (publish_item) is at slot(i).
  const uint32_t item_slot0 = smem_u32(reinterpret_cast<unsigned char*>(bars) + 256);
  auto slot = [&](int qbuf) { return item_slot0 + qbuf * kItemSlotBytes; };
  // After the last item: an end marker with the next Q buffer's barrier, once the consumers are done with it.
  auto publish_end_of_work = [&](int n_items) {
    const int qbuf = n_items & 1;
    if (n_items >= 2) mbar_wait(&q_empty[qbuf], ((n_items >> 1) - 1) & 1);
    publish_end(slot(qbuf));
    mbar_arrive(&q_full[qbuf]);
  };
  int* sIv = sPos + kStages * kBN;  // [kStages][kBN] query intervals of listed keys (kv_intervals)
  // Split keys: per consumer warpgroup [kPartialFloats / 2][128]: half of its partial O rows, its row maxima and sums.
  float* sPart = reinterpret_cast<float*>(base + 2 * Tr::kQBytes + 2 * kStages * Tr::kKVBytes + Tr::kBarrierBytes +
                                          Tr::kPosArrays * Tr::kPosBytes);
  static_assert((4 + 4 * kStages) * 8 <= 192, "barriers must fit the first 192 of their 256 bytes");
  // Index mode: per stage and producer warp, the largest key position of the warp's 32 tile rows, or INT_MAX when
  // one of them is empty (-1); published with the K tile like the positions (bytes 192-255 of the barrier block).
  int* sTileMax = reinterpret_cast<int*>(reinterpret_cast<unsigned char*>(bars) + 192);
  static_assert(kStages * 4 * 4 <= 64, "tile maxima must fit the last 64 bytes of the barrier block");
  // Index mode: the 128 threads of the K (V) producer warpgroup arrive on the K (V) "full" barriers (TMA tiles: its
  // thread 0 with the byte count).
  constexpr int kFullCount = Tr::kIndex ? 128 : 1;

  if (tid == 0) {
    for (int i = 0; i < 2; ++i) {
      mbar_init(&q_full[i], 1);
      mbar_init(&q_empty[i], Tr::kConsumerThreads);
    }
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&k_full[s], kFullCount);
      mbar_init(&v_full[s], kFullCount);
      mbar_init(&k_empty[s], Tr::kTileReaders);
      mbar_init(&v_empty[s], Tr::kTileReaders);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  // Dense and not varlen, the first work item follows from the kernel parameters alone, so the TMA-issuing thread
  // computes its coordinates (a chain of integer divisions by run-time sizes, ~0.7 us at 1,8,512,64 by in-kernel
  // clock stamps) before griddepcontrol.wait, where programmatic dependent launch overlaps them with the previous
  // kernel. The empty asm keeps the compiler from sinking them below the wait.
  // Only in the split-keys kernels (small grids, one item per CTA): in the others the change moved ptxas's schedule of
  // the unchanged tile loop (head dim 64: 830 -> 954 instructions), which PERF_NOTES v29 found can cost more.
  const bool first_early = Tr::kSplitKeys && p.kv_indices == nullptr && p.cu_seqlens_q == nullptr &&
                           p.cu_seqlens_k == nullptr;
  WorkTile w_first{};
  if (first_early && tid == 0) {
    w_first = work_tile<kBM, kBN, Tr::kHalfRows>(p, first_item, num_m, split, splits);
    asm volatile("" : "+r"(w_first.b), "+r"(w_first.h), "+r"(w_first.m0), "+r"(w_first.off), "+r"(w_first.pos_min),
                 "+r"(w_first.pos_max), "+r"(w_first.lo), "+r"(w_first.hi), "+r"(w_first.n_tiles));
  }
  __syncthreads();
  // Programmatic dependent launch (a no-op without it): let the next kernel on the stream start its prologue, and
  // wait for the previous kernel's memory before the first global access (sequence lengths, lists, Q/K/V, O).
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  asm volatile("griddepcontrol.wait;\n" ::: "memory");

  if (wg == 0 || wg > Tr::kConsumers) {  // -------------------------------------------------------- producers
    setmaxnreg_dec<Tr::kProducerRegs>();
    if constexpr (Tr::kIndex) {
      static_assert(kBN == 128, "index mode: one producer thread per key row");
      // Role 0: Q, K and the key positions; role 1: V (second producer warpgroup); role 2: all (block runs).
      auto index_producer = [&](auto role) {
        constexpr bool do_k = decltype(role)::value != 1, do_v = decltype(role)::value != 0;
        // Thread index within the producer warpgroup, written so ptxas keeps it in a register (with `threadIdx.x %
        // 128` it re-read SR_TID inside the gather loop, which made the per-query path ~9% slower).
        const int tid = decltype(role)::value == 1 ? (int)threadIdx.x - 128 * (Tr::kConsumers + 1) : (int)threadIdx.x;
        // Gathered (token and interval) lists never see runs: those go to the block-runs kernel, and the launcher
        // rejects intervals with runs (kErrBadIntervals). Their tile loop drops that path.
        const int run = Tr::kGather ? 1 : (p.kv_index_run > 1 ? p.kv_index_run : 1);
        // Shared-memory addresses (32-bit): generic stores made ptxas rebuild the shared window's base every tile.
        const uint32_t pos_u32 = smem_u32(sPos), tile_max_u32 = smem_u32(sTileMax);
        int kv_iter = 0, n_items = 0;
        for (int item = first_item; item < num_items; item += item_stride) {
          const WorkTile w = work_tile<kBM, kBN>(p, item, num_m);
          if (!w.valid) continue;
          const int hk = w.h / group;
          if (do_k && tid == 0) {
            const int qbuf = n_items & 1;
            if (n_items >= 2) mbar_wait(&q_empty[qbuf], ((n_items >> 1) - 1) & 1);
            publish_item(slot(qbuf), w, item);  // released by the arrival below
            mbar_expect_tx(&q_full[qbuf], Tr::kQBytes);
            T* dQ = sQ + qbuf * (Tr::kQBytes / 2);
            for (int c = 0; c < kBlocksD; ++c)
              tma_load_4d(dQ + c * kBM * 64, &tma.q, &q_full[qbuf], c * 64, w.m0, w.h, w.b);
          }
          const T* kbase = reinterpret_cast<const T*>(p.k) + w.b * p.k_batch_stride + hk * p.k_head_stride;
          const T* vbase = reinterpret_cast<const T*>(p.v) + w.b * p.v_batch_stride + hk * p.v_head_stride;
          int j_next = run == 1 && w.n_list > 0 && tid < w.list_n ? __ldg(w.list + tid) : -1;
          for (int tile = 0; tile < w.n_tiles; ++tile, ++kv_iter) {
            const int stage = kv_iter % kStages;
            const int empty_phase = ((kv_iter / kStages) - 1) & 1;
            int j, tma_row = -1;  // this thread's key position; first row of a TMA tile (-1: gathered tile)
            int iv = 0;           // its query interval (kv_intervals)
            if (tile < w.n_list) {
              if (run > 1) {
                const int e = tile * kBN;  // offset into the concatenated runs
                const int start = __ldg(w.list + e / run);
                const int first = start >= 0 ? start + e % run : -1;
                tma_row = first >= 0 ? first : 0;
                j = first >= 0 && first + tid < w.sk ? first + tid : -1;
              } else {
                const int e = tile * kBN + tid;
                j = e < w.list_n ? j_next : -1;
                // the next tile's entry loads while this tile waits and gathers
                j_next = tile + 1 < w.n_list && e + kBN < w.list_n ? __ldg(w.list + e + kBN) : -1;
                if (j >= w.sk) j = -1;
                if (Tr::kIntervals && do_k && e < w.list_n) iv = __ldg(w.ivlist + e);
              }
            } else {
              const int n0 = w.lo + (tile - w.n_list) * kBN;
              tma_row = n0;
              j = n0 + tid < w.hi ? n0 + tid : -1;
            }
            // A TMA tile: thread 0 issues it with the byte count, the others arrive.
            auto tma_tile = [&](T* dst, const CUtensorMap* map, uint64_t* full) {
              if (tid == 0) {
                mbar_expect_tx(full, Tr::kKVBytes);
                for (int c = 0; c < kBlocksD; ++c) tma_load_4d(dst + c * kBN * 64, map, full, c * 64, tma_row, hk, w.b);
              } else {
                mbar_arrive(full);
              }
            };
            // A gathered tile: each warp copies its 32 rows (their keys are its lanes' j).
            auto gather_tile = [&](T* dst, const T* base, uint32_t row_bytes, uint64_t* full) {
              gather_rows<kD, kBN>(dst, base, tid / 32, tid % 32, row_offset16(j, row_bytes));
              cp_async_mbar_arrive(full);
              mbar_arrive(full);
            };
            if constexpr (do_k) {
              T* dK = sK + stage * (Tr::kKVBytes / 2);
              if (kv_iter >= kStages) {
                mbar_wait(&k_empty[stage], empty_phase);  // index mode: the stage's key positions are read too
              }
              st_shared_b32(pos_u32 + (stage * kBN + tid) * 4, j);  // published by the K barrier's (release) arrivals
              {
                const int wmax = __reduce_max_sync(0xffffffffu, j), wmin = __reduce_min_sync(0xffffffffu, j);
                // Query intervals: a row whose interval does not cover the whole work item also needs the mask.
                bool partial = false;
                if constexpr (Tr::kIntervals) {
                  const int rows = min(kBM, w.sq - w.m0);
                  partial = __any_sync(0xffffffffu, j >= 0 && ((iv & 0xffff) != 0 || (iv >> 16) < rows));
                }
                if ((tid & 31) == 0)
                  st_shared_b32(tile_max_u32 + (stage * 4 + tid / 32) * 4, wmin < 0 || partial ? INT_MAX : wmax);
              }
              if constexpr (Tr::kIntervals) sIv[stage * kBN + tid] = iv;
              if (!Tr::kGather || tma_row >= 0) {  // block runs: every tile by TMA
                tma_tile(dK, &tma.k, &k_full[stage]);
              } else {
                gather_tile(dK, kbase, (uint32_t)p.k_row_stride * sizeof(T), &k_full[stage]);
              }
            }
            if constexpr (do_v) {
              T* dV = sV + stage * (Tr::kKVBytes / 2);
              if (kv_iter >= kStages) mbar_wait(&v_empty[stage], empty_phase);
              if (!Tr::kGather || tma_row >= 0) {  // block runs: every tile by TMA
                tma_tile(dV, &tma.v, &v_full[stage]);
              } else {
                gather_tile(dV, vbase, (uint32_t)p.v_row_stride * sizeof(T), &v_full[stage]);
              }
            }
          }
          ++n_items;
        }
        if (do_k && tid == 0) publish_end_of_work(n_items);
      };
      if constexpr (Tr::kProducerWGs == 2) {
        if (wg == 0) index_producer(std::integral_constant<int, 0>{});
        else index_producer(std::integral_constant<int, 1>{});
      } else {
        index_producer(std::integral_constant<int, 2>{});
      }
    } else if (tid == 0) {
      int kv_iter = 0, n_items = 0;  // K/V tiles and work items loaded so far by this CTA
      for (int item = first_item; item < num_items; item += item_stride) {
        const WorkTile w =
            first_early && item == first_item ? w_first : work_tile<kBM, kBN, Tr::kHalfRows>(p, item, num_m, split, splits);
        if (!w.valid) continue;
        const int hk = w.h / group;
        const int qb = p.cu_seqlens_q ? 0 : w.b, kb = p.cu_seqlens_k ? 0 : w.b;
        const int qbuf = n_items & 1;
        if (n_items >= 2) mbar_wait(&q_empty[qbuf], ((n_items >> 1) - 1) & 1);  // consumers done with that buffer
        publish_item(slot(qbuf), w, item);  // released by the arrival below
        mbar_expect_tx(&q_full[qbuf], Tr::kQBytes);
        T* dQ = sQ + qbuf * (Tr::kQBytes / 2);
        for (int c = 0; c < kBlocksD; ++c)
          tma_load_4d(dQ + c * kBM * 64, &tma.q, &q_full[qbuf], c * 64, w.q_start + w.m0, w.h, qb);
        for (int tile = 0; tile < w.n_tiles; ++tile, ++kv_iter) {
          const int stage = kv_iter % kStages;
          const int empty_phase = ((kv_iter / kStages) - 1) & 1;
          const int row = w.k_start + w.lo + tile * kBN;
          T* dK = sK + stage * (Tr::kKVBytes / 2);
          T* dV = sV + stage * (Tr::kKVBytes / 2);
          if (kv_iter >= kStages) mbar_wait(&k_empty[stage], empty_phase);
          mbar_expect_tx(&k_full[stage], Tr::kKVBytes);
          for (int c = 0; c < kBlocksD; ++c)
            tma_load_4d(dK + c * kBN * 64, &tma.k, &k_full[stage], c * 64, row, hk, kb);
          if (kv_iter >= kStages) mbar_wait(&v_empty[stage], empty_phase);
          mbar_expect_tx(&v_full[stage], Tr::kKVBytes);
          for (int c = 0; c < kBlocksD; ++c)
            tma_load_4d(dV + c * kBN * 64, &tma.v, &v_full[stage], c * 64, row, hk, kb);
        }
        ++n_items;
      }
      publish_end_of_work(n_items);
    }
    return;
  }

  // ------------------------------------------------------------------------------------ consumers
  setmaxnreg_inc<Tr::kConsumerRegs>();
  const int ctid = tid - 128 * wg;  // thread within the consumer warpgroup
  const int warp = ctid >> 5, lane = ctid & 31, g = lane >> 2, t4 = lane & 3;
  const int wrow = Tr::kSplitKeys ? 0 : (wg - 1) * 64;  // this warpgroup's first row in the block
  // The key tiles this warpgroup takes: all, or (split keys) every second one from t_first.
  constexpr int kStep = Tr::kSplitKeys ? 2 : 1;
  const int t_first = Tr::kSplitKeys ? wg - 1 : 0;
  const int r0 = wrow + warp * 16 + g;  // rows r0 and r0 + 8
  const float scale = p.scale_log2;
  float acc_o[kD / 2];
  float acc_s[kBN / 2];
  uint32_t pa[kBN / 16][4];
  float row_max[2], row_sum[2];  // row max in log2 units (scaled)
  int qpos[2];
  int kv_base = 0;  // K/V tiles consumed by this CTA before the current work item
  WorkTile w{};  // the current work tile (assigned per item; the lambdas below read it)
  const T* sQc = sQ;  // the current work item's Q buffer (the lambdas below read it)
  // Index kernels: the low word of this warpgroup's Q descriptor for the current item; each k-step adds a constant.
  // (ptxas keeps the 8 full descriptors of the dense kernels in registers, but rebuilt them at every k-step here,
  // 4 vector instructions each, with the index kernels' 224 registers: PERF_NOTES v51.)
  uint32_t dq_lo = 0;
  // Tr::kQInRegs: the current item's Q rows of this warpgroup as wgmma A fragments (k16 step kk).
  uint32_t qa[Tr::kQInRegs ? kD / 16 : 1][4];
  // The LSE of the current item's query `row` (row within its sequence).
  auto lse_at = [&](int row) -> float& {
    return p.lse[w.b * p.lse_batch_stride + w.h * p.lse_head_stride + w.q_start + row];
  };

  // Software pipeline (FA3's intra-warpgroup overlap): while the tensor cores run O += P_{j-1} V_{j-1}, this warpgroup
  // computes the softmax of S_j. Empty barriers are per operand, so K_j's slot is released as soon as S_j is done.
  // Tile 0 is peeled off so that every wgmma wait in the loop is unconditional (ptxas then keeps wgmmas asynchronous).
  // Index mode: token-list tiles are gathered with cp.async (generic proxy) and need a proxy fence before wgmma reads
  // them; runs and band tiles arrive by TMA (async proxy, made visible by the mbarrier) and need none.
  auto gathered = [&](int tile) { return Tr::kGather && p.kv_index_run <= 1 && tile < w.n_list; };
  auto issue_s = [&](int tile) {
    const int it = kv_base + tile;
    const int stage = it % kStages;
    const T* cK = sK + stage * (Tr::kKVBytes / 2);
    mbar_wait(&k_full[stage], (it / kStages) & 1);
    if (Tr::kIndex && gathered(tile)) fence_proxy_async();  // the tile was written by cp.async
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const int c = kk / 4, kin = (kk % 4) * 16;  // 64-column block and element offset inside the 128-byte row
      const uint64_t db = make_desc(cK + c * kBN * 64 + kin, 16, 1024);
      if constexpr (Tr::kQInRegs) {
        wgmma_rs<kBN, T>(acc_s, qa[kk], db, kk > 0 ? 1 : 0);
      } else {
        const uint64_t da =
            Tr::kIndex ? (make_desc(sQ, 16, 1024) & 0xFFFFFFFF00000000ull) |  // high word: no address bits
                             (dq_lo + (uint32_t)(((c * kBM * 64 + kin) * (int)sizeof(T)) >> 4))
                       : make_desc(sQc + c * kBM * 64 + wrow * 64 + kin, 16, 1024);
        wgmma_ss<kBN, T>(acc_s, da, db, kk > 0 ? 1 : 0);
      }
    }
    wgmma_commit();
  };
  auto issue_pv_tile = [&](int tile) {
    const int it = kv_base + tile;
    const int stage = it % kStages;
    mbar_wait(&v_full[stage], (it / kStages) & 1);
    if (Tr::kIndex && gathered(tile)) fence_proxy_async();
    issue_pv<Tr>(acc_o, pa, sV + stage * (Tr::kKVBytes / 2));
  };
  // Mask (tile-level test first) and online softmax of acc_s in log2 units; returns the O rescale factors.
  auto softmax = [&](int tile, float* corr) {
    const bool listed = Tr::kIndex && tile < w.n_list;
    const int n0 = w.lo + (tile - w.n_list) * kBN;
    const int pos_stage = (kv_base + tile) % kStages;
    // A listed tile whose rows all hold keys at or below every row's limit needs no mask (block runs, and lists
    // below the band, as block-shared SparseK selections are; with query intervals, also every key's interval must
    // cover the whole item, as the strong members leading each per-query union list do): one test per tile instead
    // of one per score.
    bool listed_full = false;
    if (Tr::kIndex && listed) {
      const uint4 tm = ld_shared_v4(smem_u32(sTileMax + pos_stage * 4));  // LDS (a generic load otherwise)
      const int tile_max = max(max((int)tm.x, (int)tm.y), max((int)tm.z, (int)tm.w));
      listed_full = tile_max != INT_MAX &&
                    (p.window_right < 0 || (long long)tile_max <= (long long)w.pos_min + p.window_right);
    }
    // Listed keys: positions from the producer (with K), masked only by j <= pos + window_right
    if (listed && !listed_full) {
      const int* pos = sPos + pos_stage * kBN;  // and, with kv_intervals, by the key's query interval
      const int* ivs = sIv + pos_stage * kBN;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const int2 jj = *reinterpret_cast<const int2*>(pos + nt * 8 + 2 * t4);
        const int2 ii = Tr::kIntervals ? *reinterpret_cast<const int2*>(ivs + nt * 8 + 2 * t4) : make_int2(0, 0);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = (e & 1) ? jj.y : jj.x;
          const int iv = (e & 1) ? ii.y : ii.x;
          const int row = r0 + (e >> 1) * 8;  // row in the 128-query block = in its list's block
          bool ok = j >= 0 && (p.window_right < 0 || j <= qpos[e >> 1] + p.window_right);
          if (Tr::kIntervals) ok = ok && row >= (iv & 0xffff) && row < (iv >> 16);
          if (!ok) acc_s[nt * 4 + e] = -INFINITY;
        }
      }
    }
    // Index mode: K's slot is released only here, once its key positions (published with K) are read as well.
    if constexpr (Tr::kIndex) mbar_arrive(&k_empty[pos_stage]);
    const bool need_mask = !listed && (n0 + kBN > w.hi ||
                                       (p.window_right >= 0 && n0 + kBN - 1 > w.pos_min + p.window_right) ||
                                       (p.window_left >= 0 && n0 < w.pos_max - p.window_left));
    if (need_mask) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2 * Tr::kRows; ++e) {
          const int j = n0 + nt * 8 + 2 * t4 + (e & 1);
          const int qp = qpos[e >> 1];
          const bool ok = j < w.hi && (p.window_right < 0 || j <= qp + p.window_right) &&
                          (p.window_left < 0 || j >= qp - p.window_left);
          if (!ok) acc_s[nt * 4 + e] = -INFINITY;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < Tr::kRows; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(acc_s[nt * 4 + 2 * r], acc_s[nt * 4 + 2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
      const float new_max = fmaxf(row_max[r], mx * scale);
      const float base_r = new_max == -INFINITY ? 0.f : new_max;
      corr[r] = sparsek_math::fast_exp2(row_max[r] - base_r);
      row_max[r] = new_max;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        acc_s[nt * 4 + 2 * r] = sparsek_math::fast_exp2(fmaf(acc_s[nt * 4 + 2 * r], scale, -base_r));
        acc_s[nt * 4 + 2 * r + 1] = sparsek_math::fast_exp2(fmaf(acc_s[nt * 4 + 2 * r + 1], scale, -base_r));
        sum += acc_s[nt * 4 + 2 * r] + acc_s[nt * 4 + 2 * r + 1];
      }
      row_sum[r] = row_sum[r] * corr[r] + sum;
    }
  };
  // Rescale O and turn the probabilities into the register A operand (k16 step kk = S n8 tiles 2kk, 2kk+1).
  auto rescale_and_pack = [&](const float* corr) {
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      acc_o[dt * 4 + 0] *= corr[0];
      acc_o[dt * 4 + 1] *= corr[0];
      if constexpr (Tr::kRows == 2) {
        acc_o[dt * 4 + 2] *= corr[1];
        acc_o[dt * 4 + 3] *= corr[1];
      }
    }
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {  // half rows: the rows r0 + 8 get P = 0 (their O is never read)
      pa[kk][0] = Pack2<T>::pack(acc_s[(2 * kk) * 4 + 0], acc_s[(2 * kk) * 4 + 1]);
      pa[kk][1] = Tr::kRows == 2 ? Pack2<T>::pack(acc_s[(2 * kk) * 4 + 2], acc_s[(2 * kk) * 4 + 3]) : 0u;
      pa[kk][2] = Pack2<T>::pack(acc_s[(2 * kk + 1) * 4 + 0], acc_s[(2 * kk + 1) * 4 + 1]);
      pa[kk][3] = Tr::kRows == 2 ? Pack2<T>::pack(acc_s[(2 * kk + 1) * 4 + 2], acc_s[(2 * kk + 1) * 4 + 3]) : 0u;
    }
  };

  // Ping-pong (round robin): warpgroup w may issue GEMMs after bar.sync(w); it then lets the next one go (bar.arrive).
  auto gemm_turn_begin = [&]() {
    if constexpr (Tr::kPingPong) asm volatile("bar.sync %0, 256;\n" ::"r"(wg) : "memory");
  };
  auto gemm_turn_end = [&]() {
    if constexpr (Tr::kPingPong) asm volatile("bar.arrive %0, 256;\n" ::"r"(wg % Tr::kConsumers + 1) : "memory");
  };
  if constexpr (Tr::kPingPong) {
    if (wg == Tr::kConsumers) asm volatile("bar.arrive 1, 256;\n" ::: "memory");  // warpgroup 1 issues first
  }

  // The epilogue stages O in the Q buffer where O's base and strides allow 16-byte stores (not with split keys: both
  // warpgroups share those rows); Q is released after the epilogue.
  // Dense head dim 128 stores O straight from registers instead, a quad's lanes swapping half their columns so each
  // lane writes 8 contiguous bytes (full 32-byte sectors too): measured faster there (PERF_NOTES v37), while head dim
  // 64 and the index-list kernels measured faster with the staging.
  constexpr bool kShuffleO = !Tr::kSplitKeys && !Tr::kIndex && kD == 128;
  constexpr bool kStageO = !Tr::kSplitKeys && !kShuffleO;
  // Index lists, where the launcher could map O (tma.o_ok: not varlen): the staged O leaves by bulk tensor stores; the
  // thread that issues them releases the Q buffer only once they have read it, after the next item's first S GEMM is
  // issued (dense head dim 64 measured slower with them, PERF_NOTES v38).
  constexpr bool kTmaO = Tr::kIndex && kStageO;
  int q_release = -1;  // the Q buffer whose release waits for this warpgroup's bulk stores (-1: none)
  auto release_staged_q = [&]() {
    if (kTmaO && q_release >= 0) {
      bulk_wait_all<true>();  // only thread 0 has bulk stores in flight; the others pass at once
      mbar_arrive_if(ctid == 0, &q_empty[q_release]);
      q_release = -1;
    }
  };
  const bool o_aligned16 =
      ((reinterpret_cast<uintptr_t>(p.o) | (uintptr_t)((p.o_row_stride | p.o_batch_stride | p.o_head_stride) *
                                                       (int64_t)sizeof(T))) & 15) == 0;
  for (int n_items = 0;; ++n_items) {
    // The next work item and its Q, both published by the producer (publish_item).
    mbar_wait(&q_full[n_items & 1], (n_items >> 1) & 1);
    int item;
    w = read_item(slot(n_items & 1), &item);
    if (!w.valid) break;
    qpos[0] = w.m0 + r0 + w.off;
    qpos[1] = qpos[0] + 8;
#pragma unroll
    for (int i = 0; i < kD / 2; ++i) acc_o[i] = 0.f;
    row_max[0] = row_max[1] = -INFINITY;
    row_sum[0] = row_sum[1] = 0.f;
    sQc = sQ + (n_items & 1) * (Tr::kQBytes / 2);
    if constexpr (Tr::kIndex) dq_lo = (uint32_t)make_desc(sQc + wrow * 64, 16, 1024);
    if constexpr (Tr::kQInRegs) {
      // ldmatrix.x4 per k16 step: lanes 0-15 address rows 0-15 of the warp's 16 at the step's first 8 columns, lanes
      // 16-31 at its second 8; 16-byte chunk j of Q row r sits at chunk j ^ (r % 8) (TMA's 128-byte swizzle).
      const int qrow = wrow + warp * 16 + (lane & 15);
      const uint32_t qrow_addr = smem_u32(sQc) + qrow * 128;
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        const int c = kk / 4, chunk = (kk % 4) * 2 + (lane >> 4);
        ldmatrix_x4(qa[kk], qrow_addr + c * kBM * 128 + ((chunk ^ (qrow & 7)) << 4));
      }
    }
    if (!Tr::kPipeline || t_first >= w.n_tiles) release_staged_q();
    if (t_first < w.n_tiles) {
      float corr[2];
      if constexpr (Tr::kPipeline) {
        gemm_turn_begin();
        issue_s(t_first);
        gemm_turn_end();
        release_staged_q();
        wgmma_wait<0>();
        fence_operands<kBN / 2>(acc_s);
        if constexpr (!Tr::kIndex) mbar_arrive(&k_empty[(kv_base + t_first) % kStages]);  // index mode: in softmax
        softmax(t_first, corr);
        rescale_and_pack(corr);
        int last = t_first;  // the last tile whose P V is still to issue
        for (int tile = t_first + kStep; tile < w.n_tiles; tile += kStep) {
          const int prev = (kv_base + last) % kStages;
          gemm_turn_begin();
          issue_s(tile);
          issue_pv_tile(last);
          gemm_turn_end();
          wgmma_wait<1>();
          fence_operands<kBN / 2>(acc_s);
          if constexpr (!Tr::kIndex) mbar_arrive(&k_empty[(kv_base + tile) % kStages]);
          softmax(tile, corr);
          wgmma_wait<0>();
          fence_operands<kD / 2>(acc_o);
          mbar_arrive(&v_empty[prev]);
          rescale_and_pack(corr);
          last = tile;
        }
        // Every S GEMM of this item has completed: Q may be overwritten (unless the epilogue stages O in it).
        if constexpr (!kStageO) mbar_arrive(&q_empty[n_items & 1]);
        gemm_turn_begin();
        issue_pv_tile(last);
        gemm_turn_end();
        wgmma_wait<0>();
        fence_operands<kD / 2>(acc_o);
        mbar_arrive(&v_empty[(kv_base + last) % kStages]);
      } else {
        for (int tile = t_first; tile < w.n_tiles; tile += kStep) {
          gemm_turn_begin();
          issue_s(tile);
          gemm_turn_end();
          wgmma_wait<0>();
          fence_operands<kBN / 2>(acc_s);
          if constexpr (!Tr::kIndex) mbar_arrive(&k_empty[(kv_base + tile) % kStages]);
          softmax(tile, corr);
          rescale_and_pack(corr);
          gemm_turn_begin();
          issue_pv_tile(tile);
          gemm_turn_end();
          wgmma_wait<0>();
          fence_operands<kD / 2>(acc_o);
          mbar_arrive(&v_empty[(kv_base + tile) % kStages]);
        }
        if constexpr (!kStageO) mbar_arrive(&q_empty[n_items & 1]);
      }
    } else {
      if constexpr (!kStageO) mbar_arrive(&q_empty[n_items & 1]);
    }
    if constexpr (Tr::kSplitKeys) {
      // Both warpgroups hold partial rows of the same 64 queries (same thread = same elements). Each hands the other
      // its running max and sum and the half of its O columns the other stores (the first warpgroup keeps the lower
      // half, the second the upper); after one barrier each merges and stores its half, so the merge and the stores
      // are split between them. Barrier 10 (only before a further item) keeps the buffer until both have read it.
      constexpr int kP = Tr::kPartialFloats / 2, kHalf = kD / 4;  // per warpgroup: kHalf O values, 2 maxima, 2 sums
      static_assert(2 * kP * 128 * 4 == Tr::kPartialBytes, "partial layout");
      const int me = wg - 1;
      float* out = sPart + me * kP * 128;
      const float* in = sPart + (1 - me) * kP * 128;
      auto publish = [&](auto give_c) {  // give: the half (0 lower, 1 upper) the other warpgroup keeps
        constexpr int give = decltype(give_c)::value;
#pragma unroll
        for (int i = 0; i < kHalf; ++i)
          if (Tr::kRows == 2 || ((give * kHalf + i) & 2) == 0) out[i * 128 + ctid] = acc_o[give * kHalf + i];
      };
      if (me == 0) publish(std::integral_constant<int, 1>{});
      else publish(std::integral_constant<int, 0>{});
#pragma unroll
      for (int r = 0; r < Tr::kRows; ++r) {
        out[(kHalf + r) * 128 + ctid] = row_max[r];
        out[(kHalf + 2 + r) * 128 + ctid] = row_sum[r];
      }
      asm volatile("bar.sync 9, 256;\n" ::: "memory");
      float c_own[2], c_other[2];
#pragma unroll
      for (int r = 0; r < Tr::kRows; ++r) {
        const float m_other = in[(kHalf + r) * 128 + ctid];
        const float m = fmaxf(row_max[r], m_other);
        const float base_r = m == -INFINITY ? 0.f : m;
        c_own[r] = sparsek_math::fast_exp2(row_max[r] - base_r);
        c_other[r] = sparsek_math::fast_exp2(m_other - base_r);
        row_sum[r] = row_sum[r] * c_own[r] + in[(kHalf + 2 + r) * 128 + ctid] * c_other[r];
        row_max[r] = m;
      }
      auto merge = [&](auto keep_c) {
        constexpr int keep = decltype(keep_c)::value;
#pragma unroll
        for (int i = 0; i < kHalf; ++i) {
          const int j = keep * kHalf + i, r = (j >> 1) & 1;  // accumulator j belongs to row r0 + 8r
          if (r < Tr::kRows) acc_o[j] = acc_o[j] * c_own[r] + in[i * 128 + ctid] * c_other[r];
        }
      };
      if (me == 0) merge(std::integral_constant<int, 0>{});
      else merge(std::integral_constant<int, 1>{});
      if (item + item_stride < num_items) asm volatile("bar.sync 10, 256;\n" ::: "memory");
    }
    // Epilogue: normalize and store straight from registers; LSE in natural log.
#pragma unroll
    for (int r = 0; r < Tr::kRows; ++r) {
      row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 1);
      row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 2);
    }
    T* obase = reinterpret_cast<T*>(p.o) + w.b * p.o_batch_stride + (int64_t)w.q_start * p.o_row_stride +
               w.h * p.o_head_stride;
    if (splits > 1) {
      // Split-KV: every CTA of the cluster publishes its unnormalized rows (fp32 O, running max, sum) in its own K/V
      // ring (free once every consumer's GEMMs are done), then combines a slice of the block's rows from all CTAs'
      // partials through distributed shared memory and stores it.
      constexpr int kLd = kD + 8;  // padded fp32 row: the quad's float2 stores of 8 rows spread over the banks
      static_assert(kBM * kLd * 4 + kBM * 8 <= 2 * kStages * Tr::kKVBytes, "split-KV partials must fit the K/V ring");
      float* sO = reinterpret_cast<float*>(sK);
      float2* sML = reinterpret_cast<float2*>(sO + kBM * kLd);
      asm volatile("bar.sync 8, %0;\n" ::"n"(Tr::kConsumerThreads) : "memory");
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = r0 + 8 * r;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt)
          *reinterpret_cast<float2*>(sO + row * kLd + dt * 8 + 2 * t4) =
              make_float2(acc_o[dt * 4 + 2 * r], acc_o[dt * 4 + 2 * r + 1]);
        if (t4 == 0) sML[row] = make_float2(row_max[r], row_sum[r]);
      }
      cluster_sync();
      constexpr int kC4 = kD / 4;
      const int rows_per = (kBM + splits - 1) / splits;
      const int row_begin = split * rows_per, row_end = min(kBM, row_begin + rows_per);
      for (int e = tid - 128; e < (row_end - row_begin) * kC4; e += Tr::kConsumerThreads) {
        const int row = row_begin + e / kC4, c4 = e % kC4;
        const uint32_t ml_addr = smem_u32(sML + row), o_addr = smem_u32(sO + row * kLd + c4 * 4);
        float m_all = -INFINITY;
        for (int s = 0; s < splits; ++s) m_all = fmaxf(m_all, ld_cluster_f2(cluster_map(ml_addr, s)).x);
        float l_all = 0.f;
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
        if (m_all != -INFINITY) {
          for (int s = 0; s < splits; ++s) {
            const float2 ml = ld_cluster_f2(cluster_map(ml_addr, s));
            const float wgt = sparsek_math::fast_exp2(ml.x - m_all);
            const float4 v = ld_cluster_f4(cluster_map(o_addr, s));
            l_all += wgt * ml.y;
            o.x += wgt * v.x, o.y += wgt * v.y, o.z += wgt * v.z, o.w += wgt * v.w;
          }
        }
        const int q_row = w.m0 + row;
        if (q_row < w.sq) {
          const float inv = l_all > 0.f ? 1.f / l_all : 0.f;
          T* dst = obase + (int64_t)q_row * p.o_row_stride + c4 * 4;
          reinterpret_cast<uint32_t*>(dst)[0] = Pack2<T>::pack(o.x * inv, o.y * inv);
          reinterpret_cast<uint32_t*>(dst)[1] = Pack2<T>::pack(o.z * inv, o.w * inv);
          if (p.lse && c4 == 0)
            lse_at(q_row) = row_lse(m_all, l_all);
        }
      }
      cluster_sync();  // no CTA leaves while another still reads its shared memory
      if constexpr (kStageO) mbar_arrive(&q_empty[n_items & 1]);
      kv_base += w.n_tiles;
      continue;
    }
    const float inv[2] = {row_sum[0] > 0.f ? 1.f / row_sum[0] : 0.f, row_sum[1] > 0.f ? 1.f / row_sum[1] : 0.f};
    if (kStageO && o_aligned16) {
      // Each warp writes its 16 rows of O into its rows of the item's Q buffer (dead once this warpgroup's S GEMMs are
      // done; the other warpgroups read only their own rows), 16-byte units XOR-swizzled by row (conflict-free), and
      // reads them back as whole-row chunks: every global store then covers full 32-byte sectors (the fragment's
      // 4-byte stores wrote each sector in two halves).
      const uint32_t stage = smem_u32(sQc);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int rr = r0 + 8 * r;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt)
          st_shared_b32(stage + (dt >> 3) * (kBM * 128) + rr * 128 + (((dt & 7) ^ (rr & 7)) << 4) + 4 * t4,
                        Pack2<T>::pack(acc_o[dt * 4 + 2 * r] * inv[r], acc_o[dt * 4 + 2 * r + 1] * inv[r]));
      }
      if (kTmaO && tma.o_ok) {
        // The staged rows are the O map's swizzled layout: one thread stores the warpgroup's 64 rows with the bulk
        // copy engine (rows past the sequence end are clipped) and releases the Q buffer once they are read.
        fence_proxy_async();
        asm volatile("bar.sync %0, 128;\n" ::"r"(11 + wg) : "memory");
#pragma unroll
        for (int c = 0; c < kBlocksD; ++c)
          tma_store_4d_if(ctid == 0, &tma.o, sQc + c * kBM * 64 + wrow * 64, c * 64, w.q_start + w.m0 + wrow, w.h,
                          w.b);
        bulk_commit();  // an empty group in the other threads
        q_release = n_items & 1;
      } else {
        __syncwarp();
        constexpr int kRowsPerPass = 32 / kDT;  // rows of 16-byte units one warp instruction covers
        const int unit = lane % kDT;
#pragma unroll
        for (int i = 0; i < 16 / kRowsPerPass; ++i) {
          const int rr = wrow + warp * 16 + i * kRowsPerPass + lane / kDT;
          const uint4 val =
              ld_shared_v4(stage + (unit >> 3) * (kBM * 128) + rr * 128 + (((unit & 7) ^ (rr & 7)) << 4));
          const int row = w.m0 + rr;
          if (row < w.sq) st_global_v4(obase + (int64_t)row * p.o_row_stride + unit * 8, val);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = w.m0 + r0 + 8 * r;
        if (p.lse && t4 == 0 && row < w.sq)
          lse_at(row) = row_lse(row_max[r], row_sum[r]);
      }
    } else if (kShuffleO && o_aligned16) {
      // Each thread pair of a quad swaps half its packed columns (one shuffle per two 8-column chunks), so every lane
      // stores 8 contiguous bytes and a quad covers a whole 32-byte sector of the row. One row test and one address
      // per row; the chunks are immediate offsets from it (a test per store made ptxas sink the address arithmetic
      // into every store's branch: ~460 instructions per warp and item instead of ~200, PERF_NOTES v48).
      const bool odd = t4 & 1;
      const int col0 = 2 * t4 + (odd ? 6 : 0);  // chunk m: columns 16 m + col0, +1, +2, +3
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = w.m0 + r0 + 8 * r;
        uint32_t lo[kDT / 2], hi[kDT / 2];
#pragma unroll
        for (int m = 0; m < kDT / 2; ++m) {
          const uint32_t a =
              Pack2<T>::pack(acc_o[(2 * m) * 4 + 2 * r] * inv[r], acc_o[(2 * m) * 4 + 2 * r + 1] * inv[r]);
          const uint32_t b =
              Pack2<T>::pack(acc_o[(2 * m + 1) * 4 + 2 * r] * inv[r], acc_o[(2 * m + 1) * 4 + 2 * r + 1] * inv[r]);
          const uint32_t got = __shfl_xor_sync(0xffffffffu, odd ? a : b, 1);
          lo[m] = odd ? got : a;
          hi[m] = odd ? b : got;
        }
        if (row < w.sq) {
          T* dst = obase + (int64_t)row * p.o_row_stride + col0;
#pragma unroll
          for (int m = 0; m < kDT / 2; ++m)
            asm volatile("st.global.v2.b32 [%0], {%1, %2};\n" ::"l"(dst + 16 * m), "r"(lo[m]), "r"(hi[m]) : "memory");
          if (p.lse && t4 == 0) lse_at(row) = row_lse(row_max[r], row_sum[r]);
        }
      }
    } else {
#pragma unroll
      for (int r = 0; r < Tr::kRows; ++r) {
        const int row = w.m0 + r0 + 8 * r;
        if (row < w.sq) {
          T* orow = obase + (int64_t)row * p.o_row_stride;
#pragma unroll
          for (int dt = 0; dt < kDT; ++dt) {
            if (Tr::kSplitKeys && dt / (kDT / 2) != wg - 1) continue;  // split keys: each warpgroup stores its half
            *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * t4) =
                Pack2<T>::pack(acc_o[dt * 4 + 2 * r] * inv[r], acc_o[dt * 4 + 2 * r + 1] * inv[r]);
          }
          if (p.lse && t4 == 0 && (!Tr::kSplitKeys || wg == 1)) {
            lse_at(row) = row_lse(row_max[r], row_sum[r]);
          }
        }
      }
    }
    if constexpr (kStageO) {
      fence_proxy_async();  // generic accesses to this Q buffer come before the next TMA load into it
      mbar_arrive_if(!(kTmaO && q_release >= 0 && ctid == 0), &q_empty[n_items & 1]);
    }
    kv_base += w.n_tiles;
  }
  if constexpr (Tr::kPingPong) {
    if (wg == 1) asm volatile("bar.sync 1, 256;\n" ::: "memory");  // consume the last warpgroup's last arrive
  }
  if constexpr (kTmaO) {
    bulk_wait_all<false>();  // the last bulk stores have completed (thread 0's; the others have none)
  }

#endif
}

}  // namespace sm90
}  // namespace sparsek
