// internvl::small_m_linear_int4(x, q, s, group, b?): y[..., N] = x[..., K] @ dequant(q, s)^T (+ b) for at most 8 rows
// of bf16 x, with group-wise int4 weights (compile/passes/int4_weights.py, QUANT=int4): fp32 accumulation, bf16 out.
//
// Layout (docs/CONTRACTS.md): q is uint8 [N, K / 2]; each chunk of 64 weights of a row is 32 bytes, byte j holding
// weight j of the chunk in its low nibble and weight 32 + j in its high nibble, each nibble the weight's value + 8
// (values -8..7). s is fp32 [N, K / group], group a multiple of 64 dividing K: w[n, k] = (nibble - 8) * s[n, k / group].
//
// Each weight row is read once for all rows of x (kernels/blocks.h: row_blocks), its nibbles widened to bf16 in
// registers (exactly: |value| <= 8) and multiplied in with AVX512-BF16's vdpbf16ps into a per-group partial sum,
// which is scaled into the row's accumulator at the group's end. AVX512-BF16: a chunk's 64 nibbles become bf16 by
// two in-lane byte-table lookups (vpshufb: the bf16's high and low byte) and an interleave (vpunpck{l,h}bw, within
// 128-bit lanes: x is permuted alike once per call, kernels/blocks.h permute64); with AVX-512 VNNI as well (Zen 4,
// Ice Lake+) the integer dot product below, 64 weights a vpdpbusd (24 layers of 2B matrices, Zen 4, ms at M = 1 / 2
// / 4 / 8: 29-36 / 34-39 / 48-69 / 129-131 with vdpbf16ps, 26-30 / 30-31 / 42-58 / 104-108 with vpdpbusd, 24-25 /
// 24-26 / 38 / 71-73 with its factors in vectors (tenth round); `-D
// INTERNVL_INT4_BF16` builds the former). AVX2 + FMA: integer dot products,
// as llama.cpp's q4_0 x q8_0: x is rounded to int8 per group once per call (a scale max |x| / 127 per row and group:
// an error of at most half a step per element, against the weights' own of half of s), the nibbles are multiplied
// into it as unsigned x signed bytes (vpmaddubsw) and summed in int16/int32; per group the sum less 8 * sum(xq) is
// scaled by s and the row's step into fp32. 24 layers of 2B matrices, emulated AVX2 on Zen 4, ms at M = 1 / 2 / 4 /
// 8: 57 / 64 / 109 / 255 with the former fp32 loop (nibbles looked up as int8, converted, FMA), 26-28 / 30-33 /
// 56-61 / 109-118 with this (docs/performance.md, ninth round). Neither ISA: a plain loop (tests only).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "blocks.h"

namespace {

constexpr int64_t kChunk = 64;       // weights per 32-byte chunk of q

#if defined(__AVX2__) && defined(__FMA__)
// x rounded to int8 per group of K (the integer paths: AVX2, and AVX-512 with VNNI): q = round(x / s), s = max |x| /
// 127 over the group (0 for a group of zeros; blocks.h block_step), sum8 = 8 times the group's sum of q, as fp32 (the
// nibbles' offset; exact: |8 * sum| < 2^24).
struct QuantX {
  int64_t groups;
  scratch<int8_t> q;
  std::vector<float> s, sum8;
  QuantX(const bf16* x, int64_t M, int64_t MP, int64_t K, int64_t group)
      : groups(K / group), q(MP * K, 0), s(MP * groups, 0.f), sum8(MP * groups, 0.f) {
    scratch<float> xf(K);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = 0; k < K; ++k) xf[k] = float(x[m * K + k]);
      for (int64_t g = 0; g < groups; ++g) {
        const float step = block_step(xf.data() + g * group, group, 127.f);
        s[m * groups + g] = step;
        sum8[m * groups + g] = 8.f * float(round_block(xf.data() + g * group, group, step, q.data() + m * K + g * group));
      }
    }
  }
  // The factor that takes group g's integer sum (nibbles x xq) of row m against a weight row with scale ws into
  // fp32: ws times the row's step. The nibbles hold the weights + 8, so that sum exceeds the true one by 8 * sum(xq);
  // its share times the same factor is added to `offset`, which the dot block subtracts at the end.
  float factor(int64_t m, int64_t g, float ws, float& offset) const {
    const float c = ws * s[m * groups + g];
    offset += sum8[m * groups + g] * c;
    return c;
  }
};

