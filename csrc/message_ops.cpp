// Fused elementwise steps of the message MLP (scn_fast/ops/tap_projection.py, scn_fast/ops/tap_combine.py):
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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/block_pool.h"
#include "cpu/cpu_isa.h"
#include "cpu/vec_math.h"

namespace scn_fast::message {
namespace pool = scn_fast::cpu::block_pool;
namespace {

using at::Tensor;
using scn_fast::cpu::sigmoid_scalar;

constexpr int64_t kGrainElements = 16384;  // minimum elements per parallel task
constexpr int64_t kSumChunkEdges = 16;      // edges per partial bias-gradient sum (fixed)

// ------------------------------------------------------------------------------------ checks
void check_float(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "scn_fast_ext: ",
              name, " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "scn_fast_ext: ", name, " has dtype ",
              t.scalar_type(), " but the first argument has ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "scn_fast_ext: ", name, " is on ", t.device(),
              " but the first argument is on ", like.device());
  TORCH_CHECK(t.is_contiguous(), "scn_fast_ext: ", name, " must be contiguous");
}

struct GateSizes {
  int64_t E, Tb, H;
};

GateSizes check_gate(const Tensor& a, const Tensor& b, const Tensor& gate) {
  TORCH_CHECK(a.dim() == 2, "scn_fast_ext: tap_gate a must be (E, H), got ", a.sizes());
  const int64_t E = a.size(0), H = a.size(1);
  TORCH_CHECK(b.dim() == 3 && b.size(0) == E && (b.size(1) == 0 || b.size(1) == 2) &&
                  b.size(2) == H,
              "scn_fast_ext: tap_gate b must be (E, 2, H) or (E, 0, H) with E = ", E, ", H = ", H,
              ", got ", b.sizes());
  TORCH_CHECK(gate.sizes() == a.sizes(), "scn_fast_ext: tap_gate gate must be (E, H) = ",
              a.sizes(), ", got ", gate.sizes());
  check_float(a, "a", a);
  check_float(b, "b", a);
  check_float(gate, "gate", a);
  return {E, b.size(1), H};
}

struct CombineSizes {
  int64_t E, Q, C, R, J;
};

CombineSizes check_combine(const Tensor& z, const Tensor& bias, const Tensor& src,
                           const Tensor& coef) {
  TORCH_CHECK(z.dim() == 3, "scn_fast_ext: tap_combine z must be (E, T*R, C), got ", z.sizes());
  TORCH_CHECK(bias.dim() == 2 && bias.size(1) == z.size(2),
              "scn_fast_ext: tap_combine bias must be (R, C) with C = ", z.size(2), ", got ",
              bias.sizes());
  const int64_t R = bias.size(0);
  TORCH_CHECK(src.dim() == 2 && src.size(0) == R && src.scalar_type() == at::kLong &&
                  src.is_contiguous(),
              "scn_fast_ext: tap_combine src must be a contiguous int64 (R, J) tensor with R = ", R,
              ", got ", src.sizes(), " ", src.scalar_type());
  const int64_t J = src.size(1);
  TORCH_CHECK(R * J == z.size(1), "scn_fast_ext: tap_combine src (R, J) = (", R, ", ", J,
              ") must name each of the z.size(1) = ", z.size(1), " rows once");
  TORCH_CHECK(coef.sizes() == src.sizes(), "scn_fast_ext: tap_combine coef must have src's shape ",
              src.sizes(), ", got ", coef.sizes());
  check_float(bias, "bias", bias);
  check_float(coef, "coef", bias);
  TORCH_CHECK(z.scalar_type() == bias.scalar_type() ||
                  (z.scalar_type() == at::kBFloat16 && bias.scalar_type() == at::kFloat),
              "scn_fast_ext: tap_combine z must have bias's dtype, or be bfloat16 with a float32 "
              "bias; got ", z.scalar_type(), " and ", bias.scalar_type());
  TORCH_CHECK(z.is_contiguous() && z.device() == bias.device(),
              "scn_fast_ext: tap_combine z must be contiguous, on bias's device");
  TORCH_CHECK(src.device() == z.device(), "scn_fast_ext: src is on ", src.device(), " but z is on ",
              z.device());
  if (src.is_cpu()) {  // a permutation of [0, Q): checked here (cheap), trusted on other devices
    std::vector<char> seen(static_cast<size_t>(R * J), 0);
    const int64_t* s = src.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < R * J; ++i) {
      TORCH_CHECK(s[i] >= 0 && s[i] < R * J && !seen[s[i]], "scn_fast_ext: tap_combine src must be a ",
                  "permutation of [0, ", R * J, "), got value ", s[i], " at flat position ", i);
      seen[s[i]] = 1;
    }
  }
  return {z.size(0), z.size(1), z.size(2), R, J};
}

