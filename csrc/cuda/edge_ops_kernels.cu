// CUDA kernels of the edge primitives (scn_fast/ops/SPEC.md). Plain CUDA: no torch headers.
//
// gather_rotate   y[e, p, row_off_l + a, c] = sum_b wig[e, off_l + a*(2l+1) + b] * x[idx[e, p], l*l + b, c]
//   One warp per (edge, side): block = (32 lanes, kGatherWarps edges), grid = (edge tiles, P). The warp
//   stages its edge's K wig entries in shared memory (converted to the accumulation type), then walks
//   the channels in passes of 32 * CPT (lane-contiguous, so every x load / y store is coalesced), and
//   for each degree l accumulates its n_l kept rows in registers over the 2l+1 columns.
//
// rotate_scatter  out[n, l*l + b, c] = sum_p sum_{k in ptr[p,n] .. ptr[p,n+1]} sum_a
//                                      wig[e, off_l + a*(2l+1) + b] * m[e, p, row_off_l + a, c],  e = perm[p, k]
//   One block per (destination node, 32-channel tile), one warp per degree l (block = 32 x (lmax+1)).
//   The warp walks the node's CSR segments in order (p ascending, k ascending), keeps the 2l+1 output
//   rows of its degree in registers (compile-time size: the degree is a template argument) and writes
//   them once. Each output element is summed by one thread in a fixed order: deterministic, no atomics.
//
// Scalar types: float, double, __nv_bfloat16, __half; accumulation in float (double for double).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../edge_layout.h"
#include "edge_ops_kernels.h"

namespace scn_fast::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kGatherWarps = 8;                              // edges per gather block
constexpr int kGatherThreads = kWarp * kGatherWarps;         // 256
constexpr int kScatterThreads = kWarp * (kMaxLmax + 1);      // 352: one warp per degree

// ---------------------------------------------------------------------------------------------------
// Accumulation type and conversions

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename Acc>
__device__ __forceinline__ Acc quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

// ---------------------------------------------------------------------------------------------------
// gather_rotate

template <typename T, typename W>
struct GatherParams {
  const T* __restrict__ x;          // (N, S_x, C)
  const W* __restrict__ wig;        // (E, K)
  const int64_t* __restrict__ idx;  // (E, P)
  T* __restrict__ y;                // (E, P, R, C)
  int64_t E, P, N, S_x, C;
  int lmax;
};

// MMAX: kept orders (0 or 1); CPT: channels per lane per pass (1, 2 or 4).
template <typename T, typename W, int MMAX, int CPT>
__global__ void __launch_bounds__(kGatherThreads)
    gather_rotate_kernel(const GatherParams<T, W> q) {
  using Acc = acc_t<T>;
  constexpr int kMaxRows = 2 * MMAX + 1;  // n_l <= kMaxRows
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kGatherWarps + threadIdx.y;
  if (e >= q.E) return;  // whole warp: no block-wide barrier follows
  const int64_t p = blockIdx.y;
  const int K = static_cast<int>(num_entries(q.lmax, MMAX));
  const int64_t R = num_rows(q.lmax, MMAX);

  // This warp's slice of shared memory: the edge's K compact wig entries.
  Acc* ws = reinterpret_cast<Acc*>(smem) + threadIdx.y * K;
  for (int i = lane; i < K; i += kWarp) ws[i] = to_acc(q.wig[e * K + i]);
  __syncwarp();

  const int64_t n = q.idx[e * q.P + p];
  T* __restrict__ ye = q.y + (e * q.P + p) * R * q.C;
  if (n < 0 || n >= q.N) {  // invalid index: NaN rows rather than an out-of-bounds read
    for (int64_t i = lane; i < R * q.C; i += kWarp) ye[i] = from_acc<T>(quiet_nan<Acc>());
    return;
  }
  const T* __restrict__ xn = q.x + n * q.S_x * q.C;

  for (int64_t c0 = 0; c0 < q.C; c0 += kWarp * CPT) {
    for (int l = 0; l <= q.lmax; ++l) {
      const int nb = 2 * l + 1;
      const int na = static_cast<int>(kept_rows(l, MMAX));
      const Acc* wl = ws + entry_offset(l, MMAX);
      const T* __restrict__ xl = xn + static_cast<int64_t>(l) * l * q.C;
      Acc acc[kMaxRows][CPT];
#pragma unroll
      for (int a = 0; a < kMaxRows; ++a)
#pragma unroll
        for (int j = 0; j < CPT; ++j) acc[a][j] = Acc(0);
      for (int b = 0; b < nb; ++b) {
        Acc xv[CPT];
#pragma unroll
        for (int j = 0; j < CPT; ++j) {
          const int64_t c = c0 + lane + j * kWarp;
          xv[j] = c < q.C ? to_acc(xl[b * q.C + c]) : Acc(0);
        }
#pragma unroll
        for (int a = 0; a < kMaxRows; ++a) {
          if (a < na) {  // warp-uniform
            const Acc w = wl[a * nb + b];
#pragma unroll
            for (int j = 0; j < CPT; ++j) acc[a][j] += w * xv[j];
          }
        }
      }
      T* __restrict__ yl = ye + row_offset(l, MMAX) * q.C;
#pragma unroll
      for (int a = 0; a < kMaxRows; ++a) {
        if (a < na) {
#pragma unroll
          for (int j = 0; j < CPT; ++j) {
            const int64_t c = c0 + lane + j * kWarp;
            if (c < q.C) yl[a * q.C + c] = from_acc<T>(acc[a][j]);
          }
        }
      }
    }
  }
}

