// Spherical grid MLP and sphere-sample output heads (scn_fast/ops/grid_projection.py,
// scn_fast/ops/output_heads.py): tile loops over atoms calling ATen GEMMs and fused elementwise work.
//
// Device-generic: the GEMMs are at::mm_out / addmm_ (MKL/oneDNN on CPU, cuBLAS on CUDA; already
// multithreaded, so no parallel_for around them), the copies are ATen ops, and the elementwise steps
// (bias + SiLU, SiLU derivative + bias-gradient column sums) are one fused pass each on CPU
// (grid_ops.h, at::parallel_for) and ATen ops elsewhere. So the one source serves CPU and CUDA
// tensors; the ops are registered for the CompositeExplicitAutograd key (autograd is done by the
// Python op layer). float32 and float64. Scratch buffers hold one tile and are reused across tiles.
//
// Notation: N atoms, S = (L+1)^2 coefficients, G grid points, b bands, C channels per input,
// H1 = 2bC, H2 = w2 rows, C3 = w3 rows, n atoms per tile. A tile's grid rows are ordered (g, z)
// (grid point major, atom minor) so that each projection is ONE 2-D GEMM over the whole tile.
//
// grid_mlp_forward(x_down, x_new, to_grid (G, b*S), from_grid (S, G), w1 (H1, 2bC), b1, w2 (H2, H1),
//                  b2, w3 (C3, H2), b3, tile_atoms, bf16_gemms=False) -> out (N, S, C3)
//   Upstream:  u_g = [T_k x_down | T_k x_new]_{k}  (fc1 input columns ordered side, band, channel)
//              out = F (fc3(silu(fc2(silu(fc1(u))))))
//   Here fc1 is applied in coefficient space (exact algebra, S < G makes it cheaper):
//     X[(i,z), s*C + c] = x_s[z, i, c]                               (S*n, 2C)    tile transpose
//     Q_k = X W1_k^T,  W1_k[h, s*C + c] = w1[h, (s*b + k)*C + c]      (S*n, H1)    per band
//     A1 = to_grid @ [Q_0; Q_1; ...] + b1  with Q stacked as (b*S, n*H1)   (G, n*H1) = (G*n, H1)
//     H1 = silu(A1);  A2 = H1 w2^T + b2;  H2 = silu(A2)                (G*n, H2)
//     U = from_grid @ H2 viewed (G, n*H2)                              (S, n*H2) = (S*n, H2)
//     out[z, i, :] = U[(i,z)] w3^T + fsum[i] b3,  fsum = from_grid @ 1   (fc3 commuted with F)
//   Nothing of size (N*G, .) is allocated: the buffers hold one tile and are reused.
//   bf16_gemms (float32 inputs): the GEMMs with w1, w2, w3 (and their gradients' GEMMs) take bf16
//   operands (precision="bf16" on hardware with bf16 units); projections, biases, SiLU stay float32.
//   tf32 (every grid and heads op): on CUDA, the call's float32 GEMMs run on tf32 tensor cores
//   (true) or in IEEE float32 (false, the default), whatever the process-wide
//   torch.backends.cuda.matmul.allow_tf32 says (Tf32Scope); no effect on CPU.
//
// grid_mlp_backward(grad_out, same inputs) -> [dx_down, dx_new, dw1, db1, dw2, db2, dw3, db3]
//   recomputes each tile's forward (nothing saved across tiles) and runs the chain rule backwards
//   through the same GEMMs; weight gradients accumulate over tiles.
// grid_mlp_forward_saving(same inputs) -> [out, A1 (N*G*H1,), A2 (N*G*H2,)] and
// grid_mlp_backward_saved(grad_out, x_down, x_new, A1, A2, the other inputs) -> as above: the
//   pre-activations of fc1 and fc2 kept from the forward (each tile's rows in its (g, z) order, so
//   the same tile_atoms must be passed to both), so the backward runs no forward GEMM: ~45% fewer
//   GEMM FLOPs for G*(H1+H2) saved numbers per atom (645 KB at L = 6, 2 bands, float32).
//
// sphere_heads_forward(x (N, S, C), sh (P, S), weights [w1, b1, w2, b2, w3, b3 per head],
//                      point_weights [V_k (P, d_k) per head], tile_atoms) -> [out_k (N, d_k)]
//   out_k[z, j] = (1/P) sum_p V_k[p, j] (w3_k silu(w2_k silu(w1_k (sh x_z)[p] + b1_k) + b2_k) + b3_k)
//   with w3_k (1, D2). First layers of all heads run as one GEMM in coefficient space, the point
//   sums run before fc3 (it is linear): R_k = V_k^T H2_k / P, out = R_k w3^T + b3 (V_k^T 1) / P.
// sphere_heads_backward(grads [d out_k], x, sh, weights, point_weights, tile_atoms)
//   -> [dx, then dw1, db1, dw2, db2, dw3, db3 per head]
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "cpu/block_pool.h"
#include "grid_ops.h"

namespace scn_fast::grid {
namespace {

using at::Tensor;

constexpr int64_t kChunkRows = 64;         // rows per partial column sum (fixed: deterministic)
constexpr int64_t kGrainElements = 16384;  // minimum elements per parallel task

// out = silu(y + bias), pre = y + bias (if defined); y, pre, out hold rows x cols values
// (contiguous, bias (cols,) repeats along rows); pre and out may alias y. One pass on CPU.
void bias_silu(const Tensor& y, const Tensor& bias, const Tensor& pre, const Tensor& out) {
  const int64_t cols = bias.numel();
  const int64_t rows = cols ? y.numel() / cols : 0;
  if (rows == 0) return;
  if (!y.is_cpu()) {
    Tensor a = (pre.defined() ? pre : out).view({rows, cols});
    at::add_out(a, y.view({rows, cols}), bias);
    Tensor o = out.view({rows, cols});
    at::silu_out(o, a);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "scn_fast_ext::bias_silu", [&] {
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* bp = bias.data_ptr<scalar_t>();
    scalar_t* pp = pre.defined() ? pre.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / cols), [&](int64_t r0, int64_t r1) {
      cpu::bias_silu_rows(yp + r0 * cols, bp, pp ? pp + r0 * cols : nullptr, op + r0 * cols,
                          r1 - r0, cols);
    });
  });
}

