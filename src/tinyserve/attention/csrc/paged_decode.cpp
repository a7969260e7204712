// Decode attention that reads the paged KV pool in place (the `paged` attention back end).
//
// One query token per sequence. Work item = (sequence, KV head): the G query heads that share a KV
// head are scored against each K row while it is in cache, so every K and V row of the context is
// read from memory exactly once per step, and nothing is copied out of the pool. Two passes (scores,
// then the V sum) with a plain softmax in between: the context of one item is small enough that its
// scores fit in a per-thread buffer, and this order streams K, then V, front to back.
// Accumulation is fp32 whatever the cache dtype (fp32, bf16, or the int8 pool of codes and scales). Parallel over items with
// at::parallel_for, so it follows torch.set_num_threads like every other op of the step.
//
// With AVX-512 and head_dim 64 or 128 (every model we serve) a vector kernel does the same sums in a
// different order, for K/V that come from memory rather than cache (docs/REPORT.md, section PA): a
// work item is a whole sequence when there are enough of them (its chunks of 16 tokens are contiguous
// runs of a block, read ahead), each K or V row is widened to fp32 once for all G query heads, a score
// is a vector of partial products summed across lanes 16 tokens at a time (one shuffle tree, not one
// horizontal sum per token and head), the softmax's exp is a vector polynomial, and the V sums stay in
// registers. A sequence's result does not depend on how the items are split (tested). The portable
// loop below serves other head sizes and CPUs without AVX-512.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && !defined(TINYSERVE_PORTABLE)
#define TINYSERVE_PAGED_AVX512 1
#include "../../csrc/vec_math.h"
#endif

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

#if defined(TINYSERVE_PAGED_AVX512)
// 16 cache values widened to fp32 (bf16 rows: Widen below).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const double*) { return _mm512_setzero_ps(); }  // instantiated by the dispatch, never called
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// A pool row widened to kD / 16 fp32 vectors, and where its element d lands among them. bf16 rows
// widen their even and odd elements apart (a shift and a mask per 32 values, no shuffle: the shuffle
// port is what the rest of the kernel is short of); the query is laid out the same way, so the dot
// products are unchanged, and the V sums are put back in order once per item.
template <typename C>
struct Widen {
  static int64_t at(int64_t d) { return d; }
  template <int kV>
  static void load(const C* r, __m512* v) {
    for (int j = 0; j < kV; ++j) v[j] = load16(r + 16 * j);
  }
};
template <>
struct Widen<c10::BFloat16> {
  static int64_t at(int64_t d) { return d / 32 * 32 + d % 2 * 16 + d % 32 / 2; }
  template <int kV>
  static void load(const c10::BFloat16* r, __m512* v) {
    for (int j = 0; j < kV / 2; ++j) {
      const __m512i x = _mm512_loadu_si512(r + 32 * j);  // little-endian: element 2i is dword i's low half
      v[2 * j] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
      v[2 * j + 1] = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(int32_t(0xFFFF0000u))));
    }
  }
};

// v[i] holds 16 partial sums of token i's score; returns the 16 scores (lane i = sum of v[i]'s lanes),
// by a tree of in-lane then cross-lane shuffles: 45 instructions for 16 tokens.
inline __m512 sum_lanes16(__m512* v) {
  for (int i = 0; i < 8; ++i)  // lane k of 128 bits: [v2i 0+1, v2i 2+3, v2i+1 0+1, v2i+1 2+3]
    v[i] = _mm512_add_ps(_mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0x88),
                         _mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0xDD));
  for (int i = 0; i < 4; ++i)  // lane k: tokens 4i..4i+3, each summed over lane k's four values
    v[i] = _mm512_add_ps(_mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0x88),
                         _mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // then across the four 128-bit lanes, twice
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x88), _mm512_shuffle_f32x4(v[0], v[1], 0xDD));
}

