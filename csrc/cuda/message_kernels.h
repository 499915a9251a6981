// Launchers of the CUDA message-MLP elementwise kernels: tap_gate and tap_combine (the math is
// csrc/message_ops.cpp's, the CPU twin). Raw pointers, sizes and a stream only: no torch headers on
// either side of this interface, so message_kernels.cu compiles with plain nvcc. All arrays are
// contiguous and on the current device; the caller has checked shapes, dtypes and src (a permutation
// of [0, R*J) laid out (R, J)), and skips launches with nothing to compute. Every kernel writes each
// output element once, in a fixed order: deterministic, no atomics, no (E, 4, H)-sized temporaries.
//
//   tap_gate_forward   a (E, H), b (E, Tb, H), g (E, H) -> m (E, T, H); Tb = 2 (T = 4) or 0 (T = 1):
//                      m[e, t] = silu(p_t) g,  p = [a + b0, a + b1, a - b0, a - b1] (or [a])
//   tap_gate_backward  dm (E, T, H) -> da (E, H), db (E, Tb, H), dg (E, H)
//   tap_combine_forward  z (E, Q, C), bias (R, C), src (R, J), coef (R, J) -> m (E, R, C):
//                      m[e, r, c] = sum_j coef[r, j] silu(z[e, src[r, j], c] + bias[src[r, j] % R, c])
//   tap_combine_backward dm (E, R, C) -> dz (E, Q, C) in z's type, dbias (R, C) summed (over edges
//                      and taps) from the values before dz's rounding, in two passes over a
//                      workspace of tap_combine_workspace(E, Q, C) floats of the accumulation type.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace scn_fast::cuda {

// Storage type of a message array (as edge_ops_kernels.h's ScalarKind).
enum class MessageKind : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2 };

// float32 or float64 (a, b, g, m of one kind).
cudaError_t launch_tap_gate_forward(MessageKind kind, const void* a, const void* b, const void* g,
                                    void* m, int64_t E, int64_t H, int taps, cudaStream_t stream);

cudaError_t launch_tap_gate_backward(MessageKind kind, const void* dm, const void* a, const void* b,
                                     const void* g, void* da, void* db, void* dg, int64_t E,
                                     int64_t H, int taps, cudaStream_t stream);

// z_kind: float32 / float64 (bias, coef, m of the same kind) or bfloat16 (bias, coef, m float32).
cudaError_t launch_tap_combine_forward(MessageKind z_kind, const void* z, const void* bias,
                                       const int64_t* src, const void* coef, void* m, int64_t E,
                                       int64_t R, int64_t J, int64_t C, cudaStream_t stream);

// Elements of the accumulation type (float, or double for float64) the backward's workspace needs.
int64_t tap_combine_workspace(int64_t E, int64_t Q, int64_t C);

cudaError_t launch_tap_combine_backward(MessageKind z_kind, const void* dm, const void* z,
                                        const void* bias, const int64_t* src, const void* coef,
                                        void* dz, void* dbias, void* workspace, int64_t E,
                                        int64_t R, int64_t J, int64_t C, cudaStream_t stream);

}  // namespace scn_fast::cuda
