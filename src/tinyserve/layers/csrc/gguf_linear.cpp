// y = x W^T for W in a GGUF file's own blocks, read as stored (no repacking: the bytes the step
// streams are the file's bytes per weight). Types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32) and
// Q4_K, Q5_K, Q6_K (super-blocks of 256 with integer sub-scales). Q4_K and Q6_K may instead be read
// from a copy repacked once at load, 16 rows interleaved: on AMX tiles where the CPU has them, else on
// the AVX-512 units (the sections below).
//
// Arithmetic (layers/gguf_native.py states the bound the tests check):
// - Every block decodes to int16 codes q with w = d_j * q - min_j per 32 weights. The K-quants fold
//   their integer sub-scales into q (|q| <= 4096), so d is one float per 256 weights.
// - Activations are quantized per group (32 for the legacy types, 256 for the K-quants) to int16 with a
//   power-of-two step dx = 2^(e - 14), e = floor(log2(group absmax)): every bf16 value within 2^7 of
//   its group's largest is represented exactly, smaller ones are rounded by at most dx / 2.
// - sum(q * xq) is exact in int32 (VNNI's vpdpwssd; worst case Q6_K: 16 products of 4096 x 32767 per
//   lane, 2147221504 < 2^31), then scaled once per group in fp32: d * dx * sum - min_j * sum_j(x), the
//   last with fp32 sums of the unquantized activations.
// Each activation row is computed alone, in the same order whatever the other rows (batch-invariant).
// Work is split over output rows (at::parallel_for, torch's thread count); a block is decoded once
// and used for up to kMany (32) activation rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(TINYSERVE_PORTABLE)
#define TINYSERVE_GGUF_VNNI 1
#include <immintrin.h>
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__) && !defined(TINYSERVE_NO_AMX)
#define TINYSERVE_GGUF_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace {

// GGML type ids (ggml.h), the only ones accepted.
enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(TINYSERVE_GGUF_VNNI)
  return _cvtsh_ss(h);  // one instruction (F16C); the portable conversion is a dozen, per 32 weights
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

// One block decoded: w = d * q - mins[j] for the j-th 32 weights (a K-quant's sub-scales are in q).
struct Decoded {
  alignas(64) int16_t q[256];
  float d;
  float mins[8];
};

// K-quants: super-blocks of 256 with integer sub-scales, quantized against activation groups of 256;
// the rest: blocks (and activation groups) of 32.
constexpr bool is_k_quant(int64_t t) { return t == Q4_K || t == Q5_K || t == Q6_K; }
constexpr bool has_mins(int64_t t) { return t == Q4_1 || t == Q5_1 || t == Q4_K || t == Q5_K; }

struct Layout {
  int64_t weights, bytes;
};

Layout layout(int64_t t) {
  switch (t) {
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q5_0: return {32, 22};
    case Q5_1: return {32, 24};
    case Q8_0: return {32, 34};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
  }
  TORCH_CHECK(false, "gguf_linear: unsupported GGML type ", t);
}

// `f(type)` with the GGML type `t` as a compile-time constant (every op's switch over the block types).
template <typename F>
void with_type(int64_t t, F&& f) {
  switch (t) {
    case Q4_0: return f(std::integral_constant<int64_t, Q4_0>{});
    case Q4_1: return f(std::integral_constant<int64_t, Q4_1>{});
    case Q5_0: return f(std::integral_constant<int64_t, Q5_0>{});
    case Q5_1: return f(std::integral_constant<int64_t, Q5_1>{});
    case Q8_0: return f(std::integral_constant<int64_t, Q8_0>{});
    case Q4_K: return f(std::integral_constant<int64_t, Q4_K>{});
    case Q5_K: return f(std::integral_constant<int64_t, Q5_K>{});
    case Q6_K: return f(std::integral_constant<int64_t, Q6_K>{});
  }
}

// A K-quant's eight 6-bit scales and mins from their 12 bytes (llama.cpp's get_scale_min_k4, all
// eight at once with its mask trick), as the bytes of two words: returned in registers, since a
// vector load of bytes just stored one word at a time would stall on store forwarding.
struct ScalesMins {
  uint64_t scales, mins;
};

inline ScalesMins scales_mins(const uint8_t* s12) {
  uint32_t u[3];
  std::memcpy(u, s12, 12);
  constexpr uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, low2 = 0x03030303;
  const uint32_t sc_hi = (u[2] & low4) | (((u[0] >> 6) & low2) << 4);
  const uint32_t mn_hi = ((u[2] >> 4) & low4) | (((u[1] >> 6) & low2) << 4);
  return {(u[0] & low6) | (static_cast<uint64_t>(sc_hi) << 32), (u[1] & low6) | (static_cast<uint64_t>(mn_hi) << 32)};
}

inline int byte_of(uint64_t w, int j) { return static_cast<int>((w >> (8 * j)) & 255); }

// Legacy blocks: 16 bytes of nibbles, weight i in the low nibble of byte i, i + 16 in the high one;
// Q5's fifth bits in a 32-bit field, bit i for weight i. The loops have fixed trip counts so the
// compiler vectorizes them.
inline void nibbles(const uint8_t* qs, int16_t* q, int16_t offset) {
  for (int i = 0; i < 16; ++i) {
    q[i] = static_cast<int16_t>((qs[i] & 15) - offset);
    q[i + 16] = static_cast<int16_t>((qs[i] >> 4) - offset);
  }
}

// Adds each weight's fifth bit (16) and subtracts `offset`.
inline void fifth_bits(const uint8_t* qh, int16_t* q, int16_t offset) {
  uint32_t h;
  std::memcpy(&h, qh, 4);
  for (int i = 0; i < 32; ++i) q[i] = static_cast<int16_t>(q[i] + (((h >> i) & 1) << 4) - offset);
}

