// internvl::paged_decode_attention(q, k_cache, v_cache, layer, block_tables, positions, scale): one query token
// per sequence attending over its keys 0..positions[b] in the paged KV cache: graphs/attention.py's decode
// formulation for CPU decode graphs (kernels/__init__.py says how it is built, shipped and chosen;
// docs/CONTRACTS.md has the cache layout).
//
// q [B, 1, H, D]; k_cache, v_cache [layers, blocks, block_size, KVH, D] (q's dtype: bf16 or fp32); block_tables
// [B, W] (only the blocks holding keys 0..positions[b] are read, whatever W); positions [B, 1]; -> [B, 1, H, D].
// Work item: one sequence and a range of KV heads (split so that there are work items for every thread at
// batch 1); each K and V row of the range is read once from the pool for the G = H / KVH query heads of its
// group and widened to fp32 in registers. Two passes, no online rescaling: the scores of every key (fp32, in a
// per-thread buffer: heads x keys x 4 bytes, in L2 at 2B sizes), one softmax per query head over them, then
// the probabilities times V block by block (per head, 16 dims at a time for the whole block, the G outputs in
// registers). fp32 products and sums throughout, as in the graph.
//
// Written with GCC vector extensions (16 fp32 lanes): one source for every target, compiled by -march into
// AVX-512 (one zmm), AVX2 (two ymm) or SSE. An earlier version with scalar dot products and an exp per
// score ran at the graph's speed (docs/performance.md, fifth round): here the exp is a vector polynomial
// and every loop is a vector loop.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

using bf16 = c10::BFloat16;
typedef float vf __attribute__((vector_size(64)));       // 16 fp32
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));    // 16 bf16 bit patterns
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
constexpr int64_t L = 16;                                // lanes
constexpr int kMaxGroup = 8;                             // query heads per KV head handled per pass

inline vf splat(float x) { return vf{} + x; }
inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf load(const bf16* p) {                          // a bf16 is the top half of an fp32: exact
#ifdef __AVX512F__      // one vpmovzxwd zmm (gcc splits the generic form below into two halves)
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#else
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

inline float hsum(vf v) {
  vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
          __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
inline float hmax(vf v) {
  vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  vf8 a2 = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  a = a > a2 ? a : a2;
  vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3), b2 = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  b = b > b2 ? b : b2;
  return std::max(std::max(b[0], b[1]), std::max(b[2], b[3]));
}

// exp(x) for x <= 0 (-inf included, giving exactly 0): Cephes' expf polynomial after x = n ln2 + r, 2^n put
// into the exponent bits; below -87 (where 2^n would leave the normal range) the result is 0.
inline vf exp_nonpositive(vf x) {
  const vf lo = splat(-87.0f), magic = splat(12582912.0f);   // 1.5 * 2^23: adding it rounds to an integer
  const vi dead = x < lo;
  x = dead ? lo : x;
  const vf t = x * 1.44269504088896341f + magic;
  const vf n = t - magic;
  const vi ni = (vi)t - (vi)magic;
  const vf r = x - n * 0.693359375f - n * -2.12194440e-4f;
  vf p = splat(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  const vf y = (p * r * r + r + 1.0f) * (vf)((ni + 127) << 23);
  return dead ? splat(0.0f) : y;
}

struct Shape {
  int64_t B, H, KVH, G, D, BS, W, row, layer_offset;
};

// s[j * S] = q_j . k for the GN query heads j of one KV head and one key's row k of that head.
template <int GN, typename T>
inline void score_key(const float* qf, const T* k, int64_t D, float* s, int64_t S) {
  vf a[GN] = {};
  for (int64_t c = 0; c < D; c += L) {
    const vf kv = load(k + c);
    for (int j = 0; j < GN; ++j) a[j] += load(qf + j * D + c) * kv;
  }
  for (int j = 0; j < GN; ++j) s[j * S] = hsum(a[j]);
}

// acc[j][:] += sum over the block's n keys of p[j * S + t] * v_t for the GN query heads j of one KV head (v_t:
// that head's row of key t, `row` apart), 16 dims at a time with the GN sums in registers: the block was fetched
// into L2 while the previous one was read.
template <int GN, typename T>
inline void value_block(const float* p, int64_t S, const T* v, int64_t n, int64_t row, int64_t D, float* acc) {
  for (int64_t c = 0; c < D; c += L) {
    vf a[GN];
    for (int j = 0; j < GN; ++j) a[j] = load(acc + j * D + c);
    for (int64_t t = 0; t < n; ++t) {
      const vf vv = load(v + t * row + c);
      for (int j = 0; j < GN; ++j) a[j] += p[j * S + t] * vv;
    }
    for (int j = 0; j < GN; ++j) store(acc + j * D + c, a[j]);
  }
}

// The next block's row of key t (the item's heads: `bytes` contiguous), fetched into L2 while this block's is read:
// the blocks of a sequence are anywhere in the pool, which no hardware prefetcher can guess. 24 layers of 2B caches,
// batch 8 x 512 keys, 2 threads, Zen 4: 25-38 ms without, 37-41 ms into L1 (locality 3: it evicts the block being
// read), 22-27 ms into L2 (docs/performance.md, sixth round).
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 256) {      // whole 256 bytes: past the row end is harmless (never faults)
    __builtin_prefetch(c + o, 0, 2);
    __builtin_prefetch(c + o + 64, 0, 2);
    __builtin_prefetch(c + o + 128, 0, 2);
    __builtin_prefetch(c + o + 192, 0, 2);
  }
}