// ------------------------------------------------------------------------------------ CPU: gate
template <typename T>
inline void gate_forward_row(const T* a, const T* b, const T* g, T* m, int64_t Tb, int64_t H,
                             int64_t h0) {
  for (int64_t h = h0; h < H; ++h) {
    const T av = a[h], gv = g[h];
    if (Tb == 0) {
      m[h] = av * sigmoid_scalar(av) * gv;
      continue;
    }
    const T b0 = b[h], b1 = b[H + h];
    const T p[4] = {av + b0, av + b1, av - b0, av - b1};
    for (int t = 0; t < 4; ++t) m[t * H + h] = p[t] * sigmoid_scalar(p[t]) * gv;
  }
}

template <typename T>
inline void gate_backward_row(const T* dm, const T* a, const T* b, const T* g, T* da, T* db,
                              T* dg, int64_t Tb, int64_t H, int64_t h0) {
  for (int64_t h = h0; h < H; ++h) {
    const T av = a[h], gv = g[h];
    if (Tb == 0) {
      const T s = sigmoid_scalar(av);
      dg[h] = dm[h] * av * s;
      da[h] = dm[h] * gv * s * (T(1) + av * (T(1) - s));
      continue;
    }
    const T b0 = b[h], b1 = b[H + h];
    const T p[4] = {av + b0, av + b1, av - b0, av - b1};
    T dp[4];
    T dgv = 0;
    for (int t = 0; t < 4; ++t) {
      const T s = sigmoid_scalar(p[t]);
      const T d = dm[t * H + h];
      dgv += d * p[t] * s;
      dp[t] = d * gv * s * (T(1) + p[t] * (T(1) - s));
    }
    dg[h] = dgv;
    da[h] = (dp[0] + dp[1]) + (dp[2] + dp[3]);
    db[h] = dp[0] - dp[2];
    db[H + h] = dp[1] - dp[3];
  }
}


// ------------------------------------------------------------------------------------ CPU: combine
// Z: z's (and dz's) storage type, T: the compute type of bias, coef, m, dm (float for Z = float or
// bfloat16, double for double).
template <typename Z, typename T>
inline void combine_forward_tail(const Z* ze, const T* bias, const int64_t* src, const T* coef,
                                 T* me, int64_t R, int64_t J, int64_t C, int64_t c0) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = c0; c < C; ++c) {
      T acc = 0;
      for (int64_t j = 0; j < J; ++j) {
        const int64_t s = src[r * J + j];
        const T x = static_cast<T>(ze[s * C + c]) + bias[(s % R) * C + c];
        acc += coef[r * J + j] * (x * sigmoid_scalar(x));
      }
      me[r * C + c] = acc;
    }
}

// dz for channels [c0, C) of one edge; psum (R, C) += dz (before any rounding to Z) over taps.
template <typename Z, typename T>
inline void combine_backward_tail(const T* dme, const Z* ze, const T* bias, const int64_t* src,
                                  const T* coef, Z* dze, T* psum, int64_t R, int64_t J, int64_t C,
                                  int64_t c0) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < J; ++j) {
      const int64_t s = src[r * J + j];
      const T k = coef[r * J + j];
      const Z* zr = ze + s * C;
      const T* br = bias + (s % R) * C;
      Z* dzr = dze + s * C;
      T* pr = psum + (s % R) * C;
      for (int64_t c = c0; c < C; ++c) {
        const T x = static_cast<T>(zr[c]) + br[c];
        const T sg = sigmoid_scalar(x);
        const T v = k * dme[r * C + c] * (sg * (T(1) + x * (T(1) - sg)));
        dzr[c] = static_cast<Z>(v);
        pr[c] += v;
      }
    }
}

#if SCN_HAS_AVX2_CLONE
// The vector channel loops of tap_combine and tap_gate, one text compiled for AVX2 (8 lanes) and for
// AVX-512 (16 lanes).
SCN_BEGIN_TARGET_AVX2
namespace avx2 {
using scn_fast::cpu::avx2::sigmoid;
using scn_fast::cpu::avx2::V;
#include "message_combine.inc"
#include "message_gate.inc"
}  // namespace avx2
SCN_END_TARGET

SCN_BEGIN_TARGET_AVX512
namespace avx512 {
using scn_fast::cpu::avx512::sigmoid;
using scn_fast::cpu::avx512::V;
#include "message_combine.inc"
#include "message_gate.inc"
}  // namespace avx512
SCN_END_TARGET
#endif

