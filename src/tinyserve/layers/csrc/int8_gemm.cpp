// y = (x quantized to int8 per row and block of 64 columns) x (W int8 per output channel)^T, rescaled to
// bf16, on AVX512-VNNI (layers/int8_gemm.py packs W once, says when this runs and holds the reference).
//
// Per output channel one scale cannot hold every weight column of a down_proj, nor one per token every
// activation of a qkv_proj (their inputs carry outlier channels): int8 products there cost +1.1-1.8%
// perplexity. So each activation row is quantized per block of 64 columns (llama.cpp's activations are
// blocked the same way), after its columns are multiplied by `cols`, a per-input-channel factor the weight
// was divided by before it was quantized (sqrt of the column's absmax: the weight's columns evened out,
// found from the weights alone). The four kinds of a layer then cost +0.56% together (docs/REPORT.md B8).
//
// Layout: W [N, K] int8 is stored as [N/16][K/64][17][64 bytes]: for each block of 16 output rows and
// each block of 64 columns, one line of 16 int32, -128 x the rows' sums of codes over the block, then 16
// lines of quads of K positions (the quad of each of the 16 rows). `vpdpbusd` multiplies unsigned by
// signed bytes, so activations are stored as q + 128 (1..255); a block's int32 sums start from that first
// line and so end exact.
//
// Each output is sum over blocks of float(exact int32 sum) * x_scale, added in block order (multiply, then
// add: no fused rounding), times w_scale, rounded to bf16 once: the reference's bits, whatever the row
// count (batch-invariant). Work split as csrc/bf16_gemm.cpp: parallel over groups of 6 blocks of 16
// outputs, each group run as two halves of 3 in tiles of 4 rows (12 int32 sums and 12 float totals in
// registers), the half's weights in L2 while every row passes. A `vpdpbusd` does 64 multiply-adds, twice a
// `vdpbf16ps`: the point of int8 compute where there is no AMX.
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
constexpr int64_t kBlock = 64;  // columns per activation scale
constexpr int64_t kLines = 1 + kBlock / 4;  // per block of 16 outputs and 64 columns: sums, then quads

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

// Row x [K] times cols, per block of 64 -> q + 128 as bytes into u [K]; the blocks' scales into xs [K/64].
inline void quantize_row(const c10::BFloat16* x, const float* cols, int64_t K, uint8_t* u, float* xs) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(x);
  auto widen = [](__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); };
  const __m512i offset = _mm512_set1_epi32(128);
  for (int64_t b = 0; b < K / kBlock; ++b) {
    __m512 v[4];
    __m512 vmax = _mm512_setzero_ps();
    for (int p = 0; p < 4; ++p) {
      const int64_t k = b * kBlock + p * 16;
      // opaque: x * cols is rounded once, as the reference's product, before the division below
      v[p] = opaque(_mm512_mul_ps(widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + k))),
                                  _mm512_loadu_ps(cols + k)));
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v[p]));
    }
    const float scale = std::max(_mm512_reduce_max_ps(vmax), 1e-12f) / kQmax;
    xs[b] = scale;
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int p = 0; p < 4; ++p) {
      const __m512i q = _mm512_cvtps_epi32(_mm512_roundscale_ps(divide(v[p], vscale),
                                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(u + b * kBlock + p * 16), _mm512_cvtepi32_epi8(_mm512_add_epi32(q, offset)));
    }
  }
}

// Rows [0, MR) of the quantized x (u, block scales xs) times NR blocks of 16 outputs at w.
template <int MR, int NR>
inline void tile(const uint8_t* u, const float* xs, int64_t K, const int8_t* w, const float* ws, c10::BFloat16* y,
                 int64_t ldy) {
  const int64_t nb = K / kBlock, K4 = K / 4, stride = nb * kLines * 64;  // stride: bytes per 16 outputs
  const int32_t* quads = reinterpret_cast<const int32_t*>(u);
  __m512 total[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) total[i][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* wb = w + b * kLines * 64;
    // Typed as GCC's own vector of 16 int32: as __m512i (8 x int64) the conversions kept the sums in memory.
    __v16si acc[MR][NR];
    for (int j = 0; j < NR; ++j) {
      const __v16si start = (__v16si)_mm512_loadu_si512(wb + j * stride);
      for (int i = 0; i < MR; ++i) acc[i][j] = start;
    }
    for (int kq = 0; kq < kBlock / 4; ++kq) {
      __v16si bv[NR];
      for (int j = 0; j < NR; ++j) bv[j] = (__v16si)_mm512_loadu_si512(wb + j * stride + (1 + kq) * 64);
      for (int i = 0; i < MR; ++i) {
        const __v16si a = (__v16si)_mm512_set1_epi32(quads[i * K4 + b * (kBlock / 4) + kq]);
        for (int j = 0; j < NR; ++j) acc[i][j] = dpbusd(acc[i][j], a, bv[j]);
      }
    }
    for (int i = 0; i < MR; ++i) {
      const __m512 s = _mm512_set1_ps(xs[i * nb + b]);
      for (int j = 0; j < NR; ++j)
        total[i][j] = _mm512_add_ps(total[i][j], opaque(_mm512_mul_ps(_mm512_cvtepi32_ps((__m512i)acc[i][j]), s)));
    }
  }
  for (int j = 0; j < NR; ++j) {
    const __m512 wsj = _mm512_loadu_ps(ws + j * kLanes);
    for (int i = 0; i < MR; ++i)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i * ldy + j * kLanes),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(total[i][j], wsj)));
  }
}

