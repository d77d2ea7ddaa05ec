// internvl::small_m_linear(x, w, b?): y[..., N] = x[..., K] @ w[N, K]^T (+ b), bf16 in and out, fp32
// accumulation, for at most 8 rows of x: the linears of a decode step (kernels/__init__.py says why and how
// it is built, loaded and chosen). internvl::small_m_linear_int8(x, q, s, b?): the same with int8 weights in
// [-127, 127] and an fp32 scale per output row (y = (x @ q^T) * s + b: compile/passes/int8_weights.py's
// weight-only int8).
//
// Each weight row is read from memory once for all rows of x: a block of R weight rows is loaded 32 bf16 at
// a time and multiplied into every activation row (a few KB each, in L1) with AVX512-BF16's vdpbf16ps (a
// pair of bf16 products summed into fp32 per lane); rows of x are taken MC at a time so that the MC x R
// accumulators stay in registers, and a later chunk re-reads the block from L1/L2, not from DRAM. The weights
// are prefetched into L2 32 KB ahead (`prefetch`). int8 weights are widened to bf16 in registers (exactly:
// |q| <= 127 has 7 significant bits), 64 at a time by two byte-table lookups with AVX512-VBMI (`widen64`), else
// 32 at a time by sign-extension and conversion, once for all rows of x (padded to 2, 4 or 8 rows); with AVX-512
// VNNI as well, x is rounded to int16 once per call and the weights sign-extended to int16 go into vpdpwssd (integer
// products, 32 an instruction, as the AVX2 loop below does 16 at a time: Zen 4, 24 layers of 2B matrices, M = 8,
// 95-97 ms the lookup path, 76-78 this one).
// Built for AVX2 + FMA without AVX512-BF16 (x86-64-v3: Zen 1-3, Haswell+), the same loop structure in
// fp32: 16 bf16 weights per 256-bit load become two fp32 vectors with one shift and one mask (the even
// and the odd elements: a bf16 is the top half of an fp32), multiplied into x split once per call into
// its even and odd elements in fp32; int8 weights by integer dot products: x rounded once per call to int16 in
// blocks of 2048 (a step of max |x| / 32767; QuantX16 says what it costs), 16 weights at a time sign-extended
// to int16 and multiplied in by vpmaddwd, summed in int32 per block (24 layers of 2B matrices, emulated AVX2 on
// Zen 4, ms at M = 1 / 2 / 4 / 8: 51-53 / 57-60 / 88-98 / 174-189 with the former loop that converted 8 weights at
// a time to fp32 for FMAs, 49 / 47 / 63 / 118 with this; docs/performance.md, ninth round). Built for neither, a
// plain loop: correct, not fast (tests only).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "blocks.h"