template <typename T>
void gate_forward_rows(const T* a, const T* b, const T* g, T* m, int64_t e0, int64_t e1,
                       int64_t Tb, int64_t H) {
#if SCN_HAS_AVX2_CLONE
  if constexpr (std::is_same_v<T, float>) {
    if (scn_fast::cpu::cpu_has_avx512())
      return avx512::gate_forward_edges(a, b, g, m, e0, e1, Tb, H);
    if (scn_fast::cpu::cpu_has_avx2_fma()) return avx2::gate_forward_edges(a, b, g, m, e0, e1, Tb, H);
  }
#endif
  const int64_t T4 = Tb == 0 ? 1 : 4;
  for (int64_t e = e0; e < e1; ++e)
    gate_forward_row(a + e * H, b + e * Tb * H, g + e * H, m + e * T4 * H, Tb, H, 0);
}

template <typename T>
void gate_backward_rows(const T* dm, const T* a, const T* b, const T* g, T* da, T* db, T* dg,
                        int64_t e0, int64_t e1, int64_t Tb, int64_t H) {
#if SCN_HAS_AVX2_CLONE
  if constexpr (std::is_same_v<T, float>) {
    if (scn_fast::cpu::cpu_has_avx512())
      return avx512::gate_backward_edges(dm, a, b, g, da, db, dg, e0, e1, Tb, H);
    if (scn_fast::cpu::cpu_has_avx2_fma())
      return avx2::gate_backward_edges(dm, a, b, g, da, db, dg, e0, e1, Tb, H);
  }
#endif
  const int64_t T4 = Tb == 0 ? 1 : 4;
  for (int64_t e = e0; e < e1; ++e)
    gate_backward_row(dm + e * T4 * H, a + e * H, b + e * Tb * H, g + e * H, da + e * H,
                      db + e * Tb * H, dg + e * H, Tb, H, 0);
}


template <typename Z, typename T>
void combine_forward_edges(const Z* z, const T* bias, const int64_t* src, const T* coef, T* m,
                           int64_t e0, int64_t e1, int64_t Q, int64_t R, int64_t J, int64_t C) {
#if SCN_HAS_AVX2_CLONE
  if constexpr (std::is_same_v<T, float>) {
    if (scn_fast::cpu::cpu_has_avx512())
      return avx512::combine_forward_edges<Z>(z, bias, src, coef, m, e0, e1, Q, R, J, C);
    if (scn_fast::cpu::cpu_has_avx2_fma())
      return avx2::combine_forward_edges<Z>(z, bias, src, coef, m, e0, e1, Q, R, J, C);
  }
#endif
  for (int64_t e = e0; e < e1; ++e)
    combine_forward_tail(z + e * Q * C, bias, src, coef, m + e * R * C, R, J, C, 0);
}

template <typename Z, typename T>
void combine_backward_edges(const T* dm, const Z* z, const T* bias, const int64_t* src,
                            const T* coef, Z* dz, T* psum, int64_t e0, int64_t e1, int64_t Q,
                            int64_t R, int64_t J, int64_t C) {
#if SCN_HAS_AVX2_CLONE
  if constexpr (std::is_same_v<T, float>) {
    if (scn_fast::cpu::cpu_has_avx512())
      return avx512::combine_backward_edges<Z>(dm, z, bias, src, coef, dz, psum, e0, e1, Q, R, J,
                                               C);
    if (scn_fast::cpu::cpu_has_avx2_fma())
      return avx2::combine_backward_edges<Z>(dm, z, bias, src, coef, dz, psum, e0, e1, Q, R, J,
                                             C);
  }
#endif
  for (int64_t e = e0; e < e1; ++e)
    combine_backward_tail(dm + e * R * C, z + e * Q * C, bias, src, coef, dz + e * Q * C, psum, R,
                          J, C, 0);
}

// Calls f(Z{}, T{}) for z's storage type: (float, float), (double, double), (BFloat16, float).
template <typename F>
void dispatch_combine(const Tensor& z, F&& f) {
  switch (z.scalar_type()) {
    case at::kFloat:
      return f(float{}, float{});
    case at::kDouble:
      return f(double{}, double{});
    case at::kBFloat16:
      return f(c10::BFloat16{}, float{});
    default:
      TORCH_CHECK(false, "scn_fast_ext: tap_combine z must be float32, float64 or bfloat16");
  }
}

// ------------------------------------------------------------------------------------ composite (non-CPU)
Tensor gate_pre(const Tensor& a, const Tensor& b) {
  if (b.size(1) == 0) return a.unsqueeze(1);
  auto au = a.unsqueeze(1);
  return at::cat({au + b, au - b}, 1);  // taps (0, 1, 2, 3)
}

