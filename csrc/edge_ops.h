// Argument checks of the two edge primitives (scn_fast/ops/SPEC.md), shared by the CPU and CUDA twins.
// Each check throws a c10::Error (RuntimeError in Python) naming the offending argument, and returns
// the sizes the kernels need.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "edge_layout.h"

namespace scn_fast {

// gather_rotate(x (N, S_x, C), wig (E, K), idx (E, P), lmax, mmax) -> y (E, P, R, C)
struct GatherRotateSizes {
  int64_t num_edges;   // E
  int64_t num_sides;   // P
  int64_t num_nodes;   // N
  int64_t x_coeffs;    // S_x >= (lmax + 1)^2
  int64_t channels;    // C
  int64_t rows;        // R
  int64_t entries;     // K
};

GatherRotateSizes check_gather_rotate(const at::Tensor& x, const at::Tensor& wig,
                                      const at::Tensor& idx, int64_t lmax, int64_t mmax);

// rotate_scatter(m (E, P, R, C), wig (E, K), perm (P, E), ptr (P, num_nodes + 1), lmax, mmax,
//                num_nodes) -> out (num_nodes, (lmax + 1)^2, C)
struct RotateScatterSizes {
  int64_t num_edges;   // E
  int64_t num_sides;   // P
  int64_t num_nodes;   // N (output rows)
  int64_t channels;    // C
  int64_t rows;        // R
  int64_t entries;     // K
  int64_t out_coeffs;  // S = (lmax + 1)^2
};

RotateScatterSizes check_rotate_scatter(const at::Tensor& m, const at::Tensor& wig,
                                        const at::Tensor& perm, const at::Tensor& ptr,
                                        int64_t lmax, int64_t mmax, int64_t num_nodes);

}  // namespace scn_fast
