// A float32 GEMM for the expert matmuls of the blocked FFN: C = A B, or C += A B.
//
// A and B are strided views (any transpose is a choice of strides), so the weights of
// one expert are read where they lie in the [E, K, N] tensor, with no copy of the slice.
// The structure is the usual one of BLIS-like GEMMs:
//   - the inner dimension is cut in chunks of kKc;
//   - a tile of A (rows [m0, m1), one chunk) is packed in panels of kMr rows, and B in
//     panels of kNr columns, each k-major, zero-padded at the edges;
//   - a kMr x kNr micro-kernel keeps its block of C in registers (12 AVX2 accumulators).
//
// Summation order, the same on every path, thread count and tile split, so results are
// bit-reproducible: for each C element, each chunk is summed from 0 with one fused
// multiply-add per k in increasing k, then added to C (or stored, for the first chunk
// without accumulation). The generic path (no AVX2/FMA, or other CPUs) uses std::fma in
// the same order, so it gives the same bits.

#ifndef SIGMOID_MOE_GEMM_F32_H_
#define SIGMOID_MOE_GEMM_F32_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SIGMOID_MOE_GEMM_AVX2 1
#endif

namespace sigmoid_moe {
namespace gemm {

constexpr int64_t kMr = 6;
constexpr int64_t kNr = 16;
constexpr int64_t kKc = 256;

// Element (i, j) is data[i * row_stride + j * col_stride].
struct View {
  const float* data;
  int64_t row_stride;
  int64_t col_stride;
};

// Rows [m0, m1) of A, inner indices [k0, k0 + kc), as panels of kMr rows: element
// (m0 + p * kMr + i, k0 + k) at out[(p * kc + k) * kMr + i]; rows past m1 are zeros. The
// loops follow A's contiguous dimension, so every read is sequential (a panel at a time
// would read one float run per 4 KB page of a wide matrix).
inline void PackA(const View& a, int64_t m0, int64_t m1, int64_t k0, int64_t kc, float* out) {
  const int64_t panels = (m1 - m0 + kMr - 1) / kMr;
  if ((m1 - m0) % kMr != 0) {
    std::fill(out + (panels - 1) * kc * kMr, out + panels * kc * kMr, 0.0f);
  }
  if (a.col_stride == 1) {
    for (int64_t i = m0; i < m1; ++i) {
      const float* row = a.data + i * a.row_stride + k0;
      float* dst = out + ((i - m0) / kMr) * kc * kMr + (i - m0) % kMr;
      for (int64_t k = 0; k < kc; ++k) dst[k * kMr] = row[k];
    }
  } else {
    for (int64_t k = 0; k < kc; ++k) {
      const float* col = a.data + (k0 + k) * a.col_stride;
      for (int64_t i = m0; i < m1; ++i) {
        out[(((i - m0) / kMr) * kc + k) * kMr + (i - m0) % kMr] = col[i * a.row_stride];
      }
    }
  }
}

// Columns [n0, n1) of B, inner indices [k0, k0 + kc), as panels of kNr columns: element
// (k0 + k, n0 + q * kNr + j) at out[(q * kc + k) * kNr + j]; columns past n1 are zeros.
inline void PackB(const View& b, int64_t n0, int64_t n1, int64_t k0, int64_t kc, float* out) {
  const int64_t panels = (n1 - n0 + kNr - 1) / kNr;
  if ((n1 - n0) % kNr != 0) {
    std::fill(out + (panels - 1) * kc * kNr, out + panels * kc * kNr, 0.0f);
  }
  if (b.col_stride == 1) {
    for (int64_t k = 0; k < kc; ++k) {
      const float* row = b.data + (k0 + k) * b.row_stride;
      for (int64_t q = 0; q < panels; ++q) {
        const int64_t n = n0 + q * kNr;
        std::copy(row + n, row + std::min(n1, n + kNr), out + (q * kc + k) * kNr);
      }
    }
  } else {
    for (int64_t j = n0; j < n1; ++j) {
      const float* col = b.data + j * b.col_stride + k0 * b.row_stride;
      float* dst = out + ((j - n0) / kNr) * kc * kNr + (j - n0) % kNr;
      for (int64_t k = 0; k < kc; ++k) dst[k * kNr] = col[k * b.row_stride];
    }
  }
}

// Stores (or adds) the first mr x nr of the kMr x kNr block `t` into C.
inline void WriteBlock(const float* t, float* c, int64_t ldc, int64_t mr, int64_t nr,
                       bool accumulate) {
  for (int64_t i = 0; i < mr; ++i) {
    for (int64_t j = 0; j < nr; ++j) {
      float* p = c + i * ldc + j;
      *p = accumulate ? *p + t[i * kNr + j] : t[i * kNr + j];
    }
  }
}

inline void MicroKernelGeneric(int64_t kc, const float* pa, const float* pb, float* c,
                               int64_t ldc, int64_t mr, int64_t nr, bool accumulate) {
  float t[kMr * kNr] = {};
  for (int64_t k = 0; k < kc; ++k) {
    for (int64_t i = 0; i < kMr; ++i) {
      for (int64_t j = 0; j < kNr; ++j) {
        t[i * kNr + j] = std::fma(pa[k * kMr + i], pb[k * kNr + j], t[i * kNr + j]);
      }
    }
  }
  WriteBlock(t, c, ldc, mr, nr, accumulate);
}

#ifdef SIGMOID_MOE_GEMM_AVX2
__attribute__((target("avx2,fma"))) inline void MicroKernelAvx2(
    int64_t kc, const float* pa, const float* pb, float* c, int64_t ldc, int64_t mr, int64_t nr,
    bool accumulate) {
  // Twelve named accumulators: an array of them is not kept in registers by GCC.
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < kc; ++k, pa += kMr, pb += kNr) {
    const __m256 b0 = _mm256_loadu_ps(pb);
    const __m256 b1 = _mm256_loadu_ps(pb + 8);
    __m256 a = _mm256_broadcast_ss(pa);
    c00 = _mm256_fmadd_ps(a, b0, c00);
    c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(pa + 1);
    c10 = _mm256_fmadd_ps(a, b0, c10);
    c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(pa + 2);
    c20 = _mm256_fmadd_ps(a, b0, c20);
    c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(pa + 3);
    c30 = _mm256_fmadd_ps(a, b0, c30);
    c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(pa + 4);
    c40 = _mm256_fmadd_ps(a, b0, c40);
    c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(pa + 5);
    c50 = _mm256_fmadd_ps(a, b0, c50);
    c51 = _mm256_fmadd_ps(a, b1, c51);
  }
  const __m256 acc[kMr][2] = {{c00, c01}, {c10, c11}, {c20, c21},
                              {c30, c31}, {c40, c41}, {c50, c51}};
  if (mr == kMr && nr == kNr) {
    for (int64_t i = 0; i < kMr; ++i) {
      float* row = c + i * ldc;
      __m256 lo = acc[i][0], hi = acc[i][1];
      if (accumulate) {
        lo = _mm256_add_ps(_mm256_loadu_ps(row), lo);
        hi = _mm256_add_ps(_mm256_loadu_ps(row + 8), hi);
      }
      _mm256_storeu_ps(row, lo);
      _mm256_storeu_ps(row + 8, hi);
    }
    return;
  }
  alignas(32) float t[kMr * kNr];
  for (int64_t i = 0; i < kMr; ++i) {
    _mm256_store_ps(t + i * kNr, acc[i][0]);
    _mm256_store_ps(t + i * kNr + 8, acc[i][1]);
  }
  WriteBlock(t, c, ldc, mr, nr, accumulate);
}

inline bool HasAvx2Fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

// C[m0:m1, n0:n1] (+)= A[m0:m1, :] B[:, n0:n1] with inner dimension `depth`; C is
// row-major with leading dimension ldc. With depth 0 it stores zeros (or leaves C).
inline void GemmTile(const View& a, const View& b, int64_t depth, float* c, int64_t ldc,
                     int64_t m0, int64_t m1, int64_t n0, int64_t n1, bool accumulate,
                     bool avx2) {
  if (depth == 0) {
    if (!accumulate) {
      for (int64_t i = m0; i < m1; ++i) std::fill(c + i * ldc + n0, c + i * ldc + n1, 0.0f);
    }
    return;
  }
  thread_local std::vector<float> packed_a, packed_b;
  const int64_t row_panels = (m1 - m0 + kMr - 1) / kMr;
  const int64_t col_panels = (n1 - n0 + kNr - 1) / kNr;
  packed_a.resize(static_cast<size_t>(row_panels * kMr * kKc));
  packed_b.resize(static_cast<size_t>(col_panels * kNr * kKc));
  for (int64_t k0 = 0; k0 < depth; k0 += kKc) {
    const int64_t kc = std::min(kKc, depth - k0);
    const bool add = accumulate || k0 > 0;
    PackA(a, m0, m1, k0, kc, packed_a.data());
    PackB(b, n0, n1, k0, kc, packed_b.data());
    for (int64_t q = 0; q < col_panels; ++q) {
      const int64_t n = n0 + q * kNr;
      const int64_t nr = std::min(kNr, n1 - n);
      const float* pb = packed_b.data() + q * kc * kNr;
      for (int64_t p = 0; p < row_panels; ++p) {
        const int64_t m = m0 + p * kMr;
        const int64_t mr = std::min(kMr, m1 - m);
        const float* pa = packed_a.data() + p * kc * kMr;
        float* cm = c + m * ldc + n;
#ifdef SIGMOID_MOE_GEMM_AVX2
        if (avx2) {
          MicroKernelAvx2(kc, pa, pb, cm, ldc, mr, nr, add);
          continue;
        }
#endif
        MicroKernelGeneric(kc, pa, pb, cm, ldc, mr, nr, add);
      }
    }
  }
}

// How C [m, n] is cut into tiles, one task each: whole rows (up to kMaxTileRows) and
// column chunks of whole kNr panels, about two tasks per thread; one tile for small
// products.
struct Tiling {
  int64_t row_tiles, tile_rows, col_tiles, tile_cols;
  int64_t tasks() const { return row_tiles * col_tiles; }
};

constexpr int64_t kMaxTileRows = 512;
constexpr int64_t kMinTileCols = 64;
constexpr int64_t kMinFlopsToSplit = int64_t{1} << 20;

inline Tiling TileFor(int64_t m, int64_t n, int64_t depth, int64_t threads) {
  if (m == 0 || n == 0 || threads <= 1 || m * n * depth < kMinFlopsToSplit) {
    return {1, std::max<int64_t>(m, 1), 1, std::max<int64_t>(n, 1)};
  }
  const int64_t row_tiles = (m + kMaxTileRows - 1) / kMaxTileRows;
  const int64_t tile_rows = ((m + row_tiles - 1) / row_tiles + kMr - 1) / kMr * kMr;
  const int64_t want = std::max<int64_t>(1, 2 * threads / row_tiles);
  int64_t tile_cols = ((n + want - 1) / want + kNr - 1) / kNr * kNr;
  tile_cols = std::max(tile_cols, std::min(n, kMinTileCols));
  return {(m + tile_rows - 1) / tile_rows, tile_rows, (n + tile_cols - 1) / tile_cols, tile_cols};
}

}  // namespace gemm
}  // namespace sigmoid_moe

#endif  // SIGMOID_MOE_GEMM_F32_H_
