// The arguments of each kernel and the table of one ISA build's entry points. Plain C++ types
// only: the ISA translation units include no torch header (they compile in a second).
#pragma once

#include <cstdint>

namespace ss {

// W_I8_PACKED: int8 [N / 4, K / 16, 4, 16] (N % 4 == 0, K % 16 == 0): the 4 outputs of a tile
// interleaved by 16-element blocks, so a tile streams one contiguous run of memory.
enum WeightFormat : int { W_F32 = 0, W_BF16 = 1, W_F16 = 2, W_I8 = 3, W_I8_PACKED = 4 };
constexpr int kPackRows = 4;

// y[M, N] = x[M, K] @ W[N, K]^T, times scale[n] when scale is set (int8 per-channel scales).
struct LinearArgs {
  const float* x;
  int64_t M, K;
  const void* w;
  int wfmt;
  const float* scale;  // nullptr: none
  float* y;
  int64_t N;
  const float* bias = nullptr;  // added after the scale; nullptr: none
  // int8 activations (the VNNI build, packed int8 weights): x quantized by `quantize` first, per row
  // in blocks of kActBlock: xq = round(x / d) + 128 as uint8, d = max|x| / 127 per block in xd.
  uint8_t* xq = nullptr;
  float* xd = nullptr;
};
constexpr int64_t kActBlock = 16;

// Paged attention: row t (query heads [Hq, D]) of sequence row_seq[t] attends its first
// row_len[t] positions; position pos sits in block table[row_seq[t]][pos / block_size] at offset
// pos % block_size. The kernels' cache layout (one layer): K [blocks, Hkv, D, block_size] (a block's
// keys transposed: element d of 16 consecutive keys is one vector), V [blocks, Hkv, block_size, D].
// A row's keys are taken in partitions of kAttnPartition positions (fixed: the arithmetic depends on
// the row's length only); a row of several partitions leaves each one's (max, sum, sum of V) in
// `partials` for the merge. row_len 0 (padding rows) gives zeros.
constexpr int64_t kAttnPartition = 256;

struct AttentionArgs {
  const float* q;
  int64_t T, Hq, Hkv, D;
  const void* k_cache;
  const void* v_cache;
  bool kv_f16;
  const int32_t* tables;
  int64_t table_stride;
  const int32_t* row_seq;
  const int32_t* row_len;
  int64_t block_size;
  float scale;
  float* out;
  int64_t max_parts = 1;       // partitions of the longest row
  float* partials = nullptr;   // [T, Hkv, max_parts, Hq / Hkv, D + 2] when max_parts > 1
};

// RMSNorm (weight * (x * rsqrt(mean(x^2) + eps))) or LayerNorm ((x - mean) * rsqrt(var + eps) *
// weight + bias) over rows of H; bias nullptr: RMSNorm.
struct NormArgs {
  const float* x;
  int64_t M, H;
  const float* weight;
  const float* bias;
  float eps;
  float* y;
  // Residual first, when set: x += residual (+ residual_bias), written back to x, then normalised.
  const float* residual = nullptr;
  const float* residual_bias = nullptr;
};

// Rotary embedding of q and k (transformers' rotate_half convention, cos/sin tables [positions,
// D] with the attention factor folded in), then K/V into the cache. qkv rows are [q | k | v] with
// Hq, Hkv, Hkv heads of D; the rotated q goes to q_out [rows, Hq, D].
struct RopeKvArgs {
  const float* qkv;
  int64_t T, Hq, Hkv, D;
  const int64_t* positions;
  const float* cos;
  const float* sin;
  float* q_out;
  const int64_t* slots;  // < 0: padding row, no KV written
  int64_t block_size;
  void* k_cache;
  void* v_cache;
  bool kv_f16;
};

// a[t, j] = silu(gu[t, j]) * gu[t, I + j] over rows of gu [T, 2I].
struct SiluMulArgs {
  const float* gu;
  int64_t T, I;
  float* out;
};

// Writes new tokens' K/V (fp32 [T, Hkv, D]) into the cache (the layout above) at slot[t] = block *
// block_size + offset (< 0: skip), as fp32 or fp16.
struct KvWriteArgs {
  const float* k;
  const float* v;
  int64_t T, Hkv, D, block_size;
  const int64_t* slots;
  void* k_cache;
  void* v_cache;
  bool kv_f16;
};

struct IsaOps {
  const char* name;
  // Outputs [n0, n1) of every row.
  void (*linear)(const LinearArgs&, int64_t n0, int64_t n1);
  // Tasks (row, KV head, partition) numbered (t * Hkv + h) * max_parts + p, [i0, i1): one pass
  // over the partition's K and V for the KV head's query heads.
  void (*attention)(const AttentionArgs&, int64_t i0, int64_t i1);
  // Tasks (row, KV head) numbered t * Hkv + h: the partitions' merge (rows of several only).
  void (*attention_merge)(const AttentionArgs&, int64_t i0, int64_t i1);
  void (*norm)(const NormArgs&, int64_t m0, int64_t m1);
  void (*kv_write)(const KvWriteArgs&, int64_t t0, int64_t t1);
  void (*rope_kv)(const RopeKvArgs&, int64_t t0, int64_t t1);
  // Elements [e0, e1) of the flat T x I output.
  void (*silu_mul)(const SiluMulArgs&, int64_t e0, int64_t e1);
  // Outputs per tile and rows per tile of the linear kernel: thread splits align to them.
  int64_t linear_nr;
  // Rows [m0, m1) of a linear's x into its xq / xd; nullptr: this build keeps fp32 activations.
  void (*quantize)(const LinearArgs&, int64_t m0, int64_t m1);
};

}  // namespace ss
