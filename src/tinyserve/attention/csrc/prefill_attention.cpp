// Causal attention of a prompt's (or a prompt chunk's) queries on AVX512-BF16: the `paged` back end's prefill.
//
// PyTorch's CPU flash attention ran bf16 prompts at 45-105 GFLOP/s on the EPYC (128-1,024 tokens), a quarter
// or less of what `vdpbf16ps` gives our GEMM there, and at a prompt of 512 tokens it was a third of the
// bundled model's prefill (docs/REPORT.md, section FA). This kernel is flash attention with the
// products on that instruction:
//   - K and V of each KV head are packed once per call into the layouts `vdpbf16ps` reads: K as
//     [keys/16][D/2][16][2] (one 64-byte line per pair of dimensions holds it for 16 keys, so a broadcast
//     query pair scores 16 keys at once) and V as [keys/2][D][2] (one line per 16 dimensions holds two
//     keys, so a broadcast pair of softmax weights adds two keys into 16 outputs). Every query head of the
//     KV head reads the same packed copy from L2.
//   - A work item is 8 query rows of one head against tiles of 32 keys: 16 score vectors in registers per
//     pair of dimensions (two K lines, eight broadcasts), then the online softmax per row in fp32 (running
//     max and sum, the exp a vector polynomial), then the weights rounded to bf16 for the V products, whose
//     sums stay in fp32 across tiles. Items are dealt so that any contiguous run of them mixes early (short)
//     and late (long) rows: at::parallel_for's even split is then an even split of the work.
// Query i of L sees keys [0, i + S - L] of S (S = L for a fresh prompt; a chunk after a cached prefix has
// S > L). A row's result depends only on its own query and keys, whatever L, the other rows or the split.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>

#include "../../csrc/vec_math.h"
#endif

namespace {

#if defined(__AVX512BF16__)
using bf16 = c10::BFloat16;
constexpr int64_t kRows = 8;   // query rows per work item
constexpr int64_t kTile = 32;  // keys per tile: two score vectors per row
constexpr float kFloor = -1e30f;  // the running max before any key (finite: -ffast-math assumes no inf)

struct Strides {
  int64_t row, head;  // elements between tokens, between heads (the last dimension is contiguous)
};

// One KV head's K and V in the kernel's layouts, keys past S zero (a tile's masked lanes read them). K: a
// gather of 16 keys' pair p per line; V: two keys' rows interleaved by 16-bit lanes.
void pack_head(const bf16* k, const bf16* v, Strides ks, Strides vs, int64_t h, int64_t S, int64_t S_pad,
               int64_t D, int32_t* kp, bf16* vp) {
  const int64_t D2 = D / 2;
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(static_cast<int32_t>(ks.row / 2)));
  for (int64_t b = 0; b < S_pad / 16; ++b) {
    const int64_t left = S - b * 16;
    const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : left > 0 ? __mmask16((1u << left) - 1) : 0;
    const bf16* base = k + b * 16 * ks.row + h * ks.head;
    for (int64_t p = 0; p < D2; ++p)
      _mm512_storeu_si512(kp + (b * D2 + p) * 16,
                          _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, rows, base + 2 * p, 4));
  }
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5,
                                      36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t t = 0; t < S_pad; t += 2) {
    const bf16* r0 = v + t * vs.row + h * vs.head;
    bf16* line = vp + t * D;
    for (int64_t c = 0; c < D; c += 32) {
      const __m512i a = t < S ? _mm512_loadu_si512(r0 + c) : _mm512_setzero_si512();
      const __m512i b = t + 1 < S ? _mm512_loadu_si512(r0 + vs.row + c) : _mm512_setzero_si512();
      _mm512_storeu_si512(line + 2 * c, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(line + 2 * c + 32, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

// Rows [r0, r0 + kPv) of o (fp32, kD wide) rescaled by alpha, plus their bf16 weights pw times one tile of V.
template <int kD, int kPv>
inline void add_pv(float* o, const float* alpha, const int32_t* pw, const bf16* vt) {
  constexpr int kC = kD / 16;
  __m512 acc[kPv][kC];
  for (int r = 0; r < kPv; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < kC; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o + r * kD + 16 * c), a);
  }
  for (int64_t j = 0; j < kTile / 2; ++j) {
    __m512bh line[kC];
    for (int c = 0; c < kC; ++c) line[c] = (__m512bh)_mm512_loadu_si512(vt + (j * kD + 16 * c) * 2);
    for (int r = 0; r < kPv; ++r) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(pw[r * (kTile / 2) + j]);
      for (int c = 0; c < kC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], w, line[c]);
    }
  }
  for (int r = 0; r < kPv; ++r)
    for (int c = 0; c < kC; ++c) _mm512_storeu_ps(o + r * kD + 16 * c, acc[r][c]);
}

