// y = (x quantized to int8 per row) x (W int8 per output channel)^T, rescaled to bf16, on AVX512-VNNI
// (layers/int8_gemm.py packs W once and says when this runs; layers/packed.py:int8_linear is the reference).
//
// Layout: W [N, K] int8 is stored as [N/16][K/4 + 1][64 bytes]: for each block of 16 output rows, one
// 64-byte line per quad of K positions (the quad of each of the 16 rows), then one line of 16 int32:
// 128 x the row's sum of codes. `vpdpbusd` multiplies unsigned by signed bytes, so a row of activations
// is stored as q + 128 (1..255) and that line takes the 128 back out of the int32 sum, exactly.
//
// One call quantizes x once (each row alone: its absmax / 127, then round(x / scale) to nearest even,
// as the reference does), then runs the products like csrc/bf16_gemm.cpp: parallel over groups
// of 6 blocks (96 outputs), tiles of 4 rows x 96 outputs (24 accumulators), the group's weights in L2
// while every row passes. Each output is an exact int32 sum, then float(sum) * x_scale * w_scale
// rounded to bf16 once: the reference's bits, whatever the row count (batch-invariant). A `vpdpbusd`
// does 64 multiply-adds, twice a `vdpbf16ps`: the point of int8 compute where there is no AMX.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include "../../csrc/gemm_tiles.h"
#define TINYSERVE_VNNI 1
#endif

namespace {

constexpr int64_t kLanes = 16;  // output rows per block: one int32 vector

#if defined(TINYSERVE_VNNI)
// The reference's arithmetic, held against -ffast-math (which every kernel here is built with): a
// division by a constant, or by the same value many times, may become a multiplication by the rounded
// reciprocal, a vector division a reciprocal estimate, and a product of three may be reassociated. None
// is the reference's rounding, and a reciprocal is worse than it looks: bf16 activations carry 8
// significant bits, so x / scale lands exactly on n + 0.5 far more often than fp32 data would, and a
// rounded reciprocal pushes all those ties one way (int8 compute's perplexity cost on the bundled model
// +0.88% instead of +0.40%, docs/REPORT.md V8). So the divisor 127 is read at run time, the vector
// division is written out (`divide`), and `opaque` hides a value from the optimizer at each use.
volatile float kQmax = 127.0f;

template <typename T>
inline T opaque(T v) {
  asm("" : "+v"(v));
  return v;
}

// n / d correctly rounded: GCC under -ffast-math turns `_mm512_div_ps` into `vrcp14ps` and a Newton step.
inline __m512 divide(__m512 n, __m512 d) {
  __m512 q;
  asm("vdivps %[d], %[n], %[q]" : [q] "=v"(q) : [n] "v"(n), [d] "v"(d));
  return q;
}

// acc + the 4-byte dot products of unsigned a and signed b, per lane; b in a register: given the builtin,
// GCC reads each weight line from L1 again for every row.
inline __v16si dpbusd(__v16si acc, __v16si a, __v16si b) {
  asm("vpdpbusd %[b], %[a], %[acc]" : [acc] "+v"(acc) : [a] "v"(a), [b] "v"(b));
  return acc;
}

// Row x [K] -> q + 128 as bytes into u [K]; returns the row's scale.
inline float quantize_row(const c10::BFloat16* x, int64_t K, uint8_t* u) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(x);
  auto widen = [](__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); };
  const int64_t K16 = K / 16 * 16;
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K16; k += 16)
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + k)))));
  float amax = _mm512_reduce_max_ps(vmax);
  for (int64_t k = K16; k < K; ++k) amax = std::max(amax, std::fabs(static_cast<float>(x[k])));
  const float scale = std::max(amax, 1e-12f) / kQmax;
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512i offset = _mm512_set1_epi32(128);
  for (int64_t k = 0; k < K16; k += 16) {
    const __m512 v = divide(widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + k))), vscale);
    const __m512i q = _mm512_cvtps_epi32(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(u + k), _mm512_cvtepi32_epi8(_mm512_add_epi32(q, offset)));
  }
  for (int64_t k = K16; k < K; ++k) u[k] = static_cast<uint8_t>(std::nearbyint(static_cast<float>(x[k]) / opaque(scale)) + 128);
  return scale;
}