template <int64_t T>
inline void decode(const uint8_t* b, Decoded& o) {
  if constexpr (T == Q4_0) {
    o.d = fp16(b);
    o.mins[0] = 0.f;
    nibbles(b + 2, o.q, 8);
  } else if constexpr (T == Q4_1) {
    o.d = fp16(b);
    o.mins[0] = -fp16(b + 2);
    nibbles(b + 4, o.q, 0);
  } else if constexpr (T == Q5_0) {  // (q5 - 16) * d
    o.d = fp16(b);
    o.mins[0] = 0.f;
    nibbles(b + 6, o.q, 0);
    fifth_bits(b + 2, o.q, 16);
  } else if constexpr (T == Q5_1) {
    o.d = fp16(b);
    o.mins[0] = -fp16(b + 2);
    nibbles(b + 8, o.q, 0);
    fifth_bits(b + 4, o.q, 0);
  } else if constexpr (T == Q8_0) {
    o.d = fp16(b);
    o.mins[0] = 0.f;
    for (int i = 0; i < 32; ++i) o.q[i] = static_cast<int8_t>(b[2 + i]);
  } else if constexpr (T == Q4_K || T == Q5_K) {
    // d, dmin, 12 scale bytes, [Q5_K: 32 bytes of fifth bits], 128 bytes of nibbles: chunk c of 32 bytes
    // holds sub-block 2c in its low nibbles and 2c + 1 in its high ones; Q5_K's bit for weight l of
    // sub-block j is bit j of qh[l].
    const float d = fp16(b), dmin = fp16(b + 2);
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + (T == Q5_K ? 48 : 16);
    const ScalesMins sm = scales_mins(b + 4);
    for (int j = 0; j < 8; ++j) o.mins[j] = dmin * byte_of(sm.mins, j);
    for (int c = 0; c < 4; ++c) {
      const int sc0 = byte_of(sm.scales, 2 * c), sc1 = byte_of(sm.scales, 2 * c + 1);
      int16_t* lo = o.q + 64 * c;
      int16_t* hi = lo + 32;
      const uint8_t* s = qs + 32 * c;
      for (int l = 0; l < 32; ++l) {
        int a = s[l] & 15, h = s[l] >> 4;
        if constexpr (T == Q5_K) {
          a |= ((qh[l] >> (2 * c)) & 1) << 4;
          h |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
        }
        lo[l] = static_cast<int16_t>(a * sc0);
        hi[l] = static_cast<int16_t>(h * sc1);
      }
    }
    o.d = d;
  } else if constexpr (T == Q6_K) {
    // ql[128], qh[64], int8 scales[16] (one per 16 weights), d: llama.cpp's dequantize_row_q6_K.
    const float d = fp16(b + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    for (int n = 0; n < 2; ++n) {
      const uint8_t* ql = b + 64 * n;
      const uint8_t* qh = b + 128 + 32 * n;
      int16_t* y = o.q + 128 * n;
      const int8_t* s = sc + 8 * n;
      for (int half = 0; half < 2; ++half) {
        for (int l = 16 * half; l < 16 * half + 16; ++l) {
          y[l] = static_cast<int16_t>((((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32) * s[half]);
          y[l + 32] = static_cast<int16_t>((((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32) * s[half + 2]);
          y[l + 64] = static_cast<int16_t>((((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32) * s[half + 4]);
          y[l + 96] = static_cast<int16_t>((((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32) * s[half + 6]);
        }
      }
    }
    o.d = d;
    for (int j = 0; j < 8; ++j) o.mins[j] = 0.f;
  }
}


#if defined(TINYSERVE_GGUF_VNNI)
// The same decoding as `decode`, into registers: a block's codes as QK / 32 vectors of 32 int16, for
// `rows_of` to multiply by several activation rows without a round trip through memory.
template <int64_t T>
struct Regs {
  static constexpr int n = is_k_quant(T) ? 8 : 1;
  __m512i q[n];
  float d;
  float min;     // legacy: w = d * q - min
  __m256 mins;   // K-quants: dmin * m_j of each 32 weights
};

// 16 bytes of nibbles (weight i low in byte i, i + 16 high) as 32 int16 in weight order.
inline __m512i nibble_regs(const uint8_t* qs) {
  const __m256i z = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(z, _mm256_set1_epi16(15))),
                            _mm256_srli_epi16(z, 4), 1);
}

inline __m512i bytes32(const uint8_t* p) {  // 32 bytes zero-extended to int16
  return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <int64_t T>
inline void decode_regs(const uint8_t* b, Regs<T>& o) {
  const __m512i low4 = _mm512_set1_epi16(15);
  if constexpr (T == Q4_0 || T == Q4_1) {
    o.d = fp16(b);
    o.min = T == Q4_1 ? -fp16(b + 2) : 0.f;
    o.q[0] = nibble_regs(b + (T == Q4_1 ? 4 : 2));
    if constexpr (T == Q4_0) o.q[0] = _mm512_sub_epi16(o.q[0], _mm512_set1_epi16(8));
  } else if constexpr (T == Q5_0 || T == Q5_1) {
    o.d = fp16(b);
    o.min = T == Q5_1 ? -fp16(b + 2) : 0.f;
    const uint8_t* qh = b + (T == Q5_1 ? 4 : 2);
    uint32_t h;
    std::memcpy(&h, qh, 4);
    const __m512i q = nibble_regs(qh + 4);
    o.q[0] = _mm512_mask_add_epi16(q, static_cast<__mmask32>(h), q, _mm512_set1_epi16(16));
    if constexpr (T == Q5_0) o.q[0] = _mm512_sub_epi16(o.q[0], _mm512_set1_epi16(16));
  } else if constexpr (T == Q8_0) {
    o.d = fp16(b);
    o.min = 0.f;
    o.q[0] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2)));
  } else if constexpr (T == Q4_K || T == Q5_K) {
    o.d = fp16(b);
    const ScalesMins sm = scales_mins(b + 4);
    o.mins = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(sm.mins)))),
                           _mm256_set1_ps(fp16(b + 2)));
    // each scale in both halves of a 32-bit lane: a permute spreads one over the 16-bit lanes
    const __m256i s32 = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(sm.scales)));
    const __m512i sc2 = _mm512_castsi256_si512(_mm256_or_si256(s32, _mm256_slli_epi32(s32, 16)));
    __m512i h = _mm512_setzero_si512();
    if constexpr (T == Q5_K) h = bytes32(b + 16);
    const uint8_t* qs = b + (T == Q5_K ? 48 : 16);
    for (int c = 0; c < 4; ++c) {
      const __m512i z = bytes32(qs + 32 * c);
      __m512i lo = _mm512_and_si512(z, low4), hi = _mm512_srli_epi16(z, 4);
      if constexpr (T == Q5_K) {  // bit 2c of qh[l] is weight l's fifth bit in sub-block 2c, 2c + 1 in 2c + 1
        const __m512i sixteen = _mm512_set1_epi16(16);
        lo = _mm512_or_si512(lo, _mm512_and_si512(_mm512_slli_epi16(_mm512_srli_epi16(h, 2 * c), 4), sixteen));
        hi = _mm512_or_si512(hi, _mm512_and_si512(_mm512_slli_epi16(_mm512_srli_epi16(h, 2 * c + 1), 4), sixteen));
      }
      o.q[2 * c] = _mm512_mullo_epi16(lo, _mm512_permutexvar_epi32(_mm512_set1_epi32(2 * c), sc2));
      o.q[2 * c + 1] = _mm512_mullo_epi16(hi, _mm512_permutexvar_epi32(_mm512_set1_epi32(2 * c + 1), sc2));
    }
  } else if constexpr (T == Q6_K) {
    o.d = fp16(b + 208);
#if defined(__GFNI__) && !defined(TINYSERVE_NO_GFNI)  // the flag: the ablation of this path
    // In bytes, 64 weights per instruction: the low nibbles from ql, and each weight's two high bits
    // from qh moved into bits 4-7 by one GF(2) affine map per qword, which also writes them as the
    // high half of int8(q - 32): bit 4 = h0, bits 5-7 = NOT h1 (the constant 0xE0 flips them). qh is
    // read twice (both 256-bit halves): bytes 0-31 take its bits 0-1 (then 4-5), bytes 32-63 its
    // bits 2-3 (then 6-7), as llama.cpp's layout assigns weights l, l + 32, l + 64, l + 96.
    const __m512i low4b = _mm512_set1_epi8(15);
    const __m512i bits01_23 = _mm512_inserti64x4(_mm512_set1_epi64(0x0000000001020202),
                                                 _mm256_set1_epi64x(0x0000000004080808), 1);
    const __m512i bits45_67 = _mm512_inserti64x4(_mm512_set1_epi64(0x0000000010202020),
                                                 _mm256_set1_epi64x(0x0000000040808080), 1);
    for (int n = 0; n < 2; ++n) {
      const __m512i ql = _mm512_loadu_si512(b + 64 * n);
      const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * n)));
      const __m512i hi_a = _mm512_gf2p8affine_epi64_epi8(qh, bits01_23, 0xE0);
      const __m512i hi_b = _mm512_gf2p8affine_epi64_epi8(qh, bits45_67, 0xE0);
      const __m512i w0 = _mm512_ternarylogic_epi32(ql, low4b, hi_a, 0xEA);  // (ql & 15) | hi_a
      const __m512i w1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(ql, 4), low4b, hi_b, 0xEA);
      const __m512i sc = _mm512_castsi128_si512(
          _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 192 + 8 * n))));
      const __m512i q[4] = {
          _mm512_cvtepi8_epi16(_mm512_castsi512_si256(w0)), _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(w0, 1)),
          _mm512_cvtepi8_epi16(_mm512_castsi512_si256(w1)), _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(w1, 1)),
      };
      for (int k = 0; k < 4; ++k) {  // lanes 0-15 take scale 2k, 16-31 scale 2k + 1 (one per 16 weights)
        const __m512i idx = _mm512_inserti64x4(_mm512_set1_epi16(static_cast<int16_t>(2 * k)),
                                               _mm256_set1_epi16(static_cast<int16_t>(2 * k + 1)), 1);
        o.q[4 * n + k] = _mm512_mullo_epi16(q[k], _mm512_permutexvar_epi16(idx, sc));
      }
    }
