// internvl::linear_fp32(x, w, b?): y[..., N] = x[..., K] @ w[N, K]^T (+ b) for any number of rows, w bf16, x, b and
// y bf16 or fp32, every product and sum in fp32: the compute-bound linears (vision, prefill chunks) of graphs for a
// target without native bf16 (compile/passes/fp32_gemm.py). internvl::linear_fp32_int8(x, q, s, b?) and
// linear_fp32_int4(x, q, s, group, b?): the same over weight-only int8 / int4 weights (int8_weights.py,
// int4_weights.py; dequantised exactly to fp32 while packed). There PyTorch's bf16 GEMM has no fast path and the pass
// used to convert weight slices to fp32 for MKL's sgemm: 136-186 GFLOP/s at the 2B's prefill shapes against a 2-core
// FMA peak of 216-222 (emulated AVX2 on a Zen 4); this GEMM converts each weight once per call while packing it and
// reaches 178-218 (docs/performance.md, eleventh round).
//
// The loops are those of BLIS (Van Zee and van de Geijn, "BLIS: A Framework for Rapidly Instantiating BLAS
// Functionality", 2015), with the weights as the packed "B" side:
// - x is packed once per call into fp32 panels of kMR rows ([panel][K][kMR], zero rows past M), shared by the threads;
// - the threads take blocks of kNC output columns; each packs its block's weights for all of K into fp32 micro-panels
//   of kNR columns ([K][kNR] per micro-panel: 8 weights of 8 rows widened, scaled, and transposed in registers);
// - for each block of kMC rows and each kKC slice of K, every micro-panel (kKC x kNR x 4 bytes, in L1) is multiplied
//   into every kMR-row panel of the row block (kMC x kKC x 4 bytes, in L2) by the micro-kernel, a 6 x kNR tile of
//   fp32 sums in 12 vector registers (2 FMAs per broadcast element of x), added into an fp32 tile of the row block
//   (kMC x kNC, in L2) that becomes y, + b, rounded to y's dtype, after the last slice of K.
// Up to 8 rows of x (decode batches of fp32 graphs with QUANT) skip the packing: small_m below.
// Built for AVX2 + FMA (6 x 16 in ymm) and AVX-512 (6 x 32 in zmm: the x86-64-v4 target, AVX-512 without native bf16
// (Skylake-SP, Ice Lake), calls this op too, and its cores with two 512-bit FMA units do twice a ymm loop's FLOPs a
// cycle; the packing stays ymm), else a plain loop: correct, not fast (tests only).
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

