// Paged decode attention (one query per request) tuned for GQA, with split-KV for long contexts.
//
// Grid (num_splits, heads_kv * slices, batch). One CTA serves up to kG query heads that share one KV head
// (all of them when heads_q / heads_kv <= 8), so every K/V row is read from memory once per CTA and used kG times.
// The head dim is cut into 16-byte chunks: kD / 8 lanes ("thread group") cooperate on one key, each lane holding
// 8 elements of K/V and of the kG query vectors (in registers, pre-scaled by scale * log2 e). A warp holds
// 32 / (kD / 8) thread groups; each group walks its own subsequence of keys with kU keys in flight, reduces the
// q.k partial dots with shuffles inside the group and keeps an online softmax (max, sum, 8-wide accumulator per
// head). At the end the groups are merged through shuffles (same warp) and shared memory (across warps).
//
// With num_splits > 1 the request's key range is cut into num_splits chunks (multiples of 16 keys); each CTA writes
// a normalised float32 partial output and its LSE to the workspace, and paged_decode_combine merges them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

#include "device_info.cuh"
#include "fast_math.cuh"
#include "paged_abi.h"

namespace sparsek_paged {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxGroup = 8;      // query heads per CTA
constexpr int kMaxSplits = 128;   // upper bound of num_splits (combine kernel smem)
constexpr int kSplitAlign = 16;   // split chunks are multiples of this many keys
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

using sparsek_math::fast_exp2;

template <typename T>
struct Vec8;
template <>
struct Vec8<half> {
  static __device__ __forceinline__ void to_float(const uint4& u, float (&f)[8]) {
    const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __half22float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  static __device__ __forceinline__ half from_float(float x) { return __float2half_rn(x); }
};
template <>
struct Vec8<__nv_bfloat16> {
  static __device__ __forceinline__ void to_float(const uint4& u, float (&f)[8]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __bfloat1622float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ uint4 ldg16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// Key range [lo, hi) of split `split` of request b; returns false when the request has no query in this batch.
__device__ __forceinline__ bool request_range(const SkPagedDecodeParams& p, int b, int split, int& q_row, int& lo,
                                              int& hi) {
  q_row = b;
  if (p.cu_seqlens_q) {
    q_row = p.cu_seqlens_q[b];
    if (p.cu_seqlens_q[b + 1] == q_row) return false;
  }
  const int n = p.seq_lens[b];
  const int first = p.window_left >= 0 ? max(0, n - 1 - p.window_left) : 0;
  const int span = max(n - first, 0);
  int chunk = (span + p.num_splits - 1) / p.num_splits;
  chunk = (chunk + kSplitAlign - 1) / kSplitAlign * kSplitAlign;
  lo = first + split * chunk;
  hi = min(n, lo + chunk);
  return true;
}

template <typename T, int kD, int kG, int kU>
__global__ void __launch_bounds__(kThreads) paged_decode_kernel(const SkPagedDecodeParams p) {
  constexpr int kTPK = kD / 8;       // lanes per key
  constexpr int kKPW = 32 / kTPK;    // thread groups per warp
  constexpr int kGroups = kWarps * kKPW;
  constexpr int kStep = kGroups * kU;  // keys per CTA iteration

  __shared__ float sm_m[kGroups][kG];
  __shared__ float sm_l[kWarps][kG];
  __shared__ float sm_acc[kWarps][kG][kD];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int chunk = lane % kTPK;
  const int group = warp * kKPW + lane / kTPK;

  const int split = blockIdx.x, b = blockIdx.z;
  const int group_size = p.heads_q / p.heads_kv;
  const int slices = (group_size + kG - 1) / kG;
  const int hk = blockIdx.y / slices;
  const int g0 = (blockIdx.y % slices) * kG;
  const int ng = min(kG, group_size - g0);
  const int h0 = hk * group_size + g0;  // first query head of this CTA

  int q_row, lo, hi;
  if (!request_range(p, b, split, q_row, lo, hi)) return;

  // Query vectors of this lane's chunk, pre-scaled into the log2 domain.
  const float qscale = p.scale * kLog2e;
  float qf[kG][8];
  {
    const T* qb = static_cast<const T*>(p.q) + (int64_t)q_row * p.q_row_stride + (int64_t)h0 * p.q_head_stride;
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      if (g < ng) {
        Vec8<T>::to_float(ldg16(qb + g * p.q_head_stride + chunk * 8), qf[g]);
#pragma unroll
        for (int i = 0; i < 8; ++i) qf[g][i] *= qscale;
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) qf[g][i] = 0.f;
      }
    }
  }

  float m[kG], l[kG], acc[kG][8];
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    m[g] = -CUDART_INF_F;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
  }

  const int32_t* btab = p.block_table + (int64_t)b * p.block_table_stride;
  const T* kc = static_cast<const T*>(p.key_cache) + (int64_t)hk * p.k_head_stride + chunk * 8;
  const T* vc = static_cast<const T*>(p.value_cache) + (int64_t)hk * p.v_head_stride + chunk * 8;

