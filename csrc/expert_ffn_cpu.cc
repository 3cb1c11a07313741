// The blocked FFN's routed experts on the CPU, forward and backward, as XLA FFI custom
// calls (sigmoid_moe/blocked_ffn.py has the math and the block layout).
//
// The layout puts expert e's rows in consecutive blocks of B rows: its filled rows are a
// prefix of those blocks. A *segment* is one expert's rows, and one task: gather its
// tokens' rows, both GEMMs (blas_gemm.h: the library's, single-threaded, reading w[e] in
// place), the SwiGLU, the weight;
// the backward also forms the expert's two weight gradients, so every task writes only its
// own rows and its own expert's slices, and tasks run on XLA's intra-op pool with no
// locks. The per-row outputs are then summed into tokens, each token's rows in increasing
// row order, as the pure-JAX scan adds them (row_tasks.h). Which thread runs what never
// changes a result: the sums have a fixed order.
//
// SigmoidMoeExpertFfnFwd(x [T, d], src [R], weight [R], block_expert [NB],
//                        w_in [E, d, 2F], w_out [E, F, d])
//   -> y [T, d] (sum over a token's rows of weight * SwiGLU_e(x) @ w_out[e]),
//      h [P, 2F] (the pre-activations x @ w_in[e] of the segments' rows, packed: segment
//      after segment in layout order; kept for the backward). P must be at least the
//      filled rows (the assignments); rows past them are zeros.
// SigmoidMoeExpertFfnBwd(x, dy [T, d], src, weight, block_expert, w_in, w_out, h)
//   -> dx [T, d], dweight [R], dw_in [E, d, 2F], dw_out [E, F, d].
//
// Memory outside XLA's buffers: the per-row outputs of one *wave* of segments (at most
// kWaveRowBytes, or one segment), summed into the tokens before the next wave, and per
// thread the gathered rows and activations of one chunk of at most kChunkRows rows (kept
// for reuse), plus the GEMM library's packing buffers (sigmoid_moe/_native_ffn.py's
// host_scratch_bytes states the bound).
//
// R = NB * B. A row whose src is outside [0, T) is empty: it reads a zero row and adds
// nothing (the layout's empty rows have src T). An expert id of -1 marks an unused block.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "blas_gemm.h"
#include "kernel_limits.h"
#include "row_tasks.h"
#include "simd_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace sigmoid_moe {
namespace {

using blas::Gemm;
using simd::SigmoidScalar;

// Below this many multiply-adds in all, the pool is not worth waking.
constexpr int64_t kMinWorkToSplit = int64_t{1} << 22;

bool UseAvx2(int64_t allow_avx2) { return allow_avx2 != 0 && simd::HasAvx2(); }

// ------------------------------------------------------------------ SwiGLU, vectorised

// a[j] = silu(g[j]) * u[j], g = h[j], u = h[F + j], for one row.
inline void SwigluRowScalar(const float* h, float* a, int64_t f, int64_t j0) {
  for (int64_t j = j0; j < f; ++j) {
    const float g = h[j];
    a[j] = (g * SigmoidScalar(g)) * h[f + j];
  }
}

#ifdef SIGMOID_MOE_X86
SIGMOID_MOE_TARGET_AVX2 void SwigluRowAvx2(const float* h, float* a, int64_t f) {
  int64_t j = 0;
  for (; j + 8 <= f; j += 8) {
    const __m256 g = _mm256_loadu_ps(h + j);
    const __m256 silu = _mm256_mul_ps(g, simd::Sigmoid8(g));
    _mm256_storeu_ps(a + j, _mm256_mul_ps(silu, _mm256_loadu_ps(h + f + j)));
  }
  SwigluRowScalar(h, a, f, j);
}
#endif

void SwigluRow(const float* h, float* a, int64_t f, bool avx2) {
#ifdef SIGMOID_MOE_X86
  if (avx2) return SwigluRowAvx2(h, a, f);
#endif
  SwigluRowScalar(h, a, f, 0);
}

// The backward of one row. With s = sigmoid(g), silu = g s, a = silu u and the
// *unweighted* cotangent da:
//   aw = w a (for dw_out);  dweight = sum_j a da (8 lane sums, then in lane order);
//   du = w da silu;  dg = w da u s (1 + g (1 - s)).
// dh = [dg | du]. Returns dweight.
inline void SwigluBwdScalar(const float* h, const float* da, float w, float* aw, float* dh,
                            int64_t f, int64_t j0, float* lanes) {
  for (int64_t j = j0; j < f; ++j) {
    const float g = h[j], u = h[f + j];
    const float s = SigmoidScalar(g);
    const float silu = g * s;
    const float a = silu * u;
    aw[j] = a * w;
    lanes[j % 8] = std::fma(a, da[j], lanes[j % 8]);
    const float daw = da[j] * w;
    dh[f + j] = daw * silu;
    dh[j] = (daw * u) * (s * std::fma(g, 1.0f - s, 1.0f));
  }
}

inline float SumLanes(const float* lanes) {
  float total = 0.0f;
  for (int i = 0; i < 8; ++i) total += lanes[i];
  return total;
}

#ifdef SIGMOID_MOE_X86
SIGMOID_MOE_TARGET_AVX2 float SwigluBwdRowAvx2(const float* h, const float* da, float w,
                                                float* aw, float* dh, int64_t f) {
  const __m256 wv = _mm256_set1_ps(w), one = _mm256_set1_ps(1.0f);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= f; j += 8) {
    const __m256 g = _mm256_loadu_ps(h + j), u = _mm256_loadu_ps(h + f + j);
    const __m256 d = _mm256_loadu_ps(da + j);
    const __m256 s = simd::Sigmoid8(g);
    const __m256 silu = _mm256_mul_ps(g, s);
    const __m256 a = _mm256_mul_ps(silu, u);
    _mm256_storeu_ps(aw + j, _mm256_mul_ps(a, wv));
    acc = _mm256_fmadd_ps(a, d, acc);
    const __m256 daw = _mm256_mul_ps(d, wv);
    _mm256_storeu_ps(dh + f + j, _mm256_mul_ps(daw, silu));
    const __m256 ds = _mm256_mul_ps(s, _mm256_fmadd_ps(g, _mm256_sub_ps(one, s), one));
    _mm256_storeu_ps(dh + j, _mm256_mul_ps(_mm256_mul_ps(daw, u), ds));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  SwigluBwdScalar(h, da, w, aw, dh, f, j, lanes);
  return SumLanes(lanes);
}
#endif

float SwigluBwdRow(const float* h, const float* da, float w, float* aw, float* dh, int64_t f,
                   bool avx2) {
#ifdef SIGMOID_MOE_X86
  if (avx2) return SwigluBwdRowAvx2(h, da, w, aw, dh, f);
#endif
  float lanes[8] = {};
  SwigluBwdScalar(h, da, w, aw, dh, f, 0, lanes);
  return SumLanes(lanes);
}

// ------------------------------------------------------------------ layout

struct Shapes {
  int64_t tokens, d, f, experts, num_blocks, block_size;
  int64_t packed_rows;  // rows of h the segments take (the rest are zeros)
};

struct Segment {
  int64_t expert, row0, rows;  // rows [row0, row0 + rows) of the layout
  int64_t packed;              // its first row in h (segments packed in layout order)
};

// Checks the operands (h: `h_dims`) and finds each expert's segment (its run of blocks,
// up to its last filled row). Segments with no filled row are left out.
ffi::Error Plan(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::S32>& src,
                ffi::Buffer<ffi::F32>& weight, ffi::Buffer<ffi::S32>& block_expert,
                ffi::Buffer<ffi::F32>& w_in, ffi::Buffer<ffi::F32>& w_out,
                ffi::Span<const int64_t> h_dims, Shapes* shapes,
                std::vector<Segment>* segments) {
  const auto xd = x.dimensions(), wi = w_in.dimensions(), wo = w_out.dimensions();
  if (xd.size() != 2 || wi.size() != 3 || wo.size() != 3 || src.dimensions().size() != 1 ||
      weight.dimensions().size() != 1 || block_expert.dimensions().size() != 1 ||
      h_dims.size() != 2 || h_dims[1] != wi[2]) {
    return ffi::Error::InvalidArgument(
        "expert_ffn: need x [T, d], src [R], weight [R], block_expert [NB], "
        "w_in [E, d, 2F], w_out [E, F, d], h [rows, 2F]");
  }
  Shapes s;
  s.tokens = xd[0];
  s.d = xd[1];
  s.experts = wi[0];
  s.f = wo[1];
  s.num_blocks = block_expert.element_count();
  const int64_t rows = src.element_count();
  if (wi[1] != s.d || wi[2] != 2 * s.f || wo[0] != s.experts || wo[2] != s.d ||
      static_cast<int64_t>(weight.element_count()) != rows || s.num_blocks < 1 ||
      rows % s.num_blocks != 0) {
    return ffi::Error::InvalidArgument("expert_ffn: operand shapes do not match");
  }
  s.block_size = rows / s.num_blocks;
  const int32_t* be = block_expert.typed_data();
  const int32_t* sr = src.typed_data();
  std::vector<char> seen(static_cast<size_t>(s.experts), 0);
  segments->clear();
  int64_t packed = 0;
  for (int64_t b = 0; b < s.num_blocks;) {
    const int64_t e = be[b];
    int64_t end = b + 1;
    while (end < s.num_blocks && be[end] == e) ++end;
    if (e >= 0) {
      if (e >= s.experts || seen[e]) {
        return ffi::Error::InvalidArgument(
            "expert_ffn: block experts must be in [-1, E) with each expert's blocks adjacent");
      }
      seen[e] = 1;
      int64_t filled = 0;
      for (int64_t r = b * s.block_size; r < end * s.block_size; ++r) {
        if (sr[r] >= 0 && sr[r] < s.tokens) filled = r - b * s.block_size + 1;
      }
      if (filled > 0) {
        segments->push_back({e, b * s.block_size, filled, packed});
        packed += filled;
      }
    }
    b = end;
  }
  if (packed > h_dims[0]) {
    return ffi::Error::InvalidArgument(
        "expert_ffn: the experts' rows need more rows of h than it has (one per assignment "
        "is enough when each expert's filled rows are a prefix of its blocks, as "
        "block_layout makes them)");
  }
  s.packed_rows = packed;
  *shapes = s;
  return ffi::Error::Success();
}

// Consecutive segments whose rows span at most kWaveRowBytes of d-wide float rows (at
// least one segment each): the per-row outputs of one wave are summed into the tokens
// before the next wave runs, which bounds that buffer.

std::vector<std::pair<size_t, size_t>> Waves(const std::vector<Segment>& segments, int64_t d) {
  const int64_t cap = std::max<int64_t>(1, kWaveRowBytes / (4 * std::max<int64_t>(1, d)));
  std::vector<std::pair<size_t, size_t>> waves;
  for (size_t i = 0; i < segments.size();) {
    size_t j = i + 1;
    while (j < segments.size() &&
           segments[j].row0 + segments[j].rows - segments[i].row0 <= cap) {
      ++j;
    }
    waves.push_back({i, j});
    i = j;
  }
  return waves;
}

// The tasks of a wave, largest first: the pool then ends with small tasks.
std::vector<Segment> LargestFirst(const std::vector<Segment>& segments,
                                  std::pair<size_t, size_t> wave) {
  std::vector<Segment> tasks(segments.begin() + wave.first, segments.begin() + wave.second);
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Segment& l, const Segment& r) { return l.rows > r.rows; });
  return tasks;
}

