// V16: sixteen fp32 lanes, the one vector type every kernel is written in.
//
// Why sixteen lanes on both ISAs: the reduction order of every kernel is defined over 16 lanes
// (lane j accumulates the elements k with k % 16 == j, in increasing k, then a fixed tree adds the
// lanes). AVX-512 holds the 16 lanes in one register, AVX2 in two; every operation below does the
// same IEEE operation on each lane in both, so the two ISA builds give bitwise equal results, and
// a row's result never depends on the batch, its place in it or the thread count.
//
// Included once per ISA translation unit, inside that unit's namespace, after its
// `#pragma GCC target`. SS_AVX512 selects the AVX-512 body. Compiled with -ffp-contract=off: every
// fused multiply-add is written out (fma), none is left to the compiler.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

struct V16 {
#if defined(SS_AVX512)
  __m512 v;
#else
  __m256 lo, hi;
#endif
};

#if defined(SS_AVX512)

static inline V16 vzero() { return {_mm512_setzero_ps()}; }
static inline V16 vset1(float a) { return {_mm512_set1_ps(a)}; }
static inline V16 vload(const float* p) { return {_mm512_loadu_ps(p)}; }
static inline void vstore(float* p, V16 a) { _mm512_storeu_ps(p, a.v); }
static inline V16 vadd(V16 a, V16 b) { return {_mm512_add_ps(a.v, b.v)}; }
static inline V16 vsub(V16 a, V16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
static inline V16 vmul(V16 a, V16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
static inline V16 vdiv(V16 a, V16 b) { return {_mm512_div_ps(a.v, b.v)}; }
static inline V16 vmax(V16 a, V16 b) { return {_mm512_max_ps(a.v, b.v)}; }
static inline V16 vmin(V16 a, V16 b) { return {_mm512_min_ps(a.v, b.v)}; }
static inline V16 vfma(V16 a, V16 b, V16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
static inline V16 vround(V16 a) {
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
// 2^n for integral n in [-126, 127], as exponent bits.
static inline V16 vpow2i(V16 n) {
  __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(e, 23))};
}
static inline V16 vload_i8(const int8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
static inline V16 vload_bf16(const uint16_t* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
static inline V16 vload_f16(const uint16_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
static inline void vstore_f16(uint16_t* p, V16 a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT));
}
// Lanes 0..7 of the 8-lane stage of the tree: a[j] + a[j + 8].
static inline __m256 vfold8(V16 a) {
  return _mm256_add_ps(_mm512_castps512_ps256(a.v),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1)));
}
static inline float vhmax(V16 a) { return _mm512_reduce_max_ps(a.v); }  // max is exact in any order

#else  // AVX2 + FMA + F16C

static inline V16 vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline V16 vset1(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
static inline V16 vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline void vstore(float* p, V16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
static inline V16 vadd(V16 a, V16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
static inline V16 vsub(V16 a, V16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
static inline V16 vmul(V16 a, V16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
static inline V16 vdiv(V16 a, V16 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
static inline V16 vmax(V16 a, V16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
static inline V16 vmin(V16 a, V16 b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
static inline V16 vfma(V16 a, V16 b, V16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline V16 vround(V16 a) {
  const int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, mode), _mm256_round_ps(a.hi, mode)};
}
static inline __m256 pow2i8(__m256 n) {
  __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
static inline V16 vpow2i(V16 n) { return {pow2i8(n.lo), pow2i8(n.hi)}; }
static inline __m256 i8x8(const int8_t* p) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}
static inline V16 vload_i8(const int8_t* p) { return {i8x8(p), i8x8(p + 8)}; }
static inline __m256 bf16x8(const uint16_t* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline V16 vload_bf16(const uint16_t* p) { return {bf16x8(p), bf16x8(p + 8)}; }
static inline V16 vload_f16(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
static inline void vstore_f16(uint16_t* p, V16 a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a.lo, _MM_FROUND_TO_NEAREST_INT));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph(a.hi, _MM_FROUND_TO_NEAREST_INT));
}
static inline __m256 vfold8(V16 a) { return _mm256_add_ps(a.lo, a.hi); }
static inline float vhmax(V16 a) {
  __m256 m = _mm256_max_ps(a.lo, a.hi);
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

#endif

// The fixed tree after the 16 -> 8 fold: [j] + [j + 4], then [j] + [j + 2], then [0] + [1].
static inline float vhadd(V16 a) {
  __m256 s8 = vfold8(a);
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
  return _mm_cvtss_f32(s1);
}

// exp on every lane: Cody-Waite range reduction and a degree-6 polynomial, the same operations on
// each lane in both ISA builds (about 2 ulp; inputs below -87.3 give ~1e-38, never NaN).
static inline V16 vexp(V16 x) {
  x = vmax(vmin(x, vset1(88.3762626647949f)), vset1(-87.3365447505531f));
  V16 n = vround(vmul(x, vset1(1.44269504088896341f)));
  V16 r = vfma(n, vset1(-0.693359375f), x);
  r = vfma(n, vset1(2.12194440e-4f), r);
  V16 p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  p = vfma(vmul(p, r), r, vadd(r, vset1(1.0f)));
  return vmul(p, vpow2i(n));
}

// Partial loads: the first n (< 16) elements, the rest zero. Through a zeroed buffer, so both ISA
// builds read the same values into the same lanes.
template <typename T>
static inline void copy_partial(T* buf, const T* p, int n) {
  std::memset(buf, 0, 16 * sizeof(T));
  std::memcpy(buf, p, n * sizeof(T));
}
template <typename T, V16 (*Load)(const T*)>
static inline V16 load_partial(const T* p, int n) {
  alignas(64) T b[16];
  copy_partial(b, p, n);
  return Load(b);
}
static inline V16 vload_n(const float* p, int n) { return load_partial<float, vload>(p, n); }
static inline V16 vload_i8_n(const int8_t* p, int n) { return load_partial<int8_t, vload_i8>(p, n); }
static inline V16 vload_bf16_n(const uint16_t* p, int n) { return load_partial<uint16_t, vload_bf16>(p, n); }
static inline V16 vload_f16_n(const uint16_t* p, int n) { return load_partial<uint16_t, vload_f16>(p, n); }
static inline void vstore_n(float* p, V16 a, int n) {
  alignas(64) float b[16];
  vstore(b, a);
  std::memcpy(p, b, n * sizeof(float));
}
