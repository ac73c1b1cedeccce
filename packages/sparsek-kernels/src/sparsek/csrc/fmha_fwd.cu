// Host-side dispatch of the FMHA forward kernel: validates what Python cannot, picks the tile configuration,
// raises the dynamic shared-memory limit once per instantiation and launches on the caller's stream.
#include <cuda_runtime.h>

#include <cstdlib>
#include <mutex>

#include "fmha_kernel.cuh"

namespace sparsek {

enum SkError : int {
  kErrBadHeadDim = -1,
  kErrBadIndexBlock = -2,
  kErrBadHeads = -3,
};

template <int kD, int kWarps, int kMT, int kBN, typename T>
static cudaError_t launch(const SkFmhaParams& p, cudaStream_t stream) {
  using Tr = FmhaTraits<kD, kWarps, kMT, kBN, T>;
  constexpr int kBM = Tr::kBM;
  auto kernel = fmha_fwd_kernel<Tr>;
  static std::once_flag once;
  static cudaError_t attr_err = cudaSuccess;
  std::call_once(once, [&] {
    attr_err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  });
  if (attr_err != cudaSuccess) return attr_err;
  dim3 grid((p.seqlen_q + kBM - 1) / kBM, p.heads_q, p.batch);
  if (grid.x == 0 || grid.z == 0) return cudaSuccess;
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

static int num_sms() {
  static int n = 0;
  if (n == 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    if (n <= 0) n = 1;
  }
  return n;
}

// SPARSEK_FMHA_TILE=64|128 forces the query tile size (a tuning knob for benchmarks; 0/unset = heuristic).
static int tile_override() {
  static const int v = [] {
    const char* e = std::getenv("SPARSEK_FMHA_TILE");
    return e ? std::atoi(e) : 0;
  }();
  return v;
}

template <typename T>
static cudaError_t dispatch(const SkFmhaParams& p, cudaStream_t stream) {
  // Small grids leave SMs idle with 128-row tiles: use 64-row tiles when 128 would give under two waves.
  bool small_tiles;
  if (p.kv_indices) {
    small_tiles = p.index_block_q == 64;
  } else if (tile_override() != 0) {
    small_tiles = tile_override() == 64;
  } else {
    const long blocks128 = (long)((p.seqlen_q + 127) / 128) * p.heads_q * p.batch;
    small_tiles = blocks128 < 2L * num_sms();
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
    default:
      return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}

extern "C" int sk_abi_version(void) { return 1; }