// One work item: query rows [i0, i0 + n) of head qh (n <= kRows) against the packed K/V of its KV head.
template <int kD>
void rows_item(const bf16* q, Strides qs, int64_t qh, int64_t i0, int64_t n, int64_t off, const int32_t* kp,
               const bf16* vp, float scale, bf16* out, Strides os) {
  constexpr int64_t D2 = kD / 2;
  constexpr int kPv = kD == 64 ? 4 : 2;  // rows per V pass: their sums and a tile's V lines fit the registers
  alignas(64) float o[kRows * kD] = {};
  alignas(64) int32_t pw[kRows * kTile / 2];  // a tile's softmax weights, bf16 pairs
  float m[kRows], l[kRows], alpha[kRows];
  const int32_t* qp[kRows];
  for (int64_t r = 0; r < kRows; ++r) {
    m[r] = kFloor;
    l[r] = 0.f;
    qp[r] = reinterpret_cast<const int32_t*>(q + (i0 + std::min(r, n - 1)) * qs.row + qh * qs.head);
  }
  const __m512 scale16 = _mm512_set1_ps(scale);
  const int64_t tiles = (i0 + n - 1 + off) / kTile + 1;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t ts = t * kTile;
    __m512 s[kRows][2];
    for (int64_t r = 0; r < kRows; ++r) s[r][0] = s[r][1] = _mm512_setzero_ps();
    const int32_t* k0 = kp + (ts / 16) * D2 * 16;
    for (int64_t p = 0; p < D2; ++p) {
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(k0 + p * 16);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(k0 + (D2 + p) * 16);
      for (int64_t r = 0; r < kRows; ++r) {
        const __m512bh a = (__m512bh)_mm512_set1_epi32(qp[r][p]);
        s[r][0] = _mm512_dpbf16_ps(s[r][0], a, b0);
        s[r][1] = _mm512_dpbf16_ps(s[r][1], a, b1);
      }
    }
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t valid = std::clamp<int64_t>(i0 + r + off - ts + 1, 0, kTile);
      if (valid == 0 || r >= n) {  // a row before this tile (or past the chunk): weights zero, sums kept
        alpha[r] = 1.f;
        std::fill(pw + r * kTile / 2, pw + (r + 1) * kTile / 2, 0);
        continue;
      }
      const __mmask16 m0 = valid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
      const __mmask16 m1 = valid >= 32 ? __mmask16(0xFFFF) : valid > 16 ? __mmask16((1u << (valid - 16)) - 1) : 0;
      const __m512 x0 = _mm512_mul_ps(s[r][0], scale16), x1 = _mm512_mul_ps(s[r][1], scale16);
      const __m512 floor = _mm512_set1_ps(kFloor);
      const float tmax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_mask_mov_ps(floor, m0, x0),
                                                            _mm512_mask_mov_ps(floor, m1, x1)));
      const float mnew = std::max(m[r], tmax);
      alpha[r] = std::exp(m[r] - mnew);
      m[r] = mnew;
      const __m512 mv = _mm512_set1_ps(mnew);
      const __m512 p0 = _mm512_maskz_mov_ps(m0, tinyserve::exp16(_mm512_sub_ps(x0, mv)));
      const __m512 p1 = _mm512_maskz_mov_ps(m1, tinyserve::exp16(_mm512_sub_ps(x1, mv)));
      l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
      _mm512_storeu_si512(pw + r * kTile / 2, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
    }
    const bf16* vt = vp + ts * kD;
    for (int64_t r = 0; r < kRows; r += kPv) add_pv<kD, kPv>(o + r * kD, alpha + r, pw + r * kTile / 2, vt);
  }
  for (int64_t r = 0; r < n; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / l[r]);
    bf16* dst = out + (i0 + r) * os.row + qh * os.head;
    for (int c = 0; c < kD / 16; ++c)
      tinyserve::store_bf16(dst + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(o + r * kD + 16 * c), inv));
  }
}

