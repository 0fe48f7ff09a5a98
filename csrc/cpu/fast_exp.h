// Branch-free exp that GCC vectorises inside `#pragma omp simd` loops (no libm call, no
// -ffast-math needed). Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, a polynomial for
// exp(r), then the exponent n is written straight into the float's bits.
//
//   float : Cephes expf polynomial, about 1 ulp; results below 2^-124 (x < -86) are returned as
//           exact 0 (denormals are flushed), -inf gives 0, x > 88.72 gives +inf, NaN stays NaN.
//   double: degree-13 Taylor polynomial, about 1 ulp; x < -707 gives 0, x > 709.78 gives +inf.
//
// The kernels only ever call it on s - max <= 0 (or s - lse), where the flushed tail is far below
// the precision of the sum it feeds.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

// Forced inlining: a call that is not inlined cannot be vectorised, and GCC's heuristics do give
// up on inlining inside large lambdas.
#if defined(__GNUC__)
#define FASTCONTRAST_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTCONTRAST_ALWAYS_INLINE inline
#endif

namespace fastcontrast {

namespace detail {

// The bits of a value reinterpreted as another type of the same size (std::bit_cast of C++20).
template <typename To, typename From>
FASTCONTRAST_ALWAYS_INLINE To bit_cast(From value) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs types of one size");
  To out;
  std::memcpy(&out, &value, sizeof out);
  return out;
}

}  // namespace detail

FASTCONTRAST_ALWAYS_INLINE float fast_exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;       // few mantissa bits: n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;    // ln2 - kLn2Hi
  constexpr float kRound = 12582912.0f;        // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kMin = -86.0f;               // below: 0 (keeps er * 2^(n-1) a normal number)
  constexpr float kMax = 88.72283905206835f;   // above: +inf

  const float xc = x < kMin ? kMin : (x > kMax ? kMax : x);
  // n = round(x / ln2), read from the low mantissa bits of (x / ln2 + 1.5 * 2^23).
  const float shifted = xc * kLog2e + kRound;
  const int32_t n = detail::bit_cast<int32_t>(shifted) - detail::bit_cast<int32_t>(kRound);
  const float fn = shifted - kRound;
  float r = xc - fn * kLn2Hi;
  r = r - fn * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * (r * r) + r + 1.0f;
  // 2^n as 2^(n-1) * 2 so that n = 128 (x close to kMax) does not overflow the exponent field.
  const float scale = detail::bit_cast<float>((n + 126) << 23);
  const float y = er * scale * 2.0f;
  return x < kMin ? 0.0f : (x > kMax ? std::numeric_limits<float>::infinity() : y);
}

FASTCONTRAST_ALWAYS_INLINE double fast_exp(double x) {
  constexpr double kLog2e = 1.4426950408889634074;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;  // fdlibm split of ln2
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  constexpr double kRound = 6755399441055744.0;           // 1.5 * 2^52
  constexpr double kMin = -707.0;
  constexpr double kMax = 709.782712893383973096;

  const double xc = x < kMin ? kMin : (x > kMax ? kMax : x);
  const double shifted = xc * kLog2e + kRound;
  const int64_t n = detail::bit_cast<int64_t>(shifted) - detail::bit_cast<int64_t>(kRound);
  const double fn = shifted - kRound;
  const double r = (xc - fn * kLn2Hi) - fn * kLn2Lo;
  // Taylor series to r^13 / 13!: truncation error < 2e-16 relative for |r| <= ln2 / 2.
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  const double er = p * (r * r) + r + 1.0;
  const double scale = detail::bit_cast<double>((n + 1022) << 52);
  const double y = er * scale * 2.0;
  return x < kMin ? 0.0 : (x > kMax ? std::numeric_limits<double>::infinity() : y);
}

}  // namespace fastcontrast