// d *= f in place and colsum += column sums of the result; d and x hold rows x cols values, colsum
// (cols,); f = silu'(x) (Factor::kSiluOf: x the pre-activation) or f = x (Factor::kGiven: x the
// derivative silu_grad kept). The sums are per fixed chunk of kChunkRows rows, then over the chunks:
// the result does not depend on the thread count.
enum class Factor { kSiluOf, kGiven };

void scale_colsum(const Tensor& d, const Tensor& x, Tensor colsum, Factor factor) {
  const int64_t cols = colsum.numel();
  const int64_t rows = cols ? d.numel() / cols : 0;
  if (rows == 0) return;
  if (!d.is_cpu()) {
    Tensor dv = d.view({rows, cols});
    const Tensor xv = x.view({rows, cols});
    if (factor == Factor::kSiluOf)
      at::silu_backward_out(dv, dv, xv);
    else
      dv.mul_(xv);
    colsum.add_(dv.sum(0));
    return;
  }
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  Tensor partial = at::zeros({chunks, cols}, d.options());
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "scn_fast_ext::scale_colsum", [&] {
    scalar_t* dp = d.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* sp = partial.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kGrainElements / (kChunkRows * cols));
    at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        const int64_t r0 = ch * kChunkRows, n = std::min(kChunkRows, rows - r0);
        if (factor == Factor::kSiluOf)
          cpu::dsilu_rows(dp + r0 * cols, xp + r0 * cols, sp + ch * cols, n, cols);
        else
          cpu::mul_colsum_rows(dp + r0 * cols, xp + r0 * cols, sp + ch * cols, n, cols);
      }
    });
  });
  colsum.add_(partial.sum(0));
}

void dsilu_colsum(const Tensor& d, const Tensor& a, Tensor colsum) {
  scale_colsum(d, a, colsum, Factor::kSiluOf);
}

void mul_colsum(const Tensor& d, const Tensor& g, Tensor colsum) {
  scale_colsum(d, g, colsum, Factor::kGiven);
}

// h = silu(a) and g = silu'(a); a, h, g hold the same number of values (contiguous). One pass (one
// exponential per value) on CPU.
void silu_grad(const Tensor& a, const Tensor& h, const Tensor& g, int64_t cols) {
  const int64_t rows = cols ? a.numel() / cols : 0;
  if (rows == 0) return;
  if (!a.is_cpu()) {
    Tensor hv = h.view_as(a), gv = g.view_as(a);
    at::silu_out(hv, a);
    at::silu_backward_out(gv, at::ones_like(a), a);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "scn_fast_ext::silu_grad", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* gp = g.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / cols), [&](int64_t r0, int64_t r1) {
      cpu::silu_grad_rows(ap + r0 * cols, hp + r0 * cols, gp + r0 * cols, r1 - r0, cols);
    });
  });
}

// A reusable flat scratch buffer; view(shape) returns its prefix with that shape.
struct Scratch {
  Tensor flat;
  Scratch(int64_t numel, const at::TensorOptions& opt) : flat(at::empty({numel}, opt)) {}
  Tensor view(at::IntArrayRef shape) const {
    int64_t numel = 1;
    for (auto s : shape) numel *= s;
    return flat.narrow(0, 0, numel).view(shape);
  }
};

// The MLP's weight GEMMs (fc1 in coefficient space, fc2, fc3 and their gradients) in float32/64,
// or with bf16 operands (bf16_gemms: native bf16 GEMMs, oneDNN on CPU, whose results are bf16 and
// are widened into the float32 buffers). The projections (to_grid, from_grid) stay float32 either
// way, as in the rest of the model's precision modes.
struct Gemm {
  bool bf16;
  Tensor op(const Tensor& t) const { return bf16 ? t.to(at::kBFloat16) : t; }
  // out = a @ b (out any strided view)
  void mm(Tensor out, const Tensor& a, const Tensor& b) const {
    if (bf16)
      out.copy_(at::mm(a, b));
    else
      at::mm_out(out, a, b);
  }
  // acc += a @ b
  void addmm(Tensor acc, const Tensor& a, const Tensor& b) const {
    if (bf16)
      acc.add_(at::mm(a, b));
    else
      acc.addmm_(a, b);
  }
};

// The cuBLAS precision of one call's float32 GEMMs: tf32 tensor cores (tf32 = true) or IEEE float32,
// decided by the argument, never by the process-wide flag. Off: at::NoTF32Guard (thread-local; cuBLAS
// consults it for every float32 GEMM). On: the global flag is set for the call and restored after it.
// CUDA float32 only; CPU GEMMs (MKL / oneDNN) are untouched.
class Tf32Scope {
 public:
  Tf32Scope(const Tensor& like, bool tf32) {
    if (!like.is_cuda() || like.scalar_type() != at::kFloat) return;
    if (tf32) {
      auto& ctx = at::globalContext();
      try {
        restore_ = ctx.allowTF32CuBLAS();
      } catch (const c10::Error&) {
        // torch refuses to read the legacy flag when it disagrees with the new setting
        // (torch.backends.cuda.matmul.fp32_precision set alone): the call then runs in the
        // process's setting rather than change what it cannot restore.
        return;
      }
      ctx.setAllowTF32CuBLAS(true);
      set_ = true;
    } else {
      off_.emplace();
    }
  }
  ~Tf32Scope() {
    if (set_) at::globalContext().setAllowTF32CuBLAS(restore_);
  }
  Tf32Scope(const Tf32Scope&) = delete;
  Tf32Scope& operator=(const Tf32Scope&) = delete;

