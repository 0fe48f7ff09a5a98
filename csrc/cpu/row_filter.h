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
//
// The column rule (a symmetric loss in one pass; col_positive_row given, sided_filter.h): entry
// (i, j) leaves column j's log-sum-exp iff i != col_positive_row_j and
//   s_ij > col_threshold_j   or   <guide_q_i, guide_keys_j> > col_guide_threshold_j,
// independently of the row rule above. col_threshold (M,) / col_guide_threshold (M,) in q's dtype
// (given with threshold / the guide), col_positive_row (M,) int64, col_dropped (M,) int64 counts;
// all indexed by col_offset + j (never narrowed). How the entries that only one direction drops
// reach the passes (sided_filter.h): sided_masks, left in the tile with the directions' drops in
// a per-tile byte mask (sided_mask) that the pass applies; else written -inf, and given back to
// the direction that keeps them through sided (the exact forward's accumulators) where given.
struct SidedLse;
struct RowFilter {
  std::optional<at::Tensor> threshold;
  std::optional<at::Tensor> positive_col;
  std::optional<at::Tensor> guide_q;
  std::optional<at::Tensor> guide_keys;
  std::optional<at::Tensor> guide_threshold;
  std::optional<at::Tensor> dropped;
  int64_t col_offset = 0;
  std::optional<at::Tensor> col_threshold;
  std::optional<at::Tensor> col_positive_row;
  std::optional<at::Tensor> col_guide_threshold;
  std::optional<at::Tensor> col_dropped;
  SidedLse* sided = nullptr;
  bool sided_masks = false;

  bool symmetric() const { return col_positive_row.has_value(); }

  // The filter of keys c0 .. c1 as their own problem's.
  RowFilter narrowed(int64_t c0, int64_t c1) const {
    RowFilter out = *this;
    if (guide_keys) out.guide_keys = guide_keys->narrow(0, c0, c1 - c0);
    out.col_offset = col_offset + c0;
    return out;
  }
};

}  // namespace fastcontrast
