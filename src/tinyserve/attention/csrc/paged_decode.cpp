// Decode attention that reads the paged KV pool in place (the `paged` attention back end).
//
// One query token per sequence. Work item = (sequence, KV head): the G query heads that share a KV
// head are scored against each K row while it is in cache, so every K and V row of the context is
// read from memory exactly once per step, and nothing is copied out of the pool. Two passes (scores,
// then the V sum) with a plain softmax in between: the context of one item is small enough that its
// scores fit in a per-thread buffer, and this order streams K, then V, front to back.
// Accumulation is fp32 whatever the cache dtype (fp32, bf16, or the int8 pool of codes and scales). Parallel over items with
// at::parallel_for, so it follows torch.set_num_threads like every other op of the step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(double x) { return static_cast<float>(x); }  // instantiated by the dispatch, never called
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;  // bf16 is the top half of an fp32
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float to_float(int8_t x) { return static_cast<float>(x); }

// A pool row of one KV head: D values of the cache's dtype, or (kScaled, the int8 pool of
// tinyserve/kv/quant.py) D int8 codes then the row's bf16 scale, D + 2 bytes. The scale multiplies the
// dot product (K) and the softmax weight (V), once per row.
template <typename C, bool kScaled>
struct Rows {
  static constexpr int64_t kExtra = kScaled ? 2 : 0;
  static float scale(const C* row, int64_t D) {
    if constexpr (kScaled) {
      c10::BFloat16 s;
      std::memcpy(&s.x, row + D, sizeof s.x);
      return to_float(s);
    } else {
      return 1.f;
    }
  }
};

// kD > 0 fixes head_dim at compile time (the inner loops unroll into a few vector FMAs: 3.7x
// faster per K row than a runtime trip count at D=64); kD == 0 handles any head_dim.
template <typename T, typename C, bool kScaled, int kD>
void decode_kernel(const T* q, const C* k_cache, const C* v_cache, const int32_t* tables,
                   const int32_t* lens, T* out, int64_t num_seqs, int64_t num_heads,
                   int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t table_width,
                   float scale) {
  using R = Rows<C, kScaled>;
  const int64_t G = num_heads / num_kv_heads, D = kD > 0 ? kD : head_dim, W = D + R::kExtra;
  const int64_t row_stride = num_kv_heads * W, block_stride = block_size * row_stride;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / num_kv_heads, h = item % num_kv_heads;
      const int64_t n = lens[s];
      const int32_t* table = tables + s * table_width;
      const T* qs = q + (s * num_heads + h * G) * D;
      for (int64_t i = 0; i < G * D; ++i) qf[i] = to_float(qs[i]) * scale;
      scores.resize(G * n);
      // Pass 1: scores[g][t] = q_g . k_t
      for (int64_t t = 0; t < n; ++t) {
        const C* k = k_cache + table[t / block_size] * block_stride + (t % block_size) * row_stride + h * W;
        const float ks = R::scale(k, D);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qg[d] * to_float(k[d]);
          scores[g * n + t] = dot * ks;
        }
      }
      // Softmax over t, per query head.
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * n;
        const float mx = *std::max_element(sg, sg + n);
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) sum += (sg[t] = std::exp(sg[t] - mx));
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < n; ++t) sg[t] *= inv;
      }
      // Pass 2: out_g = sum_t p[g][t] v_t
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const C* v = v_cache + table[t / block_size] * block_stride + (t % block_size) * row_stride + h * W;
        const float vs = R::scale(v, D);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * n + t] * vs;
          float* ag = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] += p * to_float(v[d]);
        }
      }
      T* os = out + (s * num_heads + h * G) * D;
      for (int64_t i = 0; i < G * D; ++i) os[i] = static_cast<T>(acc[i]);
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B, H, D], caches [blocks, block_size, kv_heads, D]");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "K and V caches differ in shape");
  const bool q8 = k_cache.scalar_type() == at::kChar;  // the int8 pool: rows of D codes + a bf16 scale
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type() && (q8 || q.scalar_type() == k_cache.scalar_type()),
              "q and the caches must share a dtype (or the caches be the int8 pool)");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block_tables and context_lens are int32");
  TORCH_CHECK(block_tables.is_contiguous() && context_lens.is_contiguous(), "contiguous tables");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D + (q8 ? 2 : 0) && H % Hkv == 0,
              "head_dim mismatch or heads not a multiple of kv_heads");
  TORCH_CHECK(block_tables.size(0) == B && context_lens.size(0) == B, "one table and length per sequence");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "paged_decode supports float32 and bfloat16, got ", q.scalar_type());
  auto out = at::empty_like(q);
  if (B == 0) return out;
  const int64_t bs = k_cache.size(1), width = block_tables.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "paged_decode", [&] {
    auto run = [&](auto kernel, const auto* k, const auto* v) {
      kernel(q.data_ptr<scalar_t>(), k, v, block_tables.data_ptr<int32_t>(), context_lens.data_ptr<int32_t>(),
             out.data_ptr<scalar_t>(), B, H, Hkv, D, bs, width, static_cast<float>(scale));
    };
    if (q8) {
      const int8_t *k = k_cache.data_ptr<int8_t>(), *v = v_cache.data_ptr<int8_t>();
      if (D == 64) run(decode_kernel<scalar_t, int8_t, true, 64>, k, v);
      else if (D == 128) run(decode_kernel<scalar_t, int8_t, true, 128>, k, v);
      else run(decode_kernel<scalar_t, int8_t, true, 0>, k, v);
    } else {
      const scalar_t *k = k_cache.data_ptr<scalar_t>(), *v = v_cache.data_ptr<scalar_t>();
      if (D == 64) run(decode_kernel<scalar_t, scalar_t, false, 64>, k, v);
      else if (D == 128) run(decode_kernel<scalar_t, scalar_t, false, 128>, k, v);
      else run(decode_kernel<scalar_t, scalar_t, false, 0>, k, v);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(tinyserve, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinyserve, CPU, m) { m.impl("paged_decode", &paged_decode); }