 private:
  std::optional<at::NoTF32Guard> off_;
  bool set_ = false;
  bool restore_ = false;
};

void check_float(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "scn_fast_ext: ", name, " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "scn_fast_ext: ", name, " has dtype ",
              t.scalar_type(), " but x has ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "scn_fast_ext: ", name, " is on ", t.device(),
              " but x is on ", like.device());
}

void check_shape(const Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, "scn_fast_ext: ", name, " must have shape ", shape, ", got ",
              t.sizes());
}

struct GridSizes {
  int64_t N, S, C, G, b, H1, H2, C3;
};

GridSizes check_grid(const Tensor& x_down, const Tensor& x_new, const Tensor& to_grid,
                     const Tensor& from_grid, const Tensor& w1, const Tensor& b1, const Tensor& w2,
                     const Tensor& b2, const Tensor& w3, const Tensor& b3, int64_t tile_atoms) {
  TORCH_CHECK(x_down.dim() == 3, "scn_fast_ext: x_down must be (N, S, C), got ", x_down.sizes());
  GridSizes z{};
  z.N = x_down.size(0);
  z.S = x_down.size(1);
  z.C = x_down.size(2);
  TORCH_CHECK(to_grid.dim() == 2 && from_grid.dim() == 2,
              "scn_fast_ext: to_grid and from_grid must be 2-D");
  z.G = to_grid.size(0);
  TORCH_CHECK(to_grid.size(1) % z.S == 0 && to_grid.size(1) > 0,
              "scn_fast_ext: to_grid must be (G, bands * S) with S = ", z.S, ", got ",
              to_grid.sizes());
  z.b = to_grid.size(1) / z.S;
  z.H1 = 2 * z.b * z.C;
  z.H2 = w2.size(0);
  z.C3 = w3.size(0);
  check_float(x_down, "x_down", x_down);
  for (auto* p : {&x_new, &to_grid, &from_grid, &w1, &b1, &w2, &b2, &w3, &b3}) {
    check_float(*p, "an argument", x_down);
    TORCH_CHECK(p->is_contiguous(), "scn_fast_ext: grid_mlp arguments must be contiguous");
  }
  TORCH_CHECK(x_down.is_contiguous(), "scn_fast_ext: x_down must be contiguous");
  check_shape(x_new, "x_new", x_down.sizes());
  check_shape(from_grid, "from_grid (S, G)", {z.S, z.G});
  check_shape(w1, "w1 (2bC, 2bC)", {z.H1, z.H1});
  check_shape(b1, "b1", {z.H1});
  check_shape(w2, "w2 (H2, 2bC)", {z.H2, z.H1});
  check_shape(b2, "b2", {z.H2});
  check_shape(w3, "w3 (C3, H2)", {z.C3, z.H2});
  check_shape(b3, "b3", {z.C3});
  TORCH_CHECK(tile_atoms >= 1, "scn_fast_ext: tile_atoms must be >= 1, got ", tile_atoms);
  return z;
}

bool check_bf16_gemms(bool bf16_gemms, const Tensor& x) {
  TORCH_CHECK(!bf16_gemms || x.scalar_type() == at::kFloat,
              "scn_fast_ext: bf16 GEMMs need float32 inputs, got ", x.scalar_type());
  return bf16_gemms;
}

// w1 (H1, 2bC), columns (side, band, channel) -> W1r (b, H1, 2C), columns (side, channel).
Tensor band_weights(const Tensor& w1, const GridSizes& z) {
  return w1.view({z.H1, 2, z.b, z.C}).permute({2, 0, 1, 3}).contiguous().view({z.b, z.H1, 2 * z.C});
}

// X[(i, z'), s*C + c] = x_s[z0 + z', i, c] for the tile's n atoms.
void load_tile(const Tensor& X, const Tensor& x_down, const Tensor& x_new, int64_t z0, int64_t n,
               const GridSizes& z) {
  auto Xv = X.view({z.S, n, 2, z.C});
  Xv.select(2, 0).copy_(x_down.narrow(0, z0, n).transpose(0, 1));
  Xv.select(2, 1).copy_(x_new.narrow(0, z0, n).transpose(0, 1));
}

// Forward of one tile up to H1 = silu(A1) (and A1 itself when pre is defined).
// X (S*n, 2C), Q scratch (b, S*n, H1), out h1 (G, n*H1).
void tile_first_layer(const Tensor& X, const Tensor& Q, Tensor h1, Tensor pre,
                      const Tensor& to_grid, const Tensor& W1r, const Tensor& b1, int64_t n,
                      const GridSizes& z, const Gemm& gemm) {
  const Tensor xg = gemm.op(X);
  for (int64_t k = 0; k < z.b; ++k) gemm.mm(Q.select(0, k), xg, W1r.select(0, k).t());
  auto q2 = Q.view({z.b * z.S, n * z.H1});
  Tensor acc = pre.defined() ? pre : h1;  // (G, n*H1) = (G*n, H1): bias per column h
  at::mm_out(acc, to_grid, q2);
  bias_silu(acc, b1, pre, h1);
}

// Tile t's region (atoms z0 .. z0+n) of a saved (N*G*width) activation, in the tile's (g, z) row
// order: (G, n*width).
Tensor saved_tile(const Tensor& all, int64_t z0, int64_t n, int64_t width, const GridSizes& z) {
  return all.narrow(0, z0 * z.G * width, z.G * n * width).view({z.G, n * width});
}