namespace {

constexpr int64_t kVersion = 6;     // kernels/__init__.py KERNELS_VERSION: bumped when the ops change

#if defined(__AVX2__) && defined(__FMA__)      // the AVX2 builds and the AVX-512 ones (which have both)
// int8 weights (the AVX2 loop and the AVX-512 VNNI one): x rounded to int16 per block of kBlock16 elements of a row
// (blocks.h round_block: a step of max |x| / 32767 over the block), the first K - K % 16 elements of each row; zero
// rows up to MP. The error of an element is at most half a step, max |x| / 65534: below bf16's own rounding of every
// element larger than 1/128 of the block's largest. The integer sums are scaled into fp32 once per block and row
// pair, so a block of 2048 (one per row of K = 2048) costs little, 256 a lot where the 16 accumulators of 4 x 4
// rows spill: 24 layers of 2B matrices, Zen 4 (VNNI), ms at M = 8, blocks of 256 / 512 / 1024 / 2048 / 4096:
// 106-108 / 88-89 / 79 / 76-78 / 80-81, the VBMI bf16 path (-DINTERNVL_INT8_BF16) 95-97; emulated AVX2 at M = 8, 256
// against 2048: 113-118 / 108-110 (docs/performance.md, tenth round).
#ifndef INTERNVL_INT16_BLOCK
#define INTERNVL_INT16_BLOCK 2048
#endif
// vpmaddwd / vpdpwssd: per int32 lane sums of 2 * 127 * 32767 per 16 (ymm) or 32 (zmm) elements; at most 2^31 / (2 *
// 127 * 32767) = 258 of them: blocks up to 4096 elements are safe on both
constexpr int64_t kBlock16 = INTERNVL_INT16_BLOCK;
static_assert(kBlock16 % 32 == 0 && kBlock16 <= 4096, "int16 blocks: a multiple of 32, at most 4096");
struct QuantX16 {
  int64_t rows, K, body, blocks;   // rows of x (the rest zero padding)
  scratch<int16_t> q;
  std::vector<float> s;
  QuantX16(const bf16* x, int64_t M, int64_t MP, int64_t K_)
      : rows(M), K(K_), body(K_ - K_ % 16), blocks((body + kBlock16 - 1) / kBlock16), q(MP * K_, 0), s(MP * blocks, 0.f) {
    scratch<float> xf(K);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = 0; k < K; ++k) xf[k] = float(x[m * K + k]);
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t k0 = b * kBlock16, n = std::min(kBlock16, body - k0);
        s[m * blocks + b] = block_step(xf.data() + k0, n, 32767.f);
        round_block(xf.data() + k0, n, s[m * blocks + b], q.data() + m * K + k0);
      }
    }
  }
  // acc plus row m's last K % 16 products in fp32 from x itself (none for a padding row); w: the weight row
  float add_tail(float acc, const bf16* x, int64_t m, const int8_t* w) const {
    if (m < rows)
      for (int64_t k = body; k < K; ++k) acc += float(x[m * K + k]) * float(w[k]);
    return acc;
  }
};

#endif

#if defined(__AVX512BF16__)
// 32 weights from p as bf16 pairs (the last `n` < 32 masked: zeros beyond K add nothing). int8: sign-extended
// to int32, converted to fp32 (exact) and packed to bf16 (exact: |q| <= 127 has 7 significant bits).
inline __m512bh load32(const bf16* p) { return (__m512bh)_mm512_loadu_si512((const void*)p); }
inline __m512bh load32(const bf16* p, int64_t n) {
  return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), (const void*)p);
}
inline __m512bh widen(__m256i v) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
  return _mm512_cvtne2ps_pbh(hi, lo);     // elements 0-15 from lo, 16-31 from hi
}
inline __m512bh load32(const int8_t* p) { return widen(_mm256_loadu_si256((const __m256i*)p)); }
inline __m512bh load32(const int8_t* p, int64_t n) {
  return widen(_mm256_maskz_loadu_epi8((__mmask32)((1ull << n) - 1), (const void*)p));
}

