// C ABI of sparsek's sparse-attention kernels (sparse_select.cu, key_order.cu, interval_build.cu,
// topk_attention.cu). Keep in sync with sparsek/sparse.py (ctypes). All functions return 0 (cudaSuccess) or a
// cudaError_t; they never abort and launch on the stream passed in.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Version of this header's ABI (sparse.py refuses a library with another one).
int sk_sparse_abi_version(void);

// Top-k selection (radix select per row), for B*H groups of R rows.
// Row r of group (b, h) selects among keys [0, L_r), L_r = clamp(off + r*step, 0, Sk), the k best by
// (score descending, position ascending); -inf scores are never selected. Scores of key j:
//   scores[b*score_batch_stride + h*score_head_stride + r*score_row_stride + j]  (float32, unit key stride;
//   score_row_stride = 0: one score vector shared by all rows, the SparseK per-key case, which reuses the
//   previous rows' selection: topk([0, L_r)) is a subset of topk([0, L_r0)) + [L_r0, L_r) for r >= r0).
// Output: out_indices [B, H, R, k] int32 contiguous, positions ascending, -1 padded; out_counts [B, H, R].
int sk_topk_select(const float* scores, int64_t score_batch_stride, int64_t score_head_stride,
                   int64_t score_row_stride, int32_t batch, int32_t heads, int32_t rows, int32_t seqlen_k, int32_t k,
                   int32_t off, int32_t step, int32_t* out_indices, int32_t* out_counts, void* stream);

// Block-union key lists with query intervals (interval_build.cu): the CUDA version of
// sparsek.selection_intervals.block_union_intervals, with identical outputs. One CTA per (b, h, block m).
// Inputs (int32, contiguous): ranks [B, H, Sk] (selection rank of each key, 0 = best), order [B, H, Sk] (key of each
// rank), fin_prefix [B, H, Sk + 1] (number of keys with a score other than -inf in [0, j)), first_sets
// [B, H, num_blocks, num_sets] (block m's first-query selection), read as sets_mode says:
//   SK_SETS_KEYS: -1 padded rows of distinct keys in [0, Sk) (entries outside [0, Sk) count as padding);
//   SK_SETS_SCAN: first_sets is not read (may be null; num_sets must equal k): each CTA reads its block's selection,
//   the min(k, fin_prefix[L]) best keys of [0, L), L = clamp(off + m * block_size, 0, Sk), off `order` itself.
// Query i of the block selects among keys [0, clamp(off + i, 0, Sk)).
// Output: lists and intervals [B, H, num_blocks, width] (intervals lo | hi << 16), counts [B, H, num_blocks];
// width = min(num_sets + min(block_size - 1, k) + block_size - 1, k + block_size - 1). 1 <= block_size <= 1024.
// Returns cudaErrorInvalidValue when the shared-memory working set (about 4 * num_sets bytes) does not fit.
#define SK_SETS_KEYS 0
#define SK_SETS_SCAN 1
int sk_interval_build(const int32_t* ranks, const int32_t* order, const int32_t* fin_prefix,
                      const int32_t* first_sets, int32_t sets_mode, int32_t batch, int32_t heads,
                      int32_t num_blocks, int32_t num_sets, int32_t seqlen_k, int32_t k, int64_t seqlen_q, int64_t off,
                      int32_t block_size, int32_t width, int32_t* lists, int32_t* intervals, int32_t* counts,
                      void* stream);

// Selection order, ranks and selectable prefix of per-key scores (key_order.cu): the CUDA version of
// sparsek.selection_intervals.key_order_and_ranks and selectable_prefix, i.e. the inputs of sk_interval_build, for
// the B*H rows of scores[b*score_batch_stride + h*score_head_stride + j*score_key_stride] (element strides; dtype one
// of SK_SCORES_*, compared as fp32 like scores.float(); no NaN). Outputs (int32, contiguous):
//   order [B, H, Sk]: key of each rank (score descending, equal scores by position ascending, -0.0 == +0.0, -inf
//   last), ranks [B, H, Sk]: rank of each key, prefix [B, H, Sk + 1]: keys with a score other than -inf in [0, j).
// A few asynchronous launches on `stream` (a device-wide CUB radix sort among them); no synchronization and no
// allocation: `workspace` (256-byte aligned, not aliasing the outputs) holds at least the bytes that
// sk_key_order_workspace_bytes(B*H, Sk, dtype) reports (a host-only query; the size depends on the current
// device's architecture). Sk < 2^31 - 1, B*H <= 2^31.
enum { SK_SCORES_F32 = 0, SK_SCORES_F16 = 1, SK_SCORES_BF16 = 2, SK_SCORES_F64 = 3 };
int sk_key_order_workspace_bytes(int64_t rows, int32_t seqlen_k, int32_t dtype, int64_t* bytes);
int sk_key_order(const void* scores, int32_t dtype, int64_t score_batch_stride, int64_t score_head_stride,
                 int64_t score_key_stride, int32_t batch, int32_t heads, int32_t seqlen_k, int32_t* order,
                 int32_t* ranks, int32_t* prefix, void* workspace, int64_t workspace_bytes, void* stream);

// Per-query top-k attention forward (gather kernel). Query i of batch b (position pos = i + Sk - Sq) and every
// query head of KV head h = hq / (Hq / Hkv) attend:
//   the band [pos - window + 1, pos] (window > 0), and
//   the listed keys j = indices[b*idx_batch_stride + h*idx_head_stride + i*idx_row_stride + t], t < num_indices,
//   skipping j < 0, j >= Sk, j > pos (causal != 0) and j inside the band (counted once).
// q/o: [B, Sq, Hq, D], k/v: [B, Sk, Hkv, D] (strides in elements, unit last stride); fp16 or bf16; D = 64 or 128.
// lse (optional, float32): lse[b*lse_batch_stride + hq*lse_head_stride + i], natural log; -inf and o = 0 for a
// query that sees no key.
typedef struct {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;
  const int32_t* indices;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t lse_batch_stride, lse_head_stride;
  int64_t idx_batch_stride, idx_head_stride, idx_row_stride;
  int32_t batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, num_indices;
  int32_t window;
  int32_t causal;
  int32_t is_bf16;
  float scale_log2;  // softmax scale * log2(e)
  int32_t pad0;
} SkTopkAttnParams;

int sk_topk_attn_fwd(const SkTopkAttnParams* params, void* stream);

#ifdef __cplusplus
}
#endif
