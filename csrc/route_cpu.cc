// Candidate experts of the sigmoid router, for sigmoid_moe.route on the CPU
// (sigmoid_moe/_sigmoid_selection.py).
//
// DeepSeek-V3 selection ranks key_e = sigmoid(l_e) + b_e (float32, as XLA computes it).
// This kernel does not rank: it narrows down, per token, which experts can be among the
// top k, reading the logits once and writing no [tokens, E] array. XLA then computes the
// exact keys of the candidates only and ranks them:
//
//   a_e = s(l_e) + b_e        s: sigmoid from a polynomial exp, |a_e - key_e| <= delta
//   candidates = {e : a_e >= bound - 2 delta}, ascending, where bound <= a_(k), the k-th
//   largest a_e.
//
// The exact top k are all candidates: the k experts with the largest a_e have keys
// >= a_(k) - delta, so the k-th largest key is >= a_(k) - delta, and every e of the exact
// top k has a_e >= key_e - delta >= a_(k) - 2 delta >= bound - 2 delta. Ranking the
// candidates by their exact keys, ties to the lower index, gives the exact top k of all.
//
// delta. s is simd_math.h's sigmoid (a polynomial exp): measured over every 7th float32 in
// [-120, 120] (321 M values) against float64, it (generic and AVX2 code) and XLA's float32
// sigmoid both stay within 8.9e-8. The two sums with b_e, and the threshold
// bound - 2 delta, round by at most ulp(1 + max|b|) / 2 each. The kernel takes
// delta = 1e-5 + 2^-20 (1 + max|b|): over 50 times the sigmoid errors, over 5 times the
// rounding. (A bias near the float32 limit makes the threshold -inf: every expert is then
// a candidate, still correct.)
//
// bound. AVX2 path (x86-64 CPUs with AVX2 + FMA, E a multiple of 16, k <= 16): the keys
// are computed 16 at a time into two vectors; lane j of every first vector is chunk j,
// of every second one chunk 8 + j. The 16 chunk maxes are 16 distinct entries, so the
// k-th largest of them is <= a_(k): that is the bound, found without branches. On router
// logits it leaves k to k + 5 candidates, gathered with a lookup-table compaction.
// Elsewhere (the generic path), and when the AVX2 bound leaves more than C candidates,
// bound = a_(k) itself, from the exact top-k of the approximate keys (top_k_row.h).
//
// Exact ties: experts whose logit and bias are bitwise equal (an all-zero padding token
// with a bias quantised by sign updates) have equal exact keys, so only the k lowest ids
// of such a group can be chosen. A row with more candidates than slots keeps just those,
// which leaves at most 2k - 1 when the ties are exact (the Python side's C is >= 2k).
//
// Out, per row: `candidates` [C] ascending, padded with -1; the candidates' logits and
// biases (pads: 0 and -inf, so a pad's key sigmoid(0) + -inf is -inf); and `status`:
//   1  routed;
//   0  not routed: a logit is NaN or infinite (every row, if the bias is): candidates
//      0..C-1 with logits 0 and biases 0, to be masked by the caller;
//   2  more than C candidates (near ties, e.g. saturated sigmoids): the caller must rank
//      all experts of this call instead.
//
// A second handler ranks the candidates once XLA has their exact keys: the expert ids of
// each row's k best, value descending, ties to the lower expert id (the candidates are
// ascending, so to the earlier candidate), and their logits.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "kernel_limits.h"
#include "row_tasks.h"
#include "simd_math.h"
#include "top_k_row.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace sigmoid_moe {
namespace {

// A row's working memory: n entries each (8 more keep the 8-lane stores of the vector
// compaction in bounds without relying on the count bound that already does).
struct RowBuffers {
  explicit RowBuffers(int64_t n)
      : key(new float[n + 8]),
        logit(new float[n + 8]),
        bias(new float[n + 8]),
        index(new int32_t[n + 8]) {}
  std::unique_ptr<float[]> key, logit, bias;
  std::unique_ptr<int32_t[]> index;
};

// ------------------------------------------------------------------ the generic path

// a_e = s(l_e) + b_e for one row; returns whether every logit is finite.
bool ApproxKeys(const float* __restrict logits, const float* __restrict bias, int64_t n,
                float* __restrict key) {
  int bad = 0;
  for (int64_t e = 0; e < n; ++e) {
    const float x = logits[e];
    bad |= !(x - x == 0.0f);  // NaN or +-inf (an unrouted row: its keys are unused)
    key[e] = simd::SigmoidScalar(x) + bias[e];
  }
  return bad == 0;
}

// The k-th largest key (keys are finite: the row's logits and the bias are).
float KthLargest(const float* key, int64_t n, int64_t k, int32_t* scratch) {
  int32_t top[kMaxK];
  TopKRow(key, n, k, scratch, top);
  return key[top[k - 1]];
}

// Gathers the entries with key >= threshold, ascending; returns how many.
int64_t GatherAbove(const float* key, const float* logits, const float* bias, int64_t n,
                    float threshold, RowBuffers& buf) {
  int64_t count = 0;
  for (int64_t e = 0; e < n; ++e) {  // branch-free: the buffers have room for all n
    buf.index[count] = static_cast<int32_t>(e);
    buf.logit[count] = logits[e];
    buf.bias[count] = bias[e];
    count += key[e] >= threshold;
  }
  return count;
}

// ------------------------------------------------------------------ the AVX2 path

#ifdef SIGMOID_MOE_X86

// kCompact[m]: the lanes set in the 8-bit mask m, in order, then zeros.
struct CompactTable {
  alignas(32) int32_t lanes[256][8];
  constexpr CompactTable() : lanes() {
    for (int m = 0; m < 256; ++m) {
      int c = 0;
      for (int j = 0; j < 8; ++j) {
        if (m & (1 << j)) lanes[m][c++] = j;
      }
    }
  }
};
constexpr CompactTable kCompact;

SIGMOID_MOE_TARGET_AVX2 inline __m256 Key8(__m256 x, __m256 b, __m256& bad) {
  bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(x, x), _mm256_setzero_ps(), _CMP_NEQ_UQ));
  return _mm256_add_ps(simd::Sigmoid8(x), b);
}

