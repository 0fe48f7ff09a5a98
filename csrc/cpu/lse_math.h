// Arithmetic of the log-sum-exps on CPU: the double sums of exps (FlushedSums) and the rules for
// non-finite scores (lse_from, log_add_exp, finite_or_inf), shared by every pass of lse_tiles.h,
// shared_shift.h and the kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace fastcontrast {
namespace tiles {

// The sums of exps accumulate in double whatever T: a float running sum over M terms drifts by
// up to ~sqrt(M) ulps (1e-6 relative at M = 300), which plain PyTorch's pairwise float reductions
// do not. The hot passes keep float partial sums over kFlushRows tile rows (FlushedSums) and add
// them into the double sums then: a double accumulator in the vectorised loop itself made the
// shared-shift forward ~1.6x slower.
using Acc = double;
constexpr int64_t kFlushRows = 32;

// Per-query partial sums in T over up to kFlushRows tile rows, added into `out` (double) every
// kFlushRows rows and by flush(): call row_done() after each tile row, flush() at the end.
template <typename T>
struct FlushedSums {
  std::vector<T> part;
  Acc* out;
  int64_t pending = 0;
  FlushedSums(Acc* out_, int64_t rows) : part(static_cast<size_t>(rows), T(0)), out(out_) {}
  T* data() { return part.data(); }
  void row_done() {
    if (++pending == kFlushRows) flush();
  }
  void flush() {
    for (size_t i = 0; i < part.size(); ++i) {
      out[i] += part[i];
      part[i] = T(0);
    }
    pending = 0;
  }
};

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();
template <typename T>
constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();

// log(exp(a) + exp(b)) as torch.logaddexp: NaN if either is NaN, -inf when both are -inf, +inf
// when either is +inf.
template <typename T>
T log_add_exp(T a, T b) {
  if (std::isnan(a) || std::isnan(b)) return kNaN<T>;
  const T hi = std::max(a, b);
  if (std::isinf(hi)) return hi;
  return hi + std::log1p(std::exp(-std::abs(a - b)));
}

// A max used as the exp shift: 0 when there is no entry (-inf), so exp(-inf - shift) = 0, not NaN.
template <typename T>
T safe_shift(T mx) { return mx == -kInf<T> ? T(0) : mx; }

// Non-finite scores. The max passes skip NaN (s > mx is false) and the exp passes do not: a NaN
// entry makes the sum NaN, and shift + log(sum) keeps it; no entry (sum 0) gives -inf. A +inf
// entry makes the shift +inf and the sum NaN (exp(inf - inf)): the lse is then +inf, or NaN when
// the row also has a NaN entry, which only a scan of that (rare) row can tell. So the hot loops
// stay as they are and the finalisation sorts the cases out, as torch.logsumexp does.
// shift + log(sum) in double: the float rounding of log(sum) alone (up to log M) would add to
// the rounding of the result.
template <typename T>
T lse_from(T shift, Acc sum) {
  if (shift == kInf<T>) return kInf<T>;
  return static_cast<T>(static_cast<double>(shift) + std::log(static_cast<double>(sum)));
}

// An lse of -inf contributes 0 to a gradient: exp(s - (+inf)) = 0 where exp(s - (-inf)) is not.
template <typename T>
T finite_or_inf(T lse) { return lse == -kInf<T> ? kInf<T> : lse; }

template <typename T>
bool any_nan(const T* s, int64_t r) {
  for (int64_t i = 0; i < r; ++i)
    if (std::isnan(s[i])) return true;
  return false;
}

}  // namespace tiles
}  // namespace fastcontrast
