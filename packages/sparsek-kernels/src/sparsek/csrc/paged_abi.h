// C ABI of the paged-KV kernels (KV-cache write and paged decode). Keep in sync with sparsek/paged.py.
//
// Cache layout (vLLM / FlashAttention paged layout): key_cache and value_cache are
// [num_blocks, block_size, heads_kv, head_dim] with arbitrary element strides and a unit last stride.
// Key position j of request b lives in block block_table[b * block_table_stride + j / block_size], row j % block_size.
// Every function returns 0 (cudaSuccess), a cudaError_t, or a negative sparsek error code (see sk_paged_error_string);
// none aborts. Kernels are launched on the given stream.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Write token i of key/value ([num_tokens, heads_kv, head_dim], strides in elements) into cache slot
// slot_mapping[i] (int64; block = slot / block_size, row = slot % block_size) for i < num_tokens; slots < 0 are
// skipped. elem_bytes is the element size of key/value/caches (1, 2 or 4; they must match).
typedef struct {
  const void* key;
  const void* value;
  void* key_cache;
  void* value_cache;
  const int64_t* slot_mapping;
  int64_t key_token_stride, key_head_stride;
  int64_t value_token_stride, value_head_stride;
  int64_t kc_block_stride, kc_row_stride, kc_head_stride;
  int64_t vc_block_stride, vc_row_stride, vc_head_stride;
  int32_t num_tokens, heads_kv, head_dim, block_size;
  int32_t elem_bytes;
  int32_t pad0;
} SkCacheWriteParams;

int sk_reshape_and_cache(const SkCacheWriteParams* params, void* stream);

// Paged decode: one query per request. Request b's query row is q_row = cu_seqlens_q ? cu_seqlens_q[b] : b
// (requests with cu_seqlens_q[b + 1] == cu_seqlens_q[b] are skipped); it sits at position seq_lens[b] - 1 and attends
// keys [max(0, seq_lens[b] - 1 - window_left), seq_lens[b]) (window_left = -1: all). Query head h uses kv head
// h / (heads_q / heads_kv). Output row q_row of o ([rows, heads_q, head_dim], q's dtype); lse (optional, float32,
// natural log, -inf for rows without keys) at lse[h * lse_head_stride + q_row].
//
// Split-KV: with num_splits > 1 each request's key range is cut into num_splits chunks processed by different CTAs
// which write float32 partial results into workspace (o_partial: [batch, num_splits, heads_q, head_dim] contiguous,
// lse_partial: [batch, num_splits, heads_q] contiguous); a second kernel combines them. Use
// sk_paged_decode_workspace_floats() for the required number of floats (0 when num_splits == 1).
typedef struct {
  const void* q;
  const void* key_cache;
  const void* value_cache;
  void* o;
  float* lse;  // may be NULL
  const int32_t* block_table;
  const int32_t* seq_lens;
  const int32_t* cu_seqlens_q;  // may be NULL (row b = request b)
  float* o_partial;             // workspace, NULL when num_splits == 1
  float* lse_partial;           // workspace, NULL when num_splits == 1
  int64_t q_row_stride, q_head_stride;
  int64_t o_row_stride, o_head_stride;
  int64_t k_block_stride, k_row_stride, k_head_stride;
  int64_t v_block_stride, v_row_stride, v_head_stride;
  int64_t block_table_stride;
  int64_t lse_head_stride;
  int32_t batch, heads_q, heads_kv, head_dim, block_size;
  int32_t window_left;  // -1 = unbounded
  int32_t num_splits;   // >= 1
  int32_t is_bf16;
  float scale;  // softmax scale (natural units)
  int32_t pad0;
} SkPagedDecodeParams;

int sk_paged_decode(const SkPagedDecodeParams* params, void* stream);

// Number of float32 workspace elements sk_paged_decode needs for these sizes (o_partial followed by lse_partial).
int64_t sk_paged_decode_workspace_floats(int32_t batch, int32_t heads_q, int32_t head_dim, int32_t num_splits);

// Heuristic number of KV splits for a decode batch on the current device (1 = no split).
int32_t sk_paged_decode_num_splits(int32_t batch, int32_t heads_q, int32_t heads_kv, int32_t max_seqlen_k);

// Negative error codes of the paged kernels (cudaError_t values are non-negative).
enum {
  SK_PAGED_ERR_ELEM_BYTES = -101,
  SK_PAGED_ERR_HEAD_DIM = -102,
  SK_PAGED_ERR_HEADS = -103,
  SK_PAGED_ERR_BLOCK_SIZE = -104,
  SK_PAGED_ERR_SPLITS = -105,
};

const char* sk_paged_error_string(int code);
int sk_paged_abi_version(void);

#ifdef __cplusplus
}
#endif
