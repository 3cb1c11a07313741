// The SIMD set-up and the vector math the kernels share: one exp, one sigmoid.
//
// SIGMOID_MOE_X86 is defined where the AVX2 code is compiled (x86-64 with GCC or Clang);
// functions marked SIGMOID_MOE_TARGET_AVX2 may run only where HasAvx2() is true, which
// the kernels check at run time, so the extension itself needs only the x86-64 baseline.
//
// exp as in Cephes' expf: argument clamped to [-87, 88] (NaN stays NaN), reduced by ln 2
// in two parts, a degree-6 polynomial. ExpScalar repeats Exp8 operation by operation,
// fused multiply-adds included, so both give the same bits (tests/test_native_ffn.py
// compares the expert kernel's vector and scalar paths bit for bit). Sigmoid is
// 1 / (1 + exp(-x)); over every 7th float32 in [-120, 120] (321 M values) it is within
// 8.9e-8 of float64's sigmoid on both paths, as XLA's float32 sigmoid is (csrc/route_cpu.cc
// relies on such a bound).

#ifndef SIGMOID_MOE_SIMD_MATH_H_
#define SIGMOID_MOE_SIMD_MATH_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SIGMOID_MOE_X86 1
#define SIGMOID_MOE_TARGET_AVX2 __attribute__((target("avx2,fma,popcnt")))
#endif

namespace sigmoid_moe {
namespace simd {

constexpr float kExpLo = -87.0f, kExpHi = 88.0f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f;
constexpr float kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

inline float ExpScalar(float x) {
  x = x > kExpHi ? kExpHi : (x < kExpLo ? kExpLo : x);  // NaN stays NaN, as in Exp8
  const float n = std::nearbyint(x * kLog2e);
  float r = std::fma(n, -kLn2Hi, x);
  r = std::fma(n, -kLn2Lo, r);
  float p = std::fma(kP0, r, kP1);
  p = std::fma(p, r, kP2);
  p = std::fma(p, r, kP3);
  p = std::fma(p, r, kP4);
  p = std::fma(p, r, kP5);
  p = std::fma(p, r * r, r + 1.0f);
  const int32_t e = std::isnan(n) ? 0 : static_cast<int32_t>(n);
  const int32_t bits = (e + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float SigmoidScalar(float x) { return 1.0f / (1.0f + ExpScalar(-x)); }

#ifdef SIGMOID_MOE_X86

// Whether this CPU runs the SIGMOID_MOE_TARGET_AVX2 functions.
inline bool HasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("popcnt");
  return has;
}

SIGMOID_MOE_TARGET_AVX2 inline __m256 Exp8(__m256 x) {
  // max(lo, x) and min(hi, .) return x where it is NaN (their second operand).
  x = _mm256_min_ps(_mm256_set1_ps(kExpHi), _mm256_max_ps(_mm256_set1_ps(kExpLo), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Hi), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Lo), r);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kP0), r, _mm256_set1_ps(kP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP5));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
}

SIGMOID_MOE_TARGET_AVX2 inline __m256 Sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, Exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

#else

inline bool HasAvx2() { return false; }

#endif  // SIGMOID_MOE_X86

}  // namespace simd
}  // namespace sigmoid_moe

#endif  // SIGMOID_MOE_SIMD_MATH_H_