// out[m][r] = sum_k x[m, k] * w[n0 + r, k] for MC rows of x and R rows of w (W: bf16 or int8); PF: prefetch.
template <int MC, int R, typename W, bool PF = true>
inline void dot_block(const bf16* x, int64_t K, const W* w, int64_t n0, float* out) {
  __m512 acc[MC][R];
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const W* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (n0 + r) * K;
  const int64_t body = K - K % 32;
  for (int64_t k = 0; k < body; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
      prefetch<PF>(wr[r] + k);
      wv[r] = load32(wr[r] + k);
    }
    for (int m = 0; m < MC; ++m) {
      const __m512bh xv = load32(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  if (body < K) {     // the last K % 32 elements
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load32(wr[r] + body, K - body);
    for (int m = 0; m < MC; ++m) {
      const __m512bh xv = load32(x + m * K + body, K - body);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) out[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
}

#if defined(__AVX512VNNI__)
// int8 weights with AVX-512 VNNI (Zen 4, Ice Lake+): x rounded to int16 (QuantX16, as the AVX2 loop), 32 weights at a
// time sign-extended to int16 (vpmovsxbw, once for all rows of x) and multiplied in by vpdpwssd, summed in int32 per
// block and scaled into fp32 by the block's step; the last K % 16 elements in fp32 from x itself. Against the VBMI
// table lookup into vdpbf16ps (below, -DINTERNVL_INT8_BF16): the same 32 products an instruction, without the 6
// instructions of widen64 per 64 weights and pass.
template <int MC, int R>
inline void dot_block_q16(const QuantX16& xq, const bf16* x, int64_t m0, const int8_t* q, int64_t n0, float* out) {
  const int64_t K = xq.K;
  __m512 acc[MC][R];
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const int8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = q + (n0 + r) * K;
  const int16_t* xr = xq.q.data() + m0 * K;
  for (int64_t b = 0; b < xq.blocks; ++b) {
    __m512i p[MC][R];
    for (int m = 0; m < MC; ++m)
      for (int r = 0; r < R; ++r) p[m][r] = _mm512_setzero_si512();
    auto step = [&](int64_t k, auto loadw, auto loadx) {
      __m512i wv[R];
      for (int r = 0; r < R; ++r) wv[r] = _mm512_cvtepi8_epi16(loadw(wr[r] + k));
      for (int m = 0; m < MC; ++m) {
        const __m512i xv = loadx(xr + m * K + k);
        for (int r = 0; r < R; ++r) p[m][r] = _mm512_dpwssd_epi32(p[m][r], xv, wv[r]);
      }
    };
    const int64_t k1 = std::min((b + 1) * kBlock16, xq.body);
    int64_t k = b * kBlock16;
    for (; k + 32 <= k1; k += 32) {
      if (k % 64 == 0)
        for (int r = 0; r < R; ++r) prefetch<true>(wr[r] + k);
      step(k, [](const int8_t* p) { return _mm256_loadu_si256((const __m256i*)p); },
           [](const int16_t* p) { return _mm512_loadu_si512((const void*)p); });
    }
    if (k < k1)     // the body's last 16 elements
      step(k, [](const int8_t* p) { return _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)p)); },
           [](const int16_t* p) { return _mm512_maskz_loadu_epi16((__mmask32)0xFFFF, (const void*)p); });
    for (int m = 0; m < MC; ++m) {
      const __m512 s = _mm512_set1_ps(xq.s[(m0 + m) * xq.blocks + b]);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p[m][r]), s, acc[m][r]);
    }
  }
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) out[m * R + r] = xq.add_tail(_mm512_reduce_add_ps(acc[m][r]), x, m0 + m, wr[r]);
}
#endif

#if defined(__AVX512VBMI__)
// int8 weights with AVX512-VBMI: 64 at a time widened to bf16 by table lookups, 2.3x the rate of the
// sign-extend + convert + pack of load32 (in L1, one Zen 4 core: 41.8 against 18.2 weights/ns; bf16 weights
// 82). The bf16 of |q| <= 127 is looked up byte by byte (vpermi2b: its high and its low byte, 128-entry
// tables), q's sign ORed into the high byte, the bytes interleaved into 16-bit lanes (vpunpck{l,h}bw: within
// 128-bit lanes, so the 64 weights come out in the order of `permute64`, and x is permuted alike once per call).
struct Bf16Table {
  alignas(64) uint8_t hi[128], lo[128];
  Bf16Table() {
    for (int a = 0; a < 128; ++a) {
      const uint16_t b = bf16(float(a)).x;
      hi[a] = uint8_t(b >> 8);
      lo[a] = uint8_t(b & 0xFF);
    }
  }
};
const Bf16Table kTable;

inline void widen64(__m512i q, const __m512i* t, __m512bh& wa, __m512bh& wb) {
  const __m512i a = _mm512_abs_epi8(q);
  __m512i hi = _mm512_permutex2var_epi8(t[0], a, t[1]);
  const __m512i lo = _mm512_permutex2var_epi8(t[2], a, t[3]);
  hi = _mm512_ternarylogic_epi32(hi, q, _mm512_set1_epi8((char)0x80), 0xF8);   // hi | (q & 0x80)
  wa = (__m512bh)_mm512_unpacklo_epi8(lo, hi);
  wb = (__m512bh)_mm512_unpackhi_epi8(lo, hi);
}

