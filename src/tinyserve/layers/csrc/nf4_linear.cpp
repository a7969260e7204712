// y = x W^T for W in NF4 (QLoRA's 16-value codebook times one scale per group), read packed.
//
// Layout (layers/nf4.py packs it): codes [N, K/2] bytes in blocks of 32 weights along K; byte i of a
// block holds weight i in its low nibble and weight i + 16 in its high nibble, so 16 bytes widen to
// two 16-lane index vectors with one zero-extension and one shift. Scales [N, K/group] fp32, group a
// multiple of 32. With AVX-512 the 16-entry codebook is one register and a lookup is one
// `_mm512_permutexvar_ps`; each group's products are summed unscaled and its scale applied once.
// Without AVX-512 (or with -DTINYSERVE_PORTABLE, as a test builds it) the same loops run scalar and the
// compiler vectorises what it can; -march=native decides.
//
// Work: parallel over output rows (at::parallel_for follows torch.set_num_threads), in tiles of a few
// output rows x up to 4 activation rows that share every decoded block and activation load.
// Accumulation is fp32; bf16 activations are widened to fp32 once per call (a few KB), results
// rounded to the activations' dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && !defined(TINYSERVE_PORTABLE)
#define TINYSERVE_NF4_AVX512 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;

inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;  // bf16 is the top half of an fp32
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void store(float* p, float v) { *p = v; }
inline void store(c10::BFloat16* p, float v) { *p = c10::BFloat16(v); }  // round to nearest even

// y[m + r, n + j] = dot(W row n + j, x row m + r) for an NR x R tile. Each group's products are summed
// unscaled and its scale applied once (one FMA per group), so the inner loop is lookup + FMA; NR output
// rows share each activation load and give NR x R independent chains (a 576-wide row is only 18 blocks:
// one row at a time, its fixed costs and FMA latency would dominate).
template <typename T, int NR, int R>
void tile(const uint8_t* codes, const float* scales, const float* book, const float* x, T* y, int64_t n,
          int64_t m, int64_t N, int64_t K, int64_t group) {
  const int64_t groups = K / group;
  const uint8_t* c[NR];
  const float* s[NR];
  for (int j = 0; j < NR; ++j) {
    c[j] = codes + (n + j) * (K / 2);
    s[j] = scales + (n + j) * groups;
  }
  const float* xm = x + m * K;
#if defined(TINYSERVE_NF4_AVX512)
  const __m512 table = _mm512_loadu_ps(book);
  __m512 total[NR][R];
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < R; ++r) total[j][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[NR][R];
    for (int j = 0; j < NR; ++j)
      for (int r = 0; r < R; ++r) part[j][r] = _mm512_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; k += kBlock) {
      __m512 xl[R], xh[R];
      for (int r = 0; r < R; ++r) {
        xl[r] = _mm512_loadu_ps(xm + r * K + k);
        xh[r] = _mm512_loadu_ps(xm + r * K + k + 16);
      }
      for (int j = 0; j < NR; ++j) {
        const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c[j] + k / 2)));
        const __m512 lo = _mm512_permutexvar_ps(idx, table);  // reads only the low 4 bits of each index
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), table);
        for (int r = 0; r < R; ++r) {
          part[j][r] = _mm512_fmadd_ps(lo, xl[r], part[j][r]);
          part[j][r] = _mm512_fmadd_ps(hi, xh[r], part[j][r]);
        }
      }
    }
    for (int j = 0; j < NR; ++j) {
      const __m512 scale = _mm512_set1_ps(s[j][g]);
      for (int r = 0; r < R; ++r) total[j][r] = _mm512_fmadd_ps(part[j][r], scale, total[j][r]);
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < R; ++r) store(y + (m + r) * N + n + j, _mm512_reduce_add_ps(total[j][r]));
#else
  float total[NR][R] = {};
  float w[kBlock];
  for (int64_t g = 0; g < groups; ++g) {
    float part[NR][R] = {};
    for (int64_t k = g * group; k < (g + 1) * group; k += kBlock) {
      for (int j = 0; j < NR; ++j) {
        for (int i = 0; i < 16; ++i) {
          w[i] = book[c[j][k / 2 + i] & 15];
          w[i + 16] = book[c[j][k / 2 + i] >> 4];
        }
        for (int r = 0; r < R; ++r) {
          const float* xr = xm + r * K + k;
          float sum = 0.f;
          for (int i = 0; i < kBlock; ++i) sum += w[i] * xr[i];
          part[j][r] += sum;
        }
      }
    }
    for (int j = 0; j < NR; ++j)
      for (int r = 0; r < R; ++r) total[j][r] += part[j][r] * s[j][g];
  }
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < R; ++r) store(y + (m + r) * N + n + j, total[j][r]);
#endif
}

