// CPU twin of the edge primitives (scn_fast/ops/SPEC.md), registered for the CPU dispatch key.
//
// gather_rotate:  parallel over edges; per edge, side, degree l and channel chunk, rotate_chunk
//                 computes the n_l kept rows from the node's 2l+1 coefficient rows.
// rotate_scatter: parallel over (destination node, channel group) items, so each output element is
//                 summed by one thread in the fixed order p ascending, k ascending, a ascending:
//                 deterministic, no atomics. An item's accumulators ((lmax+1)^2, group) fit in ~32 KB
//                 (L1/L2); a group is all C channels for the production sizes (L=6, C=128), so each
//                 edge side's m block is read as one contiguous stream.
// Types: x/m float32, float64, bfloat16, float16; wig the same dtype, or float32 for the half types;
// accumulation in float (double for float64).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../edge_ops.h"
#include "block_pool.h"
#include "cpu_isa.h"
#include "edge_blocks.h"

namespace scn_fast::cpu {
namespace {

constexpr int64_t kGrainFlops = 1 << 16;  // minimum multiply-adds per parallel task

// ---------------------------------------------------------------------------------------------------
// gather_rotate

template <typename T, typename W>
struct GatherArgs {
  const T* x;            // (N, S_x, C)
  const W* wig;          // (E, K)
  const int64_t* idx;    // (E, P)
  T* y;                  // (E, P, R, C)
  int64_t P, S_x, C, R, K, lmax, mmax;
};

// y[e, p] (R, C) from node block xn = x[idx[e, p]] (S_x, C): degree by degree (the degree's x rows,
// l*l .. l*l + 2l, are one contiguous (2l+1, C) slab), each in channel chunks.
template <typename T, typename W>
SCN_ALWAYS_INLINE void gather_side(const GatherArgs<T, W>& g, const T* xn, const W* we, T* ye) {
  using Acc = acc_t<T>;
  constexpr int64_t CB = kChunk<Acc>;
  for (int64_t l = 0; l <= g.lmax; ++l) {
    const int64_t nb = 2 * l + 1;
    const T* xl = xn + l * l * g.C;
    const W* wl = we + entry_offset(l, g.mmax);
    T* yl = ye + row_offset(l, g.mmax) * g.C;
    const bool three = kept_rows(l, g.mmax) == 3;
    for (int64_t c0 = 0; c0 < g.C; c0 += CB) {
      const int64_t width = std::min(CB, g.C - c0);
      if (three)
        rotate_chunk<3, T, W, Acc>(xl + c0, wl, nb, g.C, yl + c0, width);
      else
        rotate_chunk<1, T, W, Acc>(xl + c0, wl, nb, g.C, yl + c0, width);
    }
  }
}

template <typename T, typename W>
SCN_ALWAYS_INLINE void gather_edges_body(const GatherArgs<T, W>& g, int64_t e0, int64_t e1) {
  for (int64_t e = e0; e < e1; ++e) {
    const W* we = g.wig + e * g.K;
    for (int64_t p = 0; p < g.P; ++p)
      gather_side(g, g.x + g.idx[e * g.P + p] * g.S_x * g.C, we, g.y + (e * g.P + p) * g.R * g.C);
  }
}

template <typename T, typename W>
void gather_edges_baseline(const GatherArgs<T, W>& g, int64_t e0, int64_t e1) {
  gather_edges_body(g, e0, e1);
}

template <typename T, typename W>
SCN_TARGET_AVX2 void gather_edges_avx2(const GatherArgs<T, W>& g, int64_t e0, int64_t e1) {
  gather_edges_body(g, e0, e1);
}

template <typename T, typename W>
void gather_rotate_typed(const at::Tensor& x, const at::Tensor& wig, const at::Tensor& idx,
                         at::Tensor& y, const GatherRotateSizes& s, int64_t lmax, int64_t mmax) {
  const GatherArgs<T, W> g{x.const_data_ptr<T>(), wig.const_data_ptr<W>(),
                           idx.const_data_ptr<int64_t>(), y.mutable_data_ptr<T>(),
                           s.num_sides, s.x_coeffs, s.channels, s.rows, s.entries, lmax, mmax};
  const auto run = cpu_has_avx2_fma() ? gather_edges_avx2<T, W> : gather_edges_baseline<T, W>;
  const int64_t per_edge = std::max<int64_t>(1, s.num_sides * s.entries * s.channels);
  at::parallel_for(0, s.num_edges, std::max<int64_t>(1, kGrainFlops / per_edge),
                   [&](int64_t e0, int64_t e1) { run(g, e0, e1); });
}

// ---------------------------------------------------------------------------------------------------
// gather_rotate_split: gather_rotate's rows written straight into the tap projection's two GEMM
// operands (scn_fast/ops/tap_projection.py): row q = p * R + r of an edge's (P * R) rotated rows goes
// to y0[e, a[q]] when b[q] < 0 (an m = 0 row), else to pair[e, a[q]] and, times sign[q], to
// pair[e, b[q]] (y1 and tap 1's y1'). The rows are rotated into a per-task scratch of one edge and
// copied out from there (in cache), instead of a second pass over y in memory (tap_split).

template <typename T>
struct SplitArgs {
  const int64_t* a;
  const int64_t* b;
  const T* sign;  // (P * R,) in T
  T* y0;          // (E, n0, C)
  T* pair;        // (E, np, C)
  int64_t n0, np;
};

template <typename T, typename W>
SCN_ALWAYS_INLINE void gather_split_body(const GatherArgs<T, W>& g, const SplitArgs<T>& s,
                                         int64_t e0, int64_t e1, T* scratch) {
  const int64_t C = g.C, Q = g.P * g.R;
  for (int64_t e = e0; e < e1; ++e) {
    const W* we = g.wig + e * g.K;
    for (int64_t p = 0; p < g.P; ++p)
      gather_side(g, g.x + g.idx[e * g.P + p] * g.S_x * C, we, scratch + p * g.R * C);
    T* y0e = s.y0 + e * s.n0 * C;
    T* pe = s.pair + e * s.np * C;
    for (int64_t q = 0; q < Q; ++q) {
      const T* src = scratch + q * C;
      if (s.b[q] < 0) {
        std::copy(src, src + C, y0e + s.a[q] * C);
        continue;
      }
      std::copy(src, src + C, pe + s.a[q] * C);
      T* neg = pe + s.b[q] * C;
      const T k = s.sign[q];
      for (int64_t c = 0; c < C; ++c) neg[c] = k * src[c];
    }
  }
}

template <typename T, typename W>
void gather_split_baseline(const GatherArgs<T, W>& g, const SplitArgs<T>& s, int64_t e0,
                           int64_t e1, T* scratch) {
  gather_split_body(g, s, e0, e1, scratch);
}

template <typename T, typename W>
SCN_TARGET_AVX2 void gather_split_avx2(const GatherArgs<T, W>& g, const SplitArgs<T>& s,
                                       int64_t e0, int64_t e1, T* scratch) {
  gather_split_body(g, s, e0, e1, scratch);
}

// idx values must name rows of x (checked here, once, before the parallel loop).
void check_idx_values(const at::Tensor& idx, int64_t num_nodes) {
  const int64_t* p = idx.const_data_ptr<int64_t>();
  const int64_t n = idx.numel();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < num_nodes, "scn_fast_ext.gather_rotate: idx value ", p[i],
                " at flat position ", i, " is out of range for x with N = ", num_nodes, " nodes");
}

// ---------------------------------------------------------------------------------------------------
// rotate_scatter

template <typename T, typename W>
struct ScatterArgs {
  const T* m;            // (E, P, R, C)
  const W* wig;          // (E, K)
  const int64_t* perm;   // (P, E)
  const int64_t* ptr;    // (P, N + 1)
  T* out;                // (N, S, C)
  int64_t E, P, N, C, R, K, S, lmax, mmax;
  int64_t group;         // channels per item (a multiple of kChunk)
  int64_t num_groups;    // ceil(C / group)
};

constexpr int64_t kScatterAccBytes = 32 * 1024;  // target size of one item's accumulators

// Accumulate edge side (e, p), channels [c0, c0 + width) (width <= group), into acc (S, group).
template <typename T, typename W>
SCN_ALWAYS_INLINE void scatter_edge(const ScatterArgs<T, W>& g, int64_t e, int64_t p, int64_t c0,
                                    int64_t width, acc_t<T>* acc) {
  using Acc = acc_t<T>;
  constexpr int64_t CB = kChunk<Acc>;
  const T* me = g.m + (e * g.P + p) * g.R * g.C + c0;
  const W* we = g.wig + e * g.K;
  for (int64_t l = 0; l <= g.lmax; ++l) {
    const int64_t nb = 2 * l + 1;
    const T* ml = me + row_offset(l, g.mmax) * g.C;
    const W* wl = we + entry_offset(l, g.mmax);
    Acc* al = acc + l * l * g.group;
    const bool three = kept_rows(l, g.mmax) == 3;
    for (int64_t j = 0; j < width; j += CB) {
      const int64_t w = std::min(CB, width - j);
      if (three)
        unrotate_chunk<3, T, W, Acc>(ml + j, wl, nb, g.C, al + j, g.group, w);
      else
        unrotate_chunk<1, T, W, Acc>(ml + j, wl, nb, g.C, al + j, g.group, w);
    }
  }
}

// Items [i0, i1) of the (node, channel group) grid: out[n, :, group] summed in the fixed order.
// acc: this task's (S, group) buffer.
template <typename T, typename W>
SCN_ALWAYS_INLINE void scatter_items_body(const ScatterArgs<T, W>& g, int64_t i0, int64_t i1,
                                          acc_t<T>* acc) {
  using Acc = acc_t<T>;
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t n = item / g.num_groups;
    const int64_t c0 = (item % g.num_groups) * g.group;
    const int64_t width = std::min(g.group, g.C - c0);
    std::fill(acc, acc + g.S * g.group, Acc(0));
    for (int64_t p = 0; p < g.P; ++p) {
      const int64_t* perm_p = g.perm + p * g.E;
      const int64_t* ptr_p = g.ptr + p * (g.N + 1);
      const int64_t k1 = ptr_p[n + 1];
      for (int64_t k = ptr_p[n]; k < k1; ++k) {
        if (k + 1 < k1) {  // the next edge side's rows (this group's channels) and wig row
          const int64_t e_next = perm_p[k + 1];
          const T* m_next = g.m + (e_next * g.P + p) * g.R * g.C + c0;
          for (int64_t r = 0; r < g.R; ++r)
            prefetch_bytes(m_next + r * g.C, width * static_cast<int64_t>(sizeof(T)));
          prefetch_bytes(g.wig + e_next * g.K, g.K * static_cast<int64_t>(sizeof(W)));
        }
        scatter_edge(g, perm_p[k], p, c0, width, acc);
      }
    }
    T* on = g.out + n * g.S * g.C + c0;
    for (int64_t s = 0; s < g.S; ++s)
      for (int64_t c = 0; c < width; ++c) on[s * g.C + c] = static_cast<T>(acc[s * g.group + c]);
  }
}