// out[m][r] = sum_k x[m, k] * q[n0 + r, k]; xp: MC rows of x permuted per 64 elements, Kp (K rounded up to 64,
// zeros beyond K) per row.
template <int MC, int R>
inline void dot_block_q(const bf16* xp, int64_t Kp, int64_t K, const int8_t* q, int64_t n0, float* out) {
  const __m512i t[4] = {_mm512_load_si512(kTable.hi), _mm512_load_si512(kTable.hi + 64),
                        _mm512_load_si512(kTable.lo), _mm512_load_si512(kTable.lo + 64)};
  __m512 acc[MC][R];
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const int8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = q + (n0 + r) * K;
  auto step = [&](int64_t k, auto load) {
    for (int r = 0; r < R; ++r) {
      __m512bh wa, wb;
      prefetch<true>(wr[r] + k);
      widen64(load(wr[r] + k), t, wa, wb);
      for (int m = 0; m < MC; ++m) {
        const bf16* xm = xp + m * Kp + k;
        acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)_mm512_loadu_si512((const void*)xm), wa);
        acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)_mm512_loadu_si512((const void*)(xm + 32)), wb);
      }
    }
  };
  const int64_t body = K - K % 64;
  for (int64_t k = 0; k < body; k += 64) step(k, [](const int8_t* p) { return _mm512_loadu_si512((const void*)p); });
  if (body < K) {     // the last K % 64 weights, masked (x is zero there too)
    const __mmask64 mask = (__mmask64)((1ull << (K - body)) - 1);
    step(body, [mask](const int8_t* p) { return _mm512_maskz_loadu_epi8(mask, (const void*)p); });
  }
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) out[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
}
#endif

template <int MC, int R, bool PF>
inline void rows_block(const bf16* x, int64_t M, int64_t K, const bf16* w, int64_t n0, float* out) {
  // rows of x MC at a time; the rest (M % MC) one at a time. out: [M][R]
  int64_t m0 = 0;
  for (; m0 + MC <= M; m0 += MC) dot_block<MC, R, bf16, PF>(x + m0 * K, K, w, n0, out + m0 * R);
  for (; m0 < M; ++m0) dot_block<1, R, bf16, PF>(x + m0 * K, K, w, n0, out + m0 * R);
}

// Software prefetch from 3 rows: at 1-2 the hardware prefetchers keep up (24 layers of 2B bf16 matrices, ms at
// M = 1 / 2 / 4 / 8: without 96-109 / 105-107 / 140-147 / 183-188, 32 KB ahead 117-121 / 113-125 / 122-125 /
// 120-130, 64 KB ahead 110 / 97 / 112 / 109)
// At 8 rows two passes of 4 over blocks of 4 weight rows (the second from L1/L2) beat one pass of all 8 rows:
// 24 layers of 2B matrices, Zen 4, 92-105 ms against 127-140 (blocks of 2 weight rows) and 117-119 (3).
template <int R>
inline void weight_block(const bf16* x, int64_t M, int64_t K, const bf16* w, int64_t n0, float* out) {
  if (M <= 2) {
    rows_block<2, R, false>(x, M, K, w, n0, out);
  } else {
    rows_block<4, R, true>(x, M, K, w, n0, out);
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
// out[m][r] = sum_k x[m, k] * w[n0 + r, k]; xe / xo: x's even / odd elements in fp32, K2 = K / 2 per row.
template <int MC, int R>
inline void dot_block(const bf16* x, const float* xe, const float* xo, int64_t K, int64_t K2, const bf16* w,
                      int64_t n0, float* out) {
  __m256 acc[MC][R];
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const bf16* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (n0 + r) * K;
  const __m256i high = _mm256_set1_epi32((int)0xFFFF0000);
  const int64_t body = K - K % 16;
  for (int64_t k = 0; k < body; k += 16) {
    __m256 we[R], wo[R];
    if (k % 32 == 0)
      for (int r = 0; r < R; ++r) prefetch<true>(wr[r] + k);
    for (int r = 0; r < R; ++r) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(wr[r] + k));
      we[r] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      wo[r] = _mm256_castsi256_ps(_mm256_and_si256(v, high));
    }
    for (int m = 0; m < MC; ++m) {
      const __m256 e = _mm256_loadu_ps(xe + m * K2 + k / 2), o = _mm256_loadu_ps(xo + m * K2 + k / 2);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(o, wo[r], _mm256_fmadd_ps(e, we[r], acc[m][r]));
    }
  }
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t k = body; k < K; ++k) s += float(x[m * K + k]) * float(wr[r][k]);
      out[m * R + r] = s;
    }
}