#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
struct Nibbles {                       // bf16 of (i - 8), i = 0..15: high and low bytes, in each 128-bit lane
  __m512i hi, lo;
  Nibbles() {
    alignas(16) uint8_t h[16], l[16];
    for (int i = 0; i < 16; ++i) {
      const uint16_t v = bf16(float(i - 8)).x;
      h[i] = uint8_t(v >> 8);
      l[i] = uint8_t(v & 0xFF);
    }
    hi = _mm512_broadcast_i32x4(_mm_load_si128((const __m128i*)h));
    lo = _mm512_broadcast_i32x4(_mm_load_si128((const __m128i*)l));
  }
};

// 64 nibbles (one per byte of idx) -> 64 bf16 in permute64 order
inline void widen(__m512i idx, const Nibbles& t, __m512bh& wa, __m512bh& wb) {
  const __m512i h = _mm512_shuffle_epi8(t.hi, idx), l = _mm512_shuffle_epi8(t.lo, idx);
  wa = (__m512bh)_mm512_unpacklo_epi8(l, h);
  wb = (__m512bh)_mm512_unpackhi_epi8(l, h);
}

// out[m][r] = sum_k x[m, k] * w[n0 + r, k]; xp: MC rows of x permuted per 64 elements (K per row).
template <int MC, int R>
inline void dot_block(const bf16* xp, int64_t K, const uint8_t* q, const float* s, int64_t group, int64_t n0,
                      float* out) {
  const Nibbles t;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int64_t groups = K / group;
  __m512 acc[MC][R];
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const uint8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = q + (n0 + r) * (K / 2);
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[MC][R];
    for (int m = 0; m < MC; ++m)
      for (int r = 0; r < R; ++r) part[m][r] = _mm512_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; k += kChunk) {
      for (int r = 0; r < R; ++r) {
        prefetch<true>(wr[r] + k / 2);
        // the chunk's 32 bytes in both halves; the upper half shifted: low nibbles = weights k .. k + 31, then the
        // high nibbles = k + 32 .. k + 63, one per byte
        const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(wr[r] + k / 2)));
        __m512bh wa, wb;
        widen(_mm512_and_si512(_mm512_mask_srli_epi16(v, (__mmask32)0xFFFF0000u, v, 4), low4), t, wa, wb);
        for (int m = 0; m < MC; ++m) {
          const bf16* xm = xp + m * K + k;
          part[m][r] = _mm512_dpbf16_ps(part[m][r], (__m512bh)_mm512_loadu_si512((const void*)xm), wa);
          part[m][r] = _mm512_dpbf16_ps(part[m][r], (__m512bh)_mm512_loadu_si512((const void*)(xm + 32)), wb);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 sc = _mm512_set1_ps(s[(n0 + r) * groups + g]);
      for (int m = 0; m < MC; ++m) acc[m][r] = _mm512_fmadd_ps(part[m][r], sc, acc[m][r]);
    }
  }
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) out[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
}
#if defined(__AVX512VNNI__)
// AVX-512 VNNI: the AVX2 path's integer dot product 64 weights at a time: a chunk's 32 bytes in both halves of a
// zmm, the upper half shifted, masked to the nibbles in the chunk's natural order (weights k .. k + 63), multiplied
// into 64 bytes of xq and summed 4 by 4 into int32 by vpdpbusd (no saturation); per group converted, scaled by the
// group's weight scale times xs into fp32; 8 * xsum times the same subtracted at the end. Those factors are computed
// 16 groups at a time for all row pairs in vectors, not one by one in scalar code (QuantX::factor) in the group
// loop: 24 layers of 2B matrices, Zen 4, M = 4 / 8: 43-44 / 86 ms -> 38 / 71-73 (docs/performance.md, tenth round;
// the same in 8-wide vectors made the AVX2 loop slower, 103-106 -> 123-128 ms at M = 8, and was not kept).
template <int MC, int R>
inline void dot_block_vnni(const QuantX& xq, int64_t m0, int64_t K, const uint8_t* q, const float* s, int64_t group,
                           int64_t n0, float* out) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int64_t groups = K / group;
  __m512 acc[MC][R];
  float offset[MC][R] = {};
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const uint8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = q + (n0 + r) * (K / 2);
  const int8_t* xr = xq.q.data() + m0 * K;
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    // the factors of the next 16 groups, ws * xs, for every row pair at once, and their offsets' share
    const int64_t ng = std::min<int64_t>(16, groups - g0);
    const __mmask16 mask = (__mmask16)((1u << ng) - 1);
    alignas(64) float c[MC][R][16];
    for (int m = 0; m < MC; ++m) {
      const __m512 xs = _mm512_maskz_loadu_ps(mask, xq.s.data() + (m0 + m) * groups + g0);
      const __m512 x8 = _mm512_maskz_loadu_ps(mask, xq.sum8.data() + (m0 + m) * groups + g0);
      for (int r = 0; r < R; ++r) {
        const __m512 cv = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, s + (n0 + r) * groups + g0), xs);
        _mm512_store_ps(c[m][r], cv);
        offset[m][r] += _mm512_reduce_add_ps(_mm512_mul_ps(cv, x8));
      }
    }
    for (int64_t g = g0; g < g0 + ng; ++g) {
      __m512i part[MC][R];
      for (int m = 0; m < MC; ++m)
        for (int r = 0; r < R; ++r) part[m][r] = _mm512_setzero_si512();
      for (int64_t k = g * group; k < (g + 1) * group; k += kChunk) {
        for (int r = 0; r < R; ++r) {
          prefetch<true>(wr[r] + k / 2);
          const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(wr[r] + k / 2)));
          const __m512i w = _mm512_and_si512(_mm512_mask_srli_epi16(v, (__mmask32)0xFFFF0000u, v, 4), low4);
          for (int m = 0; m < MC; ++m)
            part[m][r] = _mm512_dpbusd_epi32(part[m][r], w, _mm512_loadu_si512((const void*)(xr + m * K + k)));
        }
      }
      for (int m = 0; m < MC; ++m)
        for (int r = 0; r < R; ++r)
          acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(part[m][r]), _mm512_set1_ps(c[m][r][g - g0]), acc[m][r]);
    }
  }
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) out[m * R + r] = _mm512_reduce_add_ps(acc[m][r]) - offset[m][r];
}
#endif
#elif defined(__AVX2__) && defined(__FMA__)
// out[m][r] = sum_k x[m, k] * w[n0 + r, k] with x as int8 per group (QuantX, MC rows from row m0): a chunk's 64
// nibbles (0..15, the weights + 8) multiplied into xq as unsigned x signed bytes by vpmaddubsw (pairs at most
// 2 * 15 * 127: no saturation), summed in int16 over up to 4 chunks, widened by vpmaddwd and scaled into the fp32
// accumulator by the group's weight scale times xs; 8 * xsum times the same, summed per row, subtracted at the end.
template <int MC, int R>
inline void dot_block(const QuantX& xq, int64_t m0, int64_t K, const uint8_t* q, const float* s, int64_t group,
                      int64_t n0, float* out) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int64_t groups = K / group;
  __m256 acc[MC][R];
  float offset[MC][R] = {};
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const uint8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = q + (n0 + r) * (K / 2);
  const int8_t* xr = xq.q.data() + m0 * K;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 sc[MC][R];
    for (int m = 0; m < MC; ++m)
      for (int r = 0; r < R; ++r) sc[m][r] = _mm256_set1_ps(xq.factor(m0 + m, g, s[(n0 + r) * groups + g], offset[m][r]));
    // int16 sums over up to 4 chunks (at most 4 * 2 * 2 * 15 * 127 = 30480), then widened to int32 and scaled
    for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += 4 * kChunk) {
      __m256i p[MC][R];
      for (int m = 0; m < MC; ++m)
        for (int r = 0; r < R; ++r) p[m][r] = _mm256_setzero_si256();
      for (int64_t k = k0; k < std::min(k0 + 4 * kChunk, (g + 1) * group); k += kChunk) {
        for (int r = 0; r < R; ++r) {
          prefetch<true>(wr[r] + k / 2);
          const __m256i v = _mm256_loadu_si256((const __m256i*)(wr[r] + k / 2));
          const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
          for (int m = 0; m < MC; ++m) {
            const int8_t* xm = xr + m * K + k;
            p[m][r] = _mm256_add_epi16(p[m][r], _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)xm)));
            p[m][r] = _mm256_add_epi16(p[m][r], _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(xm + 32))));
          }
        }
      }
      for (int m = 0; m < MC; ++m)
        for (int r = 0; r < R; ++r)
          acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p[m][r], ones)), sc[m][r], acc[m][r]);
    }
  }
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) out[m * R + r] = hsum(acc[m][r]) - offset[m][r];
}
#endif

