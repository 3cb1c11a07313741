// Exact top-k indices of one row of floats: value descending, then index ascending (ties
// to the lower index). NaN ranks as -inf (never before a number; among themselves by
// index), and -0.0 equals 0.0. This is the order of sigmoid_moe.topk.top_k's portable
// path; the tests compare the two bit for bit.
//
// Fast path (x86-64, k <= 16; SSE2 only, the x86-64 baseline), per row:
//  1. A lower bound of the k-th best value: the row cut into M >= k strided chunks (entry
//     j in chunk j % M, M = k rounded up to 4) has M chunk maxes, all entries, so at least
//     k entries are >= the smallest of them. One vector max per 4 entries.
//  2. The entries >= that bound are the candidates, in index order: one compare and one
//     mask per 4 entries. On router scores about 20 for k = 8 of 128.
//  3. If they fit in S = 4M slots (padded with -inf), k rounds each take the largest
//     slot value and, of equal ones, the lowest slot (the lowest index), then clear it.
//     No branch depends on the data, which matters more here than the operation count.
// Every other row (other CPUs, k > 16, more candidates than slots, fewer than M entries
// above -inf) takes the general path: one pass, inserting an entry into a sorted list of
// k only when strictly greater than the k-th best so far.

#ifndef SIGMOID_MOE_TOP_K_ROW_H_
#define SIGMOID_MOE_TOP_K_ROW_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kernel_limits.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#define SIGMOID_MOE_SSE2 1
#endif