// Keys of one row (n a multiple of 16) and the k-th largest of its 16 chunk maxes.
// Returns false where a logit is not finite.
SIGMOID_MOE_TARGET_AVX2 bool KeysAndBoundAvx2(const float* logits, const float* bias, int64_t n,
                                              int64_t k, float* key, float* bound) {
  __m256 bad = _mm256_setzero_ps();
  __m256 a = _mm256_set1_ps(kNegInf), b = a;
  for (int64_t e = 0; e < n; e += 16) {
    const __m256 k0 = Key8(_mm256_loadu_ps(logits + e), _mm256_loadu_ps(bias + e), bad);
    const __m256 k1 = Key8(_mm256_loadu_ps(logits + e + 8), _mm256_loadu_ps(bias + e + 8), bad);
    _mm256_storeu_ps(key + e, k0);
    _mm256_storeu_ps(key + e + 8, k1);
    a = _mm256_max_ps(a, k0);
    b = _mm256_max_ps(b, k1);
  }
  if (_mm256_movemask_ps(bad) != 0) return false;
  // For each chunk max v_i, how many of the 16 are >= v_i; the k-th largest is the
  // largest v_i with at least k of them (ties included).
  __m256i count_a = _mm256_setzero_si256(), count_b = count_a;
  for (int j = 0; j < 16; ++j) {
    const __m256i lane = _mm256_set1_epi32(j % 8);
    const __m256 v = _mm256_permutevar8x32_ps(j < 8 ? a : b, lane);  // chunk max j
    count_a = _mm256_sub_epi32(count_a, _mm256_castps_si256(_mm256_cmp_ps(v, a, _CMP_GE_OQ)));
    count_b = _mm256_sub_epi32(count_b, _mm256_castps_si256(_mm256_cmp_ps(v, b, _CMP_GE_OQ)));
  }
  const __m256i below_k = _mm256_set1_epi32(static_cast<int32_t>(k - 1));
  const __m256 none = _mm256_set1_ps(kNegInf);
  const __m256 m = _mm256_max_ps(
      _mm256_blendv_ps(none, a, _mm256_castsi256_ps(_mm256_cmpgt_epi32(count_a, below_k))),
      _mm256_blendv_ps(none, b, _mm256_castsi256_ps(_mm256_cmpgt_epi32(count_b, below_k))));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  *bound = _mm_cvtss_f32(h);
  return true;
}

