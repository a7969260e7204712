// y = x W^T in bf16 on AVX512-BF16, with W packed once at load (layers/bf16_gemm.py packs it, and says when).
//
// Layout: W [N, K] is stored as [N/16][K/2][16][2]: for each block of 16 output rows, one 64-byte line per
// pair of K positions, holding the pair for each of the 16 rows. One `vdpbf16ps` then multiplies a line by
// a broadcast pair of one activation row and adds into 16 outputs, with no reduction across lanes at the
// end. (ATen's bf16 GEMM, oneDNN, reorders W into its own blocked layout on every call: at a decode step's
// tens of rows that reorder is a large share of the product.)
//
// Work: parallel over groups of kNr blocks (96 output rows); within a group, tiles of kMr activation rows
// x 96 outputs: 24 accumulators, per K pair 6 weight lines and 4 broadcasts. The group's weights (K x 192
// bytes) stay in L2 while every row tile passes over them, so each weight is read from memory once per
// call; the activations come from L2/L3 once per group (96 products per byte: far below those caches'
// rates). Chunking the rows instead (64 at a time) read the LM head 16 times at 1,024 rows: 0.93x ATen
// there, 1.12x without. Each output is one fp32 sum over K in order, then rounded to bf16 once: a row's
// result does not depend on the other rows or the row count (batch-invariant).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>

#include "../../csrc/gemm_tiles.h"
#endif

namespace {

constexpr int64_t kLanes = 16;  // output rows per block: one fp32 vector

#if defined(__AVX512BF16__)
// Rows [0, MR) of x times blocks [0, NR) of the group at w (each block K/2 lines of 32 bf16).
template <int MR, int NR>
inline void tile(const c10::BFloat16* x, int64_t K, const c10::BFloat16* w, c10::BFloat16* y, int64_t ldy) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t K2 = K / 2;
  const int32_t* pairs = reinterpret_cast<const int32_t*>(x);  // one bf16 pair per int32
  for (int64_t kp = 0; kp < K2; ++kp) {
    __m512bh b[NR];
    for (int j = 0; j < NR; ++j) b[j] = (__m512bh)_mm512_loadu_si512(w + (j * K2 + kp) * 2 * kLanes);
    for (int i = 0; i < MR; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pairs[i * K2 + kp]);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, b[j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i * ldy + j * kLanes),
                          (__m256i)_mm512_cvtneps_pbh(acc[i][j]));
}

void gemm(const c10::BFloat16* x, const c10::BFloat16* w, c10::BFloat16* y, int64_t M, int64_t K, int64_t blocks) {
  const int64_t N = blocks * kLanes;
  tinyserve::block_groups(blocks, [&](auto nr, int64_t b0) {
    const c10::BFloat16* wg = w + b0 * K * kLanes;  // K/2 lines of 2 x 16 per block
    tinyserve::row_tiles(M, [&](auto mr, int64_t i) {
      tile<decltype(mr)::value, decltype(nr)::value>(x + i * K, K, wg, y + i * N + b0 * kLanes, N);
    });
  });
}
#endif

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "bf16_linear: x must be 2-D bfloat16");
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kBFloat16 && w.size(2) == 2 * kLanes && w.is_contiguous(),
              "bf16_linear: w must be packed [N/16, K/2, 32] (layers/bf16_gemm.py)");
  const int64_t M = x.size(0), K = x.size(1), blocks = w.size(0);
  TORCH_CHECK(w.size(1) * 2 == K, "bf16_linear: x has ", K, " columns, the weight ", w.size(1) * 2);
  at::Tensor y = at::empty({M, blocks * kLanes}, x.options());
  if (M == 0) return y;
#if defined(__AVX512BF16__)
  const at::Tensor xc = x.contiguous();
  gemm(xc.data_ptr<c10::BFloat16>(), w.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), M, K, blocks);
#else
  TORCH_CHECK(false, "bf16_linear: built for a CPU without AVX512-BF16");
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinyserve, m) {
  m.def("bf16_linear(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinyserve, CPU, m) {
  m.impl("bf16_linear", &bf16_linear);
}
