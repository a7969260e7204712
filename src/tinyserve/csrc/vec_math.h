// AVX-512 pieces our native kernels share (attention/csrc/paged_decode.cpp, models/csrc/eager_ops.cpp).
// A kernel includes this only where __AVX512F__ is defined; tinyserve/native.py keys each kernel's
// build on this file's text too, so a change here rebuilds them.
#pragma once

#include <immintrin.h>

#include <c10/util/BFloat16.h>

namespace tinyserve {

// exp(x), 2^n * p(r) with r in [-ln2/2, ln2/2] and a degree-6 polynomial (relative error ~2e-7).
// Below -87 it flushes to 0 (a softmax's weight, a sigmoid's tail); above 88 it overflows to inf.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  const __m512 rr = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

#if defined(__AVX512BW__) && defined(__AVX512VL__)
#define TINYSERVE_VEC_BF16 1
// The first `n` (<= 16) bf16 values at p, widened to fp32; zeros past n.
inline __m512 load_bf16(const c10::BFloat16* p, int n = 16) {
  const __mmask16 m = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 fp32 values rounded to bf16 (to nearest, ties to even) and stored, the first `n` of them.
inline void store_bf16(c10::BFloat16* p, __m512 v, int n = 16) {
  const __mmask16 m = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
#if defined(__AVX512BF16__)
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
#else  // the same rounding in integers (NaN is not kept quiet here; activations have none)
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
#endif
  _mm256_mask_storeu_epi16(p, m, h);
}
#endif

}  // namespace tinyserve
