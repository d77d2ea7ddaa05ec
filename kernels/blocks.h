// Shared by the kernels' matrix ops (small_m_gemm.cpp: bf16 and int8 weights; int4_gemm.cpp: int4 weights): the
// weight prefetch, the parallel loop over blocks of weight rows with its store, and the row padding of the
// quantised paths. Everything here is inline, in an anonymous namespace: each source gets its own copy.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 8;
using bf16 = c10::BFloat16;

// Scratch copies of x (permuted, widened, padded) start on a cache line: with rows a multiple of 64 bytes long every
// vector load of them is then within one line (std::vector aligns to 16 bytes; no speed change was measurable on
// Zen 4 in tools/gemm_m_sweep.py, whose noise is +-15%).
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const Aligned64&) const { return true; }
  bool operator!=(const Aligned64&) const { return false; }
};
template <typename T>
using scratch = std::vector<T, Aligned64<T>>;

#if defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__))
// Software prefetch of the weights kPrefetchBytes ahead of the row being read, into L2. The hardware
// prefetchers alone left the loads waiting on DRAM (perf: the cycles on the first use of each weight load):
// 24 layers of 2B int8 matrices, 2 threads, Zen 4, ms at M = 1 / 4 / 8, no prefetch 89-96 / 142-150 / 238-242,
// 4 KB ahead to L1 93 / 144 / 182, 8 KB to L2 73-87 / 77-85 / 173-196, 32 KB to L2 63 / 73 / 172. Rows of a
// block and blocks of a thread's range are contiguous, so a distance past the row's end fetches the rows read
// next. A prefetch never faults, past the matrix's end included. bf16 weights: from 3 rows of x on AVX512-BF16
// (rows_block); always in the AVX2 loop (emulated on the Zen 4, 24 layers of 2B bf16 matrices, ms at M = 3 / 4 / 8:
// 185-210 / 132-140 / 249-280 with, 296-299 / 245-261 / 385-386 without).
#ifndef INTERNVL_PREFETCH_BYTES
#define INTERNVL_PREFETCH_BYTES 32768
#endif
constexpr int64_t kPrefetchBytes = INTERNVL_PREFETCH_BYTES;
template <bool PF>
inline void prefetch(const void* p) {
  if constexpr (PF && kPrefetchBytes > 0) _mm_prefetch((const char*)p + kPrefetchBytes, _MM_HINT_T1);
}
#endif

#if defined(__AVX512BF16__)
// position in the permuted chunk of element j of a 64-element chunk
inline int64_t permute64(int64_t j) {
  const int64_t lane = j / 16, in = j % 16;
  return (in < 8 ? 0 : 32) + lane * 8 + in % 8;
}
#endif

#if defined(__AVX2__) && defined(__FMA__)       // AVX2 + FMA builds and the AVX-512 ones (which have both)
inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// The AVX2 quantised paths' integer dot products take x rounded to integers per block of a row: q = round(x / step)
// (to nearest even), step = max |x| / top over the block (0 and q = 0 for a block of zeros), top 127 (int8: the
// int4 op) or 32767 (int16: the int8 op). n: a multiple of 16 (int16) or 32 (int8).
// A block holding a NaN or an infinity gets a NaN step, which makes the op's outputs NaN, as an fp32 product's
// would be (max_ps alone would drop a NaN).
inline float block_step(const float* x, int64_t n, float top) {
  const __m256 sign = _mm256_set1_ps(-0.f), zero = _mm256_setzero_ps();
  __m256 a = zero, bad = zero;      // bad: the sum of x * 0, NaN iff some x is not finite
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    a = _mm256_max_ps(a, _mm256_andnot_ps(sign, v));
    bad = _mm256_add_ps(bad, _mm256_mul_ps(v, zero));
  }
  const __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 t = _mm_max_ps(h, _mm_movehl_ps(h, h));
  const float step = _mm_cvtss_f32(_mm_max_ss(t, _mm_shuffle_ps(t, t, 1))) / top;
  return hsum(bad) == 0.f ? step : std::numeric_limits<float>::quiet_NaN();
}
inline __m256i round8(const float* x, __m256 inv) { return _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), inv)); }
// -> sum of the q written
inline int32_t round_block(const float* x, int64_t n, float step, int8_t* q) {
  const __m256 inv = _mm256_set1_ps(step > 0.f ? 1.f / step : 0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);   // undo the packs' 128-bit lane interleave
  __m256i sum = _mm256_setzero_si256();
  for (int64_t i = 0; i < n; i += 32) {
    const __m256i a = round8(x + i, inv), b = round8(x + i + 8, inv), c = round8(x + i + 16, inv),
                  d = round8(x + i + 24, inv);
    sum = _mm256_add_epi32(sum, _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d)));
    const __m256i v = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    _mm256_storeu_si256((__m256i*)(q + i), _mm256_permutevar8x32_epi32(v, order));
  }
  alignas(32) int32_t l[8];
  _mm256_store_si256((__m256i*)l, sum);
  return l[0] + l[1] + l[2] + l[3] + l[4] + l[5] + l[6] + l[7];
}
inline void round_block(const float* x, int64_t n, float step, int16_t* q) {
  const __m256 inv = _mm256_set1_ps(step > 0.f ? 1.f / step : 0.f);
  for (int64_t i = 0; i < n; i += 16) {
    const __m256i v = _mm256_packs_epi32(round8(x + i, inv), round8(x + i + 8, inv));
    _mm256_storeu_si256((__m256i*)(q + i), _mm256_permute4x64_epi64(v, 0xD8));
  }
}

