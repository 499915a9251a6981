// Shared by the message ops' translation units (message_gate.cpp, message_combine.cpp,
// tap_rows.cpp, tap_blocked.cpp): includes, the parallel grain and the dtype check.
// E edges, T taps (1 or 4), H hidden channels, R rotated rows, C channels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/block_pool.h"

namespace scn_fast::message {
namespace pool = scn_fast::cpu::block_pool;
using at::Tensor;

inline constexpr int64_t kGrainElements = 16384;  // minimum elements per parallel task
inline constexpr int64_t kSumChunkEdges = 16;      // edges per partial bias-gradient sum (fixed)

// t: float32 or float64, like's dtype and device, contiguous.
inline void check_float(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "scn_fast_ext: ",
              name, " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "scn_fast_ext: ", name, " has dtype ",
              t.scalar_type(), " but the first argument has ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "scn_fast_ext: ", name, " is on ", t.device(),
              " but the first argument is on ", like.device());
  TORCH_CHECK(t.is_contiguous(), "scn_fast_ext: ", name, " must be contiguous");
}

}  // namespace scn_fast::message
