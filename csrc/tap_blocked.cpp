// The row-blocked GEMMs of the tap projection (scn_fast/ops/tap_gemm.py, strategy "row_blocked").
//
// tap_blocked_forward(y3 (E, 2R, C), pair (2E, n1, C), w3 (H, 2R, C), bias (H,), runs0, runs1)
//   -> [A (E, H), B (2E, H)]: fc1_edge_proj's tap-symmetric GEMMs per block of consecutive weight
//   rows (K = n*C), reading the weight in upstream's layout (no gathered copy): A = bias + sum over
//   runs0 (j, k, n) of y3[:, k:k+n] w3[:, k:k+n]^T, B = sum over runs1 (j, k, n) of
//   pair[:, j:j+n] w3[:, k:k+n]^T (scn_fast/ops/tap_projection.py; runs flattened (j, k, n) triples).
// tap_blocked_backward(dA, dB, y3, pair, w3, runs0, runs1, dy!, dpair!) -> dW (H, 2R*C): per block,
//   dy[:, k:k+n] = dA w3[:, k:k+n] (runs0), dpair[:, j:j+n] = dB w3[:, k:k+n] (runs1) and
//   dW[:, k:k+n] = dA^T y3[:, k:k+n] or dB^T pair[:, j:j+n], each written in place by one GEMM.
//   The same ATen GEMM calls as the Python loop, without its per-call interpreter cost.

#include "message_ops.h"

namespace scn_fast::message {
namespace {

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

}  // namespace

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

}  // namespace scn_fast::message