// Rows [0, MR) of the quantized x (u, scales xs) times blocks [0, NR) of the group at w.
template <int MR, int NR>
inline void tile(const uint8_t* u, const float* xs, int64_t K, const int8_t* w, const float* ws, c10::BFloat16* y,
                 int64_t ldy) {
  // Typed as GCC's own vector of 16 int32: as __m512i (8 x int64), each step's conversions kept the 24
  // accumulators in memory (260 GOP/s instead of ~800).
  __v16si acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = (__v16si)_mm512_setzero_si512();
  const int64_t K4 = K / 4, line = K4 + 1;  // a block: K/4 lines of quads, then its compensation line
  const int32_t* quads = reinterpret_cast<const int32_t*>(u);
  for (int64_t kq = 0; kq < K4; ++kq) {
    __v16si b[NR];
    for (int j = 0; j < NR; ++j) b[j] = (__v16si)_mm512_loadu_si512(w + (j * line + kq) * 64);
    for (int i = 0; i < MR; ++i) {
      const __v16si a = (__v16si)_mm512_set1_epi32(quads[i * K4 + kq]);
      for (int j = 0; j < NR; ++j) acc[i][j] = dpbusd(acc[i][j], a, b[j]);
    }
  }
  for (int j = 0; j < NR; ++j) {
    const __m512i comp = _mm512_loadu_si512(w + (j * line + K4) * 64);
    const __m512 wsj = _mm512_loadu_ps(ws + j * kLanes);
    for (int i = 0; i < MR; ++i) {
      const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32((__m512i)acc[i][j], comp)), _mm512_set1_ps(xs[i]));
      const __m512 v = _mm512_mul_ps(opaque(t), wsj);  // (sum * x_scale) * w_scale, in the reference's order
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i * ldy + j * kLanes), (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

void gemm(const c10::BFloat16* x, const int8_t* w, const float* ws, c10::BFloat16* y, int64_t M, int64_t K,
          int64_t blocks) {
  std::vector<uint8_t> u(static_cast<size_t>(M * K));
  std::vector<float> xs(static_cast<size_t>(M));
  at::parallel_for(0, M, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; ++m) xs[m] = quantize_row(x + m * K, K, u.data() + m * K);
  });
  const int64_t N = blocks * kLanes, line = K / 4 + 1;
  tinyserve::block_groups(blocks, [&](auto nr, int64_t b0) {
    const int8_t* wg = w + b0 * line * 64;
    tinyserve::row_tiles(M, [&](auto mr, int64_t i) {
      tile<decltype(mr)::value, decltype(nr)::value>(u.data() + i * K, xs.data() + i, K, wg, ws + b0 * kLanes,
                                                     y + i * N + b0 * kLanes, N);
    });
  });
}
#endif

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int8_linear: x must be 2-D bfloat16");
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kChar && w.size(2) == 64 && w.is_contiguous(),
              "int8_linear: w must be packed [N/16, K/4 + 1, 64] int8 (layers/int8_gemm.py)");
  const int64_t M = x.size(0), K = x.size(1), blocks = w.size(0);
  TORCH_CHECK((w.size(1) - 1) * 4 == K, "int8_linear: x has ", K, " columns, the weight ", (w.size(1) - 1) * 4);
  TORCH_CHECK(w_scales.scalar_type() == at::kFloat && w_scales.numel() == blocks * kLanes && w_scales.is_contiguous(),
              "int8_linear: w_scales must be float32 [N]");
  at::Tensor y = at::empty({M, blocks * kLanes}, x.options());
  if (M == 0) return y;
#if defined(TINYSERVE_VNNI)
  const at::Tensor xc = x.contiguous();
  gemm(xc.data_ptr<c10::BFloat16>(), w.data_ptr<int8_t>(), w_scales.data_ptr<float>(), y.data_ptr<c10::BFloat16>(),
       M, K, blocks);
#else
  TORCH_CHECK(false, "int8_linear: built for a CPU without AVX512-VNNI and AVX512-BF16");
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinyserve, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor w_scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinyserve, CPU, m) {
  m.impl("int8_linear", &int8_linear);
}