// ------------------------------------------------------------------------------------ ops
Tensor tap_gate_forward(const Tensor& a, const Tensor& b, const Tensor& gate) {
  const GateSizes s = check_gate(a, b, gate);
  const int64_t T = s.Tb == 0 ? 1 : 4;
  if (!a.is_cpu()) return at::silu(gate_pre(a, b)) * gate.unsqueeze(1);
  Tensor m = pool::empty({s.E, T, s.H}, a.options());
  if (m.numel() == 0) return m;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "scn_fast_ext::tap_gate_forward", [&] {
    const scalar_t *ap = a.const_data_ptr<scalar_t>(), *bp = b.const_data_ptr<scalar_t>(),
                   *gp = gate.const_data_ptr<scalar_t>();
    scalar_t* mp = m.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.E, std::max<int64_t>(1, kGrainElements / (T * s.H)),
                     [&](int64_t e0, int64_t e1) { gate_forward_rows(ap, bp, gp, mp, e0, e1, s.Tb, s.H); });
  });
  return m;
}

std::vector<Tensor> tap_gate_backward(const Tensor& dm, const Tensor& a, const Tensor& b,
                                      const Tensor& gate) {
  const GateSizes s = check_gate(a, b, gate);
  const int64_t T = s.Tb == 0 ? 1 : 4;
  TORCH_CHECK(dm.dim() == 3 && dm.size(0) == s.E && dm.size(1) == T && dm.size(2) == s.H,
              "scn_fast_ext: tap_gate_backward dm must be (E, T, H) = (", s.E, ", ", T, ", ", s.H,
              "), got ", dm.sizes());
  check_float(dm, "dm", a);
  if (!a.is_cpu()) {
    Tensor pre = gate_pre(a, b);
    Tensor dgate = (dm * at::silu(pre)).sum(1);
    Tensor dpre = at::silu_backward(dm * gate.unsqueeze(1), pre);
    if (s.Tb == 0) return {dpre.squeeze(1), at::empty_like(b), dgate};
    auto d = dpre.view({s.E, 2, 2, s.H});
    return {d.sum({1, 2}), d.select(1, 0) - d.select(1, 1), dgate};
  }
  Tensor da = pool::empty_like(a), db = pool::empty_like(b), dg = pool::empty_like(gate);
  if (s.E * s.H == 0) return {da, db, dg};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "scn_fast_ext::tap_gate_backward", [&] {
    const scalar_t *dmp = dm.const_data_ptr<scalar_t>(), *ap = a.const_data_ptr<scalar_t>(),
                   *bp = b.const_data_ptr<scalar_t>(), *gp = gate.const_data_ptr<scalar_t>();
    scalar_t *dap = da.mutable_data_ptr<scalar_t>(), *dbp = db.mutable_data_ptr<scalar_t>(),
             *dgp = dg.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.E, std::max<int64_t>(1, kGrainElements / (T * s.H)),
                     [&](int64_t e0, int64_t e1) {
                       gate_backward_rows(dmp, ap, bp, gp, dap, dbp, dgp, e0, e1, s.Tb, s.H);
                     });
  });
  return {da, db, dg};
}

Tensor tap_combine_forward(const Tensor& z, const Tensor& bias, const Tensor& src,
                           const Tensor& coef) {
  const CombineSizes s = check_combine(z, bias, src, coef);
  if (!z.is_cpu()) {
    Tensor act = at::silu(z.to(bias.scalar_type()) + bias.repeat({s.Q / s.R, 1}));
    Tensor m = at::zeros({s.E, s.R, s.C}, bias.options());
    for (int64_t j = 0; j < s.J; ++j)
      m.addcmul_(act.index_select(1, src.select(1, j)), coef.select(1, j).view({1, s.R, 1}));
    return m;
  }
  Tensor m = pool::empty({s.E, s.R, s.C}, bias.options());
  if (m.numel() == 0) return m;
  dispatch_combine(z, [&](auto zt, auto tt) {
    using Z = decltype(zt);
    using T = decltype(tt);
    const Z* zp = z.const_data_ptr<Z>();
    const T *bp = bias.const_data_ptr<T>(), *cp = coef.const_data_ptr<T>();
    const int64_t* sp = src.const_data_ptr<int64_t>();
    T* mp = m.mutable_data_ptr<T>();
    at::parallel_for(0, s.E, std::max<int64_t>(1, kGrainElements / (s.Q * s.C)),
                     [&](int64_t e0, int64_t e1) {
                       combine_forward_edges(zp, bp, sp, cp, mp, e0, e1, s.Q, s.R, s.J, s.C);
                     });
  });
  return m;
}

