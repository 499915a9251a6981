// The message ops of the extension (the schema and its registration: message_ops.cpp), one file
// per job: message_gate.cpp (tap_gate_*), message_combine.cpp (tap_combine_*), tap_rows.cpp
// (gather_rows_out, tap_split, tap_assemble and their ATen twins), tap_blocked.cpp
// (tap_blocked_*), cpu_runtime.cpp (the CPU block cache, the ISA cap of the CPU clones).
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

Tensor tap_gate_forward(const Tensor& a, const Tensor& b, const Tensor& gate);
std::vector<Tensor> tap_gate_backward(const Tensor& dm, const Tensor& a, const Tensor& b,
                                      const Tensor& gate);
Tensor tap_combine_forward(const Tensor& z, const Tensor& bias, const Tensor& src,
                           const Tensor& coef);
std::vector<Tensor> tap_combine_backward(const Tensor& dm, const Tensor& z, const Tensor& bias,
                                         const Tensor& src, const Tensor& coef);
void gather_rows_out(const Tensor& src, const Tensor& rows, Tensor out);
void tap_split(const Tensor& y3, const Tensor& rows0, const Tensor& pair_rows,
               const Tensor& pair_signs, Tensor y0, Tensor pair);
Tensor tap_assemble(const Tensor& dy0, const Tensor& dpair, const Tensor& a, const Tensor& b,
                    const Tensor& sign);
void tap_split_aten(const Tensor& y3, const Tensor& rows0, const Tensor& pair_rows,
                    const Tensor& pair_signs, Tensor y0, Tensor pair);
Tensor tap_assemble_aten(const Tensor& dy0, const Tensor& dpair, const Tensor& a, const Tensor& b,
                         const Tensor& sign);
std::vector<Tensor> tap_blocked_forward(const Tensor& y3, const Tensor& pair, const Tensor& w3,
                                        const Tensor& bias, at::IntArrayRef runs0,
                                        at::IntArrayRef runs1);
Tensor tap_blocked_backward(const Tensor& da, const Tensor& db, const Tensor& y3,
                            const Tensor& pair, const Tensor& w3, at::IntArrayRef runs0,
                            at::IntArrayRef runs1, Tensor dy, Tensor dpair);
Tensor cached_empty(at::IntArrayRef size, at::ScalarType dtype);
int64_t release_cpu_cache();
int64_t cpu_cache_bytes();
int64_t set_isa_cap(int64_t cap);

}  // namespace scn_fast::message