#ifndef INTERNVL_GEMM_MC
#define INTERNVL_GEMM_MC 144
#endif
#ifndef INTERNVL_GEMM_NC
#define INTERNVL_GEMM_NC 256
#endif
#ifndef INTERNVL_GEMM_KC
#define INTERNVL_GEMM_KC 256
#endif
// The micro-kernel's vector: a tile row is two of them (kNR columns).
#if defined(__AVX512F__)
using Vec = __m512;
constexpr int64_t kLanes = 16;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_load_ps(p); }
inline Vec vset1(float v) { return _mm512_set1_ps(v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline void vstore(float* p, Vec v) { _mm512_store_ps(p, v); }
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int64_t kLanes = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_load_ps(p); }
inline Vec vset1(float v) { return _mm256_set1_ps(v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline void vstore(float* p, Vec v) { _mm256_store_ps(p, v); }
#else
constexpr int64_t kLanes = 8;
#endif
constexpr int64_t kNR = 2 * kLanes;
constexpr int64_t kMR = 6, kMC = INTERNVL_GEMM_MC, kNC = INTERNVL_GEMM_NC, kKC = INTERNVL_GEMM_KC;
static_assert(kMC % kMR == 0 && kNC % kNR == 0 && kKC % 8 == 0, "GEMM blocks: MC of whole panels, NC of micro-panels");

// Scratch buffers per thread (slot 0: packed x, in the calling thread; 1, 2: a worker's packed weights and tile),
// grown to the largest size asked and kept: fresh pages on every call cost more than the packing (compile/passes/
// fp32_gemm.py's docstring), and the OpenMP threads live as long as the process (the largest M x K floats in the
// caller: 16.8 MB for 4 vision tiles; kNC x K in each worker: 8 MB at the 2B's K = 8192).
template <typename T>
T* thread_scratch(int slot, size_t n) {
  thread_local scratch<T> buf[3];
  if (buf[slot].size() < n) {
    buf[slot] = scratch<T>();
    buf[slot].resize(n);
  }
  return buf[slot].data();
}

template <typename X>
inline float to_float(X v) { return float(v); }

// x rows [0, M) -> ap[panel][k][kMR], rows past M zero.
template <typename X>
void pack_x(const X* x, int64_t M, int64_t K, float* ap) {
  const int64_t panels = (M + kMR - 1) / kMR;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* dst = ap + p * K * kMR;
      for (int64_t i = 0; i < kMR; ++i) {
        const int64_t m = p * kMR + i;
        if (m < M) {
          const X* row = x + m * K;
          for (int64_t k = 0; k < K; ++k) dst[k * kMR + i] = to_float(row[k]);
        } else {
          for (int64_t k = 0; k < K; ++k) dst[k * kMR + i] = 0.f;
        }
      }
    }
  });
}

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 widen8(const bf16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// r[i] (8 elements of row i) -> r[j] (element j of every row)
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#endif

// The weight formats, as row n's weight k (fp32, scaled) and, on AVX2, its 8 weights from k (k a multiple of 8).
// bf16: the artifact's weights (a bf16 is the top half of an fp32).
struct Bf16Weights {
  const bf16* w;
  int64_t K;
  float at(int64_t n, int64_t k) const { return float(w[n * K + k]); }
#if defined(__AVX2__) && defined(__FMA__)
  __m256 load8(int64_t n, int64_t k) const { return widen8(w + n * K + k); }
#endif
};
// int8 (compile/passes/int8_weights.py): q [N, K] in [-127, 127], an fp32 scale per row: w = q * s[n].
struct Int8Weights {
  const int8_t* q;
  const float* s;
  int64_t K;
  float at(int64_t n, int64_t k) const { return float(q[n * K + k]) * s[n]; }
#if defined(__AVX2__) && defined(__FMA__)
  __m256 load8(int64_t n, int64_t k) const {
    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + n * K + k)));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(s[n]));
  }
#endif
};
// int4 (compile/passes/int4_weights.py, docs/CONTRACTS.md): q [N, K / 2], a 64-weight chunk in 32 bytes, byte j
// holding weight j in its low nibble and 32 + j in its high one, each the value + 8; s [N, K / group], group a
// multiple of 64: w = (nibble - 8) * s[n, k / group]. 8 weights from a multiple of 8 share a half-chunk and a group.
struct Int4Weights {
  const uint8_t* q;
  const float* s;
  int64_t K, group;
  float at(int64_t n, int64_t k) const {
    const uint8_t byte = q[n * (K / 2) + k / 64 * 32 + k % 32];
    return float(int(k % 64 < 32 ? byte & 0x0F : byte >> 4) - 8) * s[n * (K / group) + k / group];
  }
#if defined(__AVX2__) && defined(__FMA__)
  __m256 load8(int64_t n, int64_t k) const {
    __m128i v = _mm_loadl_epi64((const __m128i*)(q + n * (K / 2) + k / 64 * 32 + k % 32));
    if (k % 64 >= 32) v = _mm_srli_epi16(v, 4);
    const __m256i nib = _mm256_cvtepu8_epi32(_mm_and_si128(v, _mm_set1_epi8(0x0F)));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(nib, _mm256_set1_epi32(8))),
                         _mm256_set1_ps(s[n * (K / group) + k / group]));
  }
#endif
};

// Weight rows [n0, n0 + cols) (cols <= kNR; the rest of the micro-panel zero) -> bp[k][kNR] in fp32, for all of K.
// 8 rows at a time along all of K, not all kNR rows in step: 32 rows read side by side (the zmm build's micro-panel)
// packed 20-30% slower at 9-48 rows of x, where the packing is a large share (Zen 4, 2 threads, K = 2048, N = 8192,
// GFLOP/s at M = 9 / 16 / 48: 59-62 / 92-93 / 143-157 in step, 78-88 / 109-125 / 167-181 8 rows at a time; the ymm
// build's 16 rows 63-74 / 96-121 / 163-174).
template <typename W>
void pack_w(const W& w, int64_t K, int64_t n0, int64_t cols, float* bp) {
  int64_t k = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (cols == kNR) {
    const int64_t k8 = K / 8 * 8;
    for (int64_t h = 0; h < kNR; h += 8)
      for (k = 0; k < k8; k += 8) {
        __m256 r[8];
        for (int64_t i = 0; i < 8; ++i) r[i] = w.load8(n0 + h + i, k);
        transpose8(r);
        for (int64_t i = 0; i < 8; ++i) _mm256_store_ps(bp + (k + i) * kNR + h, r[i]);
      }
  }
#endif
  for (; k < K; ++k)
    for (int64_t j = 0; j < kNR; ++j) bp[k * kNR + j] = j < cols ? w.at(n0 + j, k) : 0.f;
}