std::vector<Tensor> tap_combine_backward(const Tensor& dm, const Tensor& z, const Tensor& bias,
                                         const Tensor& src, const Tensor& coef) {
  const CombineSizes s = check_combine(z, bias, src, coef);
  TORCH_CHECK(dm.dim() == 3 && dm.size(0) == s.E && dm.size(1) == s.R && dm.size(2) == s.C,
              "scn_fast_ext: tap_combine_backward dm must be (E, R, C) = (", s.E, ", ", s.R, ", ",
              s.C, "), got ", dm.sizes());
  check_float(dm, "dm", bias);
  if (!z.is_cpu()) {
    Tensor x = z.to(bias.scalar_type()) + bias.repeat({s.Q / s.R, 1});
    Tensor dz = at::empty_like(x);
    for (int64_t j = 0; j < s.J; ++j)
      dz.index_copy_(1, src.select(1, j), dm * coef.select(1, j).view({1, s.R, 1}));
    dz = at::silu_backward(dz, x);
    return {dz.to(z.scalar_type()), dz.view({s.E, s.Q / s.R, s.R, s.C}).sum({0, 1})};
  }
  Tensor dz = pool::empty_like(z);
  const int64_t chunks = (s.E + kSumChunkEdges - 1) / kSumChunkEdges;
  Tensor partial = at::zeros({std::max<int64_t>(chunks, 1), s.R, s.C}, bias.options());
  if (s.E > 0 && s.C > 0) {
    dispatch_combine(z, [&](auto zt, auto tt) {
      using Z = decltype(zt);
      using T = decltype(tt);
      const Z* zp = z.const_data_ptr<Z>();
      const T *dmp = dm.const_data_ptr<T>(), *bp = bias.const_data_ptr<T>(),
              *cp = coef.const_data_ptr<T>();
      const int64_t* sp = src.const_data_ptr<int64_t>();
      Z* dzp = dz.mutable_data_ptr<Z>();
      T* pp = partial.mutable_data_ptr<T>();
      const int64_t grain = std::max<int64_t>(1, kGrainElements / (kSumChunkEdges * s.Q * s.C));
      at::parallel_for(0, chunks, grain, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t e0 = k * kSumChunkEdges, e1 = std::min(s.E, e0 + kSumChunkEdges);
          combine_backward_edges(dmp, zp, bp, sp, cp, dzp, pp + k * s.R * s.C, e0, e1, s.Q, s.R,
                                 s.J, s.C);
        }
      });
    });
  }
  return {dz, partial.sum(0)};
}

void gather_rows_out(const Tensor& src, const Tensor& rows, Tensor out) {
  TORCH_CHECK(src.dim() == 3 && out.dim() == 3 && src.size(0) == out.size(0) &&
                  src.size(2) == out.size(2),
              "scn_fast_ext: gather_rows src (B, Rs, C) and out (B, Ro, C) disagree: ", src.sizes(),
              " vs ", out.sizes());
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == out.size(1) && rows.scalar_type() == at::kLong,
              "scn_fast_ext: gather_rows rows must be int64 (Ro,) with Ro = ", out.size(1));
  TORCH_CHECK(src.is_contiguous() && out.is_contiguous() && rows.is_contiguous(),
              "scn_fast_ext: gather_rows needs contiguous tensors");
  TORCH_CHECK(src.device() == out.device() && rows.device() == out.device(),
              "scn_fast_ext: gather_rows tensors must be on one device");
  const int64_t B = src.size(0), Rs = src.size(1), Ro = out.size(1), C = src.size(2);
  if (!out.is_cpu()) {
    out.copy_(src.index_select(1, rows));
    return;
  }
  const int64_t* rp = rows.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < Ro; ++j)
    TORCH_CHECK(rp[j] >= 0 && rp[j] < Rs, "scn_fast_ext: gather_rows row ", rp[j],
                " out of range for Rs = ", Rs);
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, src.scalar_type(), "gather_rows_src", [&] {
    using S = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "gather_rows_out", [&] {
      using O = scalar_t;
      const S* sp = src.const_data_ptr<S>();
      O* op = out.mutable_data_ptr<O>();
      at::parallel_for(0, B, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, Ro * C)),
                       [&](int64_t b0, int64_t b1) {
                         for (int64_t b = b0; b < b1; ++b)
                           for (int64_t j = 0; j < Ro; ++j) {
                             const S* from = sp + (b * Rs + rp[j]) * C;
                             O* to = op + (b * Ro + j) * C;
                             for (int64_t c = 0; c < C; ++c) to[c] = static_cast<O>(from[c]);
                           }
                       });
    });
  });
}

// Rows k .. k+n of a (B, Rr, C) tensor as the (B, n*C) matrix they form (a strided view).
Tensor row_block(const Tensor& t, int64_t k, int64_t n) {
  return t.narrow(1, k, n).view({t.size(0), n * t.size(2)});
}

void check_runs(at::IntArrayRef runs, int64_t rows, int64_t positions, const char* name) {
  TORCH_CHECK(runs.size() % 3 == 0, "scn_fast_ext: ", name, " must hold (j, k, n) triples");
  for (size_t i = 0; i < runs.size(); i += 3)
    TORCH_CHECK(runs[i] >= 0 && runs[i + 2] > 0 && runs[i] + runs[i + 2] <= positions &&
                    runs[i + 1] >= 0 && runs[i + 1] + runs[i + 2] <= rows,
                "scn_fast_ext: ", name, " run (", runs[i], ", ", runs[i + 1], ", ", runs[i + 2],
                ") is out of range");
}