#define INTERNVL_GROUP_DISPATCH(GN_VAR, CALL) \
  switch (GN_VAR) {                           \
    case 1: { constexpr int GN = 1; CALL; break; } \
    case 2: { constexpr int GN = 2; CALL; break; } \
    case 3: { constexpr int GN = 3; CALL; break; } \
    case 4: { constexpr int GN = 4; CALL; break; } \
    case 5: { constexpr int GN = 5; CALL; break; } \
    case 6: { constexpr int GN = 6; CALL; break; } \
    case 7: { constexpr int GN = 7; CALL; break; } \
    default: { constexpr int GN = 8; CALL; break; } \
  }

template <typename T>
void attend(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* positions, T* out,
            const Shape& sh, float scale) {
  const int64_t threads = at::get_num_threads();
  int64_t splits = 1;      // KV-head ranges per sequence: enough work items for every thread
  while (sh.B * splits < threads && splits * 2 <= sh.KVH && sh.KVH % (splits * 2) == 0) splits *= 2;
  const int64_t HR = sh.KVH / splits, D = sh.D, G = sh.G, BS = sh.BS;
  at::parallel_for(0, sh.B * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, s, acc;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / splits, h0 = (item % splits) * HR;
      T* o = out + (b * sh.H + h0 * G) * D;
      const int64_t keys = std::min(positions[b] + 1, sh.W * BS);
      if (keys <= 0) {
        std::fill(o, o + HR * G * D, T(0.0f));
        continue;
      }
      const int64_t nblocks = (keys + BS - 1) / BS;
      const int64_t S = (nblocks * BS + L - 1) / L * L;   // a score row, padded to whole vectors
      qf.resize(HR * G * D);
      s.assign(HR * G * S, -std::numeric_limits<float>::infinity());
      acc.assign(HR * G * D, 0.0f);
      const T* qb = q + (b * sh.H + h0 * G) * D;
      for (int64_t i = 0; i < HR * G * D; ++i) qf[i] = float(qb[i]) * scale;
      const int64_t* table = tables + b * sh.W;
      auto block = [&](const T* cache, int64_t i) { return cache + sh.layer_offset + table[i] * BS * sh.row + h0 * D; };
      const int64_t rowbytes = HR * D * int64_t(sizeof(T));
      for (int64_t i = 0; i < nblocks; ++i) {   // scores, key by key: a key's row of the item's heads is contiguous
        const int64_t n = std::min(BS, keys - i * BS);
        const T* k = block(kc, i);
        const T* next = i + 1 < nblocks ? block(kc, i + 1) : block(vc, 0);
        for (int64_t t = 0; t < n; ++t) {
          prefetch_row(next + t * sh.row, rowbytes);
          for (int64_t hh = 0; hh < HR; ++hh)
            for (int64_t g0 = 0; g0 < G; g0 += kMaxGroup) {
              const int gn = int(std::min<int64_t>(kMaxGroup, G - g0));
              const int64_t j0 = hh * G + g0;
              INTERNVL_GROUP_DISPATCH(gn, score_key<GN>(qf.data() + j0 * D, k + t * sh.row + hh * D, D,
                                                        s.data() + j0 * S + i * BS + t, S))
            }
        }
      }
      for (int64_t j = 0; j < HR * G; ++j) {     // softmax over the row; padding and unread keys are -inf
        float* r = s.data() + j * S;
        vf m = splat(-std::numeric_limits<float>::infinity());
        for (int64_t t = 0; t < S; t += L) {
          const vf x = load(r + t);
          m = x > m ? x : m;
        }
        const float top = hmax(m);
        vf sum = {};
        for (int64_t t = 0; t < S; t += L) {
          const vf e = exp_nonpositive(load(r + t) - top);
          store(r + t, e);
          sum += e;
        }
        const float inv = 1.0f / hsum(sum);
        for (int64_t t = 0; t < S; t += L) store(r + t, load(r + t) * inv);
      }
      for (int64_t i = 0; i < nblocks; ++i) {   // probabilities times V, block by block
        const int64_t n = std::min(BS, keys - i * BS);
        const T* v = block(vc, i);
        const T* next = i + 1 < nblocks ? block(vc, i + 1) : nullptr;
        for (int64_t hh = 0; hh < HR; ++hh) {
          if (next)     // the next block's rows, spread over this block's heads
            for (int64_t t = hh * BS / HR; t < (hh + 1) * BS / HR; ++t) prefetch_row(next + t * sh.row, rowbytes);
          for (int64_t g0 = 0; g0 < G; g0 += kMaxGroup) {
            const int gn = int(std::min<int64_t>(kMaxGroup, G - g0));
            const int64_t j0 = hh * G + g0;
            INTERNVL_GROUP_DISPATCH(gn, value_block<GN>(s.data() + j0 * S + i * BS, S, v + hh * D, n, sh.row, D,
                                                        acc.data() + j0 * D))
          }
        }
      }
      for (int64_t i = 0; i < HR * G * D; ++i) o[i] = T(acc[i]);
    }
  });
}