// out[m][r] = sum_k x[m, k] * q[n0 + r, k] for MC rows of x from row m0: 16 weights at a time sign-extended to int16
// (once for all rows of x) and multiplied into xq with vpmaddwd, summed in int32 per block and scaled into fp32 by
// the block's step; the last K % 16 elements in fp32 from x itself.
template <int MC, int R>
inline void dot_block_q(const QuantX16& xq, const bf16* x, int64_t m0, const int8_t* q, int64_t n0, float* out) {
  const int64_t K = xq.K;
  __m256 acc[MC][R];
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const int8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = q + (n0 + r) * K;
  const int16_t* xr = xq.q.data() + m0 * K;
  for (int64_t b = 0; b < xq.blocks; ++b) {
    __m256i p[MC][R];
    for (int m = 0; m < MC; ++m)
      for (int r = 0; r < R; ++r) p[m][r] = _mm256_setzero_si256();
    for (int64_t k = b * kBlock16; k < std::min((b + 1) * kBlock16, xq.body); k += 16) {
      __m256i wv[R];
      if (k % 64 == 0)
        for (int r = 0; r < R; ++r) prefetch<true>(wr[r] + k);
      for (int r = 0; r < R; ++r) wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wr[r] + k)));
      for (int m = 0; m < MC; ++m) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xr + m * K + k));
        for (int r = 0; r < R; ++r) p[m][r] = _mm256_add_epi32(p[m][r], _mm256_madd_epi16(xv, wv[r]));
      }
    }
    for (int m = 0; m < MC; ++m) {
      const __m256 step = _mm256_set1_ps(xq.s[(m0 + m) * xq.blocks + b]);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[m][r]), step, acc[m][r]);
    }
  }
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) out[m * R + r] = xq.add_tail(hsum(acc[m][r]), x, m0 + m, wr[r]);
}
#endif

// Built for neither ISA: one weight row at a time, plainly (tests only).
template <typename W>
void plain(const bf16* x, int64_t M, int64_t K, const W* w, int64_t N, const bf16* b, const float* s, bf16* y) {
  for_weight_blocks(M, N, 1, b, s, y, [&](int64_t n, int64_t, float* acc) {
    for (int64_t m = 0; m < M; ++m) {
      float t = 0.f;
      for (int64_t k = 0; k < K; ++k) t += float(x[m * K + k]) * float(w[n * K + k]);
      acc[m] = t;
    }
  });
}

void compute(const bf16* x, int64_t M, int64_t K, const bf16* w, int64_t N, const bf16* b, bf16* y) {
#if defined(__AVX512BF16__)
  // R = 8 weight rows per block for 1-2 rows of x (more streams in flight), 4 for 3-8 (registers).
  for_weight_blocks(M, N, M <= 2 ? 8 : 4, b, nullptr, y, [&](int64_t n0, int64_t count, float* acc) {
    if (count == 8) {
      weight_block<8>(x, M, K, w, n0, acc);
    } else if (count == 4) {
      weight_block<4>(x, M, K, w, n0, acc);
    } else {
      weight_block<1>(x, M, K, w, n0, acc);
    }
  });
#elif defined(__AVX2__) && defined(__FMA__)
  // 16 ymm registers: R = 4 weight rows for one row of x, R = 2 for x taken 4 rows at a time.
  const int64_t K2 = K / 2;
  scratch<float> xe(M * K2), xo(M * K2);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < K2; ++i) {
      xe[m * K2 + i] = float(x[m * K + 2 * i]);
      xo[m * K2 + i] = float(x[m * K + 2 * i + 1]);
    }
  auto rows = [&](auto mc, auto r, int64_t n0, float* acc) {
    constexpr int MC = decltype(mc)::value, RR = decltype(r)::value;
    int64_t m0 = 0;
    for (; m0 + MC <= M; m0 += MC)
      dot_block<MC, RR>(x + m0 * K, xe.data() + m0 * K2, xo.data() + m0 * K2, K, K2, w, n0, acc + m0 * RR);
    for (; m0 < M; ++m0)
      dot_block<1, RR>(x + m0 * K, xe.data() + m0 * K2, xo.data() + m0 * K2, K, K2, w, n0, acc + m0 * RR);
  };
  using one = std::integral_constant<int, 1>;
  using two = std::integral_constant<int, 2>;
  using four = std::integral_constant<int, 4>;
  for_weight_blocks(M, N, M == 1 ? 4 : 2, b, nullptr, y, [&](int64_t n0, int64_t count, float* acc) {
    if (count == 4) {
      rows(one{}, four{}, n0, acc);
    } else if (count == 2) {
      rows(four{}, two{}, n0, acc);
    } else {
      rows(one{}, one{}, n0, acc);
    }
  });