#else
    const __m512i mask2 = _mm512_set1_epi16(0x30), off = _mm512_set1_epi16(32);
    for (int n = 0; n < 2; ++n) {
      const __m512i a = bytes32(b + 64 * n), c = bytes32(b + 64 * n + 32), h = bytes32(b + 128 + 32 * n);
      // the 8 int8 scales of this half, one per 16 weights: lanes 0-15 take scale 2k, 16-31 scale 2k + 1
      const __m512i sc = _mm512_castsi128_si512(
          _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 192 + 8 * n))));
      const __m512i q[4] = {
          _mm512_or_si512(_mm512_and_si512(a, low4), _mm512_and_si512(_mm512_slli_epi16(h, 4), mask2)),
          _mm512_or_si512(_mm512_and_si512(c, low4), _mm512_and_si512(_mm512_slli_epi16(h, 2), mask2)),
          _mm512_or_si512(_mm512_srli_epi16(a, 4), _mm512_and_si512(h, mask2)),
          _mm512_or_si512(_mm512_srli_epi16(c, 4), _mm512_and_si512(_mm512_srli_epi16(h, 2), mask2)),
      };
      for (int k = 0; k < 4; ++k) {
        const __m512i idx = _mm512_inserti64x4(_mm512_set1_epi16(static_cast<int16_t>(2 * k)),
                                               _mm256_set1_epi16(static_cast<int16_t>(2 * k + 1)), 1);
        o.q[4 * n + k] = _mm512_mullo_epi16(_mm512_sub_epi16(q[k], off), _mm512_permutexvar_epi16(idx, sc));
      }
    }
#endif
  }
}
#endif

// sum(q[i] * x[i]) over n int16 pairs, exact in int32 (the portable path; VNNI's is in `rows_of`).
inline int32_t idot(const int16_t* q, const int16_t* x, int n) {
  int32_t s = 0;
  for (int i = 0; i < n; ++i) s += static_cast<int32_t>(q[i]) * x[i];
  return s;
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;  // bf16 is the top half of an fp32
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Activations quantized for one group size g: xq [M, K] int16, dx [M, K/g], sums of x per 32 [M, K/32].
// Kept per thread and reused: at batch 1 a call's fixed costs (allocations, an ATen conversion) are
// a measurable share of a small linear.
struct Activations {
  int64_t K = 0, group = 0;
  std::vector<int16_t> xq;
  std::vector<float> dx, sums;

  template <typename In>
  void quantize(const In* x, int64_t M, int64_t k, int64_t g) {
    K = k;
    group = g;
    xq.resize(M * K);
    dx.resize(M * (K / g));
    sums.resize(M * (K / 32));
    alignas(64) float v[256];
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t b = 0; b < K / g; ++b) {
        const In* xb = x + m * K + b * g;
        float amax = 0.f;
        for (int64_t i = 0; i < g; ++i) {
          v[i] = to_float(xb[i]);
          amax = std::max(amax, std::fabs(v[i]));
        }
        // a power of two: x / step is exact for every value within 2^7 of amax (bf16's 8 bits)
        const float step = amax > 0.f ? std::ldexp(1.f, std::ilogb(amax) - 14) : 1.f;
        const float inv = 1.f / step;
        dx[m * (K / g) + b] = step;
        int16_t* q = xq.data() + m * K + b * g;
        for (int64_t i = 0; i < g; ++i) q[i] = static_cast<int16_t>(std::min(32767.f, std::max(-32767.f, std::nearbyint(v[i] * inv))));
        for (int64_t j = 0; j < g / 32; ++j) {
          float s = 0.f;
          for (int i = 0; i < 32; ++i) s += v[32 * j + i];
          sums[m * (K / 32) + b * (g / 32) + j] = s;
        }
      }
    }
  }
};

inline void store(float* p, float v) { *p = v; }
inline void store(c10::BFloat16* p, float v) { *p = c10::BFloat16(v); }

constexpr int64_t kPrefetch = 8192;
// A thread takes its output rows in kStreams interleaved runs (`rows_of`): a core reading several
// sequential streams at once keeps more reads in flight than reading one. One core reading 512 MB: 12.2-12.9
// GB/s as one stream, 14-15 as two, 15.8-16 as four; the 1.5B's gate/up matrices at one row 18.1 -> 22.1
// GB/s (four; eight: 22.7), its Q6_K ones 20.7 -> 22.7 (2 threads, Xeon with AMX). The tiles, bound by
// their decoding, gained nothing from it.
constexpr int64_t kStreams = 4;
constexpr int kRows = 4;    // activation rows whose accumulators live in registers
constexpr int kMany = 32;   // beyond kRows, rows sharing one decode of a block (accumulators in L1)

// Output rows [begin, end) of one weight (row stride `row_bytes`) for activation rows m0..m0 + R; with
// R = 0, for `count` rows (up to kMany). Every row goes through the same operations in the same order
// whichever way it is called: a row's result never depends on the others (tests/test_gguf_native.py).
template <int64_t T, int R, typename Out>
void rows_of(const uint8_t* w, int64_t row_bytes, const Activations& a, int64_t m0, int count, int64_t begin,
             int64_t end, Out* y, int64_t y_stride, int64_t col0) {
  constexpr int64_t QK = is_k_quant(T) ? 256 : 32;
  constexpr int cap = R > 0 ? R : kMany;
  const int rows = R > 0 ? R : count;
  const int64_t K = a.K, blocks = K / QK, groups = K / a.group;  // one activation group per block
  const int64_t bytes = row_bytes / blocks;
  const int64_t run = (end - begin + kStreams - 1) / kStreams;  // rows begin + s * run + i, s in turn
  for (int64_t idx = 0; idx < run * kStreams; ++idx) {
    const int64_t n = begin + (idx % kStreams) * run + idx / kStreams;
    if (n >= end) continue;
    const uint8_t* row = w + n * row_bytes;
    float mins[cap] = {};
#if defined(TINYSERVE_GGUF_VNNI)
    __m512 acc[cap];
    __m256 kmins[cap];
    for (int r = 0; r < rows; ++r) {
      acc[r] = _mm512_setzero_ps();
      kmins[r] = _mm256_setzero_ps();
    }
    Regs<T> dec;
#else
    float acc[cap] = {};
    Decoded dec;
#endif
    for (int64_t b = 0; b < blocks; ++b) {
#if defined(TINYSERVE_GGUF_VNNI)
      // Rows are contiguous: fetch kPrefetch bytes ahead into L2, further than the hardware prefetcher
      // runs ahead of a kernel that spends this long per byte (without it a step read ~11 GB/s, not
      // ~16; into L2 rather than L1 ~10% more: more misses can be in flight).
      for (int64_t o = 0; o < bytes; o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(row + b * bytes + kPrefetch + o), _MM_HINT_T1);
      decode_regs<T>(row + b * bytes, dec);
#else
      decode<T>(row + b * bytes, dec);
#endif
      for (int r = 0; r < rows; ++r) {
        const int64_t m = m0 + r;
        const int16_t* xq = a.xq.data() + m * K + b * QK;
        const float scale = dec.d * a.dx[m * groups + b];
#if defined(TINYSERVE_GGUF_VNNI)
        // two chains of products (even and odd vectors): half the latency of one per block (+5% at 4
        // rows, the same at one: docs/REPORT.md S4)
        __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
        for (int i = 0; i + 1 < Regs<T>::n; i += 2) {
          even = _mm512_dpwssd_epi32(even, dec.q[i], _mm512_loadu_si512(xq + 32 * i));
          odd = _mm512_dpwssd_epi32(odd, dec.q[i + 1], _mm512_loadu_si512(xq + 32 * i + 32));
        }
        if constexpr (Regs<T>::n % 2) even = _mm512_dpwssd_epi32(even, dec.q[Regs<T>::n - 1],
                                                                  _mm512_loadu_si512(xq + 32 * (Regs<T>::n - 1)));
        const __m512i sum = _mm512_add_epi32(even, odd);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(scale), acc[r]);
#else
        acc[r] += scale * static_cast<float>(idot(dec.q, xq, QK));
#endif
        if constexpr (has_mins(T)) {
          const float* s = a.sums.data() + m * (K / 32) + b * (QK / 32);
#if defined(TINYSERVE_GGUF_VNNI)
          if constexpr (is_k_quant(T))
            kmins[r] = _mm256_fmadd_ps(dec.mins, _mm256_loadu_ps(s), kmins[r]);
          else
            mins[r] += dec.min * s[0];
#else
          for (int j = 0; j < QK / 32; ++j) mins[r] += dec.mins[j] * s[j];
#endif
        }
      }
    }
    for (int r = 0; r < rows; ++r) {
#if defined(TINYSERVE_GGUF_VNNI)
      if constexpr (is_k_quant(T) && has_mins(T)) {
        const __m128 k4 = _mm_add_ps(_mm256_castps256_ps128(kmins[r]), _mm256_extractf128_ps(kmins[r], 1));
        mins[r] = _mm_cvtss_f32(_mm_hadd_ps(_mm_hadd_ps(k4, k4), k4));
      }
      store(y + (m0 + r) * y_stride + col0 + n, _mm512_reduce_add_ps(acc[r]) - mins[r]);
#else
      store(y + (m0 + r) * y_stride + col0 + n, acc[r] - mins[r]);
#endif
    }
  }
}

