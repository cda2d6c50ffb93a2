// The kernels, written once over V16 and compiled once per ISA (isa_avx2.cpp, isa_avx512.cpp).
//
// Reduction order of every output (the whole point of this file): a dot product over K (linear)
// accumulates element k into lane k % 16 with one fma per element, in increasing k, the last partial
// block zero-filled; then vhadd's fixed tree adds the lanes. An attention score is one key's dot
// product over D in increasing d, one fma per element (16 keys side by side in the lanes). Softmax
// works in fixed partitions of a row's positions: exp(s_j - the partition's max) summed in lanes of
// 16 consecutive positions, then vhadd; the weighted sum of V adds position j's term for every j in
// increasing order, one fma per element; partitions merge in increasing order. Norms reduce their
// row like a dot product. Nothing here depends on M, on a row's place among the rows, on the tile an
// output falls in, on the thread that computes it or on the ISA: tiles only share loads, never
// partial sums.
//
// Included inside the ISA namespace after vec16.h; SS_MR x SS_NR is the register tile of the
// linear kernel (rows x outputs).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#ifndef SS_PREFETCH
#define SS_PREFETCH 512
#endif

using ss::AttentionArgs;
using ss::KvWriteArgs;
using ss::LinearArgs;
using ss::NormArgs;
using ss::RopeKvArgs;
using ss::SiluMulArgs;

// ---- linear ----------------------------------------------------------------------------------

template <int WF>
static inline V16 wload(const void* w, int64_t i) {
  if constexpr (WF == ss::W_F32) return vload(static_cast<const float*>(w) + i);
  if constexpr (WF == ss::W_BF16) return vload_bf16(static_cast<const uint16_t*>(w) + i);
  if constexpr (WF == ss::W_F16) return vload_f16(static_cast<const uint16_t*>(w) + i);
  if constexpr (WF == ss::W_I8) return vload_i8(static_cast<const int8_t*>(w) + i);
}

template <int WF>
static inline V16 wload_n(const void* w, int64_t i, int n) {
  if constexpr (WF == ss::W_F32) return vload_n(static_cast<const float*>(w) + i, n);
  if constexpr (WF == ss::W_BF16) return vload_bf16_n(static_cast<const uint16_t*>(w) + i, n);
  if constexpr (WF == ss::W_F16) return vload_f16_n(static_cast<const uint16_t*>(w) + i, n);
  if constexpr (WF == ss::W_I8) return vload_i8_n(static_cast<const int8_t*>(w) + i, n);
}

// Each output: the lanes' fixed tree, then the scale, then the bias.
template <int MR, int NR>
static inline void store_tile(const LinearArgs& a, const V16 (&acc)[MR][NR], int64_t m0, int64_t n0) {
  for (int i = 0; i < MR; ++i) {
    float* y = a.y + (m0 + i) * a.N + n0;
    for (int j = 0; j < NR; ++j) {
      float s = vhadd(acc[i][j]);
      if (a.scale) s *= a.scale[n0 + j];
      y[j] = a.bias ? s + a.bias[n0 + j] : s;
    }
  }
}

// A packed tile (NR == kPackRows, n0 % kPackRows == 0): 64 contiguous bytes per 16-element block.
template <int MR>
static void linear_tile_packed(const LinearArgs& a, int64_t m0, int64_t n0) {
  constexpr int NR = ss::kPackRows;
  const int64_t K = a.K;
  const float* x = a.x + m0 * K;
  const int8_t* w = static_cast<const int8_t*>(a.w) + n0 * K;  // tile n0 / 4 starts at n0 * K bytes
  V16 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = vzero();
  for (int64_t k = 0; k < K; k += 16, w += 16 * NR) {
    _mm_prefetch(reinterpret_cast<const char*>(w) + SS_PREFETCH, _MM_HINT_T0);
    V16 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = vload_i8(w + 16 * j);
    for (int i = 0; i < MR; ++i) {
      V16 xv = vload(x + i * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
    }
  }
  store_tile<MR, NR>(a, acc, m0, n0);
}

#ifdef SS_INT8_ACT
// ---- int8 activations (the AVX-512 VNNI build) ------------------------------------------------
// Integer sums are exact, so only the per-block scaling is ordered: each output's lanes (4 per
// output, a quarter of each 16-element run) accumulate d_block * sum_block in increasing block
// order, then ((l0 + l1) + (l2 + l3)), times the weight's scale, plus the bias.

static void quantize_rows(const LinearArgs& a, int64_t m0, int64_t m1) {
  const int64_t K = a.K, nb = K / ss::kActBlock;  // K % 16 == 0 (packed weights)
  const __m512i off = _mm512_set1_epi32(128);
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = a.x + m * K;
    for (int64_t b = 0; b < nb; ++b) {
      const __m512 v = _mm512_loadu_ps(x + b * 16);
      const float d = _mm512_reduce_max_ps(_mm512_abs_ps(v)) / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
      a.xd[m * nb + b] = d;
      const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(id))), off);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(a.xq + m * K + b * 16), _mm512_cvtepi32_epi8(q));
    }
  }
}