namespace sigmoid_moe {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Inserts (v, j) into the sorted prefix tv/ti of length m, after every entry >= v: an
// equal value keeps the earlier index first.
inline void Insert(float v, int32_t j, float* tv, int32_t* ti, int64_t m) {
  int64_t p = m;
  while (p > 0 && v > tv[p - 1]) {
    tv[p] = tv[p - 1];
    ti[p] = ti[p - 1];
    --p;
  }
  tv[p] = v;
  ti[p] = j;
}

// The general path for one row.
inline void TopKRowByInsertion(const float* row, int64_t n, int64_t k, int32_t* out) {
  float tv[kMaxK + 1];
  int32_t ti[kMaxK + 1];
  for (int64_t j = 0; j < k; ++j) {
    Insert(std::isnan(row[j]) ? kNegInf : row[j], static_cast<int32_t>(j), tv, ti, j);
  }
  float threshold = tv[k - 1];
  for (int64_t j = k; j < n; ++j) {
    const float v = row[j];  // NaN > threshold is false: like -inf, never taken
    if (v > threshold) {
      Insert(v, static_cast<int32_t>(j), tv, ti, k);  // k + 1 slots, the last dropped
      threshold = tv[k - 1];
    }
  }
  std::copy(ti, ti + k, out);
}

#if SIGMOID_MOE_SSE2

// The fast path for one row with V = ceil(k / 4) bound vectors (M = 4V chunks) and 4V
// slot vectors (S = 16V slots). `candidates` has room for n entries. Returns false, having
// written nothing, where the row needs the general path.
template <int V>
bool TopKRowFast(const float* row, int64_t n, int64_t k, int32_t* candidates, int32_t* out) {
  constexpr int64_t M = 4 * V;
  constexpr int S = 16 * V;
  if (n < M) return false;
  // 1. Chunk maxes. _mm_max_ps(v, acc) returns acc when v is NaN: NaN never wins.
  __m128 acc[V];
  for (int q = 0; q < V; ++q) acc[q] = _mm_set1_ps(kNegInf);
  int64_t j = 0;
  for (; j + M <= n; j += M) {
    for (int q = 0; q < V; ++q) acc[q] = _mm_max_ps(_mm_loadu_ps(row + j + 4 * q), acc[q]);
  }
  alignas(16) float chunk_max[M];
  for (int q = 0; q < V; ++q) _mm_store_ps(chunk_max + 4 * q, acc[q]);
  for (int64_t l = 0; j + l < n; ++l) {  // the tail, into the first chunks
    const float v = row[j + l];
    chunk_max[l] = v > chunk_max[l] ? v : chunk_max[l];
  }
  float bound = chunk_max[0];
  for (int64_t l = 1; l < M; ++l) bound = chunk_max[l] < bound ? chunk_max[l] : bound;
  if (bound == kNegInf) return false;  // fewer than M entries above -inf
  // 2. Candidates: the indices of the entries >= bound (NaN compares false), ascending.
  const __m128 bound_v = _mm_set1_ps(bound);
  int64_t count = 0;
  j = 0;
  for (; j + 32 <= n; j += 32) {  // one mask word per 32 entries, then its set bits
    unsigned bits = 0;
    for (int q = 0; q < 8; ++q) {
      bits |= static_cast<unsigned>(
                  _mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(row + j + 4 * q), bound_v)))
              << (4 * q);
    }
    for (; bits != 0; bits &= bits - 1) {
      candidates[count++] = static_cast<int32_t>(j + __builtin_ctz(bits));
    }
  }
  for (; j < n; ++j) {
    if (row[j] >= bound) candidates[count++] = static_cast<int32_t>(j);
  }
  if (count > S) return false;
  // 3. Rounds over the slots. Every candidate is above -inf and there are >= k of them,
  // so a round's max is above -inf: never a pad nor a cleared slot.
  alignas(16) float slot[S];
  for (int64_t s = 0; s < count; ++s) slot[s] = row[candidates[s]];
  for (int64_t s = count; s < S; ++s) slot[s] = kNegInf;
  __m128 value[4 * V];
  for (int q = 0; q < 4 * V; ++q) value[q] = _mm_load_ps(slot + 4 * q);
  const __m128 neg_inf = _mm_set1_ps(kNegInf);
  for (int64_t round = 0; round < k; ++round) {
    __m128 best = value[0];
    for (int q = 1; q < 4 * V; ++q) best = _mm_max_ps(value[q], best);
    best = _mm_max_ps(best, _mm_shuffle_ps(best, best, 0x4E));  // lanes 2 3 0 1
    best = _mm_max_ps(best, _mm_shuffle_ps(best, best, 0xB1));  // lanes 1 0 3 2
    // The lowest slot holding the max: one mask bit per slot, S <= 64.
    uint64_t bits = 0;
    for (int q = 0; q < 4 * V; ++q) {
      bits |= static_cast<uint64_t>(_mm_movemask_ps(_mm_cmpeq_ps(value[q], best))) << (4 * q);
    }
    const int taken = __builtin_ctzll(bits);
    out[round] = candidates[taken];
    const __m128i at = _mm_set1_epi32(taken);
    for (int q = 0; q < 4 * V; ++q) {
      const __m128 hit = _mm_castsi128_ps(
          _mm_cmpeq_epi32(_mm_setr_epi32(4 * q, 4 * q + 1, 4 * q + 2, 4 * q + 3), at));
      value[q] = _mm_or_ps(_mm_and_ps(hit, neg_inf), _mm_andnot_ps(hit, value[q]));
    }
  }
  return true;
}

#endif  // SIGMOID_MOE_SSE2

// Top-k indices of one row: the fast path where it applies, else the general one.
// `scratch` has room for n entries.
inline void TopKRow(const float* row, int64_t n, int64_t k, int32_t* scratch, int32_t* out) {
#if SIGMOID_MOE_SSE2
  using FastRow = bool (*)(const float*, int64_t, int64_t, int32_t*, int32_t*);
  static constexpr FastRow kFastRow[] = {TopKRowFast<1>, TopKRowFast<2>, TopKRowFast<3>,
                                         TopKRowFast<4>};
  if (k <= kMaxFastK && kFastRow[(k + 3) / 4 - 1](row, n, k, scratch, out)) return;
#endif
  TopKRowByInsertion(row, n, k, out);
}

}  // namespace sigmoid_moe

#endif  // SIGMOID_MOE_TOP_K_ROW_H_
