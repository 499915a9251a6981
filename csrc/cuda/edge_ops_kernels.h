// Launchers of the CUDA edge kernels (scn_fast/ops/SPEC.md). Raw pointers, sizes and a stream only:
// no torch headers on either side of this interface, so edge_ops_kernels.cu compiles with plain nvcc.
// All tensors are contiguous and on the current device; the caller (edge_ops_cuda.cpp) has checked
// shapes, dtypes and lmax/mmax, and skips launches with nothing to compute.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace scn_fast::cuda {

// Storage type of a feature or wig array.
enum class ScalarKind : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// y (E, P, R, C) from x (N, S_x, C), wig (E, K), idx (E, P); an edge side whose idx is outside
// [0, N) gets NaN rows. Supported kinds: x = wig, or wig = float32 with x bfloat16/float16.
// Returns the launch status (cudaErrorInvalidValue for an unsupported kind pair).
cudaError_t launch_gather_rotate(ScalarKind x_kind, ScalarKind wig_kind, const void* x,
                                 const void* wig, const int64_t* idx, void* y, int64_t num_edges,
                                 int64_t num_sides, int64_t num_nodes, int64_t x_coeffs,
                                 int64_t channels, int lmax, int mmax, cudaStream_t stream);

// out (N, (lmax+1)^2, C) from m (E, P, R, C), wig (E, K) and the per-side CSR perm (P, E),
// ptr (P, N + 1); deterministic (no atomics). perm values outside [0, E) are skipped.
cudaError_t launch_rotate_scatter(ScalarKind m_kind, ScalarKind wig_kind, const void* m,
                                  const void* wig, const int64_t* perm, const int64_t* ptr,
                                  void* out, int64_t num_edges, int64_t num_sides,
                                  int64_t num_nodes, int64_t channels, int lmax, int mmax,
                                  cudaStream_t stream);

}  // namespace scn_fast::cuda