template <typename T, typename W>
void scatter_items_baseline(const ScatterArgs<T, W>& g, int64_t i0, int64_t i1, acc_t<T>* acc) {
  scatter_items_body(g, i0, i1, acc);
}

template <typename T, typename W>
SCN_TARGET_AVX2 void scatter_items_avx2(const ScatterArgs<T, W>& g, int64_t i0, int64_t i1,
                                        acc_t<T>* acc) {
  scatter_items_body(g, i0, i1, acc);
}

template <typename T, typename W>
void rotate_scatter_typed(const at::Tensor& m, const at::Tensor& wig, const at::Tensor& perm,
                          const at::Tensor& ptr, at::Tensor& out, const RotateScatterSizes& s,
                          int64_t lmax, int64_t mmax) {
  using Acc = acc_t<T>;
  constexpr int64_t CB = kChunk<Acc>;
  // Channels per item: as many whole chunks as fit kScatterAccBytes of accumulators, at most all C.
  const int64_t fit = std::max<int64_t>(
      CB, kScatterAccBytes / (s.out_coeffs * static_cast<int64_t>(sizeof(Acc))) / CB * CB);
  const int64_t group = std::min(fit, (s.channels + CB - 1) / CB * CB);
  const int64_t num_groups = (s.channels + group - 1) / group;
  const ScatterArgs<T, W> g{m.const_data_ptr<T>(), wig.const_data_ptr<W>(),
                            perm.const_data_ptr<int64_t>(), ptr.const_data_ptr<int64_t>(),
                            out.mutable_data_ptr<T>(), s.num_edges, s.num_sides, s.num_nodes,
                            s.channels, s.rows, s.entries, s.out_coeffs, lmax, mmax, group,
                            num_groups};
  const auto run = cpu_has_avx2_fma() ? scatter_items_avx2<T, W> : scatter_items_baseline<T, W>;
  const int64_t items = s.num_nodes * num_groups;
  // Average work per item: P * E / N edge sides of K * group multiply-adds.
  const int64_t per_item = std::max<int64_t>(
      1, s.num_sides * s.num_edges / std::max<int64_t>(1, s.num_nodes) * s.entries * group);
  at::parallel_for(0, items, std::max<int64_t>(1, kGrainFlops / per_item),
                   [&](int64_t i0, int64_t i1) {
                     std::vector<Acc> acc(static_cast<size_t>(s.out_coeffs * group));
                     run(g, i0, i1, acc.data());
                   });
}

