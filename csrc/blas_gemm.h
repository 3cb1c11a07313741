// The expert kernel's matrix products: single-precision GEMM from OpenBLAS, as packaged for
// NumPy and SciPy (the `scipy-openblas32` wheel: its symbols carry a `scipy_` prefix). The
// library picks its kernels for the CPU at run time (DYNAMIC_ARCH), so the products run
// at the library's speed on AVX2, AVX-512 or later CPUs alike.
//
// Each call runs on the calling thread: the kernel runs one expert per task on XLA's pool,
// and UseOneThread() (at the start of each kernel call) sets this process's OpenBLAS to
// one thread. A single-threaded GEMM of given operands gives the same bits on every call,
// so results do not depend on how many threads XLA's pool has; they may differ between
// CPUs whose OpenBLAS kernels differ.

#ifndef SIGMOID_MOE_BLAS_GEMM_H_
#define SIGMOID_MOE_BLAS_GEMM_H_

#include <algorithm>
#include <cstdint>

#include <cblas.h>

namespace sigmoid_moe {
namespace blas {

// Sets the library to run each call on its calling thread (a process-wide setting of the
// scipy-openblas32 library, which nothing else in the package uses).
inline void UseOneThread() {
  if (scipy_openblas_get_num_threads() != 1) scipy_openblas_set_num_threads(1);
}

// A row-major operand: element (i, k) of op(M) is data[i * ld + k], or data[k * ld + i]
// when `transposed`.
struct Operand {
  const float* data;
  int64_t ld;
  bool transposed = false;
};

// C [m, n] = op(A) [m, depth] op(B) [depth, n], or C += that with `accumulate`; C is
// row-major with leading dimension ldc. Dimensions must fit in 32 bits (the callers'
// do: at most the kernel's chunk rows, d_model and 2 d_ff).
inline void Gemm(const Operand& a, const Operand& b, int64_t m, int64_t n, int64_t depth,
                 float* c, int64_t ldc, bool accumulate = false) {
  if (m == 0 || n == 0) return;
  if (depth == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    }
    return;
  }
  auto op = [](const Operand& x) { return x.transposed ? CblasTrans : CblasNoTrans; };
  scipy_cblas_sgemm(CblasRowMajor, op(a), op(b), static_cast<blasint>(m),
                    static_cast<blasint>(n), static_cast<blasint>(depth), 1.0f, a.data,
                    static_cast<blasint>(a.ld), b.data, static_cast<blasint>(b.ld),
                    accumulate ? 1.0f : 0.0f, c, static_cast<blasint>(ldc));
}

}  // namespace blas
}  // namespace sigmoid_moe

#endif  // SIGMOID_MOE_BLAS_GEMM_H_