// Sums per-row outputs into the tokens, each token's rows in increasing row order from
// 0.0, one wave of rows at a time (rows only of the segments: others are never computed).
class TokenSum {
 public:
  TokenSum(const int32_t* src, const std::vector<Segment>& segments, int64_t tokens, int64_t d,
           float* out_td)
      : d_(d), out_td_(out_td) {
    start_.assign(static_cast<size_t>(tokens + 1), 0);
    ForEachFilledRow(src, segments, tokens, [&](int64_t, int32_t t) { ++start_[t + 1]; });
    for (int64_t t = 0; t < tokens; ++t) start_[t + 1] += start_[t];
    rows_.resize(static_cast<size_t>(start_[tokens]));
    cursor_.assign(start_.begin(), start_.end() - 1);
    ForEachFilledRow(src, segments, tokens, [&](int64_t r, int32_t t) { rows_[cursor_[t]++] = r; });
    cursor_.assign(start_.begin(), start_.end() - 1);
    std::fill(out_td, out_td + tokens * d, 0.0f);
  }

  // Adds the rows [row_lo, row_hi), row r held at rows_buf[(r - row_lo) * d].
  void Add(ffi::ThreadPool& pool, int64_t row_lo, int64_t row_hi, const float* rows_buf) {
    const int64_t tokens = static_cast<int64_t>(cursor_.size());
    ForEachRowRange(pool, tokens, d_, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        float* out = out_td_ + t * d_;
        int64_t& i = cursor_[t];
        for (; i < start_[t + 1] && rows_[i] < row_hi; ++i) {
          const float* row = rows_buf + (rows_[i] - row_lo) * d_;
          for (int64_t j = 0; j < d_; ++j) out[j] += row[j];
        }
      }
    });
  }

 private:
  template <typename Fn>
  static void ForEachFilledRow(const int32_t* src, const std::vector<Segment>& segments,
                               int64_t tokens, Fn fn) {
    for (const Segment& seg : segments) {
      for (int64_t r = seg.row0; r < seg.row0 + seg.rows; ++r) {
        if (src[r] >= 0 && src[r] < tokens) fn(r, src[r]);
      }
    }
  }

  int64_t d_;
  float* out_td_;
  std::vector<int64_t> start_, rows_, cursor_;
};