template <typename T, typename W, int MMAX, int CPT>
cudaError_t launch_gather(const GatherParams<T, W>& q, cudaStream_t stream) {
  const dim3 block(kWarp, kGatherWarps);
  const dim3 grid(static_cast<unsigned>((q.E + kGatherWarps - 1) / kGatherWarps),
                  static_cast<unsigned>(q.P));
  const size_t smem = sizeof(acc_t<T>) * kGatherWarps * num_entries(q.lmax, MMAX);
  gather_rotate_kernel<T, W, MMAX, CPT><<<grid, block, smem, stream>>>(q);
  return cudaGetLastError();
}

template <typename T, typename W>
cudaError_t gather_typed(const void* x, const void* wig, const int64_t* idx, void* y, int64_t E,
                         int64_t P, int64_t N, int64_t S_x, int64_t C, int lmax, int mmax,
                         cudaStream_t stream) {
  const GatherParams<T, W> q{static_cast<const T*>(x), static_cast<const W*>(wig), idx,
                             static_cast<T*>(y), E, P, N, S_x, C, lmax};
  // Channels per lane: enough to cover C in one pass up to 128 channels (amortises the wig reads).
  const int cpt = C <= kWarp ? 1 : (C <= 2 * kWarp ? 2 : 4);
  if (mmax == 0) {
    if (cpt == 1) return launch_gather<T, W, 0, 1>(q, stream);
    if (cpt == 2) return launch_gather<T, W, 0, 2>(q, stream);
    return launch_gather<T, W, 0, 4>(q, stream);
  }
  if (cpt == 1) return launch_gather<T, W, 1, 1>(q, stream);
  if (cpt == 2) return launch_gather<T, W, 1, 2>(q, stream);
  return launch_gather<T, W, 1, 4>(q, stream);
}

// ---------------------------------------------------------------------------------------------------
// rotate_scatter

template <typename T, typename W>
struct ScatterParams {
  const T* __restrict__ m;           // (E, P, R, C)
  const W* __restrict__ wig;         // (E, K)
  const int64_t* __restrict__ perm;  // (P, E)
  const int64_t* __restrict__ ptr;   // (P, N + 1)
  T* __restrict__ out;               // (N, S, C)
  int64_t E, P, N, C;
  int lmax;
};

// Degree L of node n, channel c: out[n, L*L + b, c] for b < 2L+1, accumulated in registers.
template <typename T, typename W, int MMAX, int L>
__device__ __forceinline__ void scatter_degree(const ScatterParams<T, W>& q, int64_t n, int64_t c) {
  using Acc = acc_t<T>;
  constexpr int NB = 2 * L + 1;
  constexpr int NA = static_cast<int>(kept_rows(L, MMAX));
  constexpr int64_t kRow = row_offset(L, MMAX);
  constexpr int64_t kOff = entry_offset(L, MMAX);
  const int64_t K = num_entries(q.lmax, MMAX);
  const int64_t R = num_rows(q.lmax, MMAX);
  const bool active = c < q.C;
  Acc acc[NB];
#pragma unroll
  for (int b = 0; b < NB; ++b) acc[b] = Acc(0);
  for (int64_t p = 0; p < q.P; ++p) {
    const int64_t* __restrict__ ptr_p = q.ptr + p * (q.N + 1);
    const int64_t k1 = ptr_p[n + 1];
    for (int64_t k = ptr_p[n]; k < k1; ++k) {
      const int64_t e = q.perm[p * q.E + k];  // warp-uniform
      if (e < 0 || e >= q.E) continue;
      const T* __restrict__ me = q.m + ((e * q.P + p) * R + kRow) * q.C;
      const W* __restrict__ we = q.wig + e * K + kOff;
      Acc mv[NA];
#pragma unroll
      for (int a = 0; a < NA; ++a) mv[a] = active ? to_acc(me[a * q.C + c]) : Acc(0);
#pragma unroll
      for (int b = 0; b < NB; ++b) {
#pragma unroll
        for (int a = 0; a < NA; ++a) acc[b] += static_cast<Acc>(to_acc(we[a * NB + b])) * mv[a];
      }
    }
  }
  if (active) {
    T* __restrict__ on = q.out + (n * num_coefficients(q.lmax) + L * L) * q.C + c;
#pragma unroll
    for (int b = 0; b < NB; ++b) on[b * q.C] = from_acc<T>(acc[b]);
  }
}

