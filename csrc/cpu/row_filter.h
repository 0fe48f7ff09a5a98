// The false-negative filter of the full-product log-sum-exp kernels on CPU (see
// false_negatives.h for the pass that applies it): per query i a threshold on its scores and/or on
// the scores of guide features, the candidates above it dropped, the positive column never.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace fastcontrast {

// Candidate (i, j) is dropped iff j != positive_col_i and
//   s_ij > threshold_i                     (threshold given; s_ij = alpha_i beta_j <q_i, keys_j>)
//   or <guide_q_i, guide_keys_j> > guide_threshold_i   (guide given)
// threshold (N,) and guide_threshold (N,) in q's dtype, guide_q (N, G) / guide_keys (M, G) in
// q's dtype, positive_col (N,) int64 (-1: none; key index in the full product), dropped (N,)
// int64: where given, the count of dropped candidates of each query is added to it.
// col_offset: the product's index of this problem's key 0 (a key chunk's c0).
struct RowFilter {
  std::optional<at::Tensor> threshold;
  std::optional<at::Tensor> positive_col;
  std::optional<at::Tensor> guide_q;
  std::optional<at::Tensor> guide_keys;
  std::optional<at::Tensor> guide_threshold;
  std::optional<at::Tensor> dropped;
  int64_t col_offset = 0;

  // The filter of keys c0 .. c1 as their own problem's.
  RowFilter narrowed(int64_t c0, int64_t c1) const {
    RowFilter out = *this;
    if (guide_keys) out.guide_keys = guide_keys->narrow(0, c0, c1 - c0);
    out.col_offset = col_offset + c0;
    return out;
  }
};

}  // namespace fastcontrast