// rows [n, d] = table[src[row0 + i]] (zero rows for empty rows). Each row's cache lines
// are requested two rows ahead: a row starts at a place the hardware prefetcher cannot
// guess (figures in benchmarks/layer.py's docstring).
void GatherRows(const float* table, const int32_t* src, int64_t row0, int64_t n,
                int64_t tokens, int64_t d, float* rows) {
  constexpr int64_t kAhead = 2, kLineFloats = 16;
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n) {
      const int32_t ahead = src[row0 + i + kAhead];
      if (ahead >= 0 && ahead < tokens) {
        const float* next = table + ahead * d;
        for (int64_t j = 0; j < d; j += kLineFloats) __builtin_prefetch(next + j);
      }
    }
    const int32_t t = src[row0 + i];
    float* dst = rows + i * d;
    if (t >= 0 && t < tokens) {
      std::memcpy(dst, table + t * d, sizeof(float) * d);
    } else {
      std::fill(dst, dst + d, 0.0f);
    }
  }
}

// A thread's buffer for one chunk, kept for reuse, 64-byte aligned (as XLA's buffers).
class Scratch {
 public:
  float* Get(int64_t size) {
    if (size > size_) {
      data_.reset(static_cast<float*>(
          ::operator new[](sizeof(float) * static_cast<size_t>(size), std::align_val_t{64})));
      size_ = size;
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(float* p) const { ::operator delete[](p, std::align_val_t{64}); }
  };
  std::unique_ptr<float[], Free> data_;
  int64_t size_ = 0;
};

// Runs task(segment, rows_buf + (segment.row0 - wave_lo) * d) for every segment, wave by
// wave, then adds the wave's rows into the tokens.
template <typename TaskFn>
void RunWaves(ffi::ThreadPool& pool, const std::vector<Segment>& segments, const Shapes& s,
              TokenSum& sum, const TaskFn& task) {
  const auto waves = Waves(segments, s.d);
  int64_t span = 1;
  for (const auto& w : waves) {
    const Segment& last = segments[w.second - 1];
    span = std::max(span, last.row0 + last.rows - segments[w.first].row0);
  }
  std::unique_ptr<float[]> rows_buf(new float[static_cast<size_t>(span * s.d)]);
  for (const auto& w : waves) {
    const std::vector<Segment> tasks = LargestFirst(segments, w);
    const int64_t lo = segments[w.first].row0;
    int64_t work = 0;
    for (const Segment& seg : tasks) work += seg.rows * s.d * 3 * s.f;
    ForEachTask(pool, static_cast<int64_t>(tasks.size()), work >= kMinWorkToSplit,
                [&](int64_t t) { task(tasks[t], rows_buf.get() + (tasks[t].row0 - lo) * s.d); });
    const Segment& last = segments[w.second - 1];
    sum.Add(pool, lo, last.row0 + last.rows, rows_buf.get());
  }
}

// ------------------------------------------------------------------ forward

ffi::Error FwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> src,
                   ffi::Buffer<ffi::F32> weight, ffi::Buffer<ffi::S32> block_expert,
                   ffi::Buffer<ffi::F32> w_in, ffi::Buffer<ffi::F32> w_out,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> h,
                   int64_t allow_avx2) {
  Shapes s;
  std::vector<Segment> segments;
  if (ffi::Error err = Plan(x, src, weight, block_expert, w_in, w_out, h->dimensions(), &s,
                            &segments);
      err.failure()) {
    return err;
  }
  blas::UseOneThread();
  const bool avx2 = UseAvx2(allow_avx2);
  const int64_t d = s.d, f = s.f, f2 = 2 * s.f;
  const float* xs = x.typed_data();
  const int32_t* sr = src.typed_data();
  const float* wr = weight.typed_data();
  float* h_pf2 = h->typed_data();
  // Rows of h past the segments' are never read; zeros keep the output deterministic.
  std::fill(h_pf2 + s.packed_rows * f2, h_pf2 + h->element_count(), 0.0f);
  TokenSum sum(sr, segments, s.tokens, d, y->typed_data());
  RunWaves(pool, segments, s, sum, [&](const Segment& seg, float* o_rd) {
    thread_local Scratch x_buf, a_buf;
    const float* wi = w_in.typed_data() + seg.expert * d * f2;
    const float* wo = w_out.typed_data() + seg.expert * f * d;
    for (int64_t c0 = 0; c0 < seg.rows; c0 += kChunkRows) {
      const int64_t n = std::min(kChunkRows, seg.rows - c0), row0 = seg.row0 + c0;
      float* x_nd = x_buf.Get(n * d);
      float* a_nf = a_buf.Get(n * f);
      GatherRows(xs, sr, row0, n, s.tokens, d, x_nd);
      float* h_nf2 = h_pf2 + (seg.packed + c0) * f2;
      Gemm({x_nd, d}, {wi, f2}, n, f2, d, h_nf2, f2);
      for (int64_t i = 0; i < n; ++i) SwigluRow(h_nf2 + i * f2, a_nf + i * f, f, avx2);
      float* o_nd = o_rd + c0 * d;
      Gemm({a_nf, f}, {wo, d}, n, d, f, o_nd, d);
      for (int64_t i = 0; i < n; ++i) {
        const float w = wr[row0 + i];
        for (int64_t j = 0; j < d; ++j) o_nd[i * d + j] *= w;
      }
    }
  });
  return ffi::Error::Success();
}