// Activation rows m..m + R against output rows [begin, end): NR rows at a time, then one by one.
template <typename T, int NR, int R>
void row_range(const uint8_t* codes, const float* scales, const float* book, const float* x, T* y, int64_t begin,
               int64_t end, int64_t m, int64_t N, int64_t K, int64_t group) {
  int64_t n = begin;
  for (; n + NR <= end; n += NR) tile<T, NR, R>(codes, scales, book, x, y, n, m, N, K, group);
  for (; n < end; ++n) tile<T, 1, R>(codes, scales, book, x, y, n, m, N, K, group);
}

template <typename T>
void nf4_kernel(const float* x, const uint8_t* codes, const float* scales, const float* book, T* y, int64_t M,
                int64_t N, int64_t K, int64_t group) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = 0; m < M; m += 4) {  // tiles of up to 4 activation rows share each decoded block
      switch (std::min<int64_t>(4, M - m)) {  // NR x R sized so the accumulators fit the 32 vector registers
        case 4: row_range<T, 2, 4>(codes, scales, book, x, y, begin, end, m, N, K, group); break;
        case 3: row_range<T, 2, 3>(codes, scales, book, x, y, begin, end, m, N, K, group); break;
        case 2: row_range<T, 4, 2>(codes, scales, book, x, y, begin, end, m, N, K, group); break;
        default: row_range<T, 4, 1>(codes, scales, book, x, y, begin, end, m, N, K, group);
      }
    }
  });
}

at::Tensor nf4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                      const at::Tensor& codebook, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2 && scales.dim() == 2, "nf4_linear: x [M, K], codes [N, K/2], "
              "scales [N, K/group]");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.size(1) * 2 == K && codes.is_contiguous(),
              "nf4_linear: codes must be contiguous uint8 [N, K/2] for K = ", K);
  TORCH_CHECK(group > 0 && group % kBlock == 0 && K % group == 0, "nf4_linear: group ", group,
              " must be a multiple of 32 dividing K = ", K);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.size(0) == N && scales.size(1) == K / group &&
              scales.is_contiguous(), "nf4_linear: scales must be contiguous fp32 [N, K/group]");
  TORCH_CHECK(codebook.scalar_type() == at::kFloat && codebook.numel() == 16 && codebook.is_contiguous(),
              "nf4_linear: codebook must be 16 contiguous fp32 values");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "nf4_linear supports float32 and bfloat16 activations, got ", x.scalar_type());
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  // bf16 activations widened here, not by an ATen op: at batch 1 a tiny op's overhead is a first-order cost
  const at::Tensor xc = x.contiguous();
  std::vector<float> widened;
  const float* xf;
  if (xc.scalar_type() == at::kBFloat16) {
    const c10::BFloat16* src = xc.data_ptr<c10::BFloat16>();
    widened.resize(M * K);
    for (int64_t i = 0; i < M * K; ++i) widened[i] = to_float(src[i]);
    xf = widened.data();
  } else {
    xf = xc.data_ptr<float>();
  }
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float *s = scales.data_ptr<float>(), *book = codebook.data_ptr<float>();
  if (y.scalar_type() == at::kBFloat16)
    nf4_kernel(xf, c, s, book, y.data_ptr<c10::BFloat16>(), M, N, K, group);
  else
    nf4_kernel(xf, c, s, book, y.data_ptr<float>(), M, N, K, group);
  return y;
}

}  // namespace

// A fragment: the paged attention kernel's library owns the `tinyserve` namespace.
TORCH_LIBRARY_FRAGMENT(tinyserve, m) {
  m.def("nf4_linear(Tensor x, Tensor codes, Tensor scales, Tensor codebook, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinyserve, CPU, m) { m.impl("nf4_linear", &nf4_linear); }