#else
  plain(x, M, K, w, N, b, nullptr, y);
#endif
}

void compute_int8(const bf16* x, int64_t M, int64_t K, const int8_t* q, const float* s, int64_t N, const bf16* b,
                  bf16* y) {
#if defined(__AVX512BF16__)
  // 8 weight rows per block for 1-2 rows of x, 4 for 4 and 8 (MC x R accumulators in 32 zmm registers)
  const int64_t MP = padded_rows(M);
#if defined(__AVX512VNNI__) && !defined(INTERNVL_INT8_BF16)
  const QuantX16 xq(x, M, MP, K);
  row_blocks<8, 4>(M, N, xq.q.data(), K, b, s, y, [&](auto mc, auto r, const int16_t* xr, int64_t n0, float* out) {
    dot_block_q16<decltype(mc)::value, decltype(r)::value>(xq, x, (xr - xq.q.data()) / K, q, n0, out);
  });
#elif defined(__AVX512VBMI__)
  const int64_t Kp = (K + 63) / 64 * 64;
  scratch<bf16> xp(MP * Kp, bf16(0.f));      // x permuted like widen64's weights, zero rows up to MP
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xp[m * Kp + k / 64 * 64 + permute64(k % 64)] = x[m * K + k];
  row_blocks<8, 4>(M, N, xp.data(), Kp, b, s, y, [&](auto mc, auto r, const bf16* xr, int64_t n0, float* out) {
    dot_block_q<decltype(mc)::value, decltype(r)::value>(xr, Kp, K, q, n0, out);
  });
#else
  scratch<bf16> xp(MP * K, bf16(0.f));
  std::copy(x, x + M * K, xp.begin());
  row_blocks<8, 4>(M, N, xp.data(), K, b, s, y, [&](auto mc, auto r, const bf16* xr, int64_t n0, float* out) {
    dot_block<decltype(mc)::value, decltype(r)::value>(xr, K, q, n0, out);
  });
#endif
#elif defined(__AVX2__) && defined(__FMA__)
  // x once as int16 (zero rows up to MP); 4 weight rows per block for 1-2 rows of x, 2 for 4 and 8
  const QuantX16 xq(x, M, padded_rows(M), K);
  row_blocks<4, 2>(M, N, xq.q.data(), K, b, s, y, [&](auto mc, auto r, const int16_t* xr, int64_t n0, float* out) {
    dot_block_q<decltype(mc)::value, decltype(r)::value>(xq, x, (xr - xq.q.data()) / K, q, n0, out);
  });
#else
  plain(x, M, K, q, N, b, s, y);
#endif
}

void check(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "internvl::small_m_linear takes bf16 x and w, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(w.dim() == 2 && x.dim() >= 1 && x.size(-1) == w.size(1),
              "internvl::small_m_linear: x [..., K] and w [N, K], got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.numel() / std::max<int64_t>(x.size(-1), 1) <= kMaxRows,
              "internvl::small_m_linear takes at most ", kMaxRows, " rows, got x ", x.sizes());
  TORCH_CHECK(!b || (b->scalar_type() == at::kBFloat16 && b->dim() == 1 && b->size(0) == w.size(0)),
              "internvl::small_m_linear: bias must be bf16 [N]");
}