// Each side's CSR must be well formed: ptr[p, 0] = 0, nondecreasing, ptr[p, N] = E, perm in [0, E).
void check_csr_values(const at::Tensor& perm, const at::Tensor& ptr, int64_t E, int64_t N) {
  const int64_t P = ptr.size(0);
  const int64_t* pp = ptr.const_data_ptr<int64_t>();
  const int64_t* pe = perm.const_data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) {
    const int64_t* row = pp + p * (N + 1);
    TORCH_CHECK(row[0] == 0 && row[N] == E, "scn_fast_ext.rotate_scatter: ptr[", p,
                "] must start at 0 and end at E = ", E, ", got ", row[0], " and ", row[N]);
    for (int64_t n = 0; n < N; ++n)
      TORCH_CHECK(row[n] <= row[n + 1], "scn_fast_ext.rotate_scatter: ptr[", p,
                  "] must be nondecreasing, but ptr[", p, ", ", n, "] = ", row[n], " > ptr[", p,
                  ", ", n + 1, "] = ", row[n + 1]);
  }
  for (int64_t i = 0; i < P * E; ++i)
    TORCH_CHECK(pe[i] >= 0 && pe[i] < E, "scn_fast_ext.rotate_scatter: perm value ", pe[i],
                " at flat position ", i, " is out of range for E = ", E, " edges");
}