// fp32 -> bf16, round to nearest even (finite values: the scales are), as integer ops the vectoriser takes
inline bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return bf16(uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16), bf16::from_bits());
}

// One row of weights dequantised, w[k] = (nibble - 8) * s[k / group], as bf16 (round to nearest even, as
// c10::BFloat16) or fp32: the plain loop's weights and internvl::dequant_int4's output. Plain loops over a chunk's 32
// bytes, written for the compiler's vectoriser.
template <typename T>
void dequant_row(const uint8_t* qr, const float* sr, int64_t K, int64_t group, T* o) {
  for (int64_t c = 0; c < K; c += kChunk) {
    const float sc = sr[c / group];
    float lo[kChunk / 2], hi[kChunk / 2];
    for (int j = 0; j < kChunk / 2; ++j) {
      const uint8_t b = qr[c / 2 + j];
      lo[j] = float(int(b & 0x0F) - 8) * sc;
      hi[j] = float(int(b >> 4) - 8) * sc;
    }
    if constexpr (std::is_same_v<T, float>) {
      std::copy(lo, lo + kChunk / 2, o + c);
      std::copy(hi, hi + kChunk / 2, o + c + kChunk / 2);
    } else {
      for (int j = 0; j < kChunk / 2; ++j) {
        o[c + j] = to_bf16(lo[j]);
        o[c + kChunk / 2 + j] = to_bf16(hi[j]);
      }
    }
  }
}