template <int kD>
void attend(const bf16* q, const bf16* k, const bf16* v, bf16* out, Strides qs, Strides ks, Strides vs, Strides os,
            int64_t L, int64_t S, int64_t H, int64_t Hkv, float scale) {
  const int64_t S_pad = (S + kTile - 1) / kTile * kTile, G = H / Hkv;
  // The packed copies live in a buffer kept by the calling thread (the engine's step thread), grown when a
  // longer prompt comes: a fresh allocation of this size is an mmap whose first touch faulted in every page,
  // which cost more than the packing (0.1-0.2 ms a call at 1,000 keys).
  static thread_local std::vector<int32_t> buffer;
  const int64_t k_size = Hkv * S_pad * kD / 2;  // int32 pairs; V takes as many
  if (static_cast<int64_t>(buffer.size()) < 2 * k_size) buffer.resize(2 * k_size);
  int32_t* kpack = buffer.data();
  bf16* vpack = reinterpret_cast<bf16*>(buffer.data() + k_size);
  at::parallel_for(0, Hkv, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h)
      pack_head(k, v, ks, vs, h, S, S_pad, kD, kpack + h * S_pad * kD / 2, vpack + h * S_pad * kD);
  });
  const int64_t blocks = (L + kRows - 1) / kRows, off = S - L;
  at::parallel_for(0, H * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qh = item / blocks, j = item % blocks;
      const int64_t b = j % 2 == 0 ? j / 2 : blocks - 1 - j / 2;  // alternate short and long rows
      const int64_t h = qh / G;
      rows_item<kD>(q, qs, qh, b * kRows, std::min(kRows, L - b * kRows), off, kpack + h * S_pad * kD / 2,
                    vpack + h * S_pad * kD, scale, out, os);
    }
  });
}
#endif

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q [L, H, D], k and v [S, Hkv, D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "prefill_attention takes bfloat16");
  TORCH_CHECK(k.sizes() == v.sizes(), "K and V differ in shape");
  const int64_t L = q.size(0), H = q.size(1), D = q.size(2), S = k.size(0), Hkv = k.size(1);
  TORCH_CHECK(k.size(2) == D && H % Hkv == 0 && S >= L,
              "head_dim mismatch, heads not a multiple of kv_heads, or S < L");
  TORCH_CHECK(D == 64 || D == 128, "prefill_attention supports head_dim 64 and 128, got ", D);
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "the last dimension must be contiguous");
  auto out = at::empty({L, H, D}, q.options());
  if (L == 0) return out;
#if defined(__AVX512BF16__)
  const Strides qs{q.stride(0), q.stride(1)}, ks{k.stride(0), k.stride(1)}, vs{v.stride(0), v.stride(1)},
      os{H * D, D};
  auto run = [&](auto kernel) {
    kernel(q.data_ptr<bf16>(), k.data_ptr<bf16>(), v.data_ptr<bf16>(), out.data_ptr<bf16>(), qs, ks, vs, os, L, S,
           H, Hkv, static_cast<float>(scale));
  };
  if (D == 64) run(attend<64>);
  else run(attend<128>);
#else
  TORCH_CHECK(false, "prefill_attention: built for a CPU without AVX512-BF16");
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinyserve, m) {
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinyserve, CPU, m) { m.impl("prefill_attention", &prefill_attention); }