// The 4 outputs of a tile from its accumulator (4 lanes each): ((l0 + l1) + (l2 + l3)), times the
// weight's scale, plus the bias.
static inline void store_q8(const LinearArgs& a, __m512 acc, int64_t m, int64_t n0) {
  alignas(64) float l[16];
  _mm512_store_ps(l, acc);
  float* y = a.y + m * a.N + n0;
  for (int j = 0; j < ss::kPackRows; ++j) {
    float s = (l[4 * j] + l[4 * j + 1]) + (l[4 * j + 2] + l[4 * j + 3]);
    if (a.scale) s *= a.scale[n0 + j];
    y[j] = a.bias ? s + a.bias[n0 + j] : s;
  }
}

// A packed tile of 4 outputs with int8 activations: per 16-element block, vpdpbusd of the row's 16
// activation bytes (broadcast to the 4 outputs' 16-byte lanes) with the tile's 64 weight bytes; the
// +128 offset of the unsigned activations is taken back with the weights' own sums (one more
// vpdpbusd per tile and block, shared by the rows).
template <int MR>
static void linear_tile_q8(const LinearArgs& a, int64_t m0, int64_t n0) {
  const int64_t K = a.K, nb = K / ss::kActBlock;
  const uint8_t* xq = a.xq + m0 * K;
  const float* xd = a.xd + m0 * nb;
  const int8_t* w = static_cast<const int8_t*>(a.w) + n0 * K;
  const __m512i ones = _mm512_set1_epi8(1), zero = _mm512_setzero_si512();
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, w += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(w) + SS_PREFETCH, _MM_HINT_T0);
    const __m512i wv = _mm512_loadu_si512(w);
    const __m512i comp = _mm512_slli_epi32(_mm512_dpbusd_epi32(zero, ones, wv), 7);
    for (int i = 0; i < MR; ++i) {
      const __m128i xr = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + i * K + b * 16));
      const __m512i s = _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, _mm512_broadcast_i32x4(xr), wv), comp);
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(xd[i * nb + b]), acc[i]);
    }
  }
  for (int i = 0; i < MR; ++i) store_q8(a, acc[i], m0 + i, n0);
}

// One row against T packed tiles side by side (a decode step's GEMV): T independent accumulator
// chains and T weight streams in flight; each output's arithmetic is linear_tile_q8's.
template <int T>
static void linear_tiles_q8_row(const LinearArgs& a, int64_t m, int64_t n0) {
  const int64_t K = a.K, nb = K / ss::kActBlock;
  const uint8_t* xq = a.xq + m * K;
  const float* xd = a.xd + m * nb;
  const int8_t* w = static_cast<const int8_t*>(a.w) + n0 * K;  // tile t at w + t * 4 * K
  const __m512i ones = _mm512_set1_epi8(1), zero = _mm512_setzero_si512();
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m512i xv = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + b * 16)));
    const __m512 d = _mm512_set1_ps(xd[b]);
    for (int t = 0; t < T; ++t) {
      const int8_t* wt = w + t * ss::kPackRows * K + b * 64;
      _mm_prefetch(reinterpret_cast<const char*>(wt) + SS_PREFETCH, _MM_HINT_T0);
      const __m512i wv = _mm512_loadu_si512(wt);
      const __m512i comp = _mm512_slli_epi32(_mm512_dpbusd_epi32(zero, ones, wv), 7);
      const __m512i s = _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, xv, wv), comp);
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) store_q8(a, acc[t], m, n0 + t * ss::kPackRows);
}
#endif

