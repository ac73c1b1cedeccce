// FlashAttention-2 style forward kernel on mma.sync tensor cores (sm_80+, built for sm_90a and sm_100a).
//
// One CTA computes kBM query rows of one (sequence, query head); each warp owns 16 * kMT rows, so every K/V
// fragment read from shared memory feeds kMT MMAs. K/V tiles of kBN keys are
// streamed through a two-stage cp.async pipeline into XOR-swizzled shared memory and consumed with ldmatrix +
// m16n8k16 MMAs; the softmax is computed online in registers (base-2 exponentials, FA2 lazy row sums).
//
// Keys come from up to two phases: an optional index list (sparse mode: gathered key positions) and a contiguous
// band [lo, hi) (dense / causal / sliding window). Key positions of each tile are kept in shared memory so the same
// masking code serves both phases, paged K/V (block table) and varlen.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "fast_math.cuh"
#include "sparsek_abi.h"

namespace sparsek {

template <typename T>
struct Pack2;
template <>
struct Pack2<half> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <>
struct Pack2<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// Natural-log LSE of a softmax row from its running max (log2 units, scaled) and sum; -inf for a row without keys.
__device__ __forceinline__ float row_lse(float max_log2, float sum) {
  constexpr float kLn2 = 0.69314718055994530942f;
  return sum > 0.f ? (max_log2 + log2f(sum)) * kLn2 : -INFINITY;
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte async copy; src_bytes = 0 zero-fills the destination (used for out-of-range rows).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

// Element offset of 16-byte chunk `chunk` of row `row` in a [rows][kD] swizzled tile (kD >= 64).
template <int kD>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * kD + ((chunk ^ (row & 7)) << 3);
}

// kD head dim, kWarps warps of kMT m16 tiles each (kBM = 16 * kMT * kWarps query rows), kBN keys per tile.
// kIntervals_: index-list mode with a query interval per listed key (kv_intervals); a separate instantiation so that
// the other kernels keep their registers and shared memory.
template <int kD_, int kWarps_, int kMT_, int kBN_, typename T_, bool kIntervals_ = false>
struct FmhaTraits {
  using T = T_;
  static constexpr bool kIntervals = kIntervals_;
  static constexpr int kD = kD_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kMT = kMT_;
  static constexpr int kBM = 16 * kMT * kWarps;
  static constexpr int kBN = kBN_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kChunks = kD / 8;  // 16-byte chunks per row
  static constexpr bool kQInRegs = kD * kMT <= 128;  // keep Q fragments in registers when they fit
  static constexpr int kMinBlocks = 1;
  static constexpr int kSmemBytes = (kBM * kD + 4 * kBN * kD) * 2 + (kIntervals ? 2 : 1) * 2 * kBN * 4;
  static_assert(kD % 64 == 0, "head dim must be a multiple of 64 for the swizzle");
  static_assert(kBN % 16 == 0, "kBN must be a multiple of 16");
};

struct SeqInfo {
  int b, sq, sk, q_start, k_start;
};

template <typename Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks) fmha_fwd_kernel(const SkFmhaParams p) {
  using T = typename Tr::T;
  constexpr int kD = Tr::kD, kBM = Tr::kBM, kBN = Tr::kBN, kChunks = Tr::kChunks;
  constexpr int kNT = kBN / 8;  // n8 tiles of S
  constexpr int kDT = kD / 8;   // n8 tiles of O

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBM * kD;          // [2][kBN][kD]
  T* sV = sK + 2 * kBN * kD;      // [2][kBN][kD]
  int* sPos = reinterpret_cast<int*>(sV + 2 * kBN * kD);  // [2][kBN] key positions (-1 = invalid)
  int* sIv = sPos + 2 * kBN;  // [2][kBN] query intervals of listed keys (lo | hi << 16), with kv_intervals

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int h = blockIdx.y;
  const int hk = h / (p.heads_q / p.heads_kv);

  SeqInfo s;
  s.b = blockIdx.z;
  if (p.cu_seqlens_q) {
    s.q_start = p.cu_seqlens_q[s.b];
    s.sq = p.cu_seqlens_q[s.b + 1] - s.q_start;
  } else {
    s.q_start = 0;
    s.sq = p.seqlen_q;
  }
  if (p.cu_seqlens_k) {
    s.k_start = p.cu_seqlens_k[s.b];
    s.sk = p.cu_seqlens_k[s.b + 1] - s.k_start;
  } else {
    s.k_start = 0;
    s.sk = p.seqlen_k;
  }
  if (p.seqused_k) s.sk = p.seqused_k[s.b];

  // Heavier (later) query blocks first when the band grows with the row (causal).
  const int m_block = (p.window_right >= 0 && p.window_left < 0) ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int m0 = m_block * kBM;
  if (m0 >= s.sq) return;

  const int off = s.sk - s.sq;  // bottom-right alignment: query i sits at key position i + off
  const int pos_min = m0 + off;
  const int pos_max = min(m0 + kBM, s.sq) - 1 + off;

  // Index list (sparse mode).
  const int32_t* list = nullptr;
  int list_n = 0;
  if (p.kv_indices) {
    const int ib = m0 / p.index_block_q;
    list = p.kv_indices + s.b * p.kv_indices_batch_stride + hk * p.kv_indices_head_stride +
           ib * p.kv_indices_block_stride;
    list_n = p.kv_counts[s.b * p.kv_counts_batch_stride + hk * p.kv_counts_head_stride + ib];
  }
  // Query intervals of the list entries (kIntervals: kv_intervals, same layout as kv_indices).
  const int32_t* ivlist = nullptr;
  int row_in_list = 0;  // row of m0 inside its list's query block
  if constexpr (Tr::kIntervals) {
    ivlist = p.kv_intervals + (list - p.kv_indices);
    row_in_list = m0 - (m0 / p.index_block_q) * p.index_block_q;
  }
  // Contiguous band.
  int lo = 0, hi = 0;
  if (!p.kv_indices || p.window_left >= 0) {
    lo = p.window_left >= 0 ? max(0, pos_min - p.window_left) : 0;
    hi = p.window_right >= 0 ? min(s.sk, pos_max + p.window_right + 1) : s.sk;
    lo = (lo / kBN) * kBN;
    if (hi < lo) hi = lo;
  }
  const int run = p.kv_index_run > 1 ? p.kv_index_run : 1;  // keys per list entry (a multiple of kBN when > 1)
  const int n_list_tiles = run > 1 ? list_n * (run / kBN) : (list_n + kBN - 1) / kBN;
  const int n_tiles = n_list_tiles + (hi - lo + kBN - 1) / kBN;

  const T* qbase = reinterpret_cast<const T*>(p.q) + s.b * p.q_batch_stride + (int64_t)s.q_start * p.q_row_stride +
                   h * p.q_head_stride;
  const T* kbase = reinterpret_cast<const T*>(p.k) + hk * p.k_head_stride;
  const T* vbase = reinterpret_cast<const T*>(p.v) + hk * p.v_head_stride;
  if (!p.block_table) {
    kbase += s.b * p.k_batch_stride + (int64_t)s.k_start * p.k_row_stride;
    vbase += s.b * p.v_batch_stride + (int64_t)s.k_start * p.v_row_stride;
  }
  const int32_t* btab = p.block_table ? p.block_table + s.b * p.block_table_batch_stride : nullptr;

  // ---- issue loads -------------------------------------------------------------------------------------------
  auto load_q = [&]() {
    for (int c = tid; c < kBM * kChunks; c += Tr::kThreads) {
      const int r = c / kChunks, ch = c % kChunks;
      const bool ok = m0 + r < s.sq;
      const T* src = ok ? qbase + (int64_t)(m0 + r) * p.q_row_stride + ch * 8 : qbase;
      cp_async_16(smem_u32(sQ + swz<kD>(r, ch)), src, ok ? 16 : 0);
    }
  };
  auto load_kv = [&](int tile, int stage) {
    const bool in_list = tile < n_list_tiles;
    const int base = in_list ? tile * kBN : lo + (tile - n_list_tiles) * kBN;
    T* dK = sK + stage * kBN * kD;
    T* dV = sV + stage * kBN * kD;
    // Run mode: this tile covers keys [run_first, run_first + kBN) of one run (-1: the entry is padding).
    int run_first = -1;
    if (in_list && run > 1) {
      const int start = list[base / run];
      run_first = start >= 0 ? start + base % run : -1;
    }
    for (int c = tid; c < kBN * kChunks; c += Tr::kThreads) {
      const int r = c / kChunks, ch = c % kChunks;
      int j;
      if (in_list && run > 1) {
        j = run_first >= 0 && run_first + r < s.sk ? run_first + r : -1;
      } else if (in_list) {
        j = base + r < list_n ? list[base + r] : -1;
        if (j >= s.sk) j = -1;
      } else {
        j = base + r < hi ? base + r : -1;
      }
      const bool ok = j >= 0;
      const T* ks = kbase;
      const T* vs = vbase;
      if (ok) {
        if (btab) {
          const int64_t page = btab[j / p.page_size];
          const int in_page = j % p.page_size;
          ks += page * p.k_batch_stride + (int64_t)in_page * p.k_row_stride;
          vs += page * p.v_batch_stride + (int64_t)in_page * p.v_row_stride;
        } else {
          ks += (int64_t)j * p.k_row_stride;
          vs += (int64_t)j * p.v_row_stride;
        }
        ks += ch * 8;
        vs += ch * 8;
      }
      cp_async_16(smem_u32(dK + swz<kD>(r, ch)), ks, ok ? 16 : 0);
      cp_async_16(smem_u32(dV + swz<kD>(r, ch)), vs, ok ? 16 : 0);
      if (ch == 0) sPos[stage * kBN + r] = j;
      if constexpr (Tr::kIntervals) {
        if (ch == 0) sIv[stage * kBN + r] = in_list && base + r < list_n ? ivlist[base + r] : 0;
      }
    }
  };

  load_q();
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  // ---- per-thread state: kMT m16 tiles per warp; row index r = 2 * mt + half (half 0: row g, 1: row g + 8) ----
  constexpr int kMT = Tr::kMT;
  float acc_o[kMT][kDT][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int i = 0; i < kDT; ++i) acc_o[mt][i][0] = acc_o[mt][i][1] = acc_o[mt][i][2] = acc_o[mt][i][3] = 0.f;
  float row_max[2 * kMT], row_sum[2 * kMT];
  int qpos[2 * kMT];
  const int warp_row = warp * 16 * kMT;  // first row of this warp in the block
#pragma unroll
  for (int r = 0; r < 2 * kMT; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
    qpos[r] = m0 + warp_row + (r >> 1) * 16 + (r & 1) * 8 + g + off;
  }

  uint32_t q_frag[Tr::kQInRegs ? kMT : 1][Tr::kQInRegs ? kD / 16 : 1][4];
  const int a_row = warp_row + (lane & 7) + ((lane >> 3) & 1) * 8;  // ldmatrix row for A fragments (+16 per mt)
  const int a_chunk_hi = lane >> 4;

  cp_async_wait_all();
  __syncthreads();
  if constexpr (Tr::kQInRegs) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk)
        ldmatrix_x4(q_frag[mt][kk], smem_u32(sQ + swz<kD>(a_row + 16 * mt, 2 * kk + a_chunk_hi)));
  }

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile & 1;
    if (tile > 0) {
      cp_async_wait_all();
      __syncthreads();
    }
    if (tile + 1 < n_tiles) load_kv(tile + 1, stage ^ 1);
    cp_async_commit();

    const T* cK = sK + stage * kBN * kD;
    const T* cV = sV + stage * kBN * kD;

    // S = Q K^T (each K fragment feeds all kMT m-tiles)
    float acc_s[kMT][kNT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int i = 0; i < kNT; ++i) acc_s[mt][i][0] = acc_s[mt][i][1] = acc_s[mt][i][2] = acc_s[mt][i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t qa[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        if constexpr (Tr::kQInRegs) {
#pragma unroll
          for (int i = 0; i < 4; ++i) qa[mt][i] = q_frag[mt][kk][i];
        } else {
          ldmatrix_x4(qa[mt], smem_u32(sQ + swz<kD>(a_row + 16 * mt, 2 * kk + a_chunk_hi)));
        }
      }
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        uint32_t kb[4];
        const int key = np * 16 + (lane & 7) + (lane >> 4) * 8;
        ldmatrix_x4(kb, smem_u32(cK + swz<kD>(key, 2 * kk + ((lane >> 3) & 1))));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma16816<T>(acc_s[mt][2 * np], qa[mt], kb[0], kb[1]);
          mma16816<T>(acc_s[mt][2 * np + 1], qa[mt], kb[2], kb[3]);
        }
      }
    }

    // Scale to log2 units and mask.
    const bool in_list = tile < n_list_tiles;
    const int tbase = in_list ? 0 : lo + (tile - n_list_tiles) * kBN;
    const bool need_mask = in_list || tbase + kBN > hi ||
                           (p.window_right >= 0 && tbase + kBN - 1 > pos_min + p.window_right) ||
                           (p.window_left >= 0 && tbase < pos_max - p.window_left);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] *= p.scale_log2;
    if (need_mask) {
      const int* pos = sPos + stage * kBN;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int j = pos[nt * 8 + 2 * t4 + c];
#pragma unroll
          for (int r = 0; r < 2 * kMT; ++r) {
            const int qp = qpos[r];
            bool ok = j >= 0 && (p.window_right < 0 || j <= qp + p.window_right);
            if (!in_list) ok = ok && (p.window_left < 0 || j >= qp - p.window_left);
            if (!ok) acc_s[r >> 1][nt][(r & 1) * 2 + c] = -INFINITY;
          }
        }
      }
      if constexpr (Tr::kIntervals) {
        if (in_list) {  // listed key j only for the query rows lo <= row < hi of its list's block
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int iv = sIv[stage * kBN + nt * 8 + 2 * t4 + c];
#pragma unroll
              for (int r = 0; r < 2 * kMT; ++r) {
                const int row = qpos[r] - pos_min + row_in_list;
                if (row < (iv & 0xffff) || row >= (iv >> 16)) acc_s[r >> 1][nt][(r & 1) * 2 + c] = -INFINITY;
              }
            }
          }
        }
      }
    }

    // Online softmax.
