// Schema of the scn_fast_ext operator library and the argument checks both twins run first.
// The math (scn_fast/ops/SPEC.md), with n_l, row_off_l, off_l from edge_layout.h:
//   gather_rotate:  y[e, p, row_off_l + a, c] = sum_b wig[e, off_l + a*(2l+1) + b] * x[idx[e, p], l*l + b, c]
//   rotate_scatter: out[n, l*l + b, c] = sum_p sum_{k in ptr[p, n] .. ptr[p, n+1]} sum_a
//                                        wig[e, off_l + a*(2l+1) + b] * m[e, p, row_off_l + a, c],  e = perm[p, k]
#include "edge_ops.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

namespace scn_fast {
namespace {

bool is_half_type(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf;
}

void check_layout_params(int64_t lmax, int64_t mmax) {
  TORCH_CHECK(lmax >= 0 && lmax <= kMaxLmax, "scn_fast_ext: lmax must be in [0, ", kMaxLmax,
              "], got ", lmax);
  TORCH_CHECK(mmax == 0 || mmax == 1, "scn_fast_ext: mmax must be 0 or 1, got ", mmax);
}

// Features (x or m): float32, float64, bfloat16 or float16, contiguous.
void check_features(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "scn_fast_ext: ", name, " must be ", dim, "-D, got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || is_half_type(dt), "scn_fast_ext: ", name,
              " must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(t.is_contiguous(), "scn_fast_ext: ", name, " must be contiguous");
}

// wig (E, K): the same dtype as the features, or float32 when the features are a half type.
// num_edges: E as given by edges_source (idx for gather_rotate, m for rotate_scatter).
void check_wig(const at::Tensor& wig, const at::Tensor& features, const char* features_name,
               int64_t num_edges, const char* edges_source, int64_t lmax, int64_t mmax) {
  TORCH_CHECK(wig.dim() == 2, "scn_fast_ext: wig must be 2-D (E, K), got shape ", wig.sizes());
  TORCH_CHECK(wig.size(0) == num_edges, "scn_fast_ext: wig has ", wig.size(0), " rows but ",
              edges_source, " has E = ", num_edges, " edges");
  const int64_t K = num_entries(lmax, mmax);
  TORCH_CHECK(wig.size(1) == K, "scn_fast_ext: wig must have K = ", K,
              " compact entries per edge for lmax = ", lmax, ", mmax = ", mmax, ", got ",
              wig.size(1));
  const auto ft = features.scalar_type();
  const auto wt = wig.scalar_type();
  TORCH_CHECK(wt == ft || (wt == at::kFloat && is_half_type(ft)), "scn_fast_ext: wig dtype ", wt,
              " does not match ", features_name, " dtype ", ft,
              " (wig must have the features' dtype, or be float32 when they are bfloat16/float16)");
  TORCH_CHECK(wig.is_contiguous(), "scn_fast_ext: wig must be contiguous");
  TORCH_CHECK(wig.device() == features.device(), "scn_fast_ext: wig is on ", wig.device(),
              " but ", features_name, " is on ", features.device());
}

// Index tensors (idx, perm, ptr): int64, contiguous, on the features' device, of the given shape.
void check_index(const at::Tensor& t, const char* name, const at::Tensor& features,
                 const char* features_name, int64_t rows, int64_t cols, const char* shape_text) {
  TORCH_CHECK(t.scalar_type() == at::kLong, "scn_fast_ext: ", name, " must be int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && (rows < 0 || t.size(0) == rows) && (cols < 0 || t.size(1) == cols),
              "scn_fast_ext: ", name, " must have shape ", shape_text, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "scn_fast_ext: ", name, " must be contiguous");
  TORCH_CHECK(t.device() == features.device(), "scn_fast_ext: ", name, " is on ", t.device(),
              " but ", features_name, " is on ", features.device());
}

}  // namespace

GatherRotateSizes check_gather_rotate(const at::Tensor& x, const at::Tensor& wig,
                                      const at::Tensor& idx, int64_t lmax, int64_t mmax) {
  check_layout_params(lmax, mmax);
  check_features(x, "x (N, S_x, C)", 3);
  const int64_t S = num_coefficients(lmax);
  TORCH_CHECK(x.size(1) >= S, "scn_fast_ext: x has S_x = ", x.size(1),
              " coefficients, fewer than (lmax + 1)^2 = ", S, " for lmax = ", lmax);
  check_index(idx, "idx", x, "x", -1, -1, "(E, P)");
  TORCH_CHECK(idx.size(1) >= 1, "scn_fast_ext: idx must have P >= 1 sides, got shape ",
              idx.sizes());
  const int64_t E = idx.size(0);
  check_wig(wig, x, "x", E, "idx", lmax, mmax);
  return {E, idx.size(1), x.size(0), x.size(1), x.size(2), num_rows(lmax, mmax),
          num_entries(lmax, mmax)};
}

RotateScatterSizes check_rotate_scatter(const at::Tensor& m, const at::Tensor& wig,
                                        const at::Tensor& perm, const at::Tensor& ptr,
                                        int64_t lmax, int64_t mmax, int64_t num_nodes) {
  check_layout_params(lmax, mmax);
  check_features(m, "m (E, P, R, C)", 4);
  const int64_t R = num_rows(lmax, mmax);
  TORCH_CHECK(m.size(2) == R, "scn_fast_ext: m must have R = ", R, " rows for lmax = ", lmax,
              ", mmax = ", mmax, ", got shape ", m.sizes());
  TORCH_CHECK(m.size(1) >= 1, "scn_fast_ext: m must have P >= 1 sides, got shape ", m.sizes());
  TORCH_CHECK(num_nodes >= 0, "scn_fast_ext: num_nodes must be >= 0, got ", num_nodes);
  const int64_t E = m.size(0);
  const int64_t P = m.size(1);
  check_wig(wig, m, "m", E, "m", lmax, mmax);
  check_index(perm, "perm", m, "m", P, E, "(P, E)");
  check_index(ptr, "ptr", m, "m", P, num_nodes + 1, "(P, num_nodes + 1)");
  return {E, P, num_nodes, m.size(3), R, num_entries(lmax, mmax), num_coefficients(lmax)};
}

}  // namespace scn_fast

TORCH_LIBRARY(scn_fast_ext, m) {
  m.def("gather_rotate(Tensor x, Tensor wig, Tensor idx, int lmax, int mmax) -> Tensor");
  m.def(
      "rotate_scatter(Tensor m, Tensor wig, Tensor perm, Tensor ptr, int lmax, int mmax, "
      "int num_nodes) -> Tensor");
  // CPU only: gather_rotate's rows written into the tap projection's operands y0 and pair
  // (cpu/edge_ops_cpu.cpp).
  m.def(
      "gather_rotate_split(Tensor x, Tensor wig, Tensor idx, int lmax, int mmax, Tensor a, "
      "Tensor b, Tensor sign, Tensor(a!) y0, Tensor(b!) pair) -> ()");
}