struct BlockedSizes {
  int64_t E, R2, C, H, n1;
};

BlockedSizes check_blocked(const Tensor& y3, const Tensor& pair, const Tensor& w3,
                           at::IntArrayRef runs0, at::IntArrayRef runs1) {
  TORCH_CHECK(y3.dim() == 3 && pair.dim() == 3 && w3.dim() == 3,
              "scn_fast_ext: tap_blocked y3, pair and w3 must be 3-D");
  const BlockedSizes z{y3.size(0), y3.size(1), y3.size(2), w3.size(0), pair.size(1)};
  TORCH_CHECK(pair.size(0) == 2 * z.E && pair.size(2) == z.C && w3.size(1) == z.R2 &&
                  w3.size(2) == z.C,
              "scn_fast_ext: tap_blocked shapes disagree: y3 ", y3.sizes(), ", pair ",
              pair.sizes(), ", w3 ", w3.sizes());
  check_float(y3, "y3", y3);
  check_float(pair, "pair", y3);
  check_float(w3, "w3", y3);
  check_runs(runs0, z.R2, z.R2, "runs0");
  check_runs(runs1, z.R2, z.n1, "runs1");
  TORCH_CHECK(!runs0.empty() && !runs1.empty(), "scn_fast_ext: tap_blocked needs runs");
  return z;
}

std::vector<Tensor> tap_blocked_forward(const Tensor& y3, const Tensor& pair, const Tensor& w3,
                                        const Tensor& bias, at::IntArrayRef runs0,
                                        at::IntArrayRef runs1) {
  const BlockedSizes z = check_blocked(y3, pair, w3, runs0, runs1);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == z.H, "scn_fast_ext: bias must be (H,)");
  Tensor a = at::empty({z.E, z.H}, y3.options());
  Tensor b = at::empty({2 * z.E, z.H}, y3.options());
  for (size_t i = 0; i < runs0.size(); i += 3) {
    const Tensor lhs = row_block(y3, runs0[i + 1], runs0[i + 2]);
    const Tensor rhs = row_block(w3, runs0[i + 1], runs0[i + 2]).t();
    if (i == 0)
      at::addmm_out(a, bias, lhs, rhs);
    else
      a.addmm_(lhs, rhs);
  }
  for (size_t i = 0; i < runs1.size(); i += 3) {
    const Tensor lhs = row_block(pair, runs1[i], runs1[i + 2]);
    const Tensor rhs = row_block(w3, runs1[i + 1], runs1[i + 2]).t();
    if (i == 0)
      at::mm_out(b, lhs, rhs);
    else
      b.addmm_(lhs, rhs);
  }
  return {a, b};
}

Tensor tap_blocked_backward(const Tensor& da, const Tensor& db, const Tensor& y3,
                            const Tensor& pair, const Tensor& w3, at::IntArrayRef runs0,
                            at::IntArrayRef runs1, Tensor dy, Tensor dpair) {
  const BlockedSizes z = check_blocked(y3, pair, w3, runs0, runs1);
  TORCH_CHECK(da.sizes() == at::IntArrayRef({z.E, z.H}) && db.sizes() == at::IntArrayRef({2 * z.E, z.H}),
              "scn_fast_ext: tap_blocked_backward dA must be (E, H) and dB (2E, H)");
  TORCH_CHECK(dy.sizes() == y3.sizes() && dpair.sizes() == pair.sizes() && dy.is_contiguous() &&
                  dpair.is_contiguous(),
              "scn_fast_ext: tap_blocked_backward dy / dpair must be contiguous like y3 / pair");
  Tensor dw = at::empty({z.H, z.R2, z.C}, w3.options());
  for (size_t i = 0; i < runs0.size(); i += 3) {
    const int64_t k = runs0[i + 1], n = runs0[i + 2];
    Tensor dyk = row_block(dy, k, n), dwk = row_block(dw, k, n);
    at::mm_out(dyk, da, row_block(w3, k, n));
    at::mm_out(dwk, da.t(), row_block(y3, k, n));
  }
  for (size_t i = 0; i < runs1.size(); i += 3) {
    const int64_t j = runs1[i], k = runs1[i + 1], n = runs1[i + 2];
    Tensor dpk = row_block(dpair, j, n), dwk = row_block(dw, k, n);
    at::mm_out(dpk, db, row_block(w3, k, n));
    at::mm_out(dwk, db.t(), row_block(pair, j, n));
  }
  return dw.view({z.H, z.R2 * z.C});
}