// ------------------------------------------------------------------ backward

ffi::Error BwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                   ffi::Buffer<ffi::S32> src, ffi::Buffer<ffi::F32> weight,
                   ffi::Buffer<ffi::S32> block_expert, ffi::Buffer<ffi::F32> w_in,
                   ffi::Buffer<ffi::F32> w_out, ffi::Buffer<ffi::F32> h,
                   ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dweight,
                   ffi::ResultBuffer<ffi::F32> dw_in, ffi::ResultBuffer<ffi::F32> dw_out,
                   int64_t allow_avx2) {
  Shapes s;
  std::vector<Segment> segments;
  if (ffi::Error err = Plan(x, src, weight, block_expert, w_in, w_out, h.dimensions(), &s,
                            &segments);
      err.failure()) {
    return err;
  }
  const int64_t d = s.d, f = s.f, f2 = 2 * s.f;
  const int64_t num_rows = s.num_blocks * s.block_size;
  if (static_cast<int64_t>(dy.element_count()) != s.tokens * d) {
    return ffi::Error::InvalidArgument("expert_ffn_bwd: dy must be [T, d]");
  }
  blas::UseOneThread();
  const bool avx2 = UseAvx2(allow_avx2);
  const float* xs = x.typed_data();
  const float* dys = dy.typed_data();
  const int32_t* sr = src.typed_data();
  const float* wr = weight.typed_data();
  float* dweight_r = dweight->typed_data();
  float* dw_in_edf2 = dw_in->typed_data();
  float* dw_out_efd = dw_out->typed_data();
  std::fill(dweight_r, dweight_r + num_rows, 0.0f);
  // Experts with no filled row get zero gradients; the others are written by their task.
  std::vector<char> has_rows(static_cast<size_t>(s.experts), 0);
  for (const Segment& seg : segments) has_rows[seg.expert] = 1;
  for (int64_t e = 0; e < s.experts; ++e) {
    if (has_rows[e]) continue;
    std::fill(dw_in_edf2 + e * d * f2, dw_in_edf2 + (e + 1) * d * f2, 0.0f);
    std::fill(dw_out_efd + e * f * d, dw_out_efd + (e + 1) * f * d, 0.0f);
  }
  TokenSum sum(sr, segments, s.tokens, d, dx->typed_data());
  RunWaves(pool, segments, s, sum, [&](const Segment& seg, float* dx_rd) {
    const int64_t e = seg.expert;
    thread_local Scratch x_buf, dy_buf, aw_buf, da_buf, dh_buf;
    const float* wi = w_in.typed_data() + e * d * f2;
    const float* wo = w_out.typed_data() + e * f * d;
    for (int64_t c0 = 0; c0 < seg.rows; c0 += kChunkRows) {
      const int64_t n = std::min(kChunkRows, seg.rows - c0), row0 = seg.row0 + c0;
      const bool accumulate = c0 > 0;  // the weight gradients sum over the chunks
      float* x_nd = x_buf.Get(n * d);
      float* dy_nd = dy_buf.Get(n * d);
      float* aw_nf = aw_buf.Get(n * f);
      float* da_nf = da_buf.Get(n * f);
      float* dh_nf2 = dh_buf.Get(n * f2);
      GatherRows(xs, sr, row0, n, s.tokens, d, x_nd);
      GatherRows(dys, sr, row0, n, s.tokens, d, dy_nd);
      const float* h_nf2 = h.typed_data() + (seg.packed + c0) * f2;
      // da = dy @ w_out[e]^T.
      Gemm({dy_nd, d}, {wo, d, true}, n, f, d, da_nf, f);
      for (int64_t i = 0; i < n; ++i) {
        dweight_r[row0 + i] = SwigluBwdRow(h_nf2 + i * f2, da_nf + i * f, wr[row0 + i],
                                           aw_nf + i * f, dh_nf2 + i * f2, f, avx2);
      }
      // dw_out[e] (+)= (w a)^T @ dy.
      Gemm({aw_nf, f, true}, {dy_nd, d}, f, d, n, dw_out_efd + e * f * d, d, accumulate);
      // dw_in[e] (+)= x^T @ dh.
      Gemm({x_nd, d, true}, {dh_nf2, f2}, d, f2, n, dw_in_edf2 + e * d * f2, f2, accumulate);
      // dx rows = dh @ w_in[e]^T.
      Gemm({dh_nf2, f2}, {wi, f2, true}, n, d, f2, dx_rd + c0 * d, d);
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace sigmoid_moe

XLA_FFI_DEFINE_HANDLER_SYMBOL(SigmoidMoeExpertFfnFwd, sigmoid_moe::FwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::S32>>()  // src
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weight
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_expert
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_in
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h
                                  .Attr<int64_t>("allow_avx2"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SigmoidMoeExpertFfnBwd, sigmoid_moe::BwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::S32>>()  // src
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weight
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_expert
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_in
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dweight
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw_in
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw_out
                                  .Attr<int64_t>("allow_avx2"));
