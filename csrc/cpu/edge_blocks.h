// The CPU twin's inner blocks: one degree l of one edge side, on one chunk of channels.
//
// Features are rows of C contiguous channels. A chunk is kChunk<Acc> = 2 SIMD vectors of channels
// (16 floats or 8 doubles): the NA x 2 accumulators, the NA broadcast weights and the loaded feature
// vectors all fit in the 16 ymm registers. NA is the number of kept rows n_l of the degree (1, or 3
// when mmax = 1 and l >= 1), nb = 2l + 1 its columns. A chunk narrower than kChunk (the tail of C) runs
// one vector then scalar lanes.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cpu_isa.h"
#include "simd.h"

namespace scn_fast::cpu {

// Accumulation type: float for float32 / bfloat16 / float16, double for float64.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename Acc>
inline constexpr int64_t kChunk = 2 * kLanes<Acc>;

// ---------------------------------------------------------------------------------------------------
// Forward rotation of one degree (gather_rotate):
//   y[a, c] = sum_{b < nb} w[a*nb + b] * x[b, c]     a < NA, c in the chunk
// x: the degree's nb coefficient rows of one node (row stride C); w: the degree's NA x nb compact
// block; y: the degree's NA output rows (row stride C).

template <int NA, int NV, typename T, typename W, typename Acc>
SCN_ALWAYS_INLINE void rotate_vectors(const T* __restrict x, const W* __restrict w, int64_t nb,
                                      int64_t C, T* __restrict y) {
  using V = vec_t<Acc>;
  constexpr int64_t L = kLanes<Acc>;
  V acc[NA][NV];
  for (int a = 0; a < NA; ++a)
    for (int j = 0; j < NV; ++j) acc[a][j] = V{};
  for (int64_t b = 0; b < nb; ++b) {
    V xv[NV];
    for (int j = 0; j < NV; ++j) load_vec<Acc>(x + b * C + j * L, xv[j]);
    for (int a = 0; a < NA; ++a) {
      const Acc wab = static_cast<Acc>(w[a * nb + b]);
      for (int j = 0; j < NV; ++j) acc[a][j] += wab * xv[j];
    }
  }
  for (int a = 0; a < NA; ++a)
    for (int j = 0; j < NV; ++j) store_vec<Acc>(y + a * C + j * L, acc[a][j]);
}

template <int NA, typename T, typename W, typename Acc>
SCN_ALWAYS_INLINE void rotate_scalars(const T* x, const W* w, int64_t nb, int64_t C, T* y,
                                      int64_t width) {
  for (int64_t c = 0; c < width; ++c) {
    Acc acc[NA] = {};
    for (int64_t b = 0; b < nb; ++b) {
      const Acc v = static_cast<Acc>(x[b * C + c]);
      for (int a = 0; a < NA; ++a) acc[a] += static_cast<Acc>(w[a * nb + b]) * v;
    }
    for (int a = 0; a < NA; ++a) y[a * C + c] = static_cast<T>(acc[a]);
  }
}

// A chunk of width <= kChunk channels.
template <int NA, typename T, typename W, typename Acc>
SCN_ALWAYS_INLINE void rotate_chunk(const T* x, const W* w, int64_t nb, int64_t C, T* y,
                                    int64_t width) {
  constexpr int64_t L = kLanes<Acc>;
  if (width == 2 * L) return rotate_vectors<NA, 2, T, W, Acc>(x, w, nb, C, y);
  int64_t done = 0;
  if (width >= L) {
    rotate_vectors<NA, 1, T, W, Acc>(x, w, nb, C, y);
    done = L;
  }
  if (width > done) rotate_scalars<NA, T, W, Acc>(x + done, w, nb, C, y + done, width - done);
}

// ---------------------------------------------------------------------------------------------------
// Transposed rotation of one degree, accumulated (rotate_scatter):
//   acc[b, c] += sum_{a < NA} w[a*nb + b] * m[a, c]     b < nb, c in the chunk   (a ascending)
// m: the degree's NA rotated rows of one edge side (row stride C); acc: the degree's nb accumulator
// rows of one node (row stride ldacc). Every lane is summed in the same order, whatever its path.

template <int NA, int NV, typename T, typename W, typename Acc>
SCN_ALWAYS_INLINE void unrotate_vectors(const T* __restrict m, const W* __restrict w, int64_t nb,
                                        int64_t C, Acc* __restrict acc, int64_t ldacc) {
  using V = vec_t<Acc>;
  constexpr int64_t L = kLanes<Acc>;
  V mv[NA][NV];
  for (int a = 0; a < NA; ++a)
    for (int j = 0; j < NV; ++j) load_vec<Acc>(m + a * C + j * L, mv[a][j]);
  for (int64_t b = 0; b < nb; ++b) {
    Acc* row = acc + b * ldacc;
    V s[NV];
    for (int j = 0; j < NV; ++j) std::memcpy(&s[j], row + j * L, sizeof(V));
    for (int a = 0; a < NA; ++a) {
      const Acc wab = static_cast<Acc>(w[a * nb + b]);
      for (int j = 0; j < NV; ++j) s[j] += wab * mv[a][j];
    }
    for (int j = 0; j < NV; ++j) std::memcpy(row + j * L, &s[j], sizeof(V));
  }
}

template <int NA, typename T, typename W, typename Acc>
SCN_ALWAYS_INLINE void unrotate_scalars(const T* m, const W* w, int64_t nb, int64_t C, Acc* acc,
                                        int64_t ldacc, int64_t width) {
  for (int64_t b = 0; b < nb; ++b) {
    Acc* row = acc + b * ldacc;
    for (int64_t c = 0; c < width; ++c) {
      Acc s = row[c];
      for (int a = 0; a < NA; ++a) s += static_cast<Acc>(w[a * nb + b]) * static_cast<Acc>(m[a * C + c]);
      row[c] = s;
    }
  }
}

// A chunk of width <= kChunk channels.
template <int NA, typename T, typename W, typename Acc>
SCN_ALWAYS_INLINE void unrotate_chunk(const T* m, const W* w, int64_t nb, int64_t C, Acc* acc,
                                      int64_t ldacc, int64_t width) {
  constexpr int64_t L = kLanes<Acc>;
  if (width == 2 * L) return unrotate_vectors<NA, 2, T, W, Acc>(m, w, nb, C, acc, ldacc);
  int64_t done = 0;
  if (width >= L) {
    unrotate_vectors<NA, 1, T, W, Acc>(m, w, nb, C, acc, ldacc);
    done = L;
  }
  if (width > done)
    unrotate_scalars<NA, T, W, Acc>(m + done, w, nb, C, acc + done, ldacc, width - done);
}

}  // namespace scn_fast::cpu
