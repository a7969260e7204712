// The element-wise work of an eager (prefill) step, one pass over memory per op: RMSNorm and SwiGLU's
// SiLU(gate) * up. ATen runs RMSNorm as a chain of ops with full-size fp32 temporaries and SwiGLU as
// two ops with a bf16 rounding between them. The compiled decode step fuses these itself; these
// kernels are for the steps that run eager (models/eager_ops.py).
//
// Each row is computed alone, in the same order whatever the other rows (batch-invariant), in fp32,
// rounded once to the output dtype. Parallel over rows with at::parallel_for (torch's thread count).
// bf16 rows go through AVX-512 where the CPU has it (shared pieces in tinyserve/csrc/vec_math.h);
// the scalar loops serve fp32 and other CPUs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#if defined(__AVX512F__) && !defined(TINYSERVE_PORTABLE)
#include "../../csrc/vec_math.h"
#endif

namespace {

// Rows per parallel chunk: enough work per thread that waking it pays (~32K values).
int64_t grain(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

template <typename T>
void rms_norm_row(const T* x, const T* w, T* y, int64_t width, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < width; ++i) ss += static_cast<float>(x[i]) * static_cast<float>(x[i]);
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(width) + eps);
  for (int64_t i = 0; i < width; ++i) y[i] = static_cast<T>(static_cast<float>(x[i]) * inv * static_cast<float>(w[i]));
}

template <typename T>
void silu_mul_row(const T* g, const T* u, T* y, int64_t width) {
  for (int64_t i = 0; i < width; ++i) {
    const float gf = static_cast<float>(g[i]);
    y[i] = static_cast<T>(gf / (1.f + std::exp(-gf)) * static_cast<float>(u[i]));
  }
}

#if defined(TINYSERVE_VEC_BF16)
using BF16 = c10::BFloat16;

template <>
void rms_norm_row<BF16>(const BF16* x, const BF16* w, BF16* y, int64_t width, float eps) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < width; i += 16) {
    const __m512 v = tinyserve::load_bf16(x + i, static_cast<int>(std::min<int64_t>(16, width - i)));
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(width) + eps));
  for (int64_t i = 0; i < width; i += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, width - i));
    const __m512 v = _mm512_mul_ps(_mm512_mul_ps(tinyserve::load_bf16(x + i, n), inv), tinyserve::load_bf16(w + i, n));
    tinyserve::store_bf16(y + i, v, n);
  }
}

template <>
void silu_mul_row<BF16>(const BF16* g, const BF16* u, BF16* y, int64_t width) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < width; i += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, width - i));
    const __m512 gv = tinyserve::load_bf16(g + i, n);
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, tinyserve::exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
    tinyserve::store_bf16(y + i, _mm512_mul_ps(_mm512_mul_ps(gv, sig), tinyserve::load_bf16(u + i, n)), n);
  }
}
#endif

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), name, ": a contiguous [rows, width] tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name,
              " supports float32 and bfloat16, got ", x.scalar_type());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.scalar_type() == x.scalar_type() &&
                  weight.is_contiguous(),
              "rms_norm: a contiguous weight of the rows' width and dtype");
  auto y = at::empty_like(x);
  const int64_t width = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = weight.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, x.size(0), grain(width), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) rms_norm_row(xp + r * width, wp, yp + r * width, width, float(eps));
    });
  });
  return y;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "silu_mul");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "silu_mul: [rows, 2 * width], gate then up");
  const int64_t width = gate_up.size(1) / 2;
  auto y = at::empty({gate_up.size(0), width}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* gp = gate_up.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, gate_up.size(0), grain(2 * width), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) silu_mul_row(gp + r * 2 * width, gp + (r * 2 + 1) * width, yp + r * width, width);
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinyserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinyserve, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
}
