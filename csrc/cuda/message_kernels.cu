// CUDA kernels of the message MLP's elementwise steps (message_kernels.h has the contract).
//
// tap_gate: one thread per (edge, hidden channel), reading a, b0, b1, g once and writing the four
// taps (forward) or da, db0, db1, dg (backward): one pass over memory, coalesced along H.
// tap_combine forward: one thread per (edge, output row, channel) summing its J taps.
// tap_combine backward, deterministic without atomics:
//   pass 1: one thread per (tap row q = (r, j), channel c) and chunk of kChunk edges: writes
//           dz[e, src[r, j], c] (rounded to z's type) and the chunk's float sum of the unrounded
//           values to workspace[chunk, q, c];
//   pass 2: one thread per (bias row r', channel c) sums workspace[chunk, q, c] over chunks (in
//           order) and over the J rows q whose src[q] % R == r' (in order of q).
// silu'(x) = s (1 + x (1 - s)), s = 1 / (1 + e^-x), with expf / exp (full precision).
#include <cuda_bf16.h>

#include "message_kernels.h"

namespace scn_fast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 256;  // edges per partial bias sum (pass 1)

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float load_acc(const float* p) { return *p; }
__device__ __forceinline__ double load_acc(const double* p) { return *p; }
__device__ __forceinline__ float load_acc(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void store_from(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_from(double* p, double v) { *p = v; }
__device__ __forceinline__ void store_from(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 * 32 ? b : 65535 * 32);  // grid-stride loops cover the rest
}

// ---------------------------------------------------------------------------------------------
// tap_gate

template <typename T, int TAPS>
__global__ void __launch_bounds__(kThreads)
    gate_forward_kernel(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ g,
                        T* __restrict__ m, int64_t E, int64_t H) {
  const int64_t n = E * H;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t e = i / H, h = i - e * H;
    const T av = a[i], gv = g[i];
    if constexpr (TAPS == 1) {
      m[i] = av * sigmoid(av) * gv;
    } else {
      const T b0 = b[(2 * e) * H + h], b1 = b[(2 * e + 1) * H + h];
      const T p[4] = {av + b0, av + b1, av - b0, av - b1};
      T* me = m + 4 * e * H + h;
#pragma unroll
      for (int t = 0; t < 4; ++t) me[t * H] = p[t] * sigmoid(p[t]) * gv;
    }
  }
}

template <typename T, int TAPS>
__global__ void __launch_bounds__(kThreads)
    gate_backward_kernel(const T* __restrict__ dm, const T* __restrict__ a,
                         const T* __restrict__ b, const T* __restrict__ g, T* __restrict__ da,
                         T* __restrict__ db, T* __restrict__ dg, int64_t E, int64_t H) {
  const int64_t n = E * H;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t e = i / H, h = i - e * H;
    const T av = a[i], gv = g[i];
    if constexpr (TAPS == 1) {
      const T s = sigmoid(av), d = dm[i];
      dg[i] = d * av * s;
      da[i] = d * gv * (s * (T(1) + av * (T(1) - s)));
    } else {
      const T b0 = b[(2 * e) * H + h], b1 = b[(2 * e + 1) * H + h];
      const T p[4] = {av + b0, av + b1, av - b0, av - b1};
      const T* dme = dm + 4 * e * H + h;
      T dp[4];
      T dgv = T(0);
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const T s = sigmoid(p[t]), d = dme[t * H];
        dgv += d * p[t] * s;
        dp[t] = d * gv * (s * (T(1) + p[t] * (T(1) - s)));
      }
      dg[i] = dgv;
      da[i] = (dp[0] + dp[1]) + (dp[2] + dp[3]);
      db[(2 * e) * H + h] = dp[0] - dp[2];
      db[(2 * e + 1) * H + h] = dp[1] - dp[3];
    }
  }
}

