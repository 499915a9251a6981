// CUDA twin of the edge primitives: argument checks, device guard, output allocation and the launch
// on torch's current stream. The kernels live in edge_ops_kernels.cu (plain CUDA, raw pointers).
// Compiled only when torch is a CUDA build (scn_fast/extension.py decides).
//
// Unlike the CPU twin, index values are not validated here (that would synchronise with the device):
// an idx outside [0, N) yields NaN rows, a perm value outside [0, E) is skipped; ptr must be a
// well-formed CSR (ptr[p, 0] = 0, nondecreasing, ptr[p, N] = E).
// The stream is c10::cuda::getCurrentCUDAStream() (what at::cuda::getCurrentCUDAStream returns),
// taken from c10/cuda/CUDAStream.h to avoid ATen/cuda/CUDAContext.h's cuBLAS/cuSPARSE includes.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../edge_ops.h"
#include "edge_ops_kernels.h"

namespace scn_fast::cuda {
namespace {

ScalarKind kind_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ScalarKind::kFloat32;
    case at::kDouble:
      return ScalarKind::kFloat64;
    case at::kBFloat16:
      return ScalarKind::kBFloat16;
    case at::kHalf:
      return ScalarKind::kFloat16;
    default:
      TORCH_CHECK(false, "scn_fast_ext: unsupported dtype ", t);
  }
}

void check_on_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "scn_fast_ext: ", name, " must be a CUDA tensor, got ", t.device());
}

at::Tensor gather_rotate_cuda(const at::Tensor& x, const at::Tensor& wig, const at::Tensor& idx,
                              int64_t lmax, int64_t mmax) {
  check_on_cuda(x, "x");
  const GatherRotateSizes s = check_gather_rotate(x, wig, idx, lmax, mmax);
  TORCH_CHECK(s.num_sides <= 65535, "scn_fast_ext: at most 65535 sides on CUDA, got ", s.num_sides);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({s.num_edges, s.num_sides, s.rows, s.channels}, x.options());
  if (y.numel() == 0) return y;
  C10_CUDA_CHECK(launch_gather_rotate(
      kind_of(x.scalar_type()), kind_of(wig.scalar_type()), x.const_data_ptr(),
      wig.const_data_ptr(), idx.const_data_ptr<int64_t>(), y.mutable_data_ptr(), s.num_edges,
      s.num_sides, s.num_nodes, s.x_coeffs, s.channels, static_cast<int>(lmax),
      static_cast<int>(mmax), c10::cuda::getCurrentCUDAStream()));
  return y;
}

at::Tensor rotate_scatter_cuda(const at::Tensor& m, const at::Tensor& wig, const at::Tensor& perm,
                               const at::Tensor& ptr, int64_t lmax, int64_t mmax,
                               int64_t num_nodes) {
  check_on_cuda(m, "m");
  const RotateScatterSizes s = check_rotate_scatter(m, wig, perm, ptr, lmax, mmax, num_nodes);
  TORCH_CHECK(s.num_nodes <= 0x7fffffffLL && (s.channels + 31) / 32 <= 65535,
              "scn_fast_ext: rotate_scatter on CUDA supports num_nodes < 2^31 and C <= 2097120");
  const c10::cuda::CUDAGuard guard(m.device());
  at::Tensor out = at::empty({s.num_nodes, s.out_coeffs, s.channels}, m.options());
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(launch_rotate_scatter(
      kind_of(m.scalar_type()), kind_of(wig.scalar_type()), m.const_data_ptr(),
      wig.const_data_ptr(), perm.const_data_ptr<int64_t>(), ptr.const_data_ptr<int64_t>(),
      out.mutable_data_ptr(), s.num_edges, s.num_sides, s.num_nodes, s.channels,
      static_cast<int>(lmax), static_cast<int>(mmax), c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace
}  // namespace scn_fast::cuda

TORCH_LIBRARY_IMPL(scn_fast_ext, CUDA, m) {
  m.impl("gather_rotate", &scn_fast::cuda::gather_rotate_cuda);
  m.impl("rotate_scatter", &scn_fast::cuda::rotate_scatter_cuda);
}