// The forward; with a1_all / a2_all defined ((N*G*H1,), (N*G*H2,)) it also writes the pre-activations
// of fc1 and fc2 there (for a backward that need not recompute them).
Tensor forward_impl(const Tensor& x_down, const Tensor& x_new, const Tensor& to_grid,
                    const Tensor& from_grid, const Tensor& w1, const Tensor& b1, const Tensor& w2,
                    const Tensor& b2, const Tensor& w3, const Tensor& b3, int64_t tile_atoms,
                    bool bf16_gemms, const Tensor& a1_all, const Tensor& a2_all) {
  const auto z = check_grid(x_down, x_new, to_grid, from_grid, w1, b1, w2, b2, w3, b3, tile_atoms);
  auto out = at::empty({z.N, z.S, z.C3}, x_down.options());
  if (z.N == 0) return out;
  const bool save = a1_all.defined();
  const Gemm gemm{check_bf16_gemms(bf16_gemms, x_down)};
  const int64_t nt = std::min(tile_atoms, z.N);
  const auto opt = x_down.options();
  const Tensor W1r = gemm.op(band_weights(w1, z));
  const Tensor w2t = gemm.op(w2).t();
  const Tensor w3t = gemm.op(w3).t();
  const Tensor fc3_bias = at::outer(from_grid.sum(1), b3).unsqueeze(1);  // (S, 1, C3)
  Scratch X(z.S * nt * 2 * z.C, opt), Q(z.b * z.S * nt * z.H1, opt), H1(z.G * nt * z.H1, opt),
      H2(z.G * nt * z.H2, opt), U(z.S * nt * z.H2, opt), O(z.S * nt * z.C3, opt);
  for (int64_t z0 = 0; z0 < z.N; z0 += nt) {
    const int64_t n = std::min(nt, z.N - z0);
    auto x = X.view({z.S * n, 2 * z.C});
    load_tile(x, x_down, x_new, z0, n, z);
    auto h1 = H1.view({z.G, n * z.H1});
    const Tensor a1 = save ? saved_tile(a1_all, z0, n, z.H1, z) : Tensor();
    tile_first_layer(x, Q.view({z.b, z.S * n, z.H1}), h1, a1, to_grid, W1r, b1, n, z, gemm);
    auto h2 = H2.view({z.G * n, z.H2});
    if (save) {
      auto a2 = saved_tile(a2_all, z0, n, z.H2, z).view({z.G * n, z.H2});
      gemm.mm(a2, gemm.op(h1.view({z.G * n, z.H1})), w2t);
      bias_silu(a2, b2, a2, h2);
    } else {
      gemm.mm(h2, gemm.op(h1.view({z.G * n, z.H1})), w2t);
      bias_silu(h2, b2, Tensor(), h2);
    }
    auto u = U.view({z.S, n * z.H2});
    at::mm_out(u, from_grid, h2.view({z.G, n * z.H2}));
    auto o = O.view({z.S * n, z.C3});
    gemm.mm(o, gemm.op(u.view({z.S * n, z.H2})), w3t);
    auto dst = out.narrow(0, z0, n).transpose(0, 1);  // (S, n, C3) view of the output
    at::add_out(dst, o.view({z.S, n, z.C3}), fc3_bias);
  }
  return out;
}

Tensor grid_mlp_forward(const Tensor& x_down, const Tensor& x_new, const Tensor& to_grid,
                        const Tensor& from_grid, const Tensor& w1, const Tensor& b1,
                        const Tensor& w2, const Tensor& b2, const Tensor& w3, const Tensor& b3,
                        int64_t tile_atoms, bool bf16_gemms, bool tf32) {
  const Tf32Scope precision(x_down, tf32);
  return forward_impl(x_down, x_new, to_grid, from_grid, w1, b1, w2, b2, w3, b3, tile_atoms,
                      bf16_gemms, Tensor(), Tensor());
}

std::vector<Tensor> grid_mlp_forward_saving(const Tensor& x_down, const Tensor& x_new,
                                            const Tensor& to_grid, const Tensor& from_grid,
                                            const Tensor& w1, const Tensor& b1, const Tensor& w2,
                                            const Tensor& b2, const Tensor& w3, const Tensor& b3,
                                            int64_t tile_atoms, bool bf16_gemms, bool tf32) {
  const Tf32Scope precision(x_down, tf32);
  const auto z = check_grid(x_down, x_new, to_grid, from_grid, w1, b1, w2, b2, w3, b3, tile_atoms);
  auto a1_all = scn_fast::cpu::block_pool::empty({z.N * z.G * z.H1}, x_down.options());
  auto a2_all = scn_fast::cpu::block_pool::empty({z.N * z.G * z.H2}, x_down.options());
  auto out = forward_impl(x_down, x_new, to_grid, from_grid, w1, b1, w2, b2, w3, b3, tile_atoms,
                          bf16_gemms, a1_all, a2_all);
  return {out, a1_all, a2_all};
}