#pragma unroll
    for (int r = 0; r < 2 * kMT; ++r) {
      const int mt = r >> 1, e0 = (r & 1) * 2;
      float mx = row_max[r];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(acc_s[mt][nt][e0], acc_s[mt][nt][e0 + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
      const float base = mx == -INFINITY ? 0.f : mx;
      const float corr = sparsek_math::fast_exp2(row_max[r] - base);
      row_max[r] = mx;
      float sum = row_sum[r] * corr;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        acc_o[mt][dt][e0] *= corr;
        acc_o[mt][dt][e0 + 1] *= corr;
      }
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        acc_s[mt][nt][e0] = sparsek_math::fast_exp2(acc_s[mt][nt][e0] - base);
        acc_s[mt][nt][e0 + 1] = sparsek_math::fast_exp2(acc_s[mt][nt][e0 + 1] - base);
        sum += acc_s[mt][nt][e0] + acc_s[mt][nt][e0 + 1];
      }
      row_sum[r] = sum;
    }

    // O += P V (each V fragment feeds all kMT m-tiles)
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t pa[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        pa[mt][0] = Pack2<T>::pack(acc_s[mt][2 * kk][0], acc_s[mt][2 * kk][1]);
        pa[mt][1] = Pack2<T>::pack(acc_s[mt][2 * kk][2], acc_s[mt][2 * kk][3]);
        pa[mt][2] = Pack2<T>::pack(acc_s[mt][2 * kk + 1][0], acc_s[mt][2 * kk + 1][1]);
        pa[mt][3] = Pack2<T>::pack(acc_s[mt][2 * kk + 1][2], acc_s[mt][2 * kk + 1][3]);
      }
      const int key = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, smem_u32(cV + swz<kD>(key, 2 * dp + (lane >> 4))));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma16816<T>(acc_o[mt][2 * dp], pa[mt], vb[0], vb[1]);
          mma16816<T>(acc_o[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
        }
      }
    }
  }
  cp_async_wait_all();

  // ---- epilogue: normalize, stage through shared memory (this warp's own rows), store -----------------------------
  // Each warp read (Q) and now writes (O) only its own rows of sQ, so no CTA barrier is needed here.
  float inv[2 * kMT];