template <int WF, int MR, int NR>
static void linear_tile(const LinearArgs& a, int64_t m0, int64_t n0) {
  const int64_t K = a.K;
  const float* x = a.x + m0 * K;
  V16 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = vzero();
  int64_t k = 0;
  constexpr int64_t wbytes = WF == ss::W_F32 ? 4 : WF >= ss::W_I8 ? 1 : 2;
  const char* wrow = static_cast<const char*>(a.w) + n0 * K * wbytes;
  for (; k + 16 <= K; k += 16) {
    V16 w[NR];
    if ((k * wbytes) % 64 == 0)  // one line ahead per row and 64-byte line
      for (int j = 0; j < NR; ++j) _mm_prefetch(wrow + (j * K + k) * wbytes + SS_PREFETCH, _MM_HINT_T0);
    for (int j = 0; j < NR; ++j) w[j] = wload<WF>(a.w, (n0 + j) * K + k);
    for (int i = 0; i < MR; ++i) {
      V16 xv = vload(x + i * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = vfma(xv, w[j], acc[i][j]);
    }
  }
  if (k < K) {
    const int r = static_cast<int>(K - k);
    V16 w[NR];
    for (int j = 0; j < NR; ++j) w[j] = wload_n<WF>(a.w, (n0 + j) * K + k, r);
    for (int i = 0; i < MR; ++i) {
      V16 xv = vload_n(x + i * K + k, r);
      for (int j = 0; j < NR; ++j) acc[i][j] = vfma(xv, w[j], acc[i][j]);
    }
  }
  store_tile<MR, NR>(a, acc, m0, n0);
}

template <int WF, int MR, int NR>
static void linear_tile_dispatch(const LinearArgs& a, int64_t m0, int mr, int64_t n0, int nr) {
  // Tails of M and N use smaller tiles of the same arithmetic.
  if constexpr (MR > 1) {
    if (mr < MR) return linear_tile_dispatch<WF, MR - 1, NR>(a, m0, mr, n0, nr);
  }
  if constexpr (NR > 1 && WF != ss::W_I8_PACKED) {  // packed: N % 4 == 0, every tile is whole
    if (nr < NR) return linear_tile_dispatch<WF, MR, NR - 1>(a, m0, mr, n0, nr);
  }
#ifdef SS_INT8_ACT
  if constexpr (WF == ss::W_I8_PACKED) return linear_tile_q8<MR>(a, m0, n0);
#endif
  if constexpr (WF == ss::W_I8_PACKED) linear_tile_packed<MR>(a, m0, n0);
  else linear_tile<WF, MR, NR>(a, m0, n0);
}

template <int WF>
static void linear_range_fmt(const LinearArgs& a, int64_t n_begin, int64_t n_end) {
  // Outputs in chunks whose weights stay in L2 while every row block passes over them.
  const int64_t wbytes = WF == ss::W_F32 ? 4 : WF >= ss::W_I8 ? 1 : 2;
  const int64_t chunk = std::max<int64_t>(SS_NR, (192 * 1024 / std::max<int64_t>(1, a.K * wbytes)) / SS_NR * SS_NR);
  for (int64_t c0 = n_begin; c0 < n_end; c0 += chunk) {
    const int64_t c1 = std::min(n_end, c0 + chunk);
    for (int64_t m0 = 0; m0 < a.M; m0 += SS_MR) {
      const int mr = static_cast<int>(std::min<int64_t>(SS_MR, a.M - m0));
#ifdef SS_INT8_ACT
      if constexpr (WF == ss::W_I8_PACKED) {
        if (mr == 1) {  // a lone row: several tiles at once
          int64_t n0 = c0;
          for (; n0 + 8 * ss::kPackRows <= c1; n0 += 8 * ss::kPackRows) linear_tiles_q8_row<8>(a, m0, n0);
          for (; n0 < c1; n0 += ss::kPackRows) linear_tiles_q8_row<1>(a, m0, n0);
          continue;
        }
      }
#endif
      for (int64_t n0 = c0; n0 < c1; n0 += SS_NR) {
        const int nr = static_cast<int>(std::min<int64_t>(SS_NR, c1 - n0));
        linear_tile_dispatch<WF, SS_MR, SS_NR>(a, m0, mr, n0, nr);
      }
    }
  }
}

static void linear_range(const LinearArgs& a, int64_t n0, int64_t n1) {
  switch (a.wfmt) {
    case ss::W_F32: return linear_range_fmt<ss::W_F32>(a, n0, n1);
    case ss::W_BF16: return linear_range_fmt<ss::W_BF16>(a, n0, n1);
    case ss::W_F16: return linear_range_fmt<ss::W_F16>(a, n0, n1);
    case ss::W_I8: return linear_range_fmt<ss::W_I8>(a, n0, n1);
    case ss::W_I8_PACKED: return linear_range_fmt<ss::W_I8_PACKED>(a, n0, n1);
  }
}

// ---- attention -------------------------------------------------------------------------------

template <bool F16>
static inline V16 kvload(const void* base, int64_t i) {
  if constexpr (F16) return vload_f16(static_cast<const uint16_t*>(base) + i);
  else return vload(static_cast<const float*>(base) + i);
}

template <bool F16>
static inline V16 kvload_n(const void* base, int64_t i, int n) {
  if constexpr (F16) return vload_f16_n(static_cast<const uint16_t*>(base) + i, n);
  else return vload_n(static_cast<const float*>(base) + i, n);
}

constexpr int kMaxGroup = 16;    // query heads per KV head handled in one pass over K and V
constexpr int kMaxDChunks = 16;  // head_dim up to 256
constexpr int kScoreHeads = 4;   // query heads per pass over a block's keys (accumulators in registers)

// Scores of GN query heads for the n <= 16 keys of one block starting at kt (K transposed: element d
// of key i at kt[d * bs + i]): s_g[i] = (sum over d in increasing order of q_g[d] k_i[d]) * scale.
// `whole`: 16 keys' worth of the block lies ahead, so the loads are whole (lanes past n are
// computed from whatever the block holds and never stored; lanes never mix).
template <bool F16, int GN>
static inline void score_keys(const float* const* q, const void* kt, int64_t D, int64_t bs, int n, bool whole,
                              float scale, float* const* s) {
  V16 acc[GN];
  for (int g = 0; g < GN; ++g) acc[g] = vzero();
  for (int64_t d = 0; d < D; ++d) {
    const V16 k = whole ? kvload<F16>(kt, d * bs) : kvload_n<F16>(kt, d * bs, n);
    for (int g = 0; g < GN; ++g) acc[g] = vfma(vset1(q[g][d]), k, acc[g]);
  }
  for (int g = 0; g < GN; ++g) {
    const V16 r = vmul(acc[g], vset1(scale));
    if (n == 16) vstore(s[g], r);
    else vstore_n(s[g], r, n);
  }
}

// The weighted sum of V for GN query heads of DC whole chunks each, accumulators in registers:
// the same fma per (head, chunk, position) in the same order as the generic loop below it.
template <bool F16, int GN, int DC>
static void v_pass(const void* v_cache, const int64_t* kv_rows, int64_t L, const float* p, int64_t Lp,
                   V16 (&out)[kMaxGroup][kMaxDChunks]) {
  V16 acc[GN][DC];
  for (int g = 0; g < GN; ++g)
    for (int c = 0; c < DC; ++c) acc[g][c] = vzero();
  constexpr int64_t esize = F16 ? 2 : 4, ahead = 8;  // V rows are not contiguous across blocks
  for (int64_t j = 0; j < L; ++j) {
    if (j + ahead < L)
      for (int64_t off = 0; off < DC * 16 * esize; off += 64)
        _mm_prefetch(static_cast<const char*>(v_cache) + kv_rows[j + ahead] * esize + off, _MM_HINT_T0);
    V16 w[GN];
    for (int g = 0; g < GN; ++g) w[g] = vset1(p[g * Lp + j]);
    for (int c = 0; c < DC; ++c) {
      const V16 v = kvload<F16>(v_cache, kv_rows[j] + c * 16);
      for (int g = 0; g < GN; ++g) acc[g][c] = vfma(w[g], v, acc[g][c]);
    }
  }
  for (int g = 0; g < GN; ++g)
    for (int c = 0; c < DC; ++c) out[g][c] = acc[g][c];
}

static inline int64_t attention_parts(int64_t L) { return (L + ss::kAttnPartition - 1) / ss::kAttnPartition; }

// Partition p of row t for KV head h: positions [p * P, min(L, (p + 1) * P)). Softmax inside the
// partition (max, exp(s - max) summed in lanes of 16 consecutive positions, then vhadd), then the
// weighted sum of V in increasing position order. A row of one partition is finished here; a
// longer row's partitions are merged by attention_merge.
template <bool F16>
static void attention_part(const AttentionArgs& a, int64_t t, int64_t h, int64_t p, std::vector<float>& scratch,
                           std::vector<int64_t>& kv_rows) {
  const int64_t G = a.Hq / a.Hkv, D = a.D, L = a.row_len[t], bs = a.block_size;
  const int64_t parts = attention_parts(L);
  if (p > 0 && p >= parts) return;
  const int64_t j0 = p * ss::kAttnPartition, n = std::min<int64_t>(L, j0 + ss::kAttnPartition) - j0;
  const int64_t Lp = (ss::kAttnPartition + 15) / 16 * 16;
  const int dchunks = static_cast<int>((D + 15) / 16);
  const int dtail = static_cast<int>(D - (dchunks - 1) * 16);
  const int32_t* table = a.tables + a.row_seq[t] * a.table_stride;
  const char* k_base = static_cast<const char*>(a.k_cache);
  const int64_t esize = F16 ? 2 : 4, head_elems = D * bs;  // a block's K (or V) of one head
  if (static_cast<int64_t>(kv_rows.size()) < n) kv_rows.resize(n);
  for (int64_t g0 = 0; g0 < G; g0 += kMaxGroup) {
    const int64_t gn = std::min<int64_t>(kMaxGroup, G - g0);
    const float* q0 = a.q + (t * a.Hq + h * G + g0) * D;
    float* out0 = a.out + (t * a.Hq + h * G + g0) * D;
    if (L == 0) {
      std::fill(out0, out0 + gn * D, 0.0f);
      continue;
    }
    if (static_cast<int64_t>(scratch.size()) < gn * Lp) scratch.resize(gn * Lp);
    // scores, a block's run of keys at a time
    for (int64_t i = 0; i < n;) {
      const int64_t j = j0 + i, b = table[j / bs], o = j % bs;
      const int c = static_cast<int>(std::min<int64_t>({16, bs - o, n - i}));
      const int64_t head = b * a.Hkv + h;
      const void* kt = k_base + (head * head_elems + o) * esize;
      const bool whole = o + 16 <= bs;
      if (o + c == bs && i + c < n) {  // the next block's keys of this head, while these are scored
        const char* next = k_base + static_cast<int64_t>(table[(j + c) / bs]) * a.Hkv * head_elems * esize +
                           h * head_elems * esize;
        for (int64_t off = 0; off < head_elems * esize; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
      }
      for (int64_t g = 0; g < gn; g += kScoreHeads) {
        const float* qs[kScoreHeads];
        float* ss_[kScoreHeads];
        const int64_t m = std::min<int64_t>(kScoreHeads, gn - g);
        for (int64_t x = 0; x < m; ++x) qs[x] = q0 + (g + x) * D, ss_[x] = scratch.data() + (g + x) * Lp + i;
        switch (m) {
          case 1: score_keys<F16, 1>(qs, kt, D, bs, c, whole, a.scale, ss_); break;
          case 2: score_keys<F16, 2>(qs, kt, D, bs, c, whole, a.scale, ss_); break;
          case 3: score_keys<F16, 3>(qs, kt, D, bs, c, whole, a.scale, ss_); break;
          default: score_keys<F16, 4>(qs, kt, D, bs, c, whole, a.scale, ss_); break;
        }
      }
      for (int x = 0; x < c; ++x) kv_rows[i + x] = (head * bs + o + x) * D;
      i += c;
    }
    // softmax numerators in place, their maxima and sums
    float mx[kMaxGroup], sum[kMaxGroup];
    for (int64_t g = 0; g < gn; ++g) {
      float* s = scratch.data() + g * Lp;
      V16 m = vset1(-INFINITY);
      int64_t j = 0;
      for (; j + 16 <= n; j += 16) m = vmax(m, vload(s + j));
      float mx_s = vhmax(m);  // max is exact in any order
      for (; j < n; ++j) mx_s = std::max(mx_s, s[j]);
      const V16 vm = vset1(mx_s);
      V16 acc = vzero();
      for (j = 0; j + 16 <= n; j += 16) {
        V16 e = vexp(vsub(vload(s + j), vm));
        vstore(s + j, e);
        acc = vadd(acc, e);
      }
      if (j < n) {
        const int r = static_cast<int>(n - j);
        vstore_n(s + j, vexp(vsub(vload_n(s + j, r), vm)), r);
        acc = vadd(acc, vload_n(s + j, r));
      }
      mx[g] = mx_s;
      sum[g] = vhadd(acc);
    }
    // sum_j p_gj v_j, j in increasing order
    V16 acc[kMaxGroup][kMaxDChunks];
    const bool whole = dtail == 16;
    const float* pr = scratch.data();
    if (whole && dchunks == 4 && gn == 1) v_pass<F16, 1, 4>(a.v_cache, kv_rows.data(), n, pr, Lp, acc);
    else if (whole && dchunks == 4 && gn == 2) v_pass<F16, 2, 4>(a.v_cache, kv_rows.data(), n, pr, Lp, acc);
    else if (whole && dchunks == 4 && gn == 3) v_pass<F16, 3, 4>(a.v_cache, kv_rows.data(), n, pr, Lp, acc);
    else if (whole && dchunks == 8 && gn == 1) v_pass<F16, 1, 8>(a.v_cache, kv_rows.data(), n, pr, Lp, acc);
    else {
      for (int64_t g = 0; g < gn; ++g)
        for (int c = 0; c < dchunks; ++c) acc[g][c] = vzero();
      for (int64_t j = 0; j < n; ++j) {
        const int64_t vbase = kv_rows[j];
        for (int c = 0; c < dchunks; ++c) {
          const V16 v = c < dchunks - 1 || whole ? kvload<F16>(a.v_cache, vbase + c * 16)
                                                 : kvload_n<F16>(a.v_cache, vbase + c * 16, dtail);
          for (int64_t g = 0; g < gn; ++g) acc[g][c] = vfma(vset1(pr[g * Lp + j]), v, acc[g][c]);
        }
      }
    }
    for (int64_t g = 0; g < gn; ++g) {
      if (parts == 1) {
        const V16 sv = vset1(sum[g]);
        for (int c = 0; c < dchunks; ++c) {
          const V16 o = vdiv(acc[g][c], sv);
          if (c < dchunks - 1) vstore(out0 + g * D + c * 16, o);
          else vstore_n(out0 + g * D + c * 16, o, dtail);
        }
        continue;
      }
      float* part = a.partials + (((t * a.Hkv + h) * a.max_parts + p) * G + g0 + g) * (D + 2);
      part[0] = mx[g], part[1] = sum[g];
      for (int c = 0; c < dchunks; ++c) {
        if (c < dchunks - 1) vstore(part + 2 + c * 16, acc[g][c]);
        else vstore_n(part + 2 + c * 16, acc[g][c], dtail);
      }
    }
  }
}

static void attention_tasks(const AttentionArgs& a, int64_t i0, int64_t i1) {
  thread_local std::vector<float> scratch;
  thread_local std::vector<int64_t> kv_rows;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t p = i % a.max_parts, th = i / a.max_parts;
    if (a.kv_f16) attention_part<true>(a, th / a.Hkv, th % a.Hkv, p, scratch, kv_rows);
    else attention_part<false>(a, th / a.Hkv, th % a.Hkv, p, scratch, kv_rows);
  }
}

// out = sum_p w_p acc_p / sum_p w_p sum_p with w_p = exp(max_p - max), partitions in increasing order.
static void attention_merge(const AttentionArgs& a, int64_t i0, int64_t i1) {
  const int64_t G = a.Hq / a.Hkv, D = a.D, E = D + 2;
  const int dchunks = static_cast<int>((D + 15) / 16);
  const int dtail = static_cast<int>(D - (dchunks - 1) * 16);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t t = i / a.Hkv, h = i % a.Hkv, parts = attention_parts(a.row_len[t]);
    if (parts < 2) continue;
    for (int64_t g = 0; g < G; ++g) {
      const float* part = a.partials + (i * a.max_parts * G + g) * E;  // partition p at part + p * G * E
      float mx = -INFINITY;
      for (int64_t p = 0; p < parts; ++p) mx = std::max(mx, part[p * G * E]);
      V16 acc[kMaxDChunks];
      for (int c = 0; c < dchunks; ++c) acc[c] = vzero();
      float total = 0.0f;
      for (int64_t p = 0; p < parts; ++p) {
        const float* pp = part + p * G * E;
        float w;
        vstore_n(&w, vexp(vset1(pp[0] - mx)), 1);
        total += w * pp[1];
        const V16 wv = vset1(w);
        for (int c = 0; c < dchunks; ++c)
          acc[c] = vfma(wv, c < dchunks - 1 ? vload(pp + 2 + c * 16) : vload_n(pp + 2 + c * 16, dtail), acc[c]);
      }
      float* out = a.out + (t * a.Hq + h * G + g) * D;
      const V16 tv = vset1(total);
      for (int c = 0; c < dchunks; ++c) {
        if (c < dchunks - 1) vstore(out + c * 16, vdiv(acc[c], tv));
        else vstore_n(out + c * 16, vdiv(acc[c], tv), dtail);
      }
    }
  }
}