template <int64_t T, typename Out>
void weight_rows(const uint8_t* w, int64_t row_bytes, const Activations& a, int64_t M, int64_t begin, int64_t end,
                 Out* y, int64_t y_stride, int64_t col0) {
  if (M > kRows) {  // a batch: one pass over the weights per kMany rows
    for (int64_t m = 0; m < M; m += kMany)
      rows_of<T, 0>(w, row_bytes, a, m, static_cast<int>(std::min<int64_t>(kMany, M - m)), begin, end, y, y_stride,
                    col0);
    return;
  }
  switch (M) {
    case 4: return rows_of<T, 4>(w, row_bytes, a, 0, 4, begin, end, y, y_stride, col0);
    case 3: return rows_of<T, 3>(w, row_bytes, a, 0, 3, begin, end, y, y_stride, col0);
    case 2: return rows_of<T, 2>(w, row_bytes, a, 0, 2, begin, end, y, y_stride, col0);
    default: return rows_of<T, 1>(w, row_bytes, a, 0, 1, begin, end, y, y_stride, col0);
  }
}

template <typename Out>
void dispatch(int64_t t, const uint8_t* w, int64_t row_bytes, const Activations& a, int64_t M, int64_t begin,
              int64_t end, Out* y, int64_t y_stride, int64_t col0) {
  with_type(t, [&](auto T) { weight_rows<T()>(w, row_bytes, a, M, begin, end, y, y_stride, col0); });
}

// ---- Q4_K and Q6_K repacked: 16 output rows interleaved -----------------------------------------------
// Written once at load (`gguf_repack`), the same bits per weight. AMX reads both types so (the tiles'
// B operand); without AMX, the AVX-512 units read them so (`vector_rows`).
#if defined(TINYSERVE_GGUF_VNNI)
constexpr int64_t kRowGroup = 16;  // output rows interleaved (an AMX B tile's)

// Repacked bytes per 16 rows x 256 weights (`repack_q4k`, `repack_q6k`).
constexpr int64_t repacked_bytes(int64_t t) { return t == Q4_K ? 2368 : 3360; }

// Q4_K [N, K / 256 * 144] as [N / 16][K / 256][2368 bytes]: per 16 rows and super-block, d[16] and
// dmin[16] (fp16), the 6-bit scales and mins as [8 sub-blocks][16 rows] bytes, then the nibbles as 32
// vectors of 64 bytes: vector 8c + p holds byte qs[32c + 4p + i] of row n at 4n + i, whose low nibble is
// weight 64c + 4p + i and high nibble weight 64c + 32 + 4p + i (llama.cpp's order): the low nibbles
// are B rows p of chunk c, the high ones B rows p + 8.
void repack_q4k(const uint8_t* b, uint8_t* o, int n) {
  std::memcpy(o + 2 * n, b, 2);
  std::memcpy(o + 32 + 2 * n, b + 2, 2);
  const ScalesMins sm = scales_mins(b + 4);
  for (int j = 0; j < 8; ++j) {
    o[64 + 16 * j + n] = static_cast<uint8_t>(byte_of(sm.scales, j));
    o[192 + 16 * j + n] = static_cast<uint8_t>(byte_of(sm.mins, j));
  }
  for (int v = 0; v < 32; ++v) std::memcpy(o + 320 + 64 * v + 4 * n, b + 16 + 4 * v, 4);
}

// A Q6_K block's 256 6-bit codes in weight order, as llama.cpp's dequantize_row_q6_K reads them.
inline void q6_codes(const uint8_t* b, uint8_t* q) {
  for (int h = 0; h < 2; ++h) {
    const uint8_t* ql = b + 64 * h;
    const uint8_t* qh = b + 128 + 32 * h;
    for (int l = 0; l < 32; ++l) {
      q[128 * h + l] = static_cast<uint8_t>((ql[l] & 15) | (qh[l] & 3) << 4);
      q[128 * h + l + 32] = static_cast<uint8_t>((ql[l + 32] & 15) | (qh[l] >> 2 & 3) << 4);
      q[128 * h + l + 64] = static_cast<uint8_t>((ql[l] >> 4) | (qh[l] >> 4 & 3) << 4);
      q[128 * h + l + 96] = static_cast<uint8_t>((ql[l + 32] >> 4) | (qh[l] >> 6 & 3) << 4);
    }
  }
}

// Q6_K [N, K / 256 * 210] as [N / 16][K / 256][3360 bytes]: d[16] (fp16), the int8 scales as [16 x 16
// weights][16 rows], then the codes of B row r (weights 4r..4r + 3 of each row n at 4n + i) in two
// planes: their low nibbles in 32 vectors (vector v: rows v low, v + 32 high), their high two bits in
// 16 (vector u: rows u + 16t in bits 2t, 2t + 1).
void repack_q6k(const uint8_t* b, uint8_t* o, int n) {
  std::memcpy(o + 2 * n, b + 208, 2);
  for (int j = 0; j < 16; ++j) o[32 + 16 * j + n] = b[192 + j];
  uint8_t codes[256];
  q6_codes(b, codes);
  for (int r = 0; r < 64; ++r)
    for (int i = 0; i < 4; ++i) {
      const int q = codes[4 * r + i];
      uint8_t& nib = o[288 + 64 * (r % 32) + 4 * n + i];
      nib = static_cast<uint8_t>(nib | (q & 15) << (r < 32 ? 0 : 4));
      uint8_t& high = o[2336 + 64 * (r % 16) + 4 * n + i];
      high = static_cast<uint8_t>(high | (q >> 4) << (2 * (r / 16)));
    }
}

at::Tensor repack(const at::Tensor& blocks, int64_t t) {
  const int64_t N = blocks.size(0), bytes = layout(t).bytes, nb = blocks.size(1) / bytes;
  at::Tensor out = at::zeros({N / kRowGroup, nb * repacked_bytes(t)}, blocks.options());
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, N / kRowGroup, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t sb = 0; sb < nb; ++sb)
        for (int n = 0; n < kRowGroup; ++n) {
          const uint8_t* b = src + ((g * kRowGroup + n) * nb + sb) * bytes;
          uint8_t* o = dst + (g * nb + sb) * repacked_bytes(t);
          t == Q4_K ? repack_q4k(b, o, n) : repack_q6k(b, o, n);
        }
  });
  return out;
}

// Q4_K and Q6_K on the repacked layout without AMX: one 64-byte vector is 16 rows x 4 bytes, and two
// byte shuffles make it vectors of 16 rows x 2 codes, each multiplied (vpdpwssd) by a pair of
// activations broadcast from memory. The file's layout needs one weight row per vector, so its
// sub-scales are multiplied into the codes and broadcast per 16 or 32 weights; here they multiply the
// int32 sums per sub-block, 16 rows at once (Q4_K at one row: ~11 vector instructions per 128 weights
// instead of ~27). Each sum of products is exact in int32, as on the int16 path; the fp32 steps (d * dx
// per super-block, Q4_K's mins) are `rows_of`'s in another order, so gguf-native never repacks.
struct PairShuffles {  // per dword (a row's 4 bytes): bytes 0, 1 (then 2, 3) as the low bytes of its two 16-bit lanes
  const __m512i first = _mm512_broadcast_i32x4(_mm_setr_epi8(0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1));
  const __m512i second = _mm512_broadcast_i32x4(_mm_setr_epi8(2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15, -1));
};

inline __m512i pair_at(const int16_t* x) {  // activations x[0], x[1] in every 32-bit lane
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm512_set1_epi32(v);
}