// ---------------------------------------------------------------------------------------------------
// dtype dispatch: W = T, or W = float for the half types.

template <typename T, typename F>
void with_wig_type(const at::Tensor& wig, F&& f) {
  if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    if (wig.scalar_type() == at::kFloat) return f(float{});
  }
  f(T{});
}

at::Tensor gather_rotate_cpu(const at::Tensor& x, const at::Tensor& wig, const at::Tensor& idx,
                             int64_t lmax, int64_t mmax) {
  const GatherRotateSizes s = check_gather_rotate(x, wig, idx, lmax, mmax);
  check_idx_values(idx, s.num_nodes);
  at::Tensor y =
      block_pool::empty({s.num_edges, s.num_sides, s.rows, s.channels}, x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gather_rotate_cpu",
                                  [&] {
                                    with_wig_type<scalar_t>(wig, [&](auto w) {
                                      using W = decltype(w);
                                      gather_rotate_typed<scalar_t, W>(x, wig, idx, y, s, lmax,
                                                                       mmax);
                                    });
                                  });
  return y;
}

void gather_rotate_split_cpu(const at::Tensor& x, const at::Tensor& wig, const at::Tensor& idx,
                             int64_t lmax, int64_t mmax, const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& sign, at::Tensor y0, at::Tensor pair) {
  const GatherRotateSizes s = check_gather_rotate(x, wig, idx, lmax, mmax);
  check_idx_values(idx, s.num_nodes);
  const int64_t Q = s.num_sides * s.rows;
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "scn_fast_ext.gather_rotate_split: x must be float32 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(wig.scalar_type() == x.scalar_type(),
              "scn_fast_ext.gather_rotate_split: wig must have x's dtype");
  for (const at::Tensor* t : {&a, &b})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->numel() == Q &&
                    t->is_contiguous() && t->is_cpu(),
                "scn_fast_ext.gather_rotate_split: a and b must be contiguous int64 (P * R,) = (",
                Q, ",) CPU tensors, got ", t->sizes());
  TORCH_CHECK(sign.scalar_type() == at::kDouble && sign.numel() == Q && sign.is_contiguous(),
              "scn_fast_ext.gather_rotate_split: sign must be contiguous float64 (P * R,)");
  for (const at::Tensor* t : {&y0, &pair})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == s.num_edges && t->size(2) == s.channels &&
                    t->is_contiguous() && t->scalar_type() == x.scalar_type() && t->is_cpu(),
                "scn_fast_ext.gather_rotate_split: y0 and pair must be contiguous (E, rows, C) = (",
                s.num_edges, ", ., ", s.channels, ") tensors of x's dtype, got ", t->sizes());
  const int64_t n0 = y0.size(1), np = pair.size(1);
  const int64_t* ap = a.const_data_ptr<int64_t>();
  const int64_t* bp = b.const_data_ptr<int64_t>();
  for (int64_t q = 0; q < Q; ++q)
    TORCH_CHECK(ap[q] >= 0 && ap[q] < (bp[q] < 0 ? n0 : np) && bp[q] < np,
                "scn_fast_ext.gather_rotate_split: a[", q, "] = ", ap[q], " or b[", q, "] = ", bp[q],
                " is out of range");
  if (s.num_edges == 0 || s.channels == 0) return;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gather_rotate_split_cpu", [&] {
    using T = scalar_t;
    const GatherArgs<T, T> g{x.const_data_ptr<T>(), wig.const_data_ptr<T>(),
                             idx.const_data_ptr<int64_t>(), nullptr, s.num_sides, s.x_coeffs,
                             s.channels, s.rows, s.entries, lmax, mmax};
    const std::vector<T> signs(sign.const_data_ptr<double>(), sign.const_data_ptr<double>() + Q);
    const SplitArgs<T> sp{ap, bp, signs.data(), y0.mutable_data_ptr<T>(),
                          pair.mutable_data_ptr<T>(), n0, np};
    const auto run = cpu_has_avx2_fma() ? gather_split_avx2<T, T> : gather_split_baseline<T, T>;
    const int64_t per_edge = std::max<int64_t>(1, s.num_sides * s.entries * s.channels);
    at::parallel_for(0, s.num_edges, std::max<int64_t>(1, kGrainFlops / per_edge),
                     [&](int64_t e0, int64_t e1) {
                       std::vector<T> scratch(static_cast<size_t>(Q * s.channels));
                       run(g, sp, e0, e1, scratch.data());
                     });
  });
}