// ---- norms -----------------------------------------------------------------------------------

static inline float row_sum(const float* x, int64_t H, const float* center) {
  // sum of x (center null) or of (x - center)^2, in the lane order of a dot product
  V16 acc = vzero();
  const V16 c = vset1(center ? *center : 0.0f);
  int64_t k = 0;
  for (; k + 16 <= H; k += 16) {
    V16 v = vload(x + k);
    if (center) { v = vsub(v, c); acc = vfma(v, v, acc); }
    else acc = vadd(acc, v);
  }
  if (k < H) {
    const int r = static_cast<int>(H - k);
    V16 v = vload_n(x + k, r);
    if (center) { v = vsub(v, c); v = vload_n(reinterpret_cast<const float*>(&v), r); acc = vfma(v, v, acc); }
    else acc = vadd(acc, v);
  }
  return vhadd(acc);
}

static void norm_rows(const NormArgs& a, int64_t m0, int64_t m1) {
  const int64_t H = a.H;
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = a.x + m * H;
    float* y = a.y + m * H;
    if (a.residual) {  // x = x + residual (+ bias), in that order, as the torch path adds them
      float* xw = const_cast<float*>(x);
      const float* r = a.residual + m * H;
      for (int64_t k = 0; k < H; ++k) {
        const float add = a.residual_bias ? r[k] + a.residual_bias[k] : r[k];
        xw[k] = xw[k] + add;
      }
    }
    if (a.bias == nullptr) {  // RMSNorm: weight * (x * rsqrt(mean(x^2) + eps)), as transformers
      V16 acc = vzero();
      int64_t k = 0;
      for (; k + 16 <= H; k += 16) { V16 v = vload(x + k); acc = vfma(v, v, acc); }
      if (k < H) { V16 v = vload_n(x + k, static_cast<int>(H - k)); acc = vfma(v, v, acc); }
      const V16 r = vset1(1.0f / std::sqrt(vhadd(acc) / static_cast<float>(H) + a.eps));
      for (k = 0; k + 16 <= H; k += 16) vstore(y + k, vmul(vload(a.weight + k), vmul(vload(x + k), r)));
      if (k < H) {
        const int n = static_cast<int>(H - k);
        vstore_n(y + k, vmul(vload_n(a.weight + k, n), vmul(vload_n(x + k, n), r)), n);
      }
    } else {  // LayerNorm: (x - mean) * rsqrt(var + eps) * weight + bias
      const float mean = row_sum(x, H, nullptr) / static_cast<float>(H);
      const float var = row_sum(x, H, &mean) / static_cast<float>(H);
      const V16 r = vset1(1.0f / std::sqrt(var + a.eps)), mu = vset1(mean);
      int64_t k = 0;
      for (; k + 16 <= H; k += 16)
        vstore(y + k, vadd(vmul(vmul(vsub(vload(x + k), mu), r), vload(a.weight + k)), vload(a.bias + k)));
      if (k < H) {
        const int n = static_cast<int>(H - k);
        vstore_n(y + k,
                 vadd(vmul(vmul(vsub(vload_n(x + k, n), mu), r), vload_n(a.weight + k, n)), vload_n(a.bias + k, n)),
                 n);
      }
    }
  }
}