// The backward; with a1_all / a2_all defined (from grid_mlp_forward_saving with the same
// tile_atoms) the tile's forward is not recomputed: only SiLU of the saved pre-activations and the
// small back-projection U = F H2.
std::vector<Tensor> backward_impl(const Tensor& grad_out, const Tensor& x_down, const Tensor& x_new,
                                  const Tensor& to_grid, const Tensor& from_grid, const Tensor& w1,
                                  const Tensor& b1, const Tensor& w2, const Tensor& b2,
                                  const Tensor& w3, const Tensor& b3, int64_t tile_atoms,
                                  bool bf16_gemms, const Tensor& a1_all, const Tensor& a2_all) {
  const auto z = check_grid(x_down, x_new, to_grid, from_grid, w1, b1, w2, b2, w3, b3, tile_atoms);
  const Gemm gemm{check_bf16_gemms(bf16_gemms, x_down)};
  check_float(grad_out, "grad_out", x_down);
  check_shape(grad_out, "grad_out (N, S, C3)", {z.N, z.S, z.C3});
  const bool saved = a1_all.defined();
  if (saved) {
    check_float(a1_all, "a1", x_down);
    check_float(a2_all, "a2", x_down);
    check_shape(a1_all, "saved a1 (N*G*H1,)", {z.N * z.G * z.H1});
    check_shape(a2_all, "saved a2 (N*G*H2,)", {z.N * z.G * z.H2});
    TORCH_CHECK(a1_all.is_contiguous() && a2_all.is_contiguous(),
                "scn_fast_ext: saved activations must be contiguous");
  }
  const auto opt = x_down.options();
  auto dx_down = at::empty_like(x_down);
  auto dx_new = at::empty_like(x_new);
  auto dW1r = at::zeros({z.b, z.H1, 2 * z.C}, opt);
  auto db1 = at::zeros({z.H1}, opt);
  auto dw2 = at::zeros({z.H2, z.H1}, opt);
  auto db2 = at::zeros({z.H2}, opt);
  auto dw3 = at::zeros({z.C3, z.H2}, opt);
  auto db3 = at::zeros({z.C3}, opt);
  auto finish = [&]() -> std::vector<Tensor> {
    auto dw1 = dW1r.view({z.b, z.H1, 2, z.C}).permute({1, 2, 0, 3}).reshape({z.H1, z.H1});
    return {dx_down, dx_new, dw1, db1, dw2, db2, dw3, db3};
  };
  if (z.N == 0) return finish();
  const auto g = grad_out.contiguous();
  const int64_t nt = std::min(tile_atoms, z.N);
  const Tensor W1r = gemm.op(band_weights(w1, z));
  const Tensor w2g = gemm.op(w2), w3g = gemm.op(w3);
  const Tensor w2t = w2g.t();
  const Tensor fsum = from_grid.sum(1);
  Scratch X(z.S * nt * 2 * z.C, opt), Q(z.b * z.S * nt * z.H1, opt),
      A1(saved ? 0 : z.G * nt * z.H1, opt), H1(z.G * nt * z.H1, opt),
      A2(saved ? 0 : z.G * nt * z.H2, opt), H2(z.G * nt * z.H2, opt), U(z.S * nt * z.H2, opt),
      dO(z.S * nt * z.C3, opt), dU(z.S * nt * z.H2, opt), dX(z.S * nt * 2 * z.C, opt),
      G1(saved ? z.G * nt * z.H1 : 0, opt), G2(saved ? z.G * nt * z.H2 : 0, opt);
  for (int64_t z0 = 0; z0 < z.N; z0 += nt) {
    const int64_t n = std::min(nt, z.N - z0);
    const int64_t rows = z.G * n;
    auto x = X.view({z.S * n, 2 * z.C});
    load_tile(x, x_down, x_new, z0, n, z);
    auto q = Q.view({z.b, z.S * n, z.H1});
    auto h1 = H1.view({z.G, n * z.H1});
    auto h2 = H2.view({rows, z.H2});
    Tensor a1, a2, h1g, g1, g2;
    if (saved) {  // ---- the tile's activations and their derivatives from the saved pre-activations
      a1 = saved_tile(a1_all, z0, n, z.H1, z);
      a2 = saved_tile(a2_all, z0, n, z.H2, z).view({rows, z.H2});
      g1 = G1.view({z.G, n * z.H1});
      g2 = G2.view({rows, z.H2});
      silu_grad(a1, h1, g1, z.H1);
      h1g = gemm.op(h1.view({rows, z.H1}));
      silu_grad(a2, h2, g2, z.H2);
    } else {  // ---- recompute the tile's forward
      a1 = A1.view({z.G, n * z.H1});
      tile_first_layer(x, q, h1, a1, to_grid, W1r, b1, n, z, gemm);
      h1g = gemm.op(h1.view({rows, z.H1}));  // fc2's operand, also dw2's
      a2 = A2.view({rows, z.H2});
      gemm.mm(a2, h1g, w2t);
      bias_silu(a2, b2, a2, h2);
    }
    auto u = U.view({z.S, n * z.H2});
    at::mm_out(u, from_grid, h2.view({z.G, n * z.H2}));
    // ---- fc3 and the back-projection: out[(i,z)] = U[(i,z)] w3^T + fsum[i] b3
    auto d_o = dO.view({z.S * n, z.C3});
    d_o.view({z.S, n, z.C3}).copy_(g.narrow(0, z0, n).transpose(0, 1));
    db3.addmv_(d_o.view({z.S, n, z.C3}).sum(1).t(), fsum);
    const Tensor d_og = gemm.op(d_o);
    gemm.addmm(dw3, d_og.t(), gemm.op(u.view({z.S * n, z.H2})));
    auto du = dU.view({z.S * n, z.H2});
    gemm.mm(du, d_og, w3g);
    // ---- H2 = silu(A2), A2 = H1 w2^T + b2  (dA2 overwrites H2's buffer after dw2 needs only H1)
    auto dh2 = h2;  // reuse H2's buffer: H2 is no longer needed
    auto dh2_g = dh2.view({z.G, n * z.H2});
    at::mm_out(dh2_g, from_grid.t(), du.view({z.S, n * z.H2}));
    if (saved)
      mul_colsum(dh2, g2, db2);  // dA2, in place; db2 += its column sums
    else
      dsilu_colsum(dh2, a2, db2);
    const Tensor dh2g = gemm.op(dh2);
    gemm.addmm(dw2, dh2g.t(), h1g);
    // ---- H1 = silu(A1), A1 = to_grid Q + b1  (dH1 into H1's buffer, free now)
    auto dh1 = h1;
    auto dh1_r = dh1.view({rows, z.H1});
    gemm.mm(dh1_r, dh2g, w2g);
    if (saved)
      mul_colsum(dh1, g1, db1);  // dA1, in place; db1 += its column sums
    else
      dsilu_colsum(dh1, a1, db1);
    auto dq = q;  // reuse Q's buffer: dQ (b*S, n*H1)
    auto dq2 = dq.view({z.b * z.S, n * z.H1});
    at::mm_out(dq2, to_grid.t(), dh1);
    auto dx = dX.view({z.S * n, 2 * z.C});
    const Tensor xg = gemm.op(x);
    for (int64_t k = 0; k < z.b; ++k) {
      const Tensor dqk = gemm.op(dq.select(0, k));
      gemm.addmm(dW1r.select(0, k), dqk.t(), xg);
      if (k == 0)
        gemm.mm(dx, dqk, W1r.select(0, k));
      else
        gemm.addmm(dx, dqk, W1r.select(0, k));
    }
    auto dxv = dx.view({z.S, n, 2, z.C});
    dx_down.narrow(0, z0, n).transpose(0, 1).copy_(dxv.select(2, 0));
    dx_new.narrow(0, z0, n).transpose(0, 1).copy_(dxv.select(2, 1));
  }
  return finish();
}