  for (int base = lo; base < hi; base += kStep) {
    uint4 kr[kU], vr[kU];
    bool valid[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int j = base + u * kGroups + group;
      valid[u] = j < hi;
      if (valid[u]) {
        const int64_t page = btab[j / p.block_size];
        const int64_t row = j % p.block_size;
        kr[u] = ldg16(kc + page * p.k_block_stride + row * p.k_row_stride);
        vr[u] = ldg16(vc + page * p.v_block_stride + row * p.v_row_stride);
      } else {
        kr[u] = make_uint4(0, 0, 0, 0);
        vr[u] = make_uint4(0, 0, 0, 0);
      }
    }
    float s[kU][kG];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      float kf[8];
      Vec8<T>::to_float(kr[u], kf);
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) d = fmaf(qf[g][i], kf[i], d);
        s[u][g] = d;
      }
    }
#pragma unroll
    for (int off = kTPK / 2; off > 0; off >>= 1) {
#pragma unroll
      for (int u = 0; u < kU; ++u)
#pragma unroll
        for (int g = 0; g < kG; ++g) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], off);
    }
#pragma unroll
    for (int u = 0; u < kU; ++u)
      if (!valid[u])
#pragma unroll
        for (int g = 0; g < kG; ++g) s[u][g] = -CUDART_INF_F;

    float vf[kU][8];
#pragma unroll
    for (int u = 0; u < kU; ++u) Vec8<T>::to_float(vr[u], vf[u]);
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      float mnew = m[g];
#pragma unroll
      for (int u = 0; u < kU; ++u) mnew = fmaxf(mnew, s[u][g]);
      if (mnew == -CUDART_INF_F) continue;  // nothing valid seen yet
      const float alpha = fast_exp2(m[g] - mnew);  // m = -inf gives 0
      l[g] *= alpha;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] *= alpha;
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const float pu = fast_exp2(s[u][g] - mnew);
        l[g] += pu;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(pu, vf[u][i], acc[g][i]);
      }
      m[g] = mnew;
    }
  }

  // ---- merge the thread groups of the CTA ------------------------------------------------------------------------
  if (chunk == 0) {
#pragma unroll
    for (int g = 0; g < kG; ++g) sm_m[group][g] = m[g];
  }
  __syncthreads();
  float mx[kG];
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    mx[g] = -CUDART_INF_F;
    for (int i = 0; i < kGroups; ++i) mx[g] = fmaxf(mx[g], sm_m[i][g]);
    const float sc = (m[g] == -CUDART_INF_F) ? 0.f : fast_exp2(m[g] - mx[g]);
    l[g] *= sc;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] *= sc;
  }
#pragma unroll
  for (int off = kTPK; off < 32; off <<= 1) {
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      l[g] += __shfl_xor_sync(0xffffffffu, l[g], off);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] += __shfl_xor_sync(0xffffffffu, acc[g][i], off);
    }
  }
  if (lane < kTPK) {
#pragma unroll
    for (int g = 0; g < kG; ++g) {
#pragma unroll
      for (int i = 0; i < 8; ++i) sm_acc[warp][g][chunk * 8 + i] = acc[g][i];
      if (chunk == 0) sm_l[warp][g] = l[g];
    }
  }
  __syncthreads();

  const bool direct = p.num_splits == 1;
  for (int idx = tid; idx < kG * kD; idx += kThreads) {
    const int g = idx / kD, d = idx % kD;
    if (g >= ng) continue;
    float sum = 0.f, lsum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      sum += sm_acc[w][g][d];
      lsum += sm_l[w][g];
    }
    const float o = lsum > 0.f ? sum / lsum : 0.f;
    const float lse = lsum > 0.f ? (mx[g] + log2f(lsum)) * kLn2 : -CUDART_INF_F;
    const int h = h0 + g;
    if (direct) {
      T* op = static_cast<T*>(p.o) + (int64_t)q_row * p.o_row_stride + (int64_t)h * p.o_head_stride;
      op[d] = Vec8<T>::from_float(o);
      if (d == 0 && p.lse) p.lse[(int64_t)h * p.lse_head_stride + q_row] = lse;
    } else {
      const int64_t part = ((int64_t)b * p.num_splits + split) * p.heads_q + h;
      p.o_partial[part * kD + d] = o;
      if (d == 0) p.lse_partial[part] = lse;
    }
  }
}