inline __m512i scales_at(const uint8_t* p, bool is_signed) {  // 16 rows' scale bytes as int32
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return is_signed ? _mm512_cvtepi8_epi32(v) : _mm512_cvtepu8_epi32(v);
}

// Q4_K: sub-block 2c is the low nibbles of vectors 8c..8c + 7, 2c + 1 their high ones; `total` gets
// each chunk's sum (|lo * s_lo + hi * s_hi| <= 2 * 32 * 15 * 63 * 32767 < 2^31: exact).
template <int R>
inline void q4k_products(const uint8_t* blk, const int16_t* const* x, __m512* total) {
  const PairShuffles sh;
  const __m512i low4 = _mm512_set1_epi16(15);
  for (int c = 0; c < 4; ++c) {
    __m512i lo[R], hi[R];
    for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_si512();
    for (int p = 0; p < 8; ++p) {
      const __m512i v = _mm512_loadu_si512(blk + 320 + 64 * (8 * c + p));
      const __m512i a01 = _mm512_shuffle_epi8(v, sh.first), a23 = _mm512_shuffle_epi8(v, sh.second);
      const __m512i q0 = _mm512_and_si512(a01, low4), q2 = _mm512_and_si512(a23, low4);
      const __m512i q32 = _mm512_srli_epi16(a01, 4), q34 = _mm512_srli_epi16(a23, 4);
      const int k = 64 * c + 4 * p;  // weights k..k + 3 (low nibbles), k + 32.. (high)
      for (int r = 0; r < R; ++r) {
        lo[r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(lo[r], q0, pair_at(x[r] + k)), q2, pair_at(x[r] + k + 2));
        hi[r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(hi[r], q32, pair_at(x[r] + k + 32)), q34, pair_at(x[r] + k + 34));
      }
    }
    const __m512i s_lo = scales_at(blk + 64 + 32 * c, false), s_hi = scales_at(blk + 80 + 32 * c, false);
    for (int r = 0; r < R; ++r)
      total[r] = _mm512_add_ps(total[r], _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_mullo_epi32(lo[r], s_lo),
                                                                             _mm512_mullo_epi32(hi[r], s_hi))));
  }
}

// Q6_K: vector v holds B rows v (low nibbles; high bits at 2t of high-bit vector v % 16, t = v / 16)
// and v + 32 (high nibbles; bits 2t + 4), so vectors 4j..4j + 3 make sub-blocks j and j + 8 (16 weights
// each); codes - 32 times int8 scales: |sum| <= 16 * 32 * 32767 * 128 < 2^31 per sub-block, exact.
template <int R>
inline void q6k_products(const uint8_t* blk, const int16_t* const* x, __m512* total) {
  const PairShuffles sh;
  const __m512i low4 = _mm512_set1_epi16(15), bits45 = _mm512_set1_epi16(0x30), off = _mm512_set1_epi16(32);
  // (nibble | (high bits & 0x30)) - 32; ternary 0xF8: a | (b & c)
  const auto code = [&](__m512i nib, __m512i high) { return _mm512_sub_epi16(_mm512_ternarylogic_epi32(nib, high, bits45, 0xF8), off); };
  for (int t = 0; t < 2; ++t) {
    const __m128i to_low = _mm_cvtsi32_si128(4 - 2 * t), to_high = _mm_cvtsi32_si128(2 * t);  // bits 2t (2t + 4) to 4
    for (int j = 4 * t; j < 4 * t + 4; ++j) {
      __m512i lo[R], hi[R];
      for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_si512();
      for (int v = 4 * j; v < 4 * j + 4; ++v) {
        const __m512i z = _mm512_loadu_si512(blk + 288 + 64 * v), h = _mm512_loadu_si512(blk + 2336 + 64 * (v % 16));
        const __m512i n01 = _mm512_shuffle_epi8(z, sh.first), n23 = _mm512_shuffle_epi8(z, sh.second);
        const __m512i h01 = _mm512_shuffle_epi8(h, sh.first), h23 = _mm512_shuffle_epi8(h, sh.second);
        const __m512i c0 = code(_mm512_and_si512(n01, low4), _mm512_sll_epi16(h01, to_low));
        const __m512i c2 = code(_mm512_and_si512(n23, low4), _mm512_sll_epi16(h23, to_low));
        const __m512i c128 = code(_mm512_srli_epi16(n01, 4), _mm512_srl_epi16(h01, to_high));
        const __m512i c130 = code(_mm512_srli_epi16(n23, 4), _mm512_srl_epi16(h23, to_high));
        const int k = 4 * v;  // weights k..k + 3 (B row v), k + 128.. (B row v + 32)
        for (int r = 0; r < R; ++r) {
          lo[r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(lo[r], c0, pair_at(x[r] + k)), c2, pair_at(x[r] + k + 2));
          hi[r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(hi[r], c128, pair_at(x[r] + k + 128)), c130,
                                      pair_at(x[r] + k + 130));
        }
      }
      const __m512i s_lo = scales_at(blk + 32 + 16 * j, true), s_hi = scales_at(blk + 32 + 16 * (j + 8), true);
      for (int r = 0; r < R; ++r)
        total[r] = _mm512_add_ps(total[r], _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_mullo_epi32(lo[r], s_lo)),
                                                         _mm512_cvtepi32_ps(_mm512_mullo_epi32(hi[r], s_hi))));
    }
  }
}

// One 16-row group of a repacked weight for activation rows m0..m0 + R (accumulators in registers).
template <int64_t T, int R, typename Out>
void group_rows(const uint8_t* rp, int64_t nb, const Activations& a, int64_t m0, int64_t g, Out* y, int64_t y_stride,
                int64_t col0) {
  constexpr int64_t block = repacked_bytes(T);
  const int64_t K = a.K;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < nb; ++sb) {
    const uint8_t* blk = rp + (g * nb + sb) * block;
    for (int64_t o = 0; o < block; o += 64)
      _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetch + o), _MM_HINT_T1);
    const int16_t* x[R];
    for (int r = 0; r < R; ++r) x[r] = a.xq.data() + (m0 + r) * K + sb * 256;
    __m512 total[R];  // per row: exact int32 sums of products, added in fp32
    for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
    if constexpr (T == Q4_K) q4k_products<R>(blk, x, total);
    else q6k_products<R>(blk, x, total);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(total[r], _mm512_mul_ps(d, _mm512_set1_ps(a.dx[(m0 + r) * nb + sb])), acc[r]);
    if constexpr (T == Q4_K) {  // minus dmin * sum_j m_j * (sum of x over sub-block j)
      const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32)));
      __m512 mn[8];
      for (int j = 0; j < 8; ++j) mn[j] = _mm512_cvtepi32_ps(scales_at(blk + 192 + 16 * j, false));
      for (int r = 0; r < R; ++r) {
        const float* s = a.sums.data() + (m0 + r) * (K / 32) + sb * 8;
        __m512 mins = _mm512_mul_ps(mn[0], _mm512_set1_ps(s[0]));
        for (int j = 1; j < 8; ++j) mins = _mm512_fmadd_ps(mn[j], _mm512_set1_ps(s[j]), mins);
        acc[r] = _mm512_fnmadd_ps(dmin, mins, acc[r]);
      }
    }
  }
  alignas(64) float out[16];
  for (int r = 0; r < R; ++r) {
    _mm512_store_ps(out, acc[r]);
    for (int i = 0; i < 16; ++i) store(y + (m0 + r) * y_stride + col0 + g * kRowGroup + i, out[i]);
  }
}

// Output row groups [g0, g1) of a repacked weight for all M activation rows, up to four at a time, a
// group's bytes read from L2 again for each four; the groups taken as kStreams interleaved runs, as
// `rows_of` takes rows.
template <int64_t T, typename Out>
void vector_rows(const uint8_t* rp, int64_t nb, const Activations& a, int64_t M, int64_t g0, int64_t g1, Out* y,
                 int64_t y_stride, int64_t col0) {
  const int64_t run = (g1 - g0 + kStreams - 1) / kStreams;
  for (int64_t idx = 0; idx < run * kStreams; ++idx) {
    const int64_t g = g0 + (idx % kStreams) * run + idx / kStreams;
    if (g >= g1) continue;
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      switch (std::min<int64_t>(kRows, M - m0)) {
        case 4: group_rows<T, 4>(rp, nb, a, m0, g, y, y_stride, col0); break;
        case 3: group_rows<T, 3>(rp, nb, a, m0, g, y, y_stride, col0); break;
        case 2: group_rows<T, 2>(rp, nb, a, m0, g, y, y_stride, col0); break;
        default: group_rows<T, 1>(rp, nb, a, m0, g, y, y_stride, col0);
      }
    }
  }
}

