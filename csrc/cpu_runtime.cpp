// The CPU block cache (cpu/block_pool.h) as ops, and the ISA cap of the CPU clones:
// cached_empty(size, dtype) -> a CPU tensor from the block cache, for the large per-call tensors the
//   Python op layer creates (scratch, weight gradients); release_cpu_cache() frees the cached blocks
//   and returns their bytes; cpu_cache_bytes() -> bytes cached now.
// _set_isa_cap(cap) -> previous cap: caps the ISA of the CPU clones (2 = AVX-512, 1 = AVX2,
//   0 = baseline), so that the tests run every clone on one machine (cpu/cpu_isa.h).

#include "message_ops.h"
#include "cpu/cpu_isa.h"

namespace scn_fast::message {

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

}  // namespace scn_fast::message