// Merge the num_splits partial results of one (request, query head).
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) paged_decode_combine_kernel(const SkPagedDecodeParams p) {
  __shared__ float sm_w[kMaxSplits];
  __shared__ float sm_lse;
  const int b = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
  int q_row = b;
  if (p.cu_seqlens_q) {
    q_row = p.cu_seqlens_q[b];
    if (p.cu_seqlens_q[b + 1] == q_row) return;
  }
  const int S = p.num_splits;
  const int64_t part0 = (int64_t)b * S * p.heads_q + h;  // split s at part0 + s * heads_q
  if (tid < 32) {
    float mx = -CUDART_INF_F;
    for (int s = tid; s < S; s += 32) mx = fmaxf(mx, p.lse_partial[part0 + (int64_t)s * p.heads_q]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float wsum = 0.f;
    for (int s = tid; s < S; s += 32) {
      const float ls = p.lse_partial[part0 + (int64_t)s * p.heads_q];
      const float w = (mx == -CUDART_INF_F) ? 0.f : __expf(ls - mx);  // ls = -inf gives 0
      sm_w[s] = w;
      wsum += w;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) wsum += __shfl_xor_sync(0xffffffffu, wsum, off);
    if (tid == 0) sm_lse = wsum > 0.f ? mx + __logf(wsum) : -CUDART_INF_F;
    for (int s = tid; s < S; s += 32) sm_w[s] = wsum > 0.f ? sm_w[s] / wsum : 0.f;
  }
  __syncthreads();
  T* op = static_cast<T*>(p.o) + (int64_t)q_row * p.o_row_stride + (int64_t)h * p.o_head_stride;
  for (int d = tid; d < kD; d += kThreads) {
    float o = 0.f;
    for (int s = 0; s < S; ++s) o = fmaf(sm_w[s], p.o_partial[(part0 + (int64_t)s * p.heads_q) * kD + d], o);
    op[d] = Vec8<T>::from_float(o);
  }
  if (tid == 0 && p.lse) p.lse[(int64_t)h * p.lse_head_stride + q_row] = sm_lse;
}

static int num_sms() { return sparsek_device::num_sms(); }

static int group_tile(int group_size) {
  if (group_size <= 1) return 1;
  if (group_size <= 2) return 2;
  if (group_size <= 4) return 4;
  return kMaxGroup;
}

template <typename T, int kD, int kG>
static cudaError_t launch_main(const SkPagedDecodeParams& p, cudaStream_t stream) {
  constexpr int kU = kG >= 8 ? 2 : 4;
  const int slices = (p.heads_q / p.heads_kv + kG - 1) / kG;
  const dim3 grid(p.num_splits, p.heads_kv * slices, p.batch);
  paged_decode_kernel<T, kD, kG, kU><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kD>
static cudaError_t launch_d(const SkPagedDecodeParams& p, cudaStream_t stream) {
  cudaError_t err;
  switch (group_tile(p.heads_q / p.heads_kv)) {
    case 1:
      err = launch_main<T, kD, 1>(p, stream);
      break;
    case 2:
      err = launch_main<T, kD, 2>(p, stream);
      break;
    case 4:
      err = launch_main<T, kD, 4>(p, stream);
      break;
    default:
      err = launch_main<T, kD, kMaxGroup>(p, stream);
      break;
  }
  if (err != cudaSuccess || p.num_splits == 1) return err;
  paged_decode_combine_kernel<T, kD><<<dim3(p.batch, p.heads_q), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
static cudaError_t dispatch(const SkPagedDecodeParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64:
      return launch_d<T, 64>(p, stream);
    case 128:
      return launch_d<T, 128>(p, stream);
    case 256:
      return launch_d<T, 256>(p, stream);
    default:
      return static_cast<cudaError_t>(SK_PAGED_ERR_HEAD_DIM);
  }
}

}  // namespace sparsek_paged

extern "C" int sk_paged_decode(const SkPagedDecodeParams* params, void* stream) {
  using namespace sparsek_paged;
  const SkPagedDecodeParams& p = *params;
  if (p.heads_kv <= 0 || p.heads_q <= 0 || p.heads_q % p.heads_kv != 0) return SK_PAGED_ERR_HEADS;
  if (p.block_size <= 0) return SK_PAGED_ERR_BLOCK_SIZE;
  if (p.num_splits < 1 || p.num_splits > kMaxSplits) return SK_PAGED_ERR_SPLITS;
  if (p.num_splits > 1 && (!p.o_partial || !p.lse_partial)) return SK_PAGED_ERR_SPLITS;
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256) return SK_PAGED_ERR_HEAD_DIM;
  if (p.batch <= 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  return p.is_bf16 ? dispatch<__nv_bfloat16>(p, s) : dispatch<half>(p, s);
}

extern "C" int64_t sk_paged_decode_workspace_floats(int32_t batch, int32_t heads_q, int32_t head_dim,
                                                    int32_t num_splits) {
  if (num_splits <= 1) return 0;
  const int64_t parts = (int64_t)batch * num_splits * heads_q;
  return parts * head_dim + parts;
}

extern "C" int32_t sk_paged_decode_num_splits(int32_t batch, int32_t heads_q, int32_t heads_kv,
                                              int32_t max_seqlen_k) {
  using namespace sparsek_paged;
  if (batch <= 0 || heads_kv <= 0 || heads_q % heads_kv != 0) return 1;
  const int gt = group_tile(heads_q / heads_kv);
  const int64_t ctas = (int64_t)batch * heads_kv * ((heads_q / heads_kv + gt - 1) / gt);
  const int64_t target = 2LL * num_sms();  // about two CTAs per SM
  if (ctas >= target) return 1;
  const int64_t by_work = (target + ctas - 1) / ctas;
  const int64_t by_len = (max_seqlen_k + 255) / 256;  // at least ~256 keys per split
  int64_t n = by_work < by_len ? by_work : by_len;
  if (n > 64) n = 64;
  return n < 1 ? 1 : static_cast<int32_t>(n);
}