// A size that is static in every decode graph (the pool's block count and the table's width are dynamic there and
// are not looked at here, so the Meta kernel runs on export's symbolic shapes).
int64_t dim(const at::Tensor& t, int64_t d) { return t.sym_size(d).guard_int(__FILE__, __LINE__); }

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t layer, const at::Tensor& tables,
           const at::Tensor& positions) {
  TORCH_CHECK(q.dim() == 4 && dim(q, 1) == 1, "internvl::paged_decode_attention: q [B, 1, H, D], got ", q.dim(),
              " dims");
  TORCH_CHECK(k.dim() == 5 && v.dim() == 5, "internvl::paged_decode_attention: caches [layers, blocks, block_size, "
              "KVH, D]");
  const int64_t B = dim(q, 0), H = dim(q, 2), D = dim(q, 3), KVH = dim(k, 3);
  for (int64_t d : {0, 2, 3, 4})
    TORCH_CHECK(dim(k, d) == dim(v, d), "internvl::paged_decode_attention: k_cache and v_cache differ in dim ", d);
  TORCH_CHECK(dim(k, 4) == D && KVH > 0 && H % KVH == 0,
              "internvl::paged_decode_attention: caches with head_dim ", dim(k, 4), " and ", KVH,
              " KV heads for q with ", H, " heads of ", D);
  TORCH_CHECK(D % L == 0, "internvl::paged_decode_attention: head_dim must be a multiple of ", L, ", got ", D);
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat),
              "internvl::paged_decode_attention: q and the caches in one dtype, bf16 or fp32; got ",
              q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(0 <= layer && layer < dim(k, 0), "internvl::paged_decode_attention: layer ", layer, " out of range");
  TORCH_CHECK(tables.dim() == 2 && dim(tables, 0) == B && positions.dim() == 2 && dim(positions, 0) == B &&
                  dim(positions, 1) == 1,
              "internvl::paged_decode_attention: block_tables [B, W] and positions [B, 1] for B = ", B);
}

at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      int64_t layer, const at::Tensor& block_tables, const at::Tensor& positions,
                                      double scale) {
  check(q, k_cache, v_cache, layer, block_tables, positions);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "internvl::paged_decode_attention: the caches must be contiguous (never copied: they are the pool)");
  const at::Tensor qc = q.contiguous();
  const at::Tensor tables = block_tables.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  const int64_t B = q.size(0), H = q.size(2), D = q.size(3), KVH = k_cache.size(3), BS = k_cache.size(2);
  const Shape sh{B, H, KVH, H / KVH, D, BS, tables.size(1), KVH * D, layer * k_cache.stride(0)};
  if (B == 0) return out;
  const int64_t* tp = tables.const_data_ptr<int64_t>();
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {    // every block that will be read exists: a bad table is an error, not a read
    const int64_t nblocks = (std::min(pp[b] + 1, sh.W * BS) + BS - 1) / BS;
    for (int64_t i = 0; i < nblocks; ++i)
      TORCH_CHECK(0 <= tp[b * sh.W + i] && tp[b * sh.W + i] < k_cache.size(1),
                  "internvl::paged_decode_attention: block_tables[", b, ", ", i, "] = ", tp[b * sh.W + i],
                  " is not a block of the pool (", k_cache.size(1), " blocks)");
  }
  if (q.scalar_type() == at::kBFloat16) {
    attend<bf16>(qc.const_data_ptr<bf16>(), k_cache.const_data_ptr<bf16>(), v_cache.const_data_ptr<bf16>(), tp, pp,
                 out.mutable_data_ptr<bf16>(), sh, float(scale));
  } else {
    attend<float>(qc.const_data_ptr<float>(), k_cache.const_data_ptr<float>(), v_cache.const_data_ptr<float>(), tp,
                  pp, out.mutable_data_ptr<float>(), sh, float(scale));
  }
  return out;
}

at::Tensor paged_decode_attention_meta(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       int64_t layer, const at::Tensor& block_tables, const at::Tensor& positions,
                                       double) {
  check(q, k_cache, v_cache, layer, block_tables, positions);
  return at::empty_symint(q.sym_sizes(), q.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(internvl, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, int layer, Tensor block_tables, "
        "Tensor positions, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(internvl, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention_cpu); }
TORCH_LIBRARY_IMPL(internvl, Meta, m) { m.impl("paged_decode_attention", &paged_decode_attention_meta); }
