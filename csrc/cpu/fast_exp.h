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

// exp(x - k ln2) = 2^-k exp(x) for an integer k, with x itself as the reduced argument: the
// shift k ln2 only moves the exponent bits, so the result keeps the precision of exp(x) (a shift
// subtracted in floating point first would round x - c to the ulp of |x - c|, 3.8e-6 near 40 in
// float). lo and hi (pow2_shift) are where the result leaves the range of fast_exp: below lo it is
// 0, above hi +inf; NaN stays NaN. Needs |k| <= kMaxPow2Shift, so that n ln2 splits exactly
// (n kLn2Hi has at most 24 significant bits in float) and x / ln2 + 1.5 * 2^23 rounds to n.
constexpr int32_t kMaxPow2Shift = 16384;

template <typename T>
struct Pow2Shift {
  int32_t k;
  T lo, hi;
};

template <typename T>
Pow2Shift<T> pow2_shift(int32_t k) {
  const double c = k * 0.69314718055994530942;
  return {k, static_cast<T>(c + (sizeof(T) == 4 ? -86.0 : -707.0)),
          static_cast<T>(c + (sizeof(T) == 4 ? 88.72283905206835 : 709.782712893383973096))};
}

FASTCONTRAST_ALWAYS_INLINE float fast_exp_shifted(float x, const Pow2Shift<float>& c) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;     // few mantissa bits: n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;  // ln2 - kLn2Hi
  constexpr float kRound = 12582912.0f;      // 1.5 * 2^23: adding it rounds to an integer
  const float xc = x < c.lo ? c.lo : (x > c.hi ? c.hi : x);
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
  // The exponent n - k, kept in [-125, 128] where lo / hi rounded it out (the result is then
  // replaced below): 2^(e-1) stays a normal number, and e = 128 (x close to hi) does not
  // overflow the exponent field as 2^e would.
  int32_t e = n - c.k;
  e = e < -125 ? -125 : (e > 128 ? 128 : e);
  const float y = er * detail::bit_cast<float>((e + 126) << 23) * 2.0f;
  return x < c.lo ? 0.0f : (x > c.hi ? std::numeric_limits<float>::infinity() : y);
}

FASTCONTRAST_ALWAYS_INLINE double fast_exp_shifted(double x, const Pow2Shift<double>& c) {
  constexpr double kLog2e = 1.4426950408889634074;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;  // fdlibm split of ln2
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  constexpr double kRound = 6755399441055744.0;           // 1.5 * 2^52
  const double xc = x < c.lo ? c.lo : (x > c.hi ? c.hi : x);
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
  int64_t e = n - c.k;
  e = e < -1021 ? -1021 : (e > 1024 ? 1024 : e);
  const double y = er * detail::bit_cast<double>((e + 1022) << 52) * 2.0;
  return x < c.lo ? 0.0 : (x > c.hi ? std::numeric_limits<double>::infinity() : y);
}

// exp(x) itself: no shift (k = 0), the range limits of the header comment.
FASTCONTRAST_ALWAYS_INLINE float fast_exp(float x) {
  return fast_exp_shifted(x, Pow2Shift<float>{0, -86.0f, 88.72283905206835f});
}

FASTCONTRAST_ALWAYS_INLINE double fast_exp(double x) {
  return fast_exp_shifted(x, Pow2Shift<double>{0, -707.0, 709.782712893383973096});
}

}  // namespace fastcontrast