#endif

// y[m, n0 + r] = acc[m * count + r] (* s[n0 + r]) (+ b[n0 + r]) for the M rows and `count` weight rows from n0.
inline void store(bf16* y, const bf16* b, const float* s, int64_t M, int64_t N, int64_t n0, int64_t count,
                  const float* acc) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < count; ++r)
      y[m * N + n0 + r] = bf16(acc[m * count + r] * (s ? s[n0 + r] : 1.f) + (b ? float(b[n0 + r]) : 0.f));
}

// Every block of R (<= 8) weight rows in parallel, then the last N % R rows one at a time;
// dot(n0, count, acc) fills acc [M][count] with the rows of x times weight rows n0 .. n0 + count.
template <typename Dot>
void for_weight_blocks(int64_t M, int64_t N, int64_t R, const bf16* b, const float* s, bf16* y, const Dot& dot) {
  const int64_t blocks = N / R;
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    float acc[kMaxRows * 8];
    for (int64_t blk = b0; blk < b1; ++blk) {
      dot(blk * R, R, acc);
      store(y, b, s, M, N, blk * R, R, acc);
    }
  });
  float acc[kMaxRows];
  for (int64_t n = blocks * R; n < N; ++n) {
    dot(n, 1, acc);
    store(y, b, s, M, N, n, 1, acc);
  }
}

// x's shape with its last dimension n: a linear's output [..., n].
inline std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

// int4 weights as every op that reads them takes them (int4_gemm.cpp, fp32_gemm.cpp; docs/CONTRACTS.md): uint8 q
// [N, K / 2], fp32 s [N, K / group], group a multiple of the 64-weight chunk dividing K.
inline void check_int4_weights(const char* op, const at::Tensor& q, const at::Tensor& s, int64_t group) {
  TORCH_CHECK(q.scalar_type() == at::kByte && s.scalar_type() == at::kFloat && q.dim() == 2 && s.dim() == 2 &&
                  group > 0 && group % 64 == 0 && (2 * q.size(1)) % group == 0 && s.size(0) == q.size(0) &&
                  s.size(1) == 2 * q.size(1) / group,
              "internvl::", op, ": uint8 q [N, K / 2], fp32 s [N, K / group], group a multiple of 64 dividing K; got ",
              q.scalar_type(), " ", q.sizes(), ", ", s.scalar_type(), " ", s.sizes(), ", group ", group);
}

// Rows of x for the quantised paths, padded with zero rows to 1, 2, 4 or 8, so that the rows are computed in one
// pass over the weights (two at 8 rows) and each quantised weight is widened once per pass.
inline int64_t padded_rows(int64_t M) { return M <= 2 ? M : (M <= 4 ? 4 : 8); }

// The quantised (int8, int4) blocks of both ISAs: R1 weight rows per block for 1-2 rows of x, R2 for 4 and 8, where
// the block is read twice, 4 rows of x at a time (from L1/L2, widened again: 24 layers of 2B int8 matrices, 2 threads, AVX512-BF16,
// 138-160 ms against 172-177 for one pass over 2 weight rows with all 8 rows of x, whose 16 loads of x per 4 dot
// products were the limit). x0: x padded to padded_rows(M) rows of `stride` elements; dot(mc, r, x rows, n0, out)
// is the ISA's dot block for MC rows of x and R weight rows. (int4 at 8 rows in one pass over single weight rows,
// MC = 8: 113-131 against 119-120 ms for 24 layers of 2B matrices, Zen 4; not kept.)
template <int R1, int R2, typename X, typename Dot>
void row_blocks(int64_t M, int64_t N, const X* x0, int64_t stride, const bf16* b, const float* s, bf16* y,
                const Dot& dot) {
  using one = std::integral_constant<int, 1>;
  using two = std::integral_constant<int, 2>;
  using four = std::integral_constant<int, 4>;
  using r1 = std::integral_constant<int, R1>;
  using r2 = std::integral_constant<int, R2>;
  const int64_t MP = padded_rows(M), R = MP <= 2 ? R1 : R2;
  for_weight_blocks(M, N, R, b, s, y, [&](int64_t n0, int64_t count, float* acc) {
    float full[8 * 8];
    if (count != R) {       // one of the last N % R weight rows
      for (int64_t m = 0; m < M; ++m) dot(one{}, one{}, x0 + m * stride, n0, acc + m);
      return;
    }
    if (MP == 1) {
      dot(one{}, r1{}, x0, n0, full);
    } else if (MP == 2) {
      dot(two{}, r1{}, x0, n0, full);
    } else {
      dot(four{}, r2{}, x0, n0, full);
      if (MP == 8) dot(four{}, r2{}, x0 + 4 * stride, n0, full + 4 * R2);
    }
    std::copy(full, full + M * R, acc);     // the padding rows dropped
  });
}

}  // namespace