// c[kMR][ldc] (+)= a[kc][kMR] @ b[kc][kNR]: the micro-kernel.
inline void micro(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, bool first) {
#if defined(__AVX2__) && defined(__FMA__)
  // 12 accumulators in registers (the loops over rows unrolled: GCC keeps the array out of memory)
  Vec acc[kMR][2];
#pragma GCC unroll 6
  for (int64_t i = 0; i < kMR; ++i) acc[i][0] = acc[i][1] = vzero();
  for (int64_t k = 0; k < kc; ++k, a += kMR, b += kNR) {
    const Vec b0 = vload(b), b1 = vload(b + kLanes);
#pragma GCC unroll 6
    for (int64_t i = 0; i < kMR; ++i) {
      const Vec x = vset1(a[i]);
      acc[i][0] = vfma(x, b0, acc[i][0]);
      acc[i][1] = vfma(x, b1, acc[i][1]);
    }
  }
  for (int64_t i = 0; i < kMR; ++i)
    for (int64_t h = 0; h < 2; ++h) {
      float* p = c + i * ldc + h * kLanes;
      vstore(p, first ? acc[i][h] : vadd(vload(p), acc[i][h]));
    }
#else
  float t[kMR][kNR] = {};
  for (int64_t k = 0; k < kc; ++k)
    for (int64_t i = 0; i < kMR; ++i)
      for (int64_t j = 0; j < kNR; ++j) t[i][j] += a[k * kMR + i] * b[k * kNR + j];
  for (int64_t i = 0; i < kMR; ++i)
    for (int64_t j = 0; j < kNR; ++j) c[i * ldc + j] = first ? t[i][j] : c[i * ldc + j] + t[i][j];
#endif
}

template <typename Y>
inline Y from_float(float v) { return Y(v); }   // bf16: rounded to nearest even (c10::BFloat16)

// kSmallM rows of x or fewer (the decode batches of fp32 graphs with QUANT, kernels.gemm_takes): no packing; each
// weight row is read once for all rows of x, 8 weights at a time converted in registers (W::load8), one fp32 sum a row
// of x. Packing every weight into fp32 panels cost more than the products there: 2B fp32 + int8, 2 threads, a decode
// step at batch 4 / 8 348-457 / 472-561 ms packed, 199-206 / 333-375 unpacked (docs/performance.md, twelfth round).
constexpr int64_t kSmallM = 8;

template <int R, typename W>
void small_m_rows(const float* xf, int64_t K, const W& w, int64_t n, float* sums) {
  int64_t k = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[R];
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m) acc[m] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = w.load8(n, k);
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xf + m * K + k), wv, acc[m]);
  }
  for (int m = 0; m < R; ++m) sums[m] = hsum(acc[m]);
#else
  for (int m = 0; m < R; ++m) sums[m] = 0.f;
#endif
  for (; k < K; ++k) {
    const float wk = w.at(n, k);
    for (int m = 0; m < R; ++m) sums[m] += xf[m * K + k] * wk;
  }
}

template <int R, typename X, typename W>
void small_m(const float* xf, int64_t K, const W& w, int64_t N, const X* b, X* y) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    float sums[R];
    for (int64_t n = n0; n < n1; ++n) {
      small_m_rows<R>(xf, K, w, n, sums);
      for (int m = 0; m < R; ++m) y[m * N + n] = from_float<X>(sums[m] + (b ? to_float(b[n]) : 0.f));
    }
  });
}