template <typename T>
cudaError_t gate_forward(const void* a, const void* b, const void* g, void* m, int64_t E, int64_t H,
                         int taps, cudaStream_t stream) {
  const auto* ap = static_cast<const T*>(a);
  const auto* bp = static_cast<const T*>(b);
  const auto* gp = static_cast<const T*>(g);
  auto* mp = static_cast<T*>(m);
  if (taps == 1)
    gate_forward_kernel<T, 1><<<blocks_for(E * H), kThreads, 0, stream>>>(ap, bp, gp, mp, E, H);
  else
    gate_forward_kernel<T, 4><<<blocks_for(E * H), kThreads, 0, stream>>>(ap, bp, gp, mp, E, H);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gate_backward(const void* dm, const void* a, const void* b, const void* g, void* da,
                          void* db, void* dg, int64_t E, int64_t H, int taps,
                          cudaStream_t stream) {
  const auto* dmp = static_cast<const T*>(dm);
  const auto* ap = static_cast<const T*>(a);
  const auto* bp = static_cast<const T*>(b);
  const auto* gp = static_cast<const T*>(g);
  auto* dap = static_cast<T*>(da);
  auto* dbp = static_cast<T*>(db);
  auto* dgp = static_cast<T*>(dg);
  if (taps == 1)
    gate_backward_kernel<T, 1>
        <<<blocks_for(E * H), kThreads, 0, stream>>>(dmp, ap, bp, gp, dap, dbp, dgp, E, H);
  else
    gate_backward_kernel<T, 4>
        <<<blocks_for(E * H), kThreads, 0, stream>>>(dmp, ap, bp, gp, dap, dbp, dgp, E, H);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// tap_combine

template <typename Z, typename A>
__global__ void __launch_bounds__(kThreads)
    combine_forward_kernel(const Z* __restrict__ z, const A* __restrict__ bias,
                           const int64_t* __restrict__ src, const A* __restrict__ coef,
                           A* __restrict__ m, int64_t E, int64_t R, int64_t J, int64_t C) {
  const int64_t n = E * R * C;
  const int64_t Q = R * J;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t c = i % C;
    const int64_t er = i / C;
    const int64_t r = er % R, e = er / R;
    A acc = A(0);
    for (int64_t j = 0; j < J; ++j) {
      const int64_t s = src[r * J + j];
      const A x = load_acc(z + (e * Q + s) * C + c) + bias[(s % R) * C + c];
      acc += coef[r * J + j] * (x * sigmoid(x));
    }
    m[i] = acc;
  }
}

// Pass 1: grid (ceil(Q*C / kThreads), chunks); thread (q, c) over the chunk's edges.
template <typename Z, typename A>
__global__ void __launch_bounds__(kThreads)
    combine_backward_kernel(const A* __restrict__ dm, const Z* __restrict__ z,
                            const A* __restrict__ bias, const int64_t* __restrict__ src,
                            const A* __restrict__ coef, Z* __restrict__ dz, A* __restrict__ part,
                            int64_t E, int64_t R, int64_t J, int64_t C) {
  const int64_t Q = R * J;
  const int64_t qc = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (qc >= Q * C) return;
  const int64_t q = qc / C, c = qc - q * C;  // q = r * J + j
  const int64_t r = q / J;
  const int64_t s = src[q];
  const A k = coef[q];
  const A bv = bias[(s % R) * C + c];
  const int64_t e0 = static_cast<int64_t>(blockIdx.y) * kChunk;
  const int64_t e1 = e0 + kChunk < E ? e0 + kChunk : E;
  A sum = A(0);
  for (int64_t e = e0; e < e1; ++e) {
    const A x = load_acc(z + (e * Q + s) * C + c) + bv;
    const A sg = sigmoid(x);
    const A v = k * dm[(e * R + r) * C + c] * (sg * (A(1) + x * (A(1) - sg)));
    store_from(dz + (e * Q + s) * C + c, v);
    sum += v;
  }
  part[static_cast<int64_t>(blockIdx.y) * Q * C + qc] = sum;
}

// Pass 2: thread (r', c): dbias[r', c] = sum over chunks, then over q with src[q] % R == r'.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    combine_bias_kernel(const A* __restrict__ part, const int64_t* __restrict__ src,
                        A* __restrict__ dbias, int64_t chunks, int64_t R, int64_t J, int64_t C) {
  const int64_t Q = R * J;
  const int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (i >= R * C) return;
  const int64_t rb = i / C, c = i - rb * C;
  A total = A(0);
  for (int64_t q = 0; q < Q; ++q) {
    if (src[q] % R != rb) continue;
    A col = A(0);
    for (int64_t k = 0; k < chunks; ++k) col += part[(k * Q + q) * C + c];
    total += col;
  }
  dbias[i] = total;
}

template <typename Z, typename A>
cudaError_t combine_forward(const void* z, const void* bias, const int64_t* src, const void* coef,
                            void* m, int64_t E, int64_t R, int64_t J, int64_t C,
                            cudaStream_t stream) {
  combine_forward_kernel<Z, A><<<blocks_for(E * R * C), kThreads, 0, stream>>>(
      static_cast<const Z*>(z), static_cast<const A*>(bias), src, static_cast<const A*>(coef),
      static_cast<A*>(m), E, R, J, C);
  return cudaGetLastError();
}