// ---- KV write --------------------------------------------------------------------------------

// A head's D values in the cache's element type (D <= 256).
template <bool F16>
static inline void to_cache_type(const float* src, int64_t D, void* dst) {
  if constexpr (!F16) {
    std::memcpy(dst, src, D * sizeof(float));
  } else {
    alignas(64) uint16_t tmp[16];
    uint16_t* out = static_cast<uint16_t*>(dst);
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) vstore_f16(out + d, vload(src + d));
    if (d < D) {
      vstore_f16(tmp, vload_n(src + d, static_cast<int>(D - d)));
      std::memcpy(out + d, tmp, (D - d) * sizeof(uint16_t));
    }
  }
}

// One token's K/V ([Hkv, D] each) into its slot: V rows as they are, K element by element into the
// transposed block.
template <bool F16>
static void kv_write_token(const KvWriteArgs& a, const float* k, const float* v, int64_t slot) {
  using E = std::conditional_t<F16, uint16_t, float>;
  const int64_t D = a.D, bs = a.block_size, b = slot / bs, o = slot % bs;
  alignas(64) E kh[256];
  for (int64_t h = 0; h < a.Hkv; ++h) {
    const int64_t head = b * a.Hkv + h;
    to_cache_type<F16>(k + h * D, D, kh);
    E* kt = static_cast<E*>(a.k_cache) + head * D * bs + o;
    for (int64_t d = 0; d < D; ++d) kt[d * bs] = kh[d];
    to_cache_type<F16>(v + h * D, D, static_cast<E*>(a.v_cache) + (head * bs + o) * D);
  }
}