#endif

// ---- Q4_K and Q6_K on AMX tiles, for steps of several rows --------------------------------------------
// The int16 products above are compute-bound from ~4 rows (S4: 8 rows 2.2x the one-row time). AMX
// multiplies int8 tiles at ~30x VNNI's rate, but wants the weights as its B operand: [K/4][16 rows][4
// bytes], i.e. 16 output rows interleaved by 4-byte groups. `gguf_repack` writes a tensor so, once at
// load, with the same bits per weight (Q4_K 4.6 instead of 4.5, Q6_K 6.56 as stored). The arithmetic
// is the int16 path's, exactly, in integers:
// - activations: the same int16 codes xq, split as xq = 256 * hi + lo (hi signed, lo unsigned bytes);
// - Q4_K: codes q (0..15) times their 6-bit sub-scale s, split as s = lo3 + 8 * hi3, so q * lo3 and
//   q * hi3 are both <= 105 (unsigned bytes; one vpmullw makes both of a 16-bit lane's bytes: no
//   carry); the four int32 tiles (each |sum| < 7e6) combine as 256 (C_hl + 8 C_hh) + C_ll + 8 C_lh;
// - Q6_K: the 16-bit product sc * (q - 32) (|.| <= 4096) split into its low byte (unsigned) and high
//   byte (signed); the tiles (|sum| < 2e7) combine as 65536 C_hh + 256 (C_hl + C_lh) + C_ll;
// then, per super-block, d * dx and the mins in fp32 as in `rows_of`. A row's integer sums do not
// depend on the others, but the fp32 order differs from `rows_of`, so the batch-invariant mode
// (gguf-native) never repacks.
#if defined(TINYSERVE_GGUF_AMX)
// The process may use tile data only after asking the kernel (Linux 5.16+); once, cached.
bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

// Every tile 16 rows of 64 bytes: 0-3 the int32 sums, 4-5 the weights (two byte planes), 6-7 the
// activations (hi / lo). Rows past M are zeros in the activation buffers.
void configure_tiles() {
  alignas(64) uint8_t cfg[64] = {};
  cfg[0] = 1;  // palette 1
  for (int t = 0; t < 8; ++t) {
    cfg[16 + 2 * t] = 64;  // bytes per row (little-endian uint16)
    cfg[48 + t] = 16;      // rows
  }
  _tile_loadconfig(cfg);
}

// The activations for the tiles: xq split into hi (signed) and lo (unsigned) bytes, rows padded to 16.
struct TileActivations {
  std::vector<int8_t> hi;
  std::vector<uint8_t> lo;

  void split(const Activations& a, int64_t M) {
    const int64_t rows = (M + 15) / 16 * 16;
    hi.assign(rows * a.K, 0);
    lo.assign(rows * a.K, 0);
    for (int64_t i = 0; i < M * a.K; ++i) {
      hi[i] = static_cast<int8_t>(a.xq[i] >> 8);
      lo[i] = static_cast<uint8_t>(a.xq[i] & 255);
    }
  }
};

// GCC's tile intrinsics are asm statements that do not declare the memory they read or write: without
// this, stores into the B buffers may be dropped as dead, or loads of the sums moved before the tiles'.
inline void memory_barrier() { asm volatile("" ::: "memory"); }

inline __m512i pair_words(const uint8_t* p) {  // 16 bytes as 16 lanes of two equal 16-bit words
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_or_si512(v, _mm512_slli_epi32(v, 16));
}

// One super-block of 16 rows decoded into B tiles: per 64-weight chunk, two byte planes of 16 rows of
// 64 bytes (Q4_K: the codes times the scales' low and high three bits; Q6_K: the products' low and
// high bytes).
struct TileWeights {
  alignas(64) uint8_t lo[4][16 * 64], hi[4][16 * 64];
};

inline void decode_q4k_tiles(const uint8_t* blk, TileWeights& w) {
  const __m512i nib = _mm512_set1_epi8(15), three = _mm512_set1_epi16(7);
  for (int ch = 0; ch < 4; ++ch) {
    const __m512i sa = pair_words(blk + 64 + 16 * (2 * ch)), sb = pair_words(blk + 64 + 16 * (2 * ch + 1));
    const __m512i la = _mm512_and_si512(sa, three), ha = _mm512_srli_epi16(sa, 3);
    const __m512i lb = _mm512_and_si512(sb, three), hb = _mm512_srli_epi16(sb, 3);
    for (int p = 0; p < 8; ++p) {
      const __m512i z = _mm512_loadu_si512(blk + 320 + 64 * (8 * ch + p));
      const __m512i q0 = _mm512_and_si512(z, nib), q1 = _mm512_and_si512(_mm512_srli_epi16(z, 4), nib);
      _mm512_store_si512(w.lo[ch] + 64 * p, _mm512_mullo_epi16(q0, la));
      _mm512_store_si512(w.hi[ch] + 64 * p, _mm512_mullo_epi16(q0, ha));
      _mm512_store_si512(w.lo[ch] + 64 * (p + 8), _mm512_mullo_epi16(q1, lb));
      _mm512_store_si512(w.hi[ch] + 64 * (p + 8), _mm512_mullo_epi16(q1, hb));
    }
  }
}

// B row r of a Q6_K super-block (codes 0..63 of 16 rows x 4 weights) into its two byte planes, with no
// shuffles: the even and odd bytes of each 16-bit lane are multiplied apart (`sc`: the row's scale in
// both 16-bit halves of its 32-bit lane) and their products' low and high bytes interleaved back.
inline void q6k_row(__m512i codes, __m512i sc, uint8_t* lo, uint8_t* hi) {
  const __m512i low8 = _mm512_set1_epi16(0x00FF), off = _mm512_set1_epi16(32);
  const __m512i pe = _mm512_mullo_epi16(_mm512_sub_epi16(_mm512_and_si512(codes, low8), off), sc);
  const __m512i po = _mm512_mullo_epi16(_mm512_sub_epi16(_mm512_srli_epi16(codes, 8), off), sc);
  // ternary 0xE4: (c & a) | (~c & b) with c = low8: a where low8, b elsewhere
  _mm512_store_si512(lo, _mm512_ternarylogic_epi32(pe, _mm512_slli_epi16(po, 8), low8, 0xE4));
  _mm512_store_si512(hi, _mm512_ternarylogic_epi32(_mm512_srli_epi16(pe, 8), po, low8, 0xE4));
}

inline void decode_q6k_tiles(const uint8_t* blk, TileWeights& w) {
  const __m512i nib = _mm512_set1_epi8(15), two = _mm512_set1_epi8(3);
  __m512i sc[16];  // per 16 weights (4 B rows): each row's int8 scale in both halves of its 32-bit lane
  for (int j = 0; j < 16; ++j) {
    const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 32 + 16 * j)));
    sc[j] = _mm512_or_si512(_mm512_and_si512(v, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32(v, 16));
  }
  for (int v = 0; v < 32; ++v) {
    const __m512i z = _mm512_loadu_si512(blk + 288 + 64 * v);
    const __m512i h = _mm512_loadu_si512(blk + 2336 + 64 * (v % 16));
    const int t = v / 16;  // row v's high bits at 2t, row v + 32's at 2t + 4
    const __m512i h0 = _mm512_and_si512(_mm512_srli_epi16(h, 2 * t), two);
    const __m512i h1 = _mm512_and_si512(_mm512_srli_epi16(h, 2 * t + 4), two);
    const __m512i c0 = _mm512_or_si512(_mm512_and_si512(z, nib), _mm512_slli_epi16(h0, 4));
    const __m512i c1 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(z, 4), nib), _mm512_slli_epi16(h1, 4));
    const int r0 = v, r1 = v + 32;  // B rows; chunk r / 16, row r % 16 there; scale (4 rows each) r / 4
    q6k_row(c0, sc[r0 / 4], w.lo[r0 / 16] + 64 * (r0 % 16), w.hi[r0 / 16] + 64 * (r0 % 16));
    q6k_row(c1, sc[r1 / 4], w.lo[r1 / 16] + 64 * (r1 % 16), w.hi[r1 / 16] + 64 * (r1 % 16));
  }
}

