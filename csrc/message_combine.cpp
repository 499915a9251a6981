// tap_combine: fc2_edge's bias, SiLU and upstream's tap combination in one pass
// (scn_fast/ops/tap_combine.py). E edges, T taps, R rotated rows, C channels.
//
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
//
// CPU: one pass each, at::parallel_for over edges, float32 with AVX-512 and AVX2+FMA clones
// (cpu/vec_math.h), float64 scalar; column sums of dbias per fixed chunk of edges, then over
// chunks (deterministic, independent of the thread count). Other devices: ATen ops.

#include "message_ops.h"
#include "cpu/cpu_isa.h"
#include "cpu/vec_math.h"

namespace scn_fast::message {
namespace {

using scn_fast::cpu::sigmoid_scalar;

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

#define SCN_MESSAGE_CLONE_INC "message_combine.inc"
#include "message_clones.inc"
#undef SCN_MESSAGE_CLONE_INC

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

}  // namespace

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

}  // namespace scn_fast::message