// rows: a contiguous int64 (n,) tensor whose values (checked on CPU) lie in [lo, bound).
void check_rows(const Tensor& rows, int64_t n, int64_t lo, int64_t bound, const char* name) {
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == n && rows.scalar_type() == at::kLong &&
                  rows.is_contiguous(),
              "scn_fast_ext: ", name, " must be a contiguous int64 (", n, ",) tensor, got ",
              rows.sizes(), " ", rows.scalar_type());
  if (!rows.is_cpu()) return;
  const int64_t* p = rows.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j)
    TORCH_CHECK(p[j] >= lo && p[j] < bound, "scn_fast_ext: ", name, " holds ", p[j],
                ", out of range for ", bound, " rows");
}

void check_signs(const Tensor& signs, int64_t n, const char* name) {
  TORCH_CHECK(signs.dim() == 1 && signs.size(0) == n && signs.scalar_type() == at::kDouble &&
                  signs.is_contiguous(),
              "scn_fast_ext: ", name, " must be a contiguous float64 (", n, ",) tensor");
}

// The non-CPU bodies of tap_split / tap_assemble (ATen ops; any device). Registered as
// _tap_split_aten / _tap_assemble_aten too, so the tests run them on CPU against the CPU loops.
void tap_split_aten(const Tensor& y3, const Tensor& rows0, const Tensor& pair_rows,
                    const Tensor& pair_signs, Tensor y0, Tensor pair) {
  const int64_t np = pair_rows.numel();
  at::index_select_out(y0, y3, 1, rows0);
  at::mul_out(pair, y3.index_select(1, pair_rows),
              pair_signs.to(y3.scalar_type()).view({1, np, 1}));
}

Tensor tap_assemble_aten(const Tensor& dy0, const Tensor& dpair, const Tensor& a, const Tensor& b,
                         const Tensor& sign) {
  const int64_t R2 = a.numel();
  auto m0 = b.lt(0);
  auto idx_a0 = at::where(m0, a, at::zeros_like(a));
  auto idx_a1 = at::where(m0, at::zeros_like(a), a);
  auto idx_b = at::where(m0, at::zeros_like(b), b);
  auto from0 = dy0.index_select(1, idx_a0);
  auto s = sign.to(dy0.scalar_type()).view({1, R2, 1});
  auto from1 = dpair.index_select(1, idx_a1) + s * dpair.index_select(1, idx_b);
  return at::where(m0.view({1, R2, 1}), from0, from1);
}

void tap_split(const Tensor& y3, const Tensor& rows0, const Tensor& pair_rows,
               const Tensor& pair_signs, Tensor y0, Tensor pair) {
  TORCH_CHECK(y3.dim() == 3, "scn_fast_ext: tap_split y3 must be (E, 2R, C), got ", y3.sizes());
  check_float(y3, "y3", y3);
  const int64_t E = y3.size(0), R2 = y3.size(1), C = y3.size(2);
  const int64_t n0 = rows0.numel(), np = pair_rows.numel();
  TORCH_CHECK(y0.sizes() == at::IntArrayRef({E, n0, C}) && pair.sizes() == at::IntArrayRef({E, np, C}),
              "scn_fast_ext: tap_split outputs must be y0 (E, n0, C) = (", E, ", ", n0, ", ", C,
              ") and pair (E, 2 n1, C) = (", E, ", ", np, ", ", C, "), got ", y0.sizes(), " and ",
              pair.sizes());
  check_float(y0, "y0", y3);
  check_float(pair, "pair", y3);
  check_rows(rows0, n0, 0, R2, "rows0");
  check_rows(pair_rows, np, 0, R2, "pair_rows");
  check_signs(pair_signs, np, "pair_signs");
  TORCH_CHECK(rows0.device() == y3.device() && pair_rows.device() == y3.device() &&
                  pair_signs.device() == y3.device(),
              "scn_fast_ext: tap_split tensors must be on one device");
  if (!y3.is_cpu()) return tap_split_aten(y3, rows0, pair_rows, pair_signs, y0, pair);
  if (E == 0) return;
  const int64_t* r0 = rows0.const_data_ptr<int64_t>();
  const int64_t* rp = pair_rows.const_data_ptr<int64_t>();
  const double* sp = pair_signs.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(y3.scalar_type(), "scn_fast_ext::tap_split", [&] {
    const scalar_t* src = y3.const_data_ptr<scalar_t>();
    scalar_t* d0 = y0.mutable_data_ptr<scalar_t>();
    scalar_t* dp = pair.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, E, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, R2 * C)),
                     [&](int64_t e0, int64_t e1) {
                       for (int64_t e = e0; e < e1; ++e) {
                         const scalar_t* row = src + e * R2 * C;
                         for (int64_t j = 0; j < n0; ++j)
                           std::copy_n(row + r0[j] * C, C, d0 + (e * n0 + j) * C);
                         for (int64_t j = 0; j < np; ++j) {
                           const scalar_t* in = row + rp[j] * C;
                           scalar_t* out = dp + (e * np + j) * C;
                           const scalar_t sg = static_cast<scalar_t>(sp[j]);
                           for (int64_t c = 0; c < C; ++c) out[c] = sg * in[c];
                         }
                       }
                     });
  });
}