void compute_int4(const bf16* x, int64_t M, int64_t K, const uint8_t* q, const float* s, int64_t group, int64_t N,
                  const bf16* b, bf16* y) {
  const int64_t MP = padded_rows(M);
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(INTERNVL_INT4_BF16)
  const QuantX xq(x, M, MP, K, group);       // zero rows up to MP
  // (weight rows per block 4 / 2 for 1-2 / 4-8 rows of x; 4 / 4 and 8 / 4 were within the noise of it)
  row_blocks<4, 2>(M, N, xq.q.data(), K, b, nullptr, y, [&](auto mc, auto r, const int8_t* xr, int64_t n0, float* out) {
    dot_block_vnni<decltype(mc)::value, decltype(r)::value>(xq, (xr - xq.q.data()) / K, K, q, s, group, n0, out);
  });
#elif defined(__AVX512BF16__) && defined(__AVX512BW__)
  scratch<bf16> xp(MP * K, bf16(0.f));       // x permuted like widen's weights, zero rows up to MP
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xp[m * K + k / 64 * 64 + permute64(k % 64)] = x[m * K + k];
  // 4 weight rows per block for 1-2 rows of x, 2 for 4 and 8 (MC x R accumulators and partial sums in 32 registers)
  row_blocks<4, 2>(M, N, xp.data(), K, b, nullptr, y, [&](auto mc, auto r, const bf16* xr, int64_t n0, float* out) {
    dot_block<decltype(mc)::value, decltype(r)::value>(xr, K, q, s, group, n0, out);
  });
#elif defined(__AVX2__) && defined(__FMA__)
  const QuantX xq(x, M, MP, K, group);       // zero rows up to MP
  // 4 weight rows per block for 1-2 rows of x, 2 for 4 and 8 (1 and 2 rows of x: 26-28 against 27-39 ms, 4 and 8
  // rows: 56-61 / 109-118 against 63-74 / 123-151 for 2 and 1; 24 layers of 2B matrices, emulated AVX2 on Zen 4)
  row_blocks<4, 2>(M, N, xq.q.data(), K, b, nullptr, y, [&](auto mc, auto r, const int8_t* xr, int64_t n0, float* out) {
    dot_block<decltype(mc)::value, decltype(r)::value>(xq, (xr - xq.q.data()) / K, K, q, s, group, n0, out);
  });
#else
  (void)MP;
  for_weight_blocks(M, N, 1, b, nullptr, y, [&](int64_t n, int64_t, float* acc) {
    std::vector<float> w(K);
    dequant_row(q + n * (K / 2), s + n * (K / group), K, group, w.data());
    for (int64_t m = 0; m < M; ++m) {
      float t = 0.f;
      for (int64_t k = 0; k < K; ++k) t += float(x[m * K + k]) * w[k];
      acc[m] = t;
    }
  });
#endif
}

// Every row of q dequantised (dequant_row), in parallel: what a prefill chunk's GEMM multiplies by, a slice of output
// rows at a time (compile/passes/int4_weights.py).
template <typename T>
void dequant_rows(const uint8_t* q, const float* s, int64_t N, int64_t K, int64_t group, T* out) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) dequant_row(q + n * (K / 2), s + n * (K / group), K, group, out + n * K);
  });
}

