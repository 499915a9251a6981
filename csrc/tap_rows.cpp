// Row movement of the tap projection (scn_fast/ops/tap_buffers.py): one pass each instead of a
// gather, a cast and a sign pass. E edges, R rotated rows per side, C channels.
//
// gather_rows_out(src (B, Rs, C), rows (Ro,), out (B, Ro, C)): out[b, j] = src[b, rows[j]] in out's
//   dtype (float32, float64, bfloat16): fc1_edge_proj's weight into [W0 | W1] order and cast to bf16
//   (or its gradient back to upstream's order) in one pass instead of two.
// tap_split(y3 (E, 2R, C), rows0 (n0,), pair_rows (2 n1,), pair_signs (2 n1,) float64,
//   y0! (E, n0, C), pair! (E, 2 n1, C)): y0[:, j] = y3[:, rows0[j]], pair[:, j] =
//   pair_signs[j] * y3[:, pair_rows[j]]: the tap projection's two GEMM operands in one pass.
// tap_assemble(dy0 (E, n0, C), dpair (E, 2 n1, C), a (2R,), b (2R,), sign (2R,) float64)
//   -> dy (E, 2R, C): dy[:, r] = dy0[:, a[r]] where b[r] < 0 (an m = 0 row), else
//   dpair[:, a[r]] + sign[r] * dpair[:, b[r]] (its y1 part and its y1' part): the split's adjoint.

#include "message_ops.h"

namespace scn_fast::message {
namespace {

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

}  // namespace

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

}  // namespace scn_fast::message