// Rows of x times the NR (<= 3) blocks at w, in tiles of up to 4 rows.
template <int NR>
inline void rows_pass(int64_t M, const uint8_t* u, const float* xs, int64_t K, const int8_t* w, const float* ws,
                      c10::BFloat16* y, int64_t N) {
  const int64_t nb = K / kBlock;
  tinyserve::row_tiles(M, [&](auto mr, int64_t i) {
    tile<decltype(mr)::value, NR>(u + i * K, xs + i * nb, K, w, ws, y + i * N, N);
  });
}

void gemm(const c10::BFloat16* x, const float* cols, const int8_t* w, const float* ws, c10::BFloat16* y, int64_t M,
          int64_t K, int64_t blocks) {
  const int64_t nb = K / kBlock;
  std::vector<uint8_t> u(static_cast<size_t>(M * K));
  std::vector<float> xs(static_cast<size_t>(M * nb));
  at::parallel_for(0, M, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; ++m) quantize_row(x + m * K, cols, K, u.data() + m * K, xs.data() + m * nb);
  });
  const int64_t N = blocks * kLanes, stride = nb * kLines * 64;
  tinyserve::block_groups(blocks, [&](auto nr, int64_t b0) {
    constexpr int kNR = decltype(nr)::value, kFirst = kNR < 3 ? kNR : 3;
    rows_pass<kFirst>(M, u.data(), xs.data(), K, w + b0 * stride, ws + b0 * kLanes, y + b0 * kLanes, N);
    if constexpr (kNR > 3) {
      const int64_t b1 = b0 + 3;
      rows_pass<kNR - 3>(M, u.data(), xs.data(), K, w + b1 * stride, ws + b1 * kLanes, y + b1 * kLanes, N);
    }
  });
}
#endif

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scales, const at::Tensor& cols) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int8_linear: x must be 2-D bfloat16");
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kChar && w.size(2) == kLines && w.size(3) == 64 && w.is_contiguous(),
              "int8_linear: w must be packed [N/16, K/64, 17, 64] int8 (layers/int8_gemm.py)");
  const int64_t M = x.size(0), K = x.size(1), blocks = w.size(0);
  TORCH_CHECK(w.size(1) * kBlock == K, "int8_linear: x has ", K, " columns, the weight ", w.size(1) * kBlock);
  TORCH_CHECK(w_scales.scalar_type() == at::kFloat && w_scales.numel() == blocks * kLanes && w_scales.is_contiguous(),
              "int8_linear: w_scales must be float32 [N]");
  TORCH_CHECK(cols.scalar_type() == at::kFloat && cols.numel() == K && cols.is_contiguous(),
              "int8_linear: cols must be float32 [K]");
  at::Tensor y = at::empty({M, blocks * kLanes}, x.options());
  if (M == 0) return y;
#if defined(TINYSERVE_VNNI)
  const at::Tensor xc = x.contiguous();
  gemm(xc.data_ptr<c10::BFloat16>(), cols.data_ptr<float>(), w.data_ptr<int8_t>(), w_scales.data_ptr<float>(),
       y.data_ptr<c10::BFloat16>(), M, K, blocks);
#else
  TORCH_CHECK(false, "int8_linear: built for a CPU without AVX512-VNNI and AVX512-BF16");
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinyserve, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor w_scales, Tensor cols) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinyserve, CPU, m) {
  m.impl("int8_linear", &int8_linear);
}