void check_int4(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, int64_t group,
                const std::optional<at::Tensor>& b) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && q.scalar_type() == at::kByte && s.scalar_type() == at::kFloat,
              "internvl::small_m_linear_int4 takes bf16 x, uint8 q (two int4 a byte) and fp32 scales, got ",
              x.scalar_type(), ", ", q.scalar_type(), " and ", s.scalar_type());
  TORCH_CHECK(group > 0 && group % kChunk == 0, "internvl::small_m_linear_int4: group must be a multiple of ", kChunk,
              ", got ", group);
  TORCH_CHECK(q.dim() == 2 && x.dim() >= 1 && x.size(-1) == 2 * q.size(1) && x.size(-1) % group == 0 &&
                  s.dim() == 2 && s.size(0) == q.size(0) && s.size(1) == x.size(-1) / group,
              "internvl::small_m_linear_int4: x [..., K], q [N, K / 2] and s [N, K / group] with K a multiple of group (",
              group, "), got ", x.sizes(), ", ", q.sizes(), " and ", s.sizes());
  TORCH_CHECK(x.numel() / std::max<int64_t>(x.size(-1), 1) <= kMaxRows,
              "internvl::small_m_linear_int4 takes at most ", kMaxRows, " rows, got x ", x.sizes());
  TORCH_CHECK(!b || (b->scalar_type() == at::kBFloat16 && b->dim() == 1 && b->size(0) == q.size(0)),
              "internvl::small_m_linear_int4: bias must be bf16 [N]");
}

at::Tensor small_m_linear_int4_cpu(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, int64_t group,
                                   const std::optional<at::Tensor>& b) {
  check_int4(x, q, s, group, b);
  const at::Tensor xc = x.contiguous(), qc = q.contiguous(), sc = s.contiguous();
  const std::optional<at::Tensor> bc = b ? std::optional<at::Tensor>(b->contiguous()) : std::nullopt;
  at::Tensor y = at::empty(out_shape(x, q.size(0)), x.options());
  const int64_t K = x.size(-1), N = q.size(0), M = K ? xc.numel() / K : 0;
  if (M == 0 || N == 0) return y;
  compute_int4(xc.const_data_ptr<bf16>(), M, K, qc.const_data_ptr<uint8_t>(), sc.const_data_ptr<float>(), group, N,
               bc ? bc->const_data_ptr<bf16>() : nullptr, y.mutable_data_ptr<bf16>());
  return y;
}

at::Tensor small_m_linear_int4_meta(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, int64_t group,
                                    const std::optional<at::Tensor>& b) {
  check_int4(x, q, s, group, b);
  return at::empty(out_shape(x, q.size(0)), x.options());
}

at::Tensor dequant_int4_cpu(const at::Tensor& q, const at::Tensor& s, int64_t group, bool fp32) {
  check_int4_weights("dequant_int4", q, s, group);
  const at::Tensor qc = q.contiguous(), sc = s.contiguous();
  const int64_t N = q.size(0), K = 2 * q.size(1);
  at::Tensor w = at::empty({N, K}, q.options().dtype(fp32 ? at::kFloat : at::kBFloat16));
  if (fp32) {
    dequant_rows(qc.const_data_ptr<uint8_t>(), sc.const_data_ptr<float>(), N, K, group, w.mutable_data_ptr<float>());
  } else {
    dequant_rows(qc.const_data_ptr<uint8_t>(), sc.const_data_ptr<float>(), N, K, group, w.mutable_data_ptr<bf16>());
  }
  return w;
}

at::Tensor dequant_int4_meta(const at::Tensor& q, const at::Tensor& s, int64_t group, bool fp32) {
  check_int4_weights("dequant_int4", q, s, group);
  return at::empty({q.size(0), 2 * q.size(1)}, q.options().dtype(fp32 ? at::kFloat : at::kBFloat16));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(internvl, m) {
  m.def("small_m_linear_int4(Tensor x, Tensor q, Tensor s, int group, Tensor? b=None) -> Tensor");
  m.def("dequant_int4(Tensor q, Tensor s, int group, bool fp32=False) -> Tensor");
}
TORCH_LIBRARY_IMPL(internvl, CPU, m) {
  m.impl("small_m_linear_int4", &small_m_linear_int4_cpu);
  m.impl("dequant_int4", &dequant_int4_cpu);
}
TORCH_LIBRARY_IMPL(internvl, Meta, m) {
  m.impl("small_m_linear_int4", &small_m_linear_int4_meta);
  m.impl("dequant_int4", &dequant_int4_meta);
}