// GatherAbove, 8 entries at a time: the lanes above the threshold are moved to the front
// (a permutation from kCompact) and stored at the running count.
SIGMOID_MOE_TARGET_AVX2 int64_t GatherAboveAvx2(const float* key, const float* logits,
                                                const float* bias, int64_t n, float threshold,
                                                RowBuffers& buf) {
  const __m256 t = _mm256_set1_ps(threshold);
  int64_t count = 0;
  for (int64_t e = 0; e < n; e += 8) {
    const int mask =
        _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(key + e), t, _CMP_GE_OQ));
    const __m256i order =
        _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompact.lanes[mask]));
    const __m256i index = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(e)),
                                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(buf.index.get() + count),
                        _mm256_permutevar8x32_epi32(index, order));
    _mm256_storeu_ps(buf.logit.get() + count,
                     _mm256_permutevar8x32_ps(_mm256_loadu_ps(logits + e), order));
    _mm256_storeu_ps(buf.bias.get() + count,
                     _mm256_permutevar8x32_ps(_mm256_loadu_ps(bias + e), order));
    count += _mm_popcnt_u32(static_cast<unsigned>(mask));
  }
  return count;
}

#endif  // SIGMOID_MOE_X86

// ------------------------------------------------------------------ one row

struct RowOut {
  int32_t* index;
  float* logit;
  float* bias;
  int32_t* status;
};

void WriteNotRouted(int64_t c, const RowOut& out) {
  for (int64_t j = 0; j < c; ++j) {
    out.index[j] = static_cast<int32_t>(j);
    out.logit[j] = 0.0f;
    out.bias[j] = 0.0f;
  }
  *out.status = kNotRouted;
}

// Experts whose logit and bias are bitwise equal have equal exact keys, so of such a group
// only its k lowest ids can be chosen: drops the others from the gathered candidates,
// keeping their order; returns how many are left. Sorting is O(count log count), so the
// caller does this only for rows with more candidates than slots.
int64_t DropTiedBeyondK(RowBuffers& buf, int64_t count, int64_t k) {
  const float* logit = buf.logit.get();
  const float* bias = buf.bias.get();
  auto bits = [](float v) {
    uint32_t b;
    std::memcpy(&b, &v, sizeof b);
    return b;
  };
  std::vector<int32_t> order(static_cast<size_t>(count));
  for (int64_t j = 0; j < count; ++j) order[j] = static_cast<int32_t>(j);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    const uint32_t la = bits(logit[a]), lb = bits(logit[b]);
    if (la != lb) return la < lb;
    const uint32_t ba = bits(bias[a]), bb = bits(bias[b]);
    return ba != bb ? ba < bb : a < b;
  });
  std::vector<char> keep(static_cast<size_t>(count), 1);
  int64_t in_group = 0;
  for (int64_t j = 0; j < count; ++j) {
    const int32_t p = order[j];
    const bool same = j > 0 && bits(logit[p]) == bits(logit[order[j - 1]]) &&
                      bits(bias[p]) == bits(bias[order[j - 1]]);
    in_group = same ? in_group + 1 : 0;
    keep[p] = in_group < k;
  }
  int64_t kept = 0;
  for (int64_t j = 0; j < count; ++j) {
    if (!keep[j]) continue;
    buf.index[kept] = buf.index[j];
    buf.logit[kept] = buf.logit[j];
    buf.bias[kept] = buf.bias[j];
    ++kept;
  }
  return kept;
}

// The first `count` candidates (ids, logits, biases) into a row's outputs.
void CopyCandidates(const int32_t* index, const float* logit, const float* bias, int64_t count,
                    const RowOut& out) {
  std::memcpy(out.index, index, static_cast<size_t>(count) * sizeof(int32_t));
  std::memcpy(out.logit, logit, static_cast<size_t>(count) * sizeof(float));
  std::memcpy(out.bias, bias, static_cast<size_t>(count) * sizeof(float));
}

// The last row of a task that had more candidates than slots, and where its results went:
// padding tokens repeat one row (all-zero logits, say), and each copy would be as costly.
struct TiedRowCache {
  const float* logits = nullptr;
  RowOut out{};
};