at::Tensor rotate_scatter_cpu(const at::Tensor& m, const at::Tensor& wig, const at::Tensor& perm,
                              const at::Tensor& ptr, int64_t lmax, int64_t mmax,
                              int64_t num_nodes) {
  const RotateScatterSizes s = check_rotate_scatter(m, wig, perm, ptr, lmax, mmax, num_nodes);
  check_csr_values(perm, ptr, s.num_edges, s.num_nodes);
  at::Tensor out = at::empty({s.num_nodes, s.out_coeffs, s.channels}, m.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, m.scalar_type(), "rotate_scatter_cpu",
                                  [&] {
                                    with_wig_type<scalar_t>(wig, [&](auto w) {
                                      using W = decltype(w);
                                      rotate_scatter_typed<scalar_t, W>(m, wig, perm, ptr, out, s,
                                                                        lmax, mmax);
                                    });
                                  });
  return out;
}

}  // namespace
}  // namespace scn_fast::cpu

TORCH_LIBRARY_IMPL(scn_fast_ext, CPU, m) {
  m.impl("gather_rotate", &scn_fast::cpu::gather_rotate_cpu);
  m.impl("rotate_scatter", &scn_fast::cpu::rotate_scatter_cpu);
  m.impl("gather_rotate_split", &scn_fast::cpu::gather_rotate_split_cpu);
}