std::vector<Tensor> grid_mlp_backward(const Tensor& grad_out, const Tensor& x_down,
                                      const Tensor& x_new, const Tensor& to_grid,
                                      const Tensor& from_grid, const Tensor& w1, const Tensor& b1,
                                      const Tensor& w2, const Tensor& b2, const Tensor& w3,
                                      const Tensor& b3, int64_t tile_atoms, bool bf16_gemms,
                                      bool tf32) {
  const Tf32Scope precision(x_down, tf32);
  return backward_impl(grad_out, x_down, x_new, to_grid, from_grid, w1, b1, w2, b2, w3, b3,
                       tile_atoms, bf16_gemms, Tensor(), Tensor());
}

std::vector<Tensor> grid_mlp_backward_saved(const Tensor& grad_out, const Tensor& x_down,
                                            const Tensor& x_new, const Tensor& a1,
                                            const Tensor& a2, const Tensor& to_grid,
                                            const Tensor& from_grid, const Tensor& w1,
                                            const Tensor& b1, const Tensor& w2, const Tensor& b2,
                                            const Tensor& w3, const Tensor& b3, int64_t tile_atoms,
                                            bool bf16_gemms, bool tf32) {
  const Tf32Scope precision(x_down, tf32);
  return backward_impl(grad_out, x_down, x_new, to_grid, from_grid, w1, b1, w2, b2, w3, b3,
                       tile_atoms, bf16_gemms, a1, a2);
}

// ------------------------------------------------------------------------------------------------
// Output heads

struct HeadsSizes {
  int64_t N, S, C, P, K, D1;  // K heads, D1 = sum of the heads' first-layer widths
  std::vector<int64_t> d1, d2, dout, off;
};

HeadsSizes check_heads(const Tensor& x, const Tensor& sh, at::TensorList weights,
                       at::TensorList point_weights, int64_t tile_atoms) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "scn_fast_ext: x must be contiguous (N, S, C)");
  check_float(x, "x", x);
  HeadsSizes z{};
  z.N = x.size(0);
  z.S = x.size(1);
  z.C = x.size(2);
  TORCH_CHECK(sh.dim() == 2 && sh.size(1) == z.S && sh.is_contiguous(),
              "scn_fast_ext: sh must be contiguous (P, S) with S = ", z.S, ", got ", sh.sizes());
  check_float(sh, "sh", x);
  z.P = sh.size(0);
  z.K = static_cast<int64_t>(point_weights.size());
  TORCH_CHECK(z.K >= 1 && static_cast<int64_t>(weights.size()) == 6 * z.K,
              "scn_fast_ext: weights must hold (w1, b1, w2, b2, w3, b3) per head");
  z.D1 = 0;
  for (int64_t k = 0; k < z.K; ++k) {
    const Tensor* w = &weights[6 * k];
    for (int j = 0; j < 6; ++j) {
      check_float(w[j], "a head weight", x);
      TORCH_CHECK(w[j].is_contiguous(), "scn_fast_ext: head weights must be contiguous");
    }
    const int64_t d1 = w[0].size(0), d2 = w[2].size(0);
    check_shape(w[0], "w1 (D1, C)", {d1, z.C});
    check_shape(w[1], "b1", {d1});
    check_shape(w[2], "w2 (D2, D1)", {d2, d1});
    check_shape(w[3], "b2", {d2});
    check_shape(w[4], "w3 (1, D2)", {1, d2});
    check_shape(w[5], "b3", {1});
    const Tensor& v = point_weights[k];
    check_float(v, "point_weights", x);
    TORCH_CHECK(v.dim() == 2 && v.size(0) == z.P && v.is_contiguous(),
                "scn_fast_ext: point_weights must be contiguous (P, d)");
    z.off.push_back(z.D1);
    z.d1.push_back(d1);
    z.d2.push_back(d2);
    z.dout.push_back(v.size(1));
    z.D1 += d1;
  }
  TORCH_CHECK(tile_atoms >= 1, "scn_fast_ext: tile_atoms must be >= 1, got ", tile_atoms);
  return z;
}

struct HeadsConsts {
  Tensor w1cat, b1cat;  // (D1, C), (D1,)
};