void CandidatesRow(const float* logits, const float* bias, int64_t n, int64_t k, int64_t c,
                   float margin, bool vectorized, RowBuffers& buf, TiedRowCache& cache,
                   const RowOut& out) {
  float* key = buf.key.get();
  int64_t count = -1;
#ifdef SIGMOID_MOE_X86
  if (vectorized) {
    float bound;
    if (!KeysAndBoundAvx2(logits, bias, n, k, key, &bound)) return WriteNotRouted(c, out);
    count = GatherAboveAvx2(key, logits, bias, n, bound - margin, buf);
  }
#else
  (void)vectorized;
#endif
  if (count < 0 || count > c) {  // the generic path, or the tighter bound a_(k)
    if (count < 0 && !ApproxKeys(logits, bias, n, key)) return WriteNotRouted(c, out);
    const float bound = KthLargest(key, n, k, buf.index.get());
    count = GatherAbove(key, logits, bias, n, bound - margin, buf);
  }
  if (count > c) {
    if (cache.logits != nullptr &&
        std::memcmp(cache.logits, logits, static_cast<size_t>(n) * sizeof(float)) == 0) {
      CopyCandidates(cache.out.index, cache.out.logit, cache.out.bias, c, out);
      *out.status = *cache.out.status;
      return;
    }
    count = DropTiedBeyondK(buf, count, k);
    cache = {logits, out};
  }
  *out.status = count > c ? kTooMany : kRouted;
  count = count > c ? c : count;
  CopyCandidates(buf.index.get(), buf.logit.get(), buf.bias.get(), count, out);
  for (int64_t j = count; j < c; ++j) {
    out.index[j] = -1;
    out.logit[j] = 0.0f;
    out.bias[j] = kNegInf;
  }
}

ffi::Error RouteCandidatesImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                               ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::S32> index,
                               ffi::ResultBuffer<ffi::F32> chosen_logits,
                               ffi::ResultBuffer<ffi::F32> chosen_bias,
                               ffi::ResultBuffer<ffi::S32> status, int64_t k,
                               int64_t allow_avx2) {
  const auto dims = logits.dimensions();
  if (dims.size() < 1) {
    return ffi::Error::InvalidArgument("route_candidates: logits must have rank >= 1");
  }
  const int64_t n = dims.back();
  const int64_t c = index->dimensions().back();
  if (k < 1 || k > n || k > kMaxK || c < k || c > n) {
    return ffi::Error::InvalidArgument("route_candidates: need 1 <= k <= C <= E and k <= 64");
  }
  if (static_cast<int64_t>(bias.element_count()) != n) {
    return ffi::Error::InvalidArgument("route_candidates: bias must have E entries");
  }
  const int64_t rows = n == 0 ? 0 : static_cast<int64_t>(logits.element_count()) / n;
  const float* l = logits.typed_data();
  const float* b = bias.typed_data();
  int32_t* out_index = index->typed_data();
  float* out_logit = chosen_logits->typed_data();
  float* out_bias = chosen_bias->typed_data();
  int32_t* out_status = status->typed_data();

  float max_abs_bias = 0.0f;
  bool bias_finite = true;
  for (int64_t e = 0; e < n; ++e) {
    bias_finite &= std::isfinite(b[e]);
    max_abs_bias = std::fmax(max_abs_bias, std::fabs(b[e]));
  }
  const float margin = 2.0f * (1e-5f + std::ldexp(1.0f + max_abs_bias, -20));
  bool vectorized = false;  // allow_avx2 = 0: the generic path (the tests run both)
#ifdef SIGMOID_MOE_X86
  vectorized = allow_avx2 != 0 && simd::HasAvx2() && n % 16 == 0 && k <= kMaxFastK;
#endif

  ForEachRowRange(pool, rows, n, [=](int64_t begin, int64_t end) {
    RowBuffers buf(n);
    TiedRowCache cache;
    for (int64_t r = begin; r < end; ++r) {
      const RowOut out{out_index + r * c, out_logit + r * c, out_bias + r * c, out_status + r};
      if (!bias_finite) {
        WriteNotRouted(c, out);
      } else {
        CandidatesRow(l + r * n, b, n, k, c, margin, vectorized, buf, cache, out);
      }
    }
  });
  return ffi::Error::Success();
}

