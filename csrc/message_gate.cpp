// tap_gate: the gate epilogue of the gated tap projection (scn_fast/ops/tap_gate.py), one pass
// instead of several ATen passes over an (E, T, H) tensor. E edges, T taps (1 or 4), H channels.
//
// tap_gate_forward(a (E, H), b (E, Tb, H), gate (E, H)) -> m (E, T, H)
//   Tb = 2 (T = 4): pre = [a + b0, a + b1, a - b0, a - b1];  Tb = 0 (T = 1): pre = [a]
//   m[e, t] = silu(pre[e, t]) * gate[e]
// tap_gate_backward(dm, a, b, gate) -> [da (E, H), db (E, Tb, H), dgate (E, H)]
//   dpre_t = dm_t * gate * silu'(pre_t);  dgate = sum_t dm_t * silu(pre_t)
//   da = sum_t dpre_t;  db0 = dpre_0 - dpre_2;  db1 = dpre_1 - dpre_3
//
// CPU: one pass each, at::parallel_for over edges, float32 with AVX-512 and AVX2+FMA clones
// (cpu/vec_math.h), float64 scalar. Other devices: the same math in ATen ops.

#include "message_ops.h"
#include "cpu/cpu_isa.h"
#include "cpu/vec_math.h"

namespace scn_fast::message {
namespace {

using scn_fast::cpu::sigmoid_scalar;

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

#define SCN_MESSAGE_CLONE_INC "message_gate.inc"
#include "message_clones.inc"
#undef SCN_MESSAGE_CLONE_INC

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

// ------------------------------------------------------------------------------------ composite (non-CPU)
Tensor gate_pre(const Tensor& a, const Tensor& b) {
  if (b.size(1) == 0) return a.unsqueeze(1);
  auto au = a.unsqueeze(1);
  return at::cat({au + b, au - b}, 1);  // taps (0, 1, 2, 3)
}

}  // namespace

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

}  // namespace scn_fast::message