at::Tensor small_m_linear_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  check(x, w, b);
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const std::optional<at::Tensor> bc = b ? std::optional<at::Tensor>(b->contiguous()) : std::nullopt;
  at::Tensor y = at::empty(out_shape(x, w.size(0)), x.options());
  const int64_t K = w.size(1), N = w.size(0), M = K ? xc.numel() / K : 0;
  if (M == 0 || N == 0) return y;
  compute(xc.const_data_ptr<bf16>(), M, K, wc.const_data_ptr<bf16>(), N,
          bc ? bc->const_data_ptr<bf16>() : nullptr, y.mutable_data_ptr<bf16>());
  return y;
}

at::Tensor small_m_linear_meta(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  check(x, w, b);
  return at::empty(out_shape(x, w.size(0)), x.options());
}

void check_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const std::optional<at::Tensor>& b) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && q.scalar_type() == at::kChar && s.scalar_type() == at::kFloat,
              "internvl::small_m_linear_int8 takes bf16 x, int8 q and fp32 scales, got ", x.scalar_type(), ", ",
              q.scalar_type(), " and ", s.scalar_type());
  TORCH_CHECK(q.dim() == 2 && x.dim() >= 1 && x.size(-1) == q.size(1) && s.dim() == 1 && s.size(0) == q.size(0),
              "internvl::small_m_linear_int8: x [..., K], q [N, K] and s [N], got ", x.sizes(), ", ", q.sizes(),
              " and ", s.sizes());
  TORCH_CHECK(x.numel() / std::max<int64_t>(x.size(-1), 1) <= kMaxRows,
              "internvl::small_m_linear_int8 takes at most ", kMaxRows, " rows, got x ", x.sizes());
  TORCH_CHECK(!b || (b->scalar_type() == at::kBFloat16 && b->dim() == 1 && b->size(0) == q.size(0)),
              "internvl::small_m_linear_int8: bias must be bf16 [N]");
}

at::Tensor small_m_linear_int8_cpu(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s,
                                   const std::optional<at::Tensor>& b) {
  check_int8(x, q, s, b);
  const at::Tensor xc = x.contiguous(), qc = q.contiguous(), sc = s.contiguous();
  const std::optional<at::Tensor> bc = b ? std::optional<at::Tensor>(b->contiguous()) : std::nullopt;
  at::Tensor y = at::empty(out_shape(x, q.size(0)), x.options());
  const int64_t K = q.size(1), N = q.size(0), M = K ? xc.numel() / K : 0;
  if (M == 0 || N == 0) return y;
  compute_int8(xc.const_data_ptr<bf16>(), M, K, qc.const_data_ptr<int8_t>(), sc.const_data_ptr<float>(), N,
               bc ? bc->const_data_ptr<bf16>() : nullptr, y.mutable_data_ptr<bf16>());
  return y;
}

at::Tensor small_m_linear_int8_meta(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s,
                                    const std::optional<at::Tensor>& b) {
  check_int8(x, q, s, b);
  return at::empty(out_shape(x, q.size(0)), x.options());
}

int64_t kernels_version() { return kVersion; }

}  // namespace

TORCH_LIBRARY(internvl, m) {
  m.def("small_m_linear(Tensor x, Tensor w, Tensor? b=None) -> Tensor");
  m.def("small_m_linear_int8(Tensor x, Tensor q, Tensor s, Tensor? b=None) -> Tensor");
  m.def("kernels_version() -> int", &kernels_version);
}

TORCH_LIBRARY_IMPL(internvl, CPU, m) {
  m.impl("small_m_linear", &small_m_linear_cpu);
  m.impl("small_m_linear_int8", &small_m_linear_int8_cpu);
}
TORCH_LIBRARY_IMPL(internvl, Meta, m) {
  m.impl("small_m_linear", &small_m_linear_meta);
  m.impl("small_m_linear_int8", &small_m_linear_int8_meta);
}