Tensor tap_assemble(const Tensor& dy0, const Tensor& dpair, const Tensor& a, const Tensor& b,
                    const Tensor& sign) {
  TORCH_CHECK(dy0.dim() == 3 && dpair.dim() == 3 && dy0.size(0) == dpair.size(0) &&
                  dy0.size(2) == dpair.size(2),
              "scn_fast_ext: tap_assemble dy0 (E, n0, C) and dpair (E, 2 n1, C) disagree: ",
              dy0.sizes(), " vs ", dpair.sizes());
  check_float(dy0, "dy0", dy0);
  check_float(dpair, "dpair", dy0);
  const int64_t E = dy0.size(0), n0 = dy0.size(1), np = dpair.size(1), C = dy0.size(2);
  const int64_t R2 = a.numel();
  check_rows(a, R2, 0, std::max(n0, np), "a");  // the exact bound per row is checked below
  check_rows(b, R2, -1, np, "b");                 // -1: an m = 0 row
  check_signs(sign, R2, "sign");
  TORCH_CHECK(a.device() == dy0.device() && b.device() == dy0.device() &&
                  sign.device() == dy0.device(),
              "scn_fast_ext: tap_assemble tensors must be on one device");
  if (!dy0.is_cpu()) return tap_assemble_aten(dy0, dpair, a, b, sign);
  const int64_t* ap = a.const_data_ptr<int64_t>();
  const int64_t* bp = b.const_data_ptr<int64_t>();
  const double* sp = sign.const_data_ptr<double>();
  for (int64_t r = 0; r < R2; ++r)
    TORCH_CHECK(ap[r] >= 0 && ap[r] < (bp[r] < 0 ? n0 : np),
                "scn_fast_ext: tap_assemble a[", r, "] = ", ap[r], " is out of range");
  Tensor dy = pool::empty({E, R2, C}, dy0.options());
  if (E == 0) return dy;
  AT_DISPATCH_FLOATING_TYPES(dy0.scalar_type(), "scn_fast_ext::tap_assemble", [&] {
    const scalar_t* s0 = dy0.const_data_ptr<scalar_t>();
    const scalar_t* s1 = dpair.const_data_ptr<scalar_t>();
    scalar_t* out = dy.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, E, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, R2 * C)),
                     [&](int64_t e0, int64_t e1) {
                       for (int64_t e = e0; e < e1; ++e) {
                         for (int64_t r = 0; r < R2; ++r) {
                           scalar_t* o = out + (e * R2 + r) * C;
                           if (bp[r] < 0) {
                             std::copy_n(s0 + (e * n0 + ap[r]) * C, C, o);
                             continue;
                           }
                           const scalar_t* x = s1 + (e * np + ap[r]) * C;
                           const scalar_t* z = s1 + (e * np + bp[r]) * C;
                           const scalar_t sg = static_cast<scalar_t>(sp[r]);
                           for (int64_t c = 0; c < C; ++c) o[c] = x[c] + sg * z[c];
                         }
                       }
                     });
  });
  return dy;
}

// Caps the ISA of the CPU clones (2 = AVX-512, 1 = AVX2, 0 = baseline) and returns the previous
// cap: the tests run every clone on one machine.
// cached_empty(size, dtype) -> a float CPU tensor from the block cache (cpu/block_pool.h), for the
//   large per-step tensors the Python op layer creates (weight gradients); release_cpu_cache() frees
//   the cached blocks and returns their bytes; cpu_cache_bytes() -> bytes cached now.
Tensor cached_empty(at::IntArrayRef size, at::ScalarType dtype) {
  return pool::empty(size, at::TensorOptions().dtype(dtype).device(at::kCPU));
}

int64_t release_cpu_cache() { return static_cast<int64_t>(pool::pool().release()); }

int64_t cpu_cache_bytes() {
  pool::Pool& p = pool::pool();
  std::lock_guard<std::mutex> g(p.mu);
  return static_cast<int64_t>(p.cached);
}

int64_t set_isa_cap(int64_t cap) {
  TORCH_CHECK(cap >= 0 && cap <= 2, "scn_fast_ext: ISA cap must be 0, 1 or 2, got ", cap);
  return scn_fast::cpu::isa_cap.exchange(static_cast<int>(cap));
}

}  // namespace
}  // namespace scn_fast::message

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