// The first `gn` of kHeads query heads' rows of kV vectors from `p` into registers, zeros after them.
template <int kHeads, int kV>
inline void load_heads(const float* p, int64_t gn, __m512 (&r)[kHeads][kV]) {
  for (int g = 0; g < kHeads; ++g)
    for (int j = 0; j < kV; ++j) r[g][j] = g < gn ? _mm512_loadu_ps(p + (g * kV + j) * 16) : _mm512_setzero_ps();
}

// `bytes` from r into the cache level `kHint` names, a line at a time (the last line too where r is not aligned).
template <_mm_hint kHint>
inline void fetch(const void* r, int64_t bytes) {
  const char* b = static_cast<const char*>(r);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(b + i, kHint);
  _mm_prefetch(b + bytes - 1, kHint);
}

// The item after this one in a thread's range: its sequence's block table and length, its first KV head.
struct NextItem {
  const int32_t* table;
  int64_t n, h0;
};

// One sequence's KV heads [h0, h1) (all of them when there are enough sequences to share out, one
// at a time otherwise). The tokens go by in chunks of 16, and each chunk serves every head in the
// range before the next: a token's rows for these heads are adjacent in the pool, so a chunk is one
// contiguous run of a block that is read from memory once. While an item is computed, the next item's K
// and V rows are fetched into L2, a slice per chunk: the item then runs at about the speed it has with its
// K/V in cache. Fetching only two chunks ahead into L1 (before) left a thread's loads waiting on memory:
// 32 sequences of 256 tokens, K/V from memory, 0.55-0.78 ms per layer against 0.32-0.53 ms now, with the
// pool's blocks in order, interleaved or shuffled (docs/REPORT.md, section FA). An item nobody fetched (a
// thread's first) is still fetched two chunks ahead.
// kHeads query heads share a pass over a chunk (their sums fit in registers): 4 at head_dim 64, 2 at 128;
// 3 where G is a multiple of 3 and not of 4 (SmolLM2-135M: 9 query heads over 3 KV heads), whose last
// group would otherwise multiply a zero head, a quarter of pass 1's products.
template <typename C, bool kScaled, int kD, int kHeads>
void decode_heads_avx512(const float* qf, const C* k_cache, const C* v_cache, const int32_t* table, int64_t n,
                         int64_t G, int64_t h0, int64_t h1, int64_t row_stride, int64_t block_stride,
                         int64_t block_size, float* scores, float* out, const NextItem& next, bool fetched) {
  using R = Rows<C, kScaled>;
  constexpr int kV = kD / 16;               // vectors per row
  constexpr int64_t kAhead = 32;
  const int64_t W = kD + R::kExtra, n16 = (n + 15) / 16 * 16, span = (h1 - h0) * W * int64_t(sizeof(C));
  auto row_of = [&](const C* cache, const int32_t* tab, int64_t t, int64_t h) {
    return cache + tab[t / block_size] * block_stride + (t % block_size) * row_stride + h * W;
  };
  auto row = [&](const C* cache, int64_t t, int64_t h) { return row_of(cache, table, t, h); };
  auto prefetch = [&](const C* cache, int64_t t0) {
    if (fetched) return;
    for (int64_t t = std::max<int64_t>(t0, 0); t < std::min(t0 + 16, n); ++t)
      fetch<_MM_HINT_T0>(row(cache, t, h0), span);
  };
  // The next item's rows (its K, then its V) into L2, `per` rows at each of this item's 2 * n16 / 16 chunks.
  const int64_t per = next.table ? (2 * next.n + 2 * n16 / 16 - 1) / (2 * n16 / 16) : 0;
  int64_t ahead = 0;
  auto prefetch_next = [&]() {
    for (const int64_t stop = std::min(ahead + per, 2 * next.n); ahead < stop; ++ahead)
      fetch<_MM_HINT_T1>(ahead < next.n ? row_of(k_cache, next.table, ahead, next.h0)
                                        : row_of(v_cache, next.table, ahead - next.n, next.h0), span);
  };
  for (int64_t t0 = 0; t0 < kAhead; t0 += 16) prefetch(k_cache, t0);
  // Pass 1: scores[h][g][t] = (q_hg . k_ht) * the row's scale, summed across lanes 16 tokens at a time.
  for (int64_t t0 = 0; t0 < n16; t0 += 16) {
    prefetch_next();
    prefetch(k_cache, t0 + kAhead);
    prefetch(v_cache, t0 + kAhead - n16);  // pass 2's first chunks, during pass 1's last
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t g0 = 0; g0 < G; g0 += kHeads) {
        const int64_t gn = std::min<int64_t>(kHeads, G - g0), qh = (h - h0) * G + g0;
        __m512 q[kHeads][kV];
        load_heads(qf + qh * kD, gn, q);
        __m512 part[kHeads][16];
        alignas(64) float ks[16];
        for (int i = 0; i < 16; ++i) {
          if (t0 + i >= n) {
            for (int g = 0; g < kHeads; ++g) part[g][i] = _mm512_setzero_ps();
            ks[i] = 0.f;
            continue;
          }
          const C* k = row(k_cache, t0 + i, h);
          ks[i] = R::scale(k, kD);
          __m512 kv[kV];
          Widen<C>::template load<kV>(k, kv);
          for (int g = 0; g < kHeads; ++g) {
            __m512 a = _mm512_mul_ps(q[g][0], kv[0]);
            for (int j = 1; j < kV; ++j) a = _mm512_fmadd_ps(q[g][j], kv[j], a);
            part[g][i] = a;
          }
        }
        const __m512 scale16 = _mm512_load_ps(ks);
        for (int g = 0; g < gn; ++g)
          _mm512_storeu_ps(scores + (qh + g) * n16 + t0, _mm512_mul_ps(sum_lanes16(part[g]), scale16));
      }
    }
  }
  // Softmax over t, per query head (the padding past n is left out of the max and the sum).
  for (int64_t r = 0; r < (h1 - h0) * G; ++r) {
    float* sg = scores + r * n16;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < n16; t += 16) {
      const __mmask16 m = n - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - t)) - 1);
      mx = _mm512_mask_max_ps(mx, m, mx, _mm512_loadu_ps(sg + t));
    }
    const __m512 mxv = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < n16; t += 16) {
      const __mmask16 m = n - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - t)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(m, tinyserve::exp16(_mm512_sub_ps(_mm512_loadu_ps(sg + t), mxv)));
      _mm512_storeu_ps(sg + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int64_t t = 0; t < n16; t += 16) _mm512_storeu_ps(sg + t, _mm512_mul_ps(_mm512_loadu_ps(sg + t), inv));
  }
  // Pass 2: out_hg = sum_t p[h][g][t] * scale_t * v_ht; the sums stay in registers through a chunk.
  std::fill(out, out + (h1 - h0) * G * kD, 0.f);
  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    prefetch_next();
    prefetch(v_cache, t0 + kAhead);
    const int64_t tn = std::min<int64_t>(16, n - t0);
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t g0 = 0; g0 < G; g0 += kHeads) {
        const int64_t gn = std::min<int64_t>(kHeads, G - g0), qh = (h - h0) * G + g0;
        __m512 acc[kHeads][kV];
        load_heads(out + qh * kD, gn, acc);
        for (int64_t i = 0; i < tn; ++i) {
          const C* v = row(v_cache, t0 + i, h);
          const float vs = R::scale(v, kD);
          __m512 vv[kV];
          Widen<C>::template load<kV>(v, vv);
          for (int g = 0; g < kHeads; ++g) {
            if (g >= gn) break;
            const __m512 p = _mm512_set1_ps(scores[(qh + g) * n16 + t0 + i] * vs);
            for (int j = 0; j < kV; ++j) acc[g][j] = _mm512_fmadd_ps(p, vv[j], acc[g][j]);
          }
        }
        for (int g = 0; g < gn; ++g)
          for (int j = 0; j < kV; ++j) _mm512_storeu_ps(out + (qh + g) * kD + 16 * j, acc[g][j]);
      }
    }
  }
}