HeadsConsts heads_consts(at::TensorList weights, const HeadsSizes& z) {
  std::vector<Tensor> w1s, b1s;
  for (int64_t k = 0; k < z.K; ++k) {
    w1s.push_back(weights[6 * k]);
    b1s.push_back(weights[6 * k + 1]);
  }
  return {at::cat(w1s, 0), at::cat(b1s, 0)};
}

std::vector<Tensor> sphere_heads_forward(const Tensor& x, const Tensor& sh, at::TensorList weights,
                                         at::TensorList point_weights, int64_t tile_atoms,
                                         bool tf32) {
  const Tf32Scope precision(x, tf32);
  const auto z = check_heads(x, sh, weights, point_weights, tile_atoms);
  std::vector<Tensor> outs;
  for (int64_t k = 0; k < z.K; ++k) outs.push_back(at::empty({z.N, z.dout[k]}, x.options()));
  if (z.N == 0) return outs;
  const int64_t nt = std::min(tile_atoms, z.N);
  const auto opt = x.options();
  const auto cst = heads_consts(weights, z);
  const int64_t d2max = *std::max_element(z.d2.begin(), z.d2.end());
  int64_t rmax = 0;
  for (auto d : z.dout) rmax = std::max(rmax, d);
  Scratch X(z.S * nt * z.C, opt), Q(z.S * nt * z.D1, opt), H1(z.P * nt * z.D1, opt),
      H2(z.P * nt * d2max, opt), R(rmax * nt * d2max, opt);
  std::vector<Tensor> bias3;  // b3 * (V^T 1) / P, (d_k,)
  for (int64_t k = 0; k < z.K; ++k)
    bias3.push_back(point_weights[k].sum(0) * weights[6 * k + 5] / static_cast<double>(z.P));
  const double inv_p = 1.0 / static_cast<double>(z.P);
  for (int64_t z0 = 0; z0 < z.N; z0 += nt) {
    const int64_t n = std::min(nt, z.N - z0);
    const int64_t rows = z.P * n;
    auto xt = X.view({z.S * n, z.C});
    xt.view({z.S, n, z.C}).copy_(x.narrow(0, z0, n).transpose(0, 1));
    auto q = Q.view({z.S * n, z.D1});
    at::mm_out(q, xt, cst.w1cat.t());
    auto h1 = H1.view({z.P, n * z.D1});
    at::mm_out(h1, sh, q.view({z.S, n * z.D1}));
    bias_silu(h1, cst.b1cat, Tensor(), h1);
    auto h1r = h1.view({rows, z.D1});
    for (int64_t k = 0; k < z.K; ++k) {
      const int64_t d2 = z.d2[k], dk = z.dout[k];
      auto h2 = H2.view({rows, d2});
      at::mm_out(h2, h1r.narrow(1, z.off[k], z.d1[k]), weights[6 * k + 2].t());
      bias_silu(h2, weights[6 * k + 3], Tensor(), h2);
      auto r = R.view({dk, n * d2});
      at::mm_out(r, point_weights[k].t(), h2.view({z.P, n * d2}));
      // out[z, j] = inv_p * R[(j, z)] . w3 + bias3[j]
      auto e = at::mv(r.view({dk * n, d2}), weights[6 * k + 4].view({d2})).view({dk, n});
      auto dst = outs[k].narrow(0, z0, n).t();  // (d_k, n) view
      at::add_out(dst, bias3[k].unsqueeze(1), e, inv_p);
    }
  }
  return outs;
}