// A super-block's four int32 tiles, as stored, folded into the rows' fp32 accumulators.
template <int64_t T>
inline void accumulate_tiles(const int32_t (*c)[16 * 16], const uint8_t* blk, const Activations& a, int64_t m0,
                             int rows, int64_t nb, int64_t sb, __m512* acc) {
  const int64_t K = a.K;
  const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
  if constexpr (T == Q6_K) {
    for (int r = 0; r < rows; ++r) {
      const __m512i mid = _mm512_add_epi32(_mm512_load_si512(c[0] + 16 * r), _mm512_load_si512(c[3] + 16 * r));
      const __m512 v = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[1] + 16 * r)),
                                                       _mm512_set1_ps(256.f), _mm512_cvtepi32_ps(mid)),
                                       _mm512_set1_ps(256.f), _mm512_cvtepi32_ps(_mm512_load_si512(c[2] + 16 * r)));
      acc[r] = _mm512_fmadd_ps(v, _mm512_mul_ps(d, _mm512_set1_ps(a.dx[(m0 + r) * nb + sb])), acc[r]);
    }
    return;
  }
  const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32)));
  __m512 mn[8];
  for (int j = 0; j < 8; ++j)
    mn[j] = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                    _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192 + 16 * j)))));
  for (int r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    const __m512i h = _mm512_add_epi32(_mm512_load_si512(c[0] + 16 * r), _mm512_slli_epi32(_mm512_load_si512(c[1] + 16 * r), 3));
    const __m512i l = _mm512_add_epi32(_mm512_load_si512(c[2] + 16 * r), _mm512_slli_epi32(_mm512_load_si512(c[3] + 16 * r), 3));
    const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), _mm512_set1_ps(256.f), _mm512_cvtepi32_ps(l));
    acc[r] = _mm512_fmadd_ps(v, _mm512_mul_ps(d, _mm512_set1_ps(a.dx[m * nb + sb])), acc[r]);
    const float* s = a.sums.data() + m * (K / 32) + sb * 8;
    __m512 mins = _mm512_mul_ps(mn[0], _mm512_set1_ps(s[0]));
    for (int j = 1; j < 8; ++j) mins = _mm512_fmadd_ps(mn[j], _mm512_set1_ps(s[j]), mins);
    acc[r] = _mm512_sub_ps(acc[r], mins);
  }
}

// Output row groups [g0, g1) of a repacked weight for all M activation rows: per super-block, the
// vector units decode the B tiles, the tiles multiply, the vector units fold the sums. (Pipelining
// these over super-blocks, decoding sb + 1 while the tiles multiply sb, measured slower: 457 vs 370 ns
// per 4096 Q4_K weights on one core; the units do not overlap either way.)
template <int64_t T, typename Out>
void amx_rows(const uint8_t* rp, int64_t nb, const Activations& a, const TileActivations& t, int64_t M, int64_t g0,
              int64_t g1, Out* y, int64_t y_stride, int64_t col0) {
  constexpr int64_t block = repacked_bytes(T);
  const int64_t K = a.K;
  TileWeights w;
  alignas(64) int32_t c[4][16 * 16];
  alignas(64) float out[16];
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, M - m0));
    const int8_t* ahi = t.hi.data() + m0 * K;
    const uint8_t* alo = t.lo.data() + m0 * K;
    for (int64_t g = g0; g < g1; ++g) {
      __m512 acc[16];
      for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t sb = 0; sb < nb; ++sb) {
        const uint8_t* blk = rp + (g * nb + sb) * block;
        for (int64_t o = 0; o < block; o += 64)
          _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetch + o), _MM_HINT_T1);
        if constexpr (T == Q4_K) decode_q4k_tiles(blk, w);
        else decode_q6k_tiles(blk, w);
        memory_barrier();  // the tiles read what the vector stores wrote
        for (int ch = 0; ch < 4; ++ch) {
          _tile_loadd(4, w.lo[ch], 64);
          _tile_loadd(5, w.hi[ch], 64);
          _tile_loadd(6, ahi + sb * 256 + 64 * ch, K);
          _tile_loadd(7, alo + sb * 256 + 64 * ch, K);
          _tile_dpbsud(0, 6, 4);  // hi x lo plane: signed x unsigned
          _tile_dpbuud(2, 7, 4);  // lo x lo plane: unsigned x unsigned
          if constexpr (T == Q4_K) {  // both weight planes unsigned
            _tile_dpbsud(1, 6, 5);
            _tile_dpbuud(3, 7, 5);
          } else {  // Q6_K's high bytes are signed
            _tile_dpbssd(1, 6, 5);
            _tile_dpbusd(3, 7, 5);
          }
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        memory_barrier();  // and the vector loads read what the tiles stored
        accumulate_tiles<T>(c, blk, a, m0, rows, nb, sb, acc);
      }
      for (int r = 0; r < rows; ++r) {
        _mm512_store_ps(out, acc[r]);
        for (int i = 0; i < 16; ++i) store(y + (m0 + r) * y_stride + col0 + g * kRowGroup + i, out[i]);
      }
    }
  }
}
#endif

// Whether repacked weights go to AMX tiles: a build with AMX, and the kernel granting tile data.
bool tiles_usable() {
#if defined(TINYSERVE_GGUF_AMX)
  return amx_permitted();
#else
  return false;
#endif
}