// The vector kernel's work items: a sequence each when there are enough of them for every thread to
// get a few (whole blocks read, in order), else (sequence, KV head) pairs (batch 1 uses every thread).
template <typename T, typename C, bool kScaled, int kD>
void decode_avx512(const T* q, const C* k_cache, const C* v_cache, const int32_t* tables, const int32_t* lens,
                   T* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                   int64_t block_size, int64_t table_width, float scale) {
  const int64_t G = num_heads / num_kv_heads, W = kD + Rows<C, kScaled>::kExtra;
  const int64_t row_stride = num_kv_heads * W, block_stride = block_size * row_stride;
  const int64_t per_item = num_seqs >= 4 * at::get_num_threads() ? num_kv_heads : 1;
  const int64_t items_per_seq = num_kv_heads / per_item;
  at::parallel_for(0, num_seqs * items_per_seq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(per_item * G * kD), res(per_item * G * kD), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / items_per_seq, h0 = item % items_per_seq * per_item, n = lens[s];
      const T* qs = q + (s * num_heads + h0 * G) * kD;  // the query heads of KV heads [h0, h0 + per_item)
      for (int64_t i = 0; i < per_item * G * kD; ++i) qf[i / kD * kD + Widen<C>::at(i % kD)] = to_float(qs[i]) * scale;
      scores.resize(per_item * G * ((n + 15) / 16 * 16));
      NextItem next{nullptr, 0, 0};
      if (item + 1 < end) {
        const int64_t s1 = (item + 1) / items_per_seq;
        next = {tables + s1 * table_width, lens[s1], (item + 1) % items_per_seq * per_item};
      }
      const auto heads = [&](auto kernel) {
        kernel(qf.data(), k_cache, v_cache, tables + s * table_width, n, G, h0, h0 + per_item, row_stride,
               block_stride, block_size, scores.data(), res.data(), next, item > begin);
      };
      if constexpr (kD == 64) {
        if (G % 4 != 0 && G % 3 == 0) heads(decode_heads_avx512<C, kScaled, kD, 3>);
        else heads(decode_heads_avx512<C, kScaled, kD, 4>);
      } else {
        heads(decode_heads_avx512<C, kScaled, kD, 2>);
      }
      T* os = out + (s * num_heads + h0 * G) * kD;
      for (int64_t i = 0; i < per_item * G * kD; ++i) os[i] = static_cast<T>(res[i / kD * kD + Widen<C>::at(i % kD)]);
    }
  });
}
#endif

