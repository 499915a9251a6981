// Compact Wigner layout of scn_fast/ops/SPEC.md, shared by the schema, the CPU twin and the CUDA
// kernels. Plain C++ (no torch headers) so that nvcc can include it in edge_ops_kernels.cu.
//
// For degree l = 0..L the kept rows are the orders m = -mm..mm, mm = min(l, M), M in {0, 1}:
//   n_l       = 2*mm + 1                         kept rows of degree l
//   row_off_l = sum_{l' < l} n_{l'}              first rotated row of degree l;   R = row_off_{L+1}
//   off_l     = sum_{l' < l} n_{l'} * (2l' + 1)  first wig entry of degree l;     K = off_{L+1}
//   wig[e, off_l + a*(2l+1) + b] = D_l(e)[kept row a, column b];  column b is coefficient l*l + b.
// Closed forms: M = 0: row_off_l = l, off_l = l^2.  M = 1 (l >= 1): row_off_l = 3l - 2, off_l = 3l^2 - 2.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SCN_HD __host__ __device__ __forceinline__
#else
#define SCN_HD inline
#endif

namespace scn_fast {

constexpr int64_t kMaxLmax = 10;  // the schema accepts lmax in [0, kMaxLmax]

// n_l: kept rows of degree l.
SCN_HD constexpr int64_t kept_rows(int64_t l, int64_t mmax) {
  return 2 * (l < mmax ? l : mmax) + 1;
}

// row_off_l: index of the first rotated row of degree l (l may be lmax + 1, giving R).
SCN_HD constexpr int64_t row_offset(int64_t l, int64_t mmax) {
  return l == 0 ? 0 : (mmax == 0 ? l : 3 * l - 2);
}

// off_l: index of the first compact wig entry of degree l (l may be lmax + 1, giving K).
SCN_HD constexpr int64_t entry_offset(int64_t l, int64_t mmax) {
  return l == 0 ? 0 : (mmax == 0 ? l * l : 3 * l * l - 2);
}

// R: rows of the rotated features.
SCN_HD constexpr int64_t num_rows(int64_t lmax, int64_t mmax) {
  return row_offset(lmax + 1, mmax);
}

// K: compact wig entries per edge.
SCN_HD constexpr int64_t num_entries(int64_t lmax, int64_t mmax) {
  return entry_offset(lmax + 1, mmax);
}

// (L + 1)^2: spherical-harmonic coefficients up to degree lmax.
SCN_HD constexpr int64_t num_coefficients(int64_t lmax) {
  return (lmax + 1) * (lmax + 1);
}

// The closed forms above agree with the defining sums (checked at compile time).
constexpr bool layout_sums_agree(int64_t lmax, int64_t mmax) {
  int64_t rows = 0, entries = 0;
  for (int64_t l = 0; l <= lmax + 1; ++l) {
    if (row_offset(l, mmax) != rows || entry_offset(l, mmax) != entries) return false;
    rows += kept_rows(l, mmax);
    entries += kept_rows(l, mmax) * (2 * l + 1);
  }
  return true;
}
static_assert(layout_sums_agree(kMaxLmax, 0) && layout_sums_agree(kMaxLmax, 1), "layout closed forms");
static_assert(num_rows(6, 1) == 19 && num_entries(6, 1) == 145, "SPEC: L=6, M=1");
static_assert(num_rows(4, 1) == 13 && num_entries(4, 1) == 73, "SPEC: L=4, M=1");

}  // namespace scn_fast