std::vector<Tensor> sphere_heads_backward(at::TensorList grads, const Tensor& x, const Tensor& sh,
                                          at::TensorList weights, at::TensorList point_weights,
                                          int64_t tile_atoms, bool tf32) {
  const Tf32Scope precision(x, tf32);
  const auto z = check_heads(x, sh, weights, point_weights, tile_atoms);
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == z.K,
              "scn_fast_ext: one gradient per head expected");
  const auto opt = x.options();
  std::vector<Tensor> res;
  res.push_back(at::empty_like(x));
  for (int64_t k = 0; k < z.K; ++k)
    for (int j = 0; j < 6; ++j) res.push_back(at::zeros_like(weights[6 * k + j]));
  if (z.N == 0) return res;
  const int64_t nt = std::min(tile_atoms, z.N);
  const auto cst = heads_consts(weights, z);
  auto dw1cat = at::zeros({z.D1, z.C}, opt);
  auto db1cat = at::zeros({z.D1}, opt);
  const int64_t d2max = *std::max_element(z.d2.begin(), z.d2.end());
  int64_t rmax = 0;
  for (auto d : z.dout) rmax = std::max(rmax, d);
  Scratch X(z.S * nt * z.C, opt), Q(z.S * nt * z.D1, opt), A1(z.P * nt * z.D1, opt),
      H1(z.P * nt * z.D1, opt), dH1(z.P * nt * z.D1, opt), A2(z.P * nt * d2max, opt),
      H2(z.P * nt * d2max, opt), R(rmax * nt * d2max, opt), dX(z.S * nt * z.C, opt);
  const double inv_p = 1.0 / static_cast<double>(z.P);
  std::vector<Tensor> gs;
  for (int64_t k = 0; k < z.K; ++k) {
    check_float(grads[k], "grad", x);
    check_shape(grads[k], "grad (N, d_k)", {z.N, z.dout[k]});
    gs.push_back(grads[k].contiguous());
  }
  for (int64_t z0 = 0; z0 < z.N; z0 += nt) {
    const int64_t n = std::min(nt, z.N - z0);
    const int64_t rows = z.P * n;
    auto xt = X.view({z.S * n, z.C});
    xt.view({z.S, n, z.C}).copy_(x.narrow(0, z0, n).transpose(0, 1));
    auto q = Q.view({z.S * n, z.D1});
    at::mm_out(q, xt, cst.w1cat.t());
    auto a1 = A1.view({z.P, n * z.D1});
    at::mm_out(a1, sh, q.view({z.S, n * z.D1}));
    auto h1 = H1.view({rows, z.D1});
    bias_silu(a1, cst.b1cat, a1, h1);
    auto dh1 = dH1.view({rows, z.D1});
    for (int64_t k = 0; k < z.K; ++k) {
      const int64_t d1 = z.d1[k], d2 = z.d2[k], dk = z.dout[k];
      const Tensor& w2 = weights[6 * k + 2];
      const Tensor& w3 = weights[6 * k + 4];
      auto h1k = h1.narrow(1, z.off[k], d1);
      auto a2 = A2.view({rows, d2});
      at::mm_out(a2, h1k, w2.t());
      auto h2 = H2.view({rows, d2});
      bias_silu(a2, weights[6 * k + 3], a2, h2);
      auto r = R.view({dk, n * d2});
      at::mm_out(r, point_weights[k].t(), h2.view({z.P, n * d2}));
      // out[z, j] = inv_p * R[(j,z)] . w3 + b3 * vsum[j] * inv_p
      auto gk = gs[k].narrow(0, z0, n).t();  // (d_k, n)
      Tensor* dw = &res[1 + 6 * k];
      dw[4].view({d2}).addmv_(r.view({dk * n, d2}).t(), gk.reshape({dk * n}), 1.0, inv_p);
      dw[5].add_((gk.sum(1) * point_weights[k].sum(0)).sum() * inv_p);
      // dR[(j,z), c] = inv_p * g[z, j] w3[c];  dH2 = V dR  (P, n*d2)
      auto dr = r.view({dk, n, d2});  // reuse R's buffer
      at::mul_out(dr, gk.unsqueeze(2), w3.view({1, 1, d2}) * inv_p);
      auto dh2 = h2;  // reuse H2's buffer (H2 is not needed any more)
      auto dh2_p = dh2.view({z.P, n * d2});
      at::mm_out(dh2_p, point_weights[k], dr.view({dk, n * d2}));
      dsilu_colsum(dh2, a2, dw[3]);  // dA2, in place; db2 += its column sums
      dw[2].addmm_(dh2.t(), h1k);
      auto dh1k = dh1.narrow(1, z.off[k], d1);
      at::mm_out(dh1k, dh2, w2);
    }
    dsilu_colsum(dh1, a1, db1cat);  // dA1, in place; db1 += its column sums
    auto dq = q;  // reuse Q's buffer: dQ (S, n*D1)
    auto dq_s = dq.view({z.S, n * z.D1});
    at::mm_out(dq_s, sh.t(), dh1.view({z.P, n * z.D1}));
    dw1cat.addmm_(dq.t(), xt);
    auto dx = dX.view({z.S * n, z.C});
    at::mm_out(dx, dq, cst.w1cat);
    res[0].narrow(0, z0, n).transpose(0, 1).copy_(dx.view({z.S, n, z.C}));
  }
  for (int64_t k = 0; k < z.K; ++k) {
    res[1 + 6 * k].copy_(dw1cat.narrow(0, z.off[k], z.d1[k]));
    res[1 + 6 * k + 1].copy_(db1cat.narrow(0, z.off[k], z.d1[k]));
  }
  return res;
}

}  // namespace
}  // namespace scn_fast::grid

TORCH_LIBRARY_FRAGMENT(scn_fast_ext, m) {
  m.def(
      "grid_mlp_forward(Tensor x_down, Tensor x_new, Tensor to_grid, Tensor from_grid, Tensor w1, "
      "Tensor b1, Tensor w2, Tensor b2, Tensor w3, Tensor b3, int tile_atoms, "
      "bool bf16_gemms=False, bool tf32=False) -> Tensor");
  m.def(
      "grid_mlp_backward(Tensor grad_out, Tensor x_down, Tensor x_new, Tensor to_grid, "
      "Tensor from_grid, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, Tensor b3, "
      "int tile_atoms, bool bf16_gemms=False, bool tf32=False) -> Tensor[]");
  m.def(
      "grid_mlp_forward_saving(Tensor x_down, Tensor x_new, Tensor to_grid, Tensor from_grid, "
      "Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, Tensor b3, int tile_atoms, "
      "bool bf16_gemms=False, bool tf32=False) -> Tensor[]");
  m.def(
      "grid_mlp_backward_saved(Tensor grad_out, Tensor x_down, Tensor x_new, Tensor a1, Tensor a2, "
      "Tensor to_grid, Tensor from_grid, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, "
      "Tensor b3, int tile_atoms, bool bf16_gemms=False, bool tf32=False) -> Tensor[]");
  m.def(
      "sphere_heads_forward(Tensor x, Tensor sh, Tensor[] weights, Tensor[] point_weights, "
      "int tile_atoms, bool tf32=False) -> Tensor[]");
  m.def(
      "sphere_heads_backward(Tensor[] grads, Tensor x, Tensor sh, Tensor[] weights, "
      "Tensor[] point_weights, int tile_atoms, bool tf32=False) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(scn_fast_ext, CompositeExplicitAutograd, m) {
  m.impl("grid_mlp_forward", &scn_fast::grid::grid_mlp_forward);
  m.impl("grid_mlp_backward", &scn_fast::grid::grid_mlp_backward);
  m.impl("grid_mlp_forward_saving", &scn_fast::grid::grid_mlp_forward_saving);
  m.impl("grid_mlp_backward_saved", &scn_fast::grid::grid_mlp_backward_saved);
  m.impl("sphere_heads_forward", &scn_fast::grid::sphere_heads_forward);
  m.impl("sphere_heads_backward", &scn_fast::grid::sphere_heads_backward);
}