// head_dim 64 and 128 on the vector kernel where there is one (the dispatch below names scalar_t).
#if defined(TINYSERVE_PAGED_AVX512)
#define TINYSERVE_KERNEL(C, S, D) decode_avx512<scalar_t, C, S, D>
#else
#define TINYSERVE_KERNEL(C, S, D) decode_kernel<scalar_t, C, S, D>
#endif

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
      if (D == 64) run(TINYSERVE_KERNEL(int8_t, true, 64), k, v);
      else if (D == 128) run(TINYSERVE_KERNEL(int8_t, true, 128), k, v);
      else run(decode_kernel<scalar_t, int8_t, true, 0>, k, v);
    } else {
      const scalar_t *k = k_cache.data_ptr<scalar_t>(), *v = v_cache.data_ptr<scalar_t>();
      if (D == 64) run(TINYSERVE_KERNEL(scalar_t, false, 64), k, v);
      else if (D == 128) run(TINYSERVE_KERNEL(scalar_t, false, 128), k, v);
      else run(decode_kernel<scalar_t, scalar_t, false, 0>, k, v);
    }
  });
  return out;
}

#undef TINYSERVE_KERNEL

}  // namespace

TORCH_LIBRARY(tinyserve, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinyserve, CPU, m) { m.impl("paged_decode", &paged_decode); }