template <typename X, typename W>
void small_m_any(const X* x, int64_t M, int64_t K, const W& w, int64_t N, const X* b, X* y) {
  const float* xf;
  if constexpr (std::is_same_v<X, float>) {
    xf = x;
  } else {
    float* t = thread_scratch<float>(0, size_t(M * K));
    for (int64_t i = 0; i < M * K; ++i) t[i] = to_float(x[i]);
    xf = t;
  }
  switch (M) {
    case 1: return small_m<1>(xf, K, w, N, b, y);
    case 2: return small_m<2>(xf, K, w, N, b, y);
    case 3: return small_m<3>(xf, K, w, N, b, y);
    case 4: return small_m<4>(xf, K, w, N, b, y);
    case 5: return small_m<5>(xf, K, w, N, b, y);
    case 6: return small_m<6>(xf, K, w, N, b, y);
    case 7: return small_m<7>(xf, K, w, N, b, y);
    default: return small_m<8>(xf, K, w, N, b, y);
  }
}

template <typename X, typename W>
void gemm(const X* x, int64_t M, int64_t K, const W& w, int64_t N, const X* b, X* y) {
  if (K == 0) {     // an empty sum: y = b
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * N + n] = b ? b[n] : from_float<X>(0.f);
    return;
  }
  if (M <= kSmallM) return small_m_any(x, M, K, w, N, b, y);
  const int64_t panels = (M + kMR - 1) / kMR;
  float* ap = thread_scratch<float>(0, size_t(panels * kMR * K));
  pack_x(x, M, K, ap);
  const int64_t col_blocks = (N + kNC - 1) / kNC;
  at::parallel_for(0, col_blocks, 1, [&](int64_t j0, int64_t j1) {
    float* bp = thread_scratch<float>(1, size_t(kNC * K));
    float* ct = thread_scratch<float>(2, size_t(kMC * kNC));
    for (int64_t jb = j0; jb < j1; ++jb) {
      const int64_t n0 = jb * kNC, nc = std::min(kNC, N - n0), micro_panels = (nc + kNR - 1) / kNR;
      for (int64_t jr = 0; jr < micro_panels; ++jr)
        pack_w(w, K, n0 + jr * kNR, std::min(kNR, nc - jr * kNR), bp + jr * K * kNR);
      for (int64_t p0 = 0; p0 < panels; p0 += kMC / kMR) {
        const int64_t p1 = std::min(panels, p0 + kMC / kMR);
        for (int64_t k0 = 0; k0 < K; k0 += kKC) {
          const int64_t kc = std::min(kKC, K - k0);
          for (int64_t jr = 0; jr < micro_panels; ++jr)
            for (int64_t p = p0; p < p1; ++p)
              micro(ap + (p * K + k0) * kMR, bp + (jr * K + k0) * kNR, kc, ct + (p - p0) * kMR * kNC + jr * kNR,
                    kNC, k0 == 0);
        }
        const int64_t m0 = p0 * kMR, m1 = std::min(M, p1 * kMR);
        for (int64_t m = m0; m < m1; ++m) {
          const float* src = ct + (m - m0) * kNC;
          X* dst = y + m * N + n0;
          for (int64_t j = 0; j < nc; ++j) dst[j] = from_float<X>(src[j] + (b ? to_float(b[n0 + j]) : 0.f));
        }
      }
    }
  });
}

// x [..., K] bf16 or fp32 (y and b alike); the weights' own checks are the caller's.
void check_x(const char* op, const at::Tensor& x, int64_t K, int64_t N, const std::optional<at::Tensor>& b) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "internvl::", op,
              " takes bf16 or fp32 x, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "internvl::", op, ": x [..., K] with K = ", K, ", got ", x.sizes());
  TORCH_CHECK(!b || (b->scalar_type() == x.scalar_type() && b->dim() == 1 && b->size(0) == N), "internvl::", op,
              ": bias must be [N] in x's dtype");
}

// y = x @ w^T (+ b) in x's dtype; make(K) builds the weight source.
template <typename Make>
at::Tensor run(const at::Tensor& x, int64_t K, int64_t N, const std::optional<at::Tensor>& b, const Make& make) {
  const at::Tensor xc = x.contiguous();
  const std::optional<at::Tensor> bc = b ? std::optional<at::Tensor>(b->contiguous()) : std::nullopt;
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  const int64_t M = y.numel() / std::max<int64_t>(N, 1);
  if (M == 0 || N == 0) return y;
  if (x.scalar_type() == at::kBFloat16) {
    gemm(xc.const_data_ptr<bf16>(), M, K, make(), N, bc ? bc->const_data_ptr<bf16>() : nullptr,
         y.mutable_data_ptr<bf16>());
  } else {
    gemm(xc.const_data_ptr<float>(), M, K, make(), N, bc ? bc->const_data_ptr<float>() : nullptr,
         y.mutable_data_ptr<float>());
  }
  return y;
}

