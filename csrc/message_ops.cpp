// The schema of the message ops and their registration (the code: message_ops.h).
//
// Fused steps of the message MLP (scn_fast/ops/tap_projection.py, scn_fast/ops/tap_combine.py):
// each replaces several ATen passes over an (E, T, ...) tensor by one. E edges, T taps (1 or 4),
// H hidden channels, R rotated rows, C channels.
//
// tap_gate_forward(a (E, H), b (E, Tb, H), gate (E, H)) -> m (E, T, H)
//   Tb = 2 (T = 4): pre = [a + b0, a + b1, a - b0, a - b1];  Tb = 0 (T = 1): pre = [a]
//   m[e, t] = silu(pre[e, t]) * gate[e]
// tap_gate_backward(dm, a, b, gate) -> [da (E, H), db (E, Tb, H), dgate (E, H)]
//   dpre_t = dm_t * gate * silu'(pre_t);  dgate = sum_t dm_t * silu(pre_t)
//   da = sum_t dpre_t;  db0 = dpre_0 - dpre_2;  db1 = dpre_1 - dpre_3
// tap_combine_forward(z (E, Q, C), bias (R, C), src (R, J), coef (R, J)) -> m (E, R, C), z float32,
//   float64, or bfloat16 (native bf16 GEMM outputs, read as they are) with a float32 bias
//   Q = T*R rows (tap major), J terms per output row, src a permutation of [0, Q) laid out (R, J):
//   m[e, r, c] = sum_j coef[r, j] * silu(z[e, src[r, j], c] + bias[src[r, j] % R, c])
//   (upstream's act(fc2_edge) followed by the tap-combination matrix mapping_y_rot, whose column r
//   has exactly the J = T non-zeros coef[r, :] at rows src[r, :]).
// tap_combine_backward(dm (E, R, C), z, bias, src, coef) -> [dz (E, Q, C), dbias (R, C)]
//   dz[e, src[r, j], c] = coef[r, j] * dm[e, r, c] * silu'(z + bias);  dbias = sum over e and taps.
//   dz in z's dtype (a bf16 dz feeds fc2_edge's bf16 backward GEMMs as it is); dbias is summed from
//   the values before that rounding.
// tap_blocked_forward(y3 (E, 2R, C), pair (2E, n1, C), w3 (H, 2R, C), bias (H,), runs0, runs1)
//   -> [A (E, H), B (2E, H)]: fc1_edge_proj's tap-symmetric GEMMs per block of consecutive weight
//   rows (K = n*C), reading the weight in upstream's layout (no gathered copy): A = bias + sum over
//   runs0 (j, k, n) of y3[:, k:k+n] w3[:, k:k+n]^T, B = sum over runs1 (j, k, n) of
//   pair[:, j:j+n] w3[:, k:k+n]^T (scn_fast/ops/tap_projection.py; runs flattened (j, k, n) triples).
// tap_blocked_backward(dA, dB, y3, pair, w3, runs0, runs1, dy!, dpair!) -> dW (H, 2R*C): per block,
//   dy[:, k:k+n] = dA w3[:, k:k+n] (runs0), dpair[:, j:j+n] = dB w3[:, k:k+n] (runs1) and
//   dW[:, k:k+n] = dA^T y3[:, k:k+n] or dB^T pair[:, j:j+n], each written in place by one GEMM.
//   The same ATen GEMM calls as the Python loop, without its per-call interpreter cost.
// gather_rows_out(src (B, Rs, C), rows (Ro,), out (B, Ro, C)): out[b, j] = src[b, rows[j]] in out's
//   dtype (float32, float64, bfloat16): fc1_edge_proj's weight into [W0 | W1] order and cast to bf16
//   (or its gradient back to upstream's order) in one pass instead of two.
// tap_split(y3 (E, 2R, C), rows0 (n0,), pair_rows (2 n1,), pair_signs (2 n1,) float64,
//   y0! (E, n0, C), pair! (E, 2 n1, C)): y0[:, j] = y3[:, rows0[j]], pair[:, j] =
//   pair_signs[j] * y3[:, pair_rows[j]]: the tap projection's two GEMM operands in one pass.
// tap_assemble(dy0 (E, n0, C), dpair (E, 2 n1, C), a (2R,), b (2R,), sign (2R,) float64)
//   -> dy (E, 2R, C): dy[:, r] = dy0[:, a[r]] where b[r] < 0 (an m = 0 row), else
//   dpair[:, a[r]] + sign[r] * dpair[:, b[r]] (its y1 part and its y1' part): the split's adjoint.
//
// CPU: one pass each, at::parallel_for over edges, float32 with AVX-512 and AVX2+FMA clones
// (cpu/vec_math.h), float64 scalar; column sums of dbias per fixed chunk of edges, then over chunks (deterministic,
// independent of the thread count). Other devices: the same math in ATen ops (registered for
// CompositeExplicitAutograd; autograd is done by the Python op layer). float32 and float64.