template <typename Z, typename A>
cudaError_t combine_backward(const void* dm, const void* z, const void* bias, const int64_t* src,
                             const void* coef, void* dz, void* dbias, void* workspace, int64_t E,
                             int64_t R, int64_t J, int64_t C, cudaStream_t stream) {
  const int64_t Q = R * J;
  const int64_t chunks = (E + kChunk - 1) / kChunk;
  if (chunks > 65535) return cudaErrorInvalidValue;  // > 16.7M edges: split the call
  auto* part = static_cast<A*>(workspace);
  const dim3 grid1(static_cast<unsigned>((Q * C + kThreads - 1) / kThreads),
                   static_cast<unsigned>(chunks));
  combine_backward_kernel<Z, A><<<grid1, kThreads, 0, stream>>>(
      static_cast<const A*>(dm), static_cast<const Z*>(z), static_cast<const A*>(bias), src,
      static_cast<const A*>(coef), static_cast<Z*>(dz), part, E, R, J, C);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const auto blocks2 = static_cast<unsigned>((R * C + kThreads - 1) / kThreads);
  combine_bias_kernel<A><<<blocks2, kThreads, 0, stream>>>(part, src, static_cast<A*>(dbias),
                                                           chunks, R, J, C);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_tap_gate_forward(MessageKind kind, const void* a, const void* b, const void* g,
                                    void* m, int64_t E, int64_t H, int taps, cudaStream_t stream) {
  if (taps != 1 && taps != 4) return cudaErrorInvalidValue;
  if (kind == MessageKind::kFloat32) return gate_forward<float>(a, b, g, m, E, H, taps, stream);
  if (kind == MessageKind::kFloat64) return gate_forward<double>(a, b, g, m, E, H, taps, stream);
  return cudaErrorInvalidValue;
}

cudaError_t launch_tap_gate_backward(MessageKind kind, const void* dm, const void* a, const void* b,
                                     const void* g, void* da, void* db, void* dg, int64_t E,
                                     int64_t H, int taps, cudaStream_t stream) {
  if (taps != 1 && taps != 4) return cudaErrorInvalidValue;
  if (kind == MessageKind::kFloat32)
    return gate_backward<float>(dm, a, b, g, da, db, dg, E, H, taps, stream);
  if (kind == MessageKind::kFloat64)
    return gate_backward<double>(dm, a, b, g, da, db, dg, E, H, taps, stream);
  return cudaErrorInvalidValue;
}

cudaError_t launch_tap_combine_forward(MessageKind z_kind, const void* z, const void* bias,
                                       const int64_t* src, const void* coef, void* m, int64_t E,
                                       int64_t R, int64_t J, int64_t C, cudaStream_t stream) {
  switch (z_kind) {
    case MessageKind::kFloat32:
      return combine_forward<float, float>(z, bias, src, coef, m, E, R, J, C, stream);
    case MessageKind::kFloat64:
      return combine_forward<double, double>(z, bias, src, coef, m, E, R, J, C, stream);
    case MessageKind::kBFloat16:
      return combine_forward<__nv_bfloat16, float>(z, bias, src, coef, m, E, R, J, C, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t tap_combine_workspace(int64_t E, int64_t Q, int64_t C) {
  return ((E + kChunk - 1) / kChunk) * Q * C;
}

cudaError_t launch_tap_combine_backward(MessageKind z_kind, const void* dm, const void* z,
                                        const void* bias, const int64_t* src, const void* coef,
                                        void* dz, void* dbias, void* workspace, int64_t E,
                                        int64_t R, int64_t J, int64_t C, cudaStream_t stream) {
  switch (z_kind) {
    case MessageKind::kFloat32:
      return combine_backward<float, float>(dm, z, bias, src, coef, dz, dbias, workspace, E, R, J,
                                            C, stream);
    case MessageKind::kFloat64:
      return combine_backward<double, double>(dm, z, bias, src, coef, dz, dbias, workspace, E, R,
                                              J, C, stream);
    case MessageKind::kBFloat16:
      return combine_backward<__nv_bfloat16, float>(dm, z, bias, src, coef, dz, dbias, workspace,
                                                    E, R, J, C, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace scn_fast::cuda
