// Per-query top-k attention forward: one CTA per (query, KV head, chunk of <= 16 query heads of the group).
// The CTA walks a virtual key list, the query's band followed by its listed keys, in tiles of 32 keys per warp
// (4 warps split the tiles), gathers the K rows (one row per lane) and V rows (one row per warp step, coalesced),
// keeps an online softmax per query head in registers, and merges the 4 warps' partial results at the end.
// The gathered K/V rows are shared by all query heads of the GQA group. See sparse_abi.h for the contract.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "fast_math.cuh"
#include "sparse_abi.h"

namespace sk_topk {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLn2 = 0.69314718055994531f;

template <typename T>
struct Cvt;
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float2 f2(uint32_t u) { return __half22float2(*reinterpret_cast<__half2*>(&u)); }
  static __device__ __forceinline__ float f(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float2 f2(uint32_t u) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
  }
  static __device__ __forceinline__ float f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// V row slice of one lane: D/32 elements (2 or 4 halves = 4 or 8 bytes).
template <int D>
struct VSlice;
template <>
struct VSlice<64> {
  using Raw = uint32_t;
};
template <>
struct VSlice<128> {
  using Raw = uint2;
};

template <typename T, int D>
__device__ __forceinline__ void load_v(const T* row, int lane, float (&out)[D / 32]) {
  using Raw = typename VSlice<D>::Raw;
  const Raw raw = __ldg(reinterpret_cast<const Raw*>(row) + lane);
  const uint32_t* w = reinterpret_cast<const uint32_t*>(&raw);
#pragma unroll
  for (int i = 0; i < D / 64; ++i) {
    const float2 f = Cvt<T>::f2(w[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <typename T, int D, int GC>
__global__ void __launch_bounds__(kThreads) topk_attn_kernel(const SkTopkAttnParams p) {
  constexpr int DPL = D / 32;
  __shared__ __align__(16) float q_s[GC][D];
  __shared__ float m_s[kWarps][GC];
  __shared__ float l_s[kWarps][GC];
  __shared__ float o_s[kWarps][GC][D];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int i = blockIdx.x;
  const int b = blockIdx.y / p.heads_kv, hk = blockIdx.y % p.heads_kv;
  const int group = p.heads_q / p.heads_kv;
  const int g0 = blockIdx.z * GC;
  const int gn = min(GC, group - g0);
  const int hq0 = hk * group + g0;

  const T* qp = static_cast<const T*>(p.q) + b * p.q_batch_stride + static_cast<int64_t>(i) * p.q_row_stride;
  for (int e = tid; e < GC * D; e += kThreads) {
    const int g = e / D, d = e % D;
    q_s[g][d] = g < gn ? Cvt<T>::f(qp[(hq0 + g) * p.q_head_stride + d]) * p.scale_log2 : 0.f;
  }
  __syncthreads();

  const int pos = i + p.seqlen_k - p.seqlen_q;
  int band_lo = 0, nband = 0;
  if (p.window > 0 && pos >= 0) {
    band_lo = max(pos - p.window + 1, 0);
    nband = min(pos, p.seqlen_k - 1) - band_lo + 1;
    nband = max(nband, 0);
  }
  const int band_hi = band_lo + nband - 1;
  const int total = p.seqlen_k > 0 ? nband + p.num_indices : 0;  // no key row to read when Sk == 0
  const int32_t* idx = p.indices + b * p.idx_batch_stride + hk * p.idx_head_stride +
                       static_cast<int64_t>(i) * p.idx_row_stride;
  const T* kbase = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;

  float m[GC], l[GC], acc[GC][DPL];
#pragma unroll
  for (int g = 0; g < GC; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int d = 0; d < DPL; ++d) acc[g][d] = 0.f;
  }

  for (int tile = warp; tile * 32 < total; tile += kWarps) {
    const int t = tile * 32 + lane;
    int key = -1;
    if (t < nband) {
      key = band_lo + t;
    } else if (t < total) {
      const int j = __ldg(idx + (t - nband));
      const bool ok = j >= 0 && j < p.seqlen_k && !(p.causal && j > pos) && !(nband > 0 && j >= band_lo && j <= band_hi);
      key = ok ? j : -1;
    }
    // Scores of this lane's key for every head of the chunk (log2 domain).
    float s[GC];
#pragma unroll
    for (int g = 0; g < GC; ++g) s[g] = 0.f;
    {
      const uint4* krow = reinterpret_cast<const uint4*>(kbase + static_cast<int64_t>(key < 0 ? 0 : key) * p.k_row_stride);
#pragma unroll 4
      for (int c = 0; c < D / 8; ++c) {
        const uint4 raw = __ldg(krow + c);
        const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
        float kf[8];
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const float2 f = Cvt<T>::f2(w[x]);
          kf[2 * x] = f.x;
          kf[2 * x + 1] = f.y;
        }
#pragma unroll
        for (int g = 0; g < GC; ++g) {
          const float4 qa = *reinterpret_cast<const float4*>(&q_s[g][c * 8]);
          const float4 qb = *reinterpret_cast<const float4*>(&q_s[g][c * 8 + 4]);
          s[g] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] + qb.y * kf[5] +
                  qb.z * kf[6] + qb.w * kf[7];
        }
      }
    }
    float pr[GC];
#pragma unroll
    for (int g = 0; g < GC; ++g) {
      const float sg = key >= 0 ? s[g] : -INFINITY;
      const float m_new = fmaxf(m[g], warp_max(sg));
      if (m_new == -INFINITY) {  // nothing valid so far (warp-uniform)
        pr[g] = 0.f;
        continue;
      }
      const float alpha = sparsek_math::fast_exp2(m[g] - m_new);  // m = -inf gives 0
      pr[g] = sparsek_math::fast_exp2(sg - m_new);
      l[g] = l[g] * alpha + warp_sum(pr[g]);
      m[g] = m_new;
#pragma unroll
      for (int d = 0; d < DPL; ++d) acc[g][d] *= alpha;
    }
    // P V: the warp steps through its 32 keys; each lane owns D/32 output dims.
    const int nk = min(32, total - tile * 32);
#pragma unroll 4
    for (int kk = 0; kk < nk; ++kk) {
      const int kj = __shfl_sync(0xffffffffu, key, kk);
      float vf[DPL];
      load_v<T, D>(vbase + static_cast<int64_t>(kj < 0 ? 0 : kj) * p.v_row_stride, lane, vf);
#pragma unroll
      for (int g = 0; g < GC; ++g) {
        const float pg = __shfl_sync(0xffffffffu, pr[g], kk);  // 0 for masked keys
#pragma unroll
        for (int d = 0; d < DPL; ++d) acc[g][d] = fmaf(pg, vf[d], acc[g][d]);
      }
    }
  }

#pragma unroll
  for (int g = 0; g < GC; ++g) {
    if (lane == 0) {
      m_s[warp][g] = m[g];
      l_s[warp][g] = l[g];
    }
#pragma unroll
    for (int d = 0; d < DPL; ++d) o_s[warp][g][lane * DPL + d] = acc[g][d];
  }
  __syncthreads();

  T* op = static_cast<T*>(p.o) + b * p.o_batch_stride + static_cast<int64_t>(i) * p.o_row_stride;
  for (int e = tid; e < gn * D; e += kThreads) {
    const int g = e / D, d = e % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, m_s[w][g]);
    float out = 0.f;
    if (mx != -INFINITY) {
      float lsum = 0.f, osum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float c = sparsek_math::fast_exp2(m_s[w][g] - mx);
        lsum += l_s[w][g] * c;
        osum += o_s[w][g][d] * c;
      }
      out = osum / lsum;
    }
    op[(hq0 + g) * p.o_head_stride + d] = Cvt<T>::from(out);
  }
  if (p.lse != nullptr && tid < gn) {
    const int g = tid;
    float mx = -INFINITY;
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, m_s[w][g]);
    float lse = -INFINITY;
    if (mx != -INFINITY) {
      float lsum = 0.f;
      for (int w = 0; w < kWarps; ++w) lsum += l_s[w][g] * sparsek_math::fast_exp2(m_s[w][g] - mx);
      lse = (mx + log2f(lsum)) * kLn2;
    }
    p.lse[b * p.lse_batch_stride + (hq0 + g) * p.lse_head_stride + i] = lse;
  }
}