// y [M, sum N_i] = x [M, K] times the weights stacked along N (a fused q/k/v may mix block types).
// `repacked`: none, or per weight its `gguf_repack` form (an empty tensor where it has none), which
// steps of `repacked_min_rows[i]` rows or more (default: any) read instead of the file's blocks: on AMX
// tiles where the CPU has them, else on the vector units. The choice is made here, not by the caller:
// a compiled step traced over a range of rows needs no branch on the rows.
at::Tensor gguf_linear(const at::Tensor& x, at::TensorList weights, at::IntArrayRef qtypes,
                       std::optional<at::TensorList> repacked_or_none,
                       std::optional<at::IntArrayRef> repacked_min_rows) {
  const at::TensorList repacked = repacked_or_none.value_or(at::TensorList());
  TORCH_CHECK(x.dim() == 2, "gguf_linear: x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "gguf_linear supports float32 and bfloat16 activations, got ", x.scalar_type());
  TORCH_CHECK(!weights.empty() && weights.size() == qtypes.size(), "gguf_linear: one GGML type per weight");
  TORCH_CHECK(repacked.empty() || repacked.size() == weights.size(), "gguf_linear: one repacked form per weight");
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<int64_t> first(weights.size() + 1, 0);  // output column where each weight starts
  for (size_t i = 0; i < weights.size(); ++i) {
    const Layout l = layout(qtypes[i]);
    const at::Tensor& w = weights[i];
    TORCH_CHECK(K % l.weights == 0, "gguf_linear: K = ", K, " is not a multiple of the block size ", l.weights);
    TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous() &&
                w.size(1) == K / l.weights * l.bytes, "gguf_linear: weight ", i,
                " must be contiguous uint8 [N, K / ", l.weights, " * ", l.bytes, "]");
    first[i + 1] = first[i] + w.size(0);
  }
  const int64_t N = first.back();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  // how each weight is read: its file blocks, or its repacked form (where its columns start on a 16-row
  // group) on AMX tiles or the vector units
  enum Path : char { kFile, kTiles, kVector };
  std::vector<char> path(weights.size(), kFile);
#if defined(TINYSERVE_GGUF_VNNI)
  TORCH_CHECK(!repacked_min_rows || repacked_min_rows->size() == weights.size(),
              "gguf_linear: one repacked_min_rows per weight");
  for (size_t i = 0; i < repacked.size(); ++i) {
    const at::Tensor& r = repacked[i];
    if (r.numel() == 0 || first[i] % kRowGroup != 0 || (repacked_min_rows && M < (*repacked_min_rows)[i])) continue;
    TORCH_CHECK((qtypes[i] == Q4_K || qtypes[i] == Q6_K) && r.scalar_type() == at::kByte && r.is_contiguous() &&
                r.size(0) * kRowGroup == weights[i].size(0) && r.size(1) == K / 256 * repacked_bytes(qtypes[i]),
                "gguf_linear: repacked form ", i, " does not match its weight");
    path[i] = tiles_usable() ? kTiles : kVector;
  }
#endif
  const bool any_tiles = std::find(path.begin(), path.end(), kTiles) != path.end();
  const at::Tensor xc = x.contiguous();
  thread_local Activations scratch[2];
  // [0]: groups of 32 (legacy types), [1]: of 256 (K-quants); the workers read this thread's copy
  Activations* by_group = scratch;
  bool done[2] = {false, false};
  for (size_t i = 0; i < weights.size(); ++i) {
    const bool k = is_k_quant(qtypes[i]);
    if (done[k]) continue;
    done[k] = true;
    if (xc.scalar_type() == at::kBFloat16)
      by_group[k].quantize(xc.data_ptr<c10::BFloat16>(), M, K, k ? 256 : 32);
    else
      by_group[k].quantize(xc.data_ptr<float>(), M, K, k ? 256 : 32);
  }
#if defined(TINYSERVE_GGUF_AMX)
  thread_local TileActivations tile_scratch;
  const TileActivations* tile_acts = &tile_scratch;  // as above: the workers read this thread's copy
  if (any_tiles) tile_scratch.split(by_group[1], M);
#endif
#if defined(TINYSERVE_GGUF_VNNI)
  // a repacked weight's groups [g0, g1): on the tiles or the vector units
  const auto repacked_rows = [&](bool on_tiles, int64_t t, const uint8_t* r, int64_t nb, const Activations& a,
                                 int64_t rows, int64_t g0, int64_t g1, auto* out, int64_t stride, int64_t col0) {
#if defined(TINYSERVE_GGUF_AMX)
    if (on_tiles) {
      t == Q4_K ? amx_rows<Q4_K>(r, nb, a, *tile_acts, rows, g0, g1, out, stride, col0)
                : amx_rows<Q6_K>(r, nb, a, *tile_acts, rows, g0, g1, out, stride, col0);
      return;
    }
#endif
    (void)on_tiles;
    t == Q4_K ? vector_rows<Q4_K>(r, nb, a, rows, g0, g1, out, stride, col0)
              : vector_rows<Q6_K>(r, nb, a, rows, g0, g1, out, stride, col0);
  };
#endif
  // in groups of 16 output rows, so that a thread's range never splits a tile's rows
  at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t g_begin, int64_t g_end) {
    const int64_t begin = g_begin * 16, end = std::min(N, g_end * 16);
#if defined(TINYSERVE_GGUF_AMX)
    if (any_tiles) configure_tiles();
#endif
    for (size_t i = 0; i < weights.size(); ++i) {
      const int64_t lo = std::max(begin, first[i]), hi = std::min(end, first[i + 1]);
      if (lo >= hi) continue;
      const Activations& a = by_group[is_k_quant(qtypes[i])];
#if defined(TINYSERVE_GGUF_VNNI)
      if (path[i] != kFile) {
        const uint8_t* r = repacked[i].data_ptr<uint8_t>();
        const int64_t g0 = (lo - first[i]) / kRowGroup, g1 = (hi - first[i]) / kRowGroup;
        if (y.scalar_type() == at::kBFloat16)
          repacked_rows(path[i] == kTiles, qtypes[i], r, K / 256, a, M, g0, g1, y.data_ptr<c10::BFloat16>(), N, first[i]);
        else
          repacked_rows(path[i] == kTiles, qtypes[i], r, K / 256, a, M, g0, g1, y.data_ptr<float>(), N, first[i]);
        continue;
      }
#endif
      const uint8_t* w = weights[i].data_ptr<uint8_t>();
      const int64_t rb = weights[i].size(1);
      if (y.scalar_type() == at::kBFloat16)
        dispatch(qtypes[i], w, rb, a, M, lo - first[i], hi - first[i], y.data_ptr<c10::BFloat16>(), N, first[i]);
      else
        dispatch(qtypes[i], w, rb, a, M, lo - first[i], hi - first[i], y.data_ptr<float>(), N, first[i]);
    }
#if defined(TINYSERVE_GGUF_AMX)
    if (any_tiles) _tile_release();
#endif
  });
  return y;
}

// A Q4_K or Q6_K tensor's repacked form, or an empty tensor where this build has no use for one (no
// AVX-512 VNNI) or the tensor cannot take it (another type, rows not in 16s).
at::Tensor gguf_repack(const at::Tensor& blocks, int64_t qtype) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2, "gguf_repack: uint8 [N, bytes] blocks");
#if defined(TINYSERVE_GGUF_VNNI)
  if ((qtype == Q4_K || qtype == Q6_K) && blocks.size(0) % kRowGroup == 0) {
    TORCH_CHECK(blocks.size(1) % layout(qtype).bytes == 0, "gguf_repack: rows of whole blocks");
    return repack(blocks.contiguous(), qtype);
  }
#endif
  return at::empty({0}, blocks.options());
}

// A weight dequantized: out [N, K] (float32 or bfloat16) = the blocks' values, row by row on all threads.
// The same values as `gguf`'s dequantization, bit for bit (tests/test_gguf_native.py): every product here
// (d times a code times a sub-scale) is exact in fp32 (at most 11 + 7 + 6 significant bits), so only the
// one addition of a min rounds, as in `gguf`, whatever order or fusing the compiler picks. Why native: the
// dense copies of a 1.5B model took 7.8 s of every start in torch ops, most of a warm start.
template <int64_t T, typename Out>
void dequantize_rows(const uint8_t* w, int64_t row_bytes, int64_t K, int64_t begin, int64_t end, Out* out) {
  const Layout l = layout(T);
  Decoded b;
  for (int64_t r = begin; r < end; ++r)
    for (int64_t k = 0; k < K; k += l.weights) {
      decode<T>(w + r * row_bytes + k / l.weights * l.bytes, b);
      Out* y = out + r * K + k;
      for (int i = 0; i < l.weights; ++i) store(y + i, b.d * b.q[i] - b.mins[i / 32]);
    }
}

template <typename Out>
void dequantize_as(int64_t t, const uint8_t* w, int64_t row_bytes, int64_t K, int64_t begin, int64_t end, Out* out) {
  with_type(t, [&](auto T) { dequantize_rows<T()>(w, row_bytes, K, begin, end, out); });
}

void gguf_dequantize(const at::Tensor& blocks, int64_t qtype, const at::Tensor& out) {
  const Layout l = layout(qtype);
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(1) % l.weights == 0 &&
              (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "gguf_dequantize: out must be contiguous float32 or bfloat16 [N, K], K in whole blocks");
  const int64_t N = out.size(0), K = out.size(1);
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.dim() == 2 &&
              blocks.size(0) == N && blocks.size(1) == K / l.weights * l.bytes,
              "gguf_dequantize: blocks must be contiguous uint8 [N, K / ", l.weights, " * ", l.bytes, "]");
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  const int64_t rb = blocks.size(1);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    if (out.scalar_type() == at::kBFloat16)
      dequantize_as(qtype, w, rb, K, begin, end, out.data_ptr<c10::BFloat16>());
    else
      dequantize_as(qtype, w, rb, K, begin, end, out.data_ptr<float>());
  });
}

}  // namespace

// A fragment: the paged attention kernel's library owns the `tinyserve` namespace.
TORCH_LIBRARY_FRAGMENT(tinyserve, m) {
  m.def("gguf_linear(Tensor x, Tensor[] weights, int[] qtypes, Tensor[]? repacked=None, int[]? repacked_min_rows=None) -> Tensor");
  m.def("gguf_repack(Tensor blocks, int qtype) -> Tensor");
  m.def("gguf_tiles() -> bool", &tiles_usable);
  m.def("gguf_dequantize(Tensor blocks, int qtype, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(tinyserve, CPU, m) {
  m.impl("gguf_linear", &gguf_linear);
  m.impl("gguf_repack", &gguf_repack);
  m.impl("gguf_dequantize", &gguf_dequantize);
}