// Runs scatter_degree<l> for the warp's runtime degree l (warp-uniform branch chain).
template <typename T, typename W, int MMAX, int L>
__device__ __forceinline__ void scatter_degree_dispatch(int l, const ScatterParams<T, W>& q,
                                                        int64_t n, int64_t c) {
  if (l == L) {
    scatter_degree<T, W, MMAX, L>(q, n, c);
  } else if constexpr (L < kMaxLmax) {
    scatter_degree_dispatch<T, W, MMAX, L + 1>(l, q, n, c);
  }
}

template <typename T, typename W, int MMAX>
__global__ void __launch_bounds__(kScatterThreads)
    rotate_scatter_kernel(const ScatterParams<T, W> q) {
  const int64_t n = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kWarp + threadIdx.x;
  scatter_degree_dispatch<T, W, MMAX, 0>(static_cast<int>(threadIdx.y), q, n, c);
}

template <typename T, typename W>
cudaError_t scatter_typed(const void* m, const void* wig, const int64_t* perm, const int64_t* ptr,
                          void* out, int64_t E, int64_t P, int64_t N, int64_t C, int lmax,
                          int mmax, cudaStream_t stream) {
  const ScatterParams<T, W> q{static_cast<const T*>(m), static_cast<const W*>(wig), perm, ptr,
                              static_cast<T*>(out), E, P, N, C, lmax};
  const dim3 block(kWarp, lmax + 1);
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>((C + kWarp - 1) / kWarp));
  if (mmax == 0)
    rotate_scatter_kernel<T, W, 0><<<grid, block, 0, stream>>>(q);
  else
    rotate_scatter_kernel<T, W, 1><<<grid, block, 0, stream>>>(q);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------
// Type dispatch: (feature kind, wig kind) -> F<T, W>. Unsupported pairs give cudaErrorInvalidValue.

template <template <typename, typename> class Op, typename... Args>
cudaError_t dispatch_kinds(ScalarKind t, ScalarKind w, Args... args) {
  if (t == ScalarKind::kFloat32 && w == ScalarKind::kFloat32) return Op<float, float>::run(args...);
  if (t == ScalarKind::kFloat64 && w == ScalarKind::kFloat64) return Op<double, double>::run(args...);
  if (t == ScalarKind::kBFloat16 && w == ScalarKind::kBFloat16)
    return Op<__nv_bfloat16, __nv_bfloat16>::run(args...);
  if (t == ScalarKind::kBFloat16 && w == ScalarKind::kFloat32)
    return Op<__nv_bfloat16, float>::run(args...);
  if (t == ScalarKind::kFloat16 && w == ScalarKind::kFloat16) return Op<__half, __half>::run(args...);
  if (t == ScalarKind::kFloat16 && w == ScalarKind::kFloat32) return Op<__half, float>::run(args...);
  return cudaErrorInvalidValue;
}

template <typename T, typename W>
struct GatherOp {
  template <typename... Args>
  static cudaError_t run(Args... args) {
    return gather_typed<T, W>(args...);
  }
};

template <typename T, typename W>
struct ScatterOp {
  template <typename... Args>
  static cudaError_t run(Args... args) {
    return scatter_typed<T, W>(args...);
  }
};

bool valid_layout(int lmax, int mmax) {
  return lmax >= 0 && lmax <= kMaxLmax && (mmax == 0 || mmax == 1);
}

}  // namespace

cudaError_t launch_gather_rotate(ScalarKind x_kind, ScalarKind wig_kind, const void* x,
                                 const void* wig, const int64_t* idx, void* y, int64_t num_edges,
                                 int64_t num_sides, int64_t num_nodes, int64_t x_coeffs,
                                 int64_t channels, int lmax, int mmax, cudaStream_t stream) {
  if (!valid_layout(lmax, mmax) || num_sides > 65535) return cudaErrorInvalidValue;
  if (num_edges == 0 || num_sides == 0 || channels == 0) return cudaSuccess;
  return dispatch_kinds<GatherOp>(x_kind, wig_kind, x, wig, idx, y, num_edges, num_sides,
                                  num_nodes, x_coeffs, channels, lmax, mmax, stream);
}

cudaError_t launch_rotate_scatter(ScalarKind m_kind, ScalarKind wig_kind, const void* m,
                                  const void* wig, const int64_t* perm, const int64_t* ptr,
                                  void* out, int64_t num_edges, int64_t num_sides,
                                  int64_t num_nodes, int64_t channels, int lmax, int mmax,
                                  cudaStream_t stream) {
  if (!valid_layout(lmax, mmax) || (channels + kWarp - 1) / kWarp > 65535 ||
      num_nodes > 0x7fffffffLL)
    return cudaErrorInvalidValue;
  if (num_nodes == 0 || channels == 0) return cudaSuccess;
  return dispatch_kinds<ScatterOp>(m_kind, wig_kind, m, wig, perm, ptr, out, num_edges, num_sides,
                                   num_nodes, channels, lmax, mmax, stream);
}

}  // namespace scn_fast::cuda