template <typename T, int D>
cudaError_t launch_d(const SkTopkAttnParams& p, cudaStream_t st) {
  const int group = p.heads_q / p.heads_kv;
  const int gc = group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : group <= 8 ? 8 : 16;
  dim3 grid(p.seqlen_q, p.batch * p.heads_kv, (group + gc - 1) / gc);
  switch (gc) {
    case 1: topk_attn_kernel<T, D, 1><<<grid, kThreads, 0, st>>>(p); break;
    case 2: topk_attn_kernel<T, D, 2><<<grid, kThreads, 0, st>>>(p); break;
    case 4: topk_attn_kernel<T, D, 4><<<grid, kThreads, 0, st>>>(p); break;
    case 8: topk_attn_kernel<T, D, 8><<<grid, kThreads, 0, st>>>(p); break;
    default: topk_attn_kernel<T, D, 16><<<grid, kThreads, 0, st>>>(p); break;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_t(const SkTopkAttnParams& p, cudaStream_t st) {
  return p.head_dim == 64 ? launch_d<T, 64>(p, st) : launch_d<T, 128>(p, st);
}

}  // namespace sk_topk

extern "C" int sk_topk_attn_fwd(const SkTopkAttnParams* params, void* stream) {
  using namespace sk_topk;
  if (params == nullptr) return cudaErrorInvalidValue;
  const SkTopkAttnParams& p = *params;
  if (p.head_dim != 64 && p.head_dim != 128) return cudaErrorInvalidValue;
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0 || p.batch < 0 || p.seqlen_q < 0 || p.seqlen_k < 0 ||
      p.num_indices < 0 || p.window < 0)
    return cudaErrorInvalidValue;
  if (p.num_indices > 0 && p.indices == nullptr) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.seqlen_q == 0 || p.heads_q == 0) return cudaSuccess;
  if (static_cast<int64_t>(p.batch) * p.heads_kv > 65535) return cudaErrorInvalidConfiguration;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return p.is_bf16 ? launch_t<__nv_bfloat16>(p, st) : launch_t<__half>(p, st);
}
