// internvl::small_m_linear(x, w, b?): y[..., N] = x[..., K] @ w[N, K]^T (+ b), bf16 in and out, fp32
// accumulation, for at most 8 rows of x: the linears of a decode step (kernels/__init__.py says why and how
// it is built, loaded and chosen).
//
// Each weight row is read from memory once for all rows of x: a block of R weight rows is loaded 32 bf16 at
// a time and multiplied into every activation row (a few KB each, in L1) with AVX512-BF16's vdpbf16ps (a
// pair of bf16 products summed into fp32 per lane); rows of x are taken MC at a time so that the MC x R
// accumulators stay in registers, and a later chunk re-reads the block from L1/L2, not from DRAM.
// Built for AVX2 + FMA without AVX512-BF16 (x86-64-v3: Zen 1-3, Haswell+), the same loop structure in
// fp32: 16 bf16 weights per 256-bit load become two fp32 vectors with one shift and one mask (the even
// and the odd elements: a bf16 is the top half of an fp32), multiplied into x split once per call into
// its even and odd elements in fp32. Built for neither, a plain loop: correct, not fast (tests only).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kVersion = 1;     // kernels/__init__.py KERNELS_VERSION: bumped when the ops change

using bf16 = c10::BFloat16;

#if defined(__AVX512BF16__)
// out[m][r] = sum_k x[m, k] * w[n0 + r, k] for MC rows of x and R rows of w.
template <int MC, int R>
inline void dot_block(const bf16* x, int64_t K, const bf16* w, int64_t n0, float* out) {
  __m512 acc[MC][R];
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const bf16* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (n0 + r) * K;
  const int64_t body = K - K % 32;
  for (int64_t k = 0; k < body; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512((const void*)(wr[r] + k));
    for (int m = 0; m < MC; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void*)(x + m * K + k));
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  if (body < K) {     // the last K % 32 elements, masked (zeros beyond K add nothing)
    const __mmask32 mask = (__mmask32)((1ull << (K - body)) - 1);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, (const void*)(wr[r] + body));
    for (int m = 0; m < MC; ++m) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, (const void*)(x + m * K + body));
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) out[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <int MC, int R>
inline void rows_block(const bf16* x, int64_t M, int64_t K, const bf16* w, int64_t n0, float* out) {
  // rows of x MC at a time; the rest (M % MC) one at a time. out: [M][R]
  int64_t m0 = 0;
  for (; m0 + MC <= M; m0 += MC) dot_block<MC, R>(x + m0 * K, K, w, n0, out + m0 * R);
  for (; m0 < M; ++m0) dot_block<1, R>(x + m0 * K, K, w, n0, out + m0 * R);
}

template <int R>
inline void weight_block(const bf16* x, int64_t M, int64_t K, const bf16* w, int64_t n0, float* out) {
  if (M <= 2) {
    rows_block<2, R>(x, M, K, w, n0, out);
  } else {
    rows_block<4, R>(x, M, K, w, n0, out);
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

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
#endif

// y[m, n0 + r] = acc[m * count + r] (+ b[n0 + r]) for the M rows and `count` weight rows from n0.
inline void store(bf16* y, const bf16* b, int64_t M, int64_t N, int64_t n0, int64_t count, const float* acc) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < count; ++r)
      y[m * N + n0 + r] = bf16(acc[m * count + r] + (b ? float(b[n0 + r]) : 0.f));
}

// Every block of R (<= 8) weight rows in parallel, then the last N % R rows one at a time;
// dot(n0, count, acc) fills acc [M][count] with the rows of x times weight rows n0 .. n0 + count.
template <typename Dot>
void for_weight_blocks(int64_t M, int64_t N, int64_t R, const bf16* b, bf16* y, const Dot& dot) {
  const int64_t blocks = N / R;
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    float acc[kMaxRows * 8];
    for (int64_t blk = b0; blk < b1; ++blk) {
      dot(blk * R, R, acc);
      store(y, b, M, N, blk * R, R, acc);
    }
  });
  float acc[kMaxRows];
  for (int64_t n = blocks * R; n < N; ++n) {
    dot(n, 1, acc);
    store(y, b, M, N, n, 1, acc);
  }
}

void compute(const bf16* x, int64_t M, int64_t K, const bf16* w, int64_t N, const bf16* b, bf16* y) {
#if defined(__AVX512BF16__)
  // R = 8 weight rows per block for 1-2 rows of x (more streams in flight), 4 for 3-8 (registers).
  for_weight_blocks(M, N, M <= 2 ? 8 : 4, b, y, [&](int64_t n0, int64_t count, float* acc) {
    if (count == 8) {
      weight_block<8>(x, M, K, w, n0, acc);
    } else if (count == 4) {
      weight_block<4>(x, M, K, w, n0, acc);
    } else {
      rows_block<1, 1>(x, M, K, w, n0, acc);
    }
  });
#elif defined(__AVX2__) && defined(__FMA__)
  // 16 ymm registers: R = 4 weight rows for one row of x, R = 2 for x taken 4 rows at a time.
  const int64_t K2 = K / 2;
  std::vector<float> xe(M * K2), xo(M * K2);
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
  for_weight_blocks(M, N, M == 1 ? 4 : 2, b, y, [&](int64_t n0, int64_t count, float* acc) {
    if (count == 4) {
      rows(one{}, four{}, n0, acc);
    } else if (count == 2) {
      rows(four{}, two{}, n0, acc);
    } else {
      rows(one{}, one{}, n0, acc);
    }
  });
#else
  for_weight_blocks(M, N, 1, b, y, [&](int64_t n, int64_t, float* acc) {
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += float(x[m * K + k]) * float(w[n * K + k]);
      acc[m] = s;
    }
  });
#endif
}

std::vector<int64_t> out_shape(const at::Tensor& x, const at::Tensor& w) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.size(0);
  return shape;
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
  at::Tensor y = at::empty(out_shape(x, w), x.options());
  const int64_t K = w.size(1), N = w.size(0), M = K ? xc.numel() / K : 0;
  if (M == 0 || N == 0) return y;
  compute(xc.const_data_ptr<bf16>(), M, K, wc.const_data_ptr<bf16>(), N,
          bc ? bc->const_data_ptr<bf16>() : nullptr, y.mutable_data_ptr<bf16>());
  return y;
}

at::Tensor small_m_linear_meta(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  check(x, w, b);
  return at::empty(out_shape(x, w), x.options());
}

int64_t kernels_version() { return kVersion; }

}  // namespace

TORCH_LIBRARY(internvl, m) {
  m.def("small_m_linear(Tensor x, Tensor w, Tensor? b=None) -> Tensor");
  m.def("kernels_version() -> int", &kernels_version);
}

TORCH_LIBRARY_IMPL(internvl, CPU, m) { m.impl("small_m_linear", &small_m_linear_cpu); }
TORCH_LIBRARY_IMPL(internvl, Meta, m) { m.impl("small_m_linear", &small_m_linear_meta); }