#include "message_ops.h"

TORCH_LIBRARY_FRAGMENT(scn_fast_ext, m) {
  m.def("tap_gate_forward(Tensor a, Tensor b, Tensor gate) -> Tensor");
  m.def("tap_gate_backward(Tensor dm, Tensor a, Tensor b, Tensor gate) -> Tensor[]");
  m.def("tap_combine_forward(Tensor z, Tensor bias, Tensor src, Tensor coef) -> Tensor");
  m.def(
      "tap_combine_backward(Tensor dm, Tensor z, Tensor bias, Tensor src, Tensor coef) -> "
      "Tensor[]");
  m.def("gather_rows_out(Tensor src, Tensor rows, Tensor(a!) out) -> ()");
  m.def("_set_isa_cap(int cap) -> int");
  m.def("cached_empty(int[] size, ScalarType dtype) -> Tensor");
  m.def("release_cpu_cache() -> int");
  m.def("cpu_cache_bytes() -> int");
  m.def(
      "tap_split(Tensor y3, Tensor rows0, Tensor pair_rows, Tensor pair_signs, Tensor(a!) y0, "
      "Tensor(b!) pair) -> ()");
  m.def("tap_assemble(Tensor dy0, Tensor dpair, Tensor a, Tensor b, Tensor sign) -> Tensor");
  m.def(
      "_tap_split_aten(Tensor y3, Tensor rows0, Tensor pair_rows, Tensor pair_signs, "
      "Tensor(a!) y0, Tensor(b!) pair) -> ()");
  m.def("_tap_assemble_aten(Tensor dy0, Tensor dpair, Tensor a, Tensor b, Tensor sign) -> Tensor");
  m.def(
      "tap_blocked_forward(Tensor y3, Tensor pair, Tensor w3, Tensor bias, int[] runs0, "
      "int[] runs1) -> Tensor[]");
  m.def(
      "tap_blocked_backward(Tensor da, Tensor db, Tensor y3, Tensor pair, Tensor w3, int[] runs0, "
      "int[] runs1, Tensor(a!) dy, Tensor(b!) dpair) -> Tensor");
}

TORCH_LIBRARY_IMPL(scn_fast_ext, CatchAll, m) {
  m.impl("_set_isa_cap", &scn_fast::message::set_isa_cap);
  m.impl("cached_empty", &scn_fast::message::cached_empty);
  m.impl("release_cpu_cache", &scn_fast::message::release_cpu_cache);
  m.impl("cpu_cache_bytes", &scn_fast::message::cpu_cache_bytes);
}

TORCH_LIBRARY_IMPL(scn_fast_ext, CompositeExplicitAutograd, m) {
  m.impl("tap_gate_forward", &scn_fast::message::tap_gate_forward);
  m.impl("tap_gate_backward", &scn_fast::message::tap_gate_backward);
  m.impl("tap_combine_forward", &scn_fast::message::tap_combine_forward);
  m.impl("tap_combine_backward", &scn_fast::message::tap_combine_backward);
  m.impl("gather_rows_out", &scn_fast::message::gather_rows_out);
  m.impl("tap_split", &scn_fast::message::tap_split);
  m.impl("tap_assemble", &scn_fast::message::tap_assemble);
  m.impl("_tap_split_aten", &scn_fast::message::tap_split_aten);
  m.impl("_tap_assemble_aten", &scn_fast::message::tap_assemble_aten);
  m.impl("tap_blocked_forward", &scn_fast::message::tap_blocked_forward);
  m.impl("tap_blocked_backward", &scn_fast::message::tap_blocked_backward);
}
