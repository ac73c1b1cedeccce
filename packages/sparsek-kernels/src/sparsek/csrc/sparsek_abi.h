// C ABI between the Python package (ctypes) and the CUDA kernels. Keep in sync with sparsek/_lib.py.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Dense / varlen / paged FMHA forward. All strides are in elements.
// Dense: batch b, row i of q at q + b*q_batch_stride + i*q_row_stride + h*q_head_stride.
// Varlen (cu_seqlens_q != NULL): row i of sequence b at q + (cu_seqlens_q[b] + i)*q_row_stride (batch stride ignored);
//   same for k/v with cu_seqlens_k. lse index: h*lse_head_stride + cu_seqlens_q[b] + i.
// seqused_k (optional): number of keys of sequence b (overrides seqlen_k / cu_seqlens_k lengths).
// Paged (block_table != NULL): key j of sequence b lives in page block_table[b*block_table_batch_stride + j/page_size],
//   row j%page_size: k + page*k_batch_stride + (j%page_size)*k_row_stride + h*k_head_stride (same for v).
typedef struct {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;  // may be NULL
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  const int32_t* seqused_k;
  const int32_t* block_table;
  // Index-list (sparse) mode, kv_indices != NULL: queries [m*index_block_q, (m+1)*index_block_q) of sequence b,
  // kv head h, attend the key positions kv_indices[b, h, m, :kv_counts[b, h, m]] (-1 entries skipped; a listed key
  // j is masked only by j <= pos + window_right when window_right >= 0), plus, when window_left >= 0, their own band
  // [pos - window_left, pos + window_right]. Listed keys must not repeat and must lie outside the band.
  const int32_t* kv_indices;
  const int32_t* kv_counts;
  int64_t kv_indices_batch_stride, kv_indices_head_stride, kv_indices_block_stride;
  int64_t kv_counts_batch_stride, kv_counts_head_stride;
  int32_t index_block_q;  // 64 or 128
  int32_t pad0;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t lse_batch_stride, lse_head_stride;
  int64_t block_table_batch_stride;
  int32_t batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim;
  int32_t page_size;
  int32_t window_left, window_right;  // -1 = unbounded; causal is window_right = 0
  int32_t is_bf16;
  float scale_log2;  // softmax scale * log2(e)
  int32_t total_q, total_k;  // rows of the q / k tensors (varlen: packed totals; dense: seqlen_q / seqlen_k)
  // Index-list run length: 0 or 1 = every entry is one key position; R > 1 (a multiple of 64) = every entry is the
  // first position of R consecutive keys (block-sparse lists without expanding them to tokens).
  int32_t kv_index_run;
  int32_t pad1;
  // Optional with kv_indices and kv_index_run <= 1: query interval of every list entry (same strides as kv_indices),
  // lo | hi << 16: entry e of list m is attended only by the list's queries r (relative to m*index_block_q) with
  // lo <= r < hi (a per-query selection written as one list per block; see sparsek/selection_intervals.py).
  const int32_t* kv_intervals;
} SkFmhaParams;

// Returns 0 (cudaSuccess) or a cudaError_t / negative sparsek error code; never aborts.
int sk_fmha_fwd(const SkFmhaParams* params, void* stream);
const char* sk_error_string(int code);
int sk_abi_version(void);

#ifdef __cplusplus
}
#endif