at::Tensor linear_fp32_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2,
              "internvl::linear_fp32 takes bf16 weights [N, K], got ", w.scalar_type(), " ", w.sizes());
  check_x("linear_fp32", x, w.size(1), w.size(0), b);
  const at::Tensor wc = w.contiguous();
  return run(x, w.size(1), w.size(0), b, [&] { return Bf16Weights{wc.const_data_ptr<bf16>(), w.size(1)}; });
}

at::Tensor linear_fp32_int8_cpu(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s,
                                const std::optional<at::Tensor>& b) {
  TORCH_CHECK(q.scalar_type() == at::kChar && s.scalar_type() == at::kFloat && q.dim() == 2 && s.dim() == 1 &&
                  s.size(0) == q.size(0),
              "internvl::linear_fp32_int8: int8 q [N, K] and fp32 s [N], got ", q.scalar_type(), " ", q.sizes(),
              " and ", s.scalar_type(), " ", s.sizes());
  check_x("linear_fp32_int8", x, q.size(1), q.size(0), b);
  const at::Tensor qc = q.contiguous(), sc = s.contiguous();
  return run(x, q.size(1), q.size(0), b, [&] {
    return Int8Weights{qc.const_data_ptr<int8_t>(), sc.const_data_ptr<float>(), q.size(1)};
  });
}

at::Tensor linear_fp32_int4_cpu(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, int64_t group,
                                const std::optional<at::Tensor>& b) {
  check_int4_weights("linear_fp32_int4", q, s, group);
  const int64_t K = 2 * q.size(1);
  check_x("linear_fp32_int4", x, K, q.size(0), b);
  const at::Tensor qc = q.contiguous(), sc = s.contiguous();
  return run(x, K, q.size(0), b, [&] {
    return Int4Weights{qc.const_data_ptr<uint8_t>(), sc.const_data_ptr<float>(), K, group};
  });
}

// The shapes symbolically: a prefill graph's chunk length is a dynamic dimension (compile/export.py), which
// sizes() would specialise to its example value. n: the weights' rows.
at::Tensor meta_out(const at::Tensor& x, const c10::SymInt& n) {
  TORCH_CHECK(x.dim() >= 1 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "internvl::linear_fp32*: bf16 or fp32 x [..., K]");
  std::vector<c10::SymInt> shape(x.sym_sizes().begin(), x.sym_sizes().end());
  shape.back() = n;
  return at::empty_symint(shape, x.options());
}
at::Tensor linear_fp32_meta(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>&) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2, "internvl::linear_fp32 takes bf16 weights [N, K]");
  return meta_out(x, w.sym_size(0));
}
at::Tensor linear_fp32_int8_meta(const at::Tensor& x, const at::Tensor& q, const at::Tensor&,
                                 const std::optional<at::Tensor>&) {
  return meta_out(x, q.sym_size(0));
}
at::Tensor linear_fp32_int4_meta(const at::Tensor& x, const at::Tensor& q, const at::Tensor&, int64_t,
                                 const std::optional<at::Tensor>&) {
  return meta_out(x, q.sym_size(0));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(internvl, m) {
  m.def("linear_fp32(Tensor x, Tensor w, Tensor? b=None) -> Tensor");
  m.def("linear_fp32_int8(Tensor x, Tensor q, Tensor s, Tensor? b=None) -> Tensor");
  m.def("linear_fp32_int4(Tensor x, Tensor q, Tensor s, int group, Tensor? b=None) -> Tensor");
}
TORCH_LIBRARY_IMPL(internvl, CPU, m) {
  m.impl("linear_fp32", &linear_fp32_cpu);
  m.impl("linear_fp32_int8", &linear_fp32_int8_cpu);
  m.impl("linear_fp32_int4", &linear_fp32_int4_cpu);
}
TORCH_LIBRARY_IMPL(internvl, Meta, m) {
  m.impl("linear_fp32", &linear_fp32_meta);
  m.impl("linear_fp32_int8", &linear_fp32_int8_meta);
  m.impl("linear_fp32_int4", &linear_fp32_int4_meta);
}