static void kv_write_rows(const KvWriteArgs& a, int64_t t0, int64_t t1) {
  const int64_t E = a.Hkv * a.D;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t slot = a.slots[t];
    if (slot < 0) continue;
    if (a.kv_f16) kv_write_token<true>(a, a.k + t * E, a.v + t * E, slot);
    else kv_write_token<false>(a, a.k + t * E, a.v + t * E, slot);
  }
}

// ---- rotary + KV write, silu * mul ---------------------------------------------------------------

// transformers: q * cos + rotate_half(q) * sin, rotate_half(q) = cat(-q[D/2:], q[:D/2]); each
// product and the sum rounded separately (no fma), as torch's element-wise ops do.
static inline void rope_head(const float* x, const float* c, const float* s, int64_t D, float* out) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < D; ++d) {
    const float rot = d < half ? -x[d + half] : x[d - half];
    const float a = x[d] * c[d];
    const float b = rot * s[d];
    out[d] = a + b;
  }
}

static void rope_kv_rows(const RopeKvArgs& a, int64_t t0, int64_t t1) {
  const int64_t D = a.D, width = (a.Hq + 2 * a.Hkv) * D, E = a.Hkv * D;
  std::vector<float> k_rot(E);
  for (int64_t t = t0; t < t1; ++t) {
    const float* row = a.qkv + t * width;
    const float* c = a.cos + a.positions[t] * D;
    const float* s = a.sin + a.positions[t] * D;
    for (int64_t h = 0; h < a.Hq; ++h) rope_head(row + h * D, c, s, D, a.q_out + (t * a.Hq + h) * D);
    const int64_t slot = a.slots[t];
    if (slot < 0) continue;
    for (int64_t h = 0; h < a.Hkv; ++h) rope_head(row + (a.Hq + h) * D, c, s, D, k_rot.data() + h * D);
    KvWriteArgs w{k_rot.data(), row + (a.Hq + a.Hkv) * D, 1, a.Hkv, D, a.block_size, &a.slots[t],
                  a.k_cache, a.v_cache, a.kv_f16};
    kv_write_rows(w, 0, 1);
  }
}

// silu(x) = x / (1 + exp(-x)), as torch's F.silu
static inline V16 vsilu(V16 x) { return vdiv(x, vadd(vset1(1.0f), vexp(vsub(vzero(), x)))); }

static void silu_mul_range(const SiluMulArgs& a, int64_t e0, int64_t e1) {
  const int64_t I = a.I;
  for (int64_t e = e0; e < e1;) {
    const int64_t t = e / I, j = e % I;
    const int64_t n = std::min<int64_t>({16, I - j, e1 - e});
    const float* g = a.gu + t * 2 * I + j;
    const float* u = g + I;
    if (n == 16) vstore(a.out + e, vmul(vsilu(vload(g)), vload(u)));
    else vstore_n(a.out + e, vmul(vsilu(vload_n(g, static_cast<int>(n))), vload_n(u, static_cast<int>(n))), static_cast<int>(n));
    e += n;
  }
}

static const ss::IsaOps kOps = {SS_ISA_NAME, linear_range, attention_tasks, attention_merge, norm_rows, kv_write_rows,
                                rope_kv_rows, silu_mul_range, SS_NR,
#ifdef SS_INT8_ACT
                                quantize_rows
#else
                                nullptr
#endif
};