#pragma unroll
  for (int r = 0; r < 2 * kMT; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 2);
    inv[r] = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
  }
  __syncwarp();
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    const int r0 = warp_row + mt * 16 + g;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      const int col = 2 * t4;
      *reinterpret_cast<uint32_t*>(sQ + swz<kD>(r0, dt) + col) =
          Pack2<T>::pack(acc_o[mt][dt][0] * inv[2 * mt], acc_o[mt][dt][1] * inv[2 * mt]);
      *reinterpret_cast<uint32_t*>(sQ + swz<kD>(r0 + 8, dt) + col) =
          Pack2<T>::pack(acc_o[mt][dt][2] * inv[2 * mt + 1], acc_o[mt][dt][3] * inv[2 * mt + 1]);
    }
  }
  __syncwarp();
  T* obase = reinterpret_cast<T*>(p.o) + s.b * p.o_batch_stride + (int64_t)s.q_start * p.o_row_stride +
             h * p.o_head_stride;
  for (int c = lane; c < 16 * kMT * kChunks; c += 32) {
    const int r = warp_row + c / kChunks, ch = c % kChunks;
    if (m0 + r < s.sq) {
      *reinterpret_cast<uint4*>(obase + (int64_t)(m0 + r) * p.o_row_stride + ch * 8) =
          *reinterpret_cast<const uint4*>(sQ + swz<kD>(r, ch));
    }
  }
  if (p.lse && t4 == 0) {
    float* lbase = p.lse + s.b * p.lse_batch_stride + h * p.lse_head_stride + s.q_start;
#pragma unroll
    for (int r = 0; r < 2 * kMT; ++r) {
      const int row = qpos[r] - off;
      if (row < s.sq) lbase[row] = row_lse(row_max[r], row_sum[r]);
    }
  }
}

}  // namespace sparsek