// Writes index[i] at out[rank_i], and logit[i] at out_logit[rank_i], for the candidates of
// rank < k, where rank_i counts the candidates before i in the order (key descending,
// position ascending). NaN keys count as -inf, so the ranks are a permutation and every
// out[0..k) is written. Branch-free: C^2 comparisons, vectorised over the candidates whose
// ranks are counted; kC is C when known at compile time (several times faster), else 0.
template <int64_t kC>
__attribute__((always_inline)) inline void RankRow(const float* key_in, const int32_t* index,
                                                   const float* logit, int64_t runtime_c, int64_t k,
                                                   int32_t* out, float* out_logit) {
  const int64_t c = kC > 0 ? kC : runtime_c;
  constexpr int64_t kSize = kC > 0 ? kC : kMaxCandidates;
  float key[kSize];
  int32_t rank[kSize];
  int32_t slot[kSize + 1];  // slot[k] takes every rank >= k
  float slot_logit[kSize + 1];
  for (int64_t j = 0; j < c; ++j) {
    key[j] = key_in[j] == key_in[j] ? key_in[j] : kNegInf;
    rank[j] = 0;
  }
  for (int64_t i = 0; i < c; ++i) {  // i before j: larger, or equal and earlier
    const float ki = key[i];
    for (int64_t j = 0; j < c; ++j) rank[j] += (ki > key[j]) | ((ki == key[j]) & (i < j));
  }
  for (int64_t j = 0; j < c; ++j) {
    const int64_t at = rank[j] < k ? rank[j] : k;
    slot[at] = index[j];
    slot_logit[at] = logit[j];
  }
  std::memcpy(out, slot, static_cast<size_t>(k) * sizeof(int32_t));
  std::memcpy(out_logit, slot_logit, static_cast<size_t>(k) * sizeof(float));
}

// RankRow over rows [begin, end), compiled for C = 16, 24, ..., 128 (the slots Python
// asks for are multiples of 8), else with the runtime size.
struct RankArgs {
  const float* key;
  const int32_t* index;
  const float* logit;
  int64_t c, k;
  int32_t* out;
  float* out_logit;
};

template <int64_t kC = 16>
__attribute__((always_inline)) inline void RankRows(const RankArgs& a, int64_t begin,
                                                    int64_t end) {
  if constexpr (kC <= kMaxCandidates) {
    if (a.c != kC) return RankRows<kC + 8>(a, begin, end);
  }
  constexpr int64_t kFixed = kC <= kMaxCandidates ? kC : 0;
  const int64_t c = a.c, k = a.k;
  for (int64_t r = begin; r < end; ++r) {
    RankRow<kFixed>(a.key + r * c, a.index + r * c, a.logit + r * c, c, k, a.out + r * k,
                    a.out_logit + r * k);
  }
}

void RankRowsBaseline(const RankArgs& a, int64_t begin, int64_t end) { RankRows(a, begin, end); }

#ifdef SIGMOID_MOE_X86
SIGMOID_MOE_TARGET_AVX2 void RankRowsAvx2(const RankArgs& a, int64_t begin, int64_t end) {
  RankRows(a, begin, end);
}
#endif

ffi::Error RankCandidatesImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> keys,
                              ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::F32> logits,
                              ffi::ResultBuffer<ffi::S32> ids,
                              ffi::ResultBuffer<ffi::F32> chosen_logits, int64_t k) {
  const auto dims = keys.dimensions();
  if (dims.size() < 1 || index.element_count() != keys.element_count() ||
      logits.element_count() != keys.element_count()) {
    return ffi::Error::InvalidArgument("rank_candidates: keys, index, logits must be [..., C]");
  }
  const int64_t c = dims.back();
  if (k < 1 || k > c || c > kMaxCandidates) {
    return ffi::Error::InvalidArgument("rank_candidates: need 1 <= k <= C <= 128");
  }
  const int64_t rows = static_cast<int64_t>(keys.element_count()) / c;
  const RankArgs args{keys.typed_data(),   index.typed_data(),         logits.typed_data(), c, k,
                      ids->typed_data(), chosen_logits->typed_data()};
  auto rank_rows = RankRowsBaseline;
#ifdef SIGMOID_MOE_X86
  if (simd::HasAvx2()) rank_rows = RankRowsAvx2;
#endif
  ForEachRowRange(pool, rows, c * c,
                  [=](int64_t begin, int64_t end) { rank_rows(args, begin, end); });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace sigmoid_moe

XLA_FFI_DEFINE_HANDLER_SYMBOL(SigmoidMoeRouteCandidates, sigmoid_moe::RouteCandidatesImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("allow_avx2"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SigmoidMoeRankCandidates, sigmoid_moe::RankCandidatesImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k"));
