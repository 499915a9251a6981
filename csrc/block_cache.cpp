// The CPU block cache (cpu/block_pool.h) as ops:
// cached_empty(size, dtype) -> a CPU tensor from the block cache, for the large per-call tensors the
//   Python op layer creates (scratch, weight gradients); release_cpu_cache() frees the cached blocks
//   and returns their bytes; cpu_cache_bytes() -> bytes cached now.

#include "message_common.h"

namespace scn_fast::message {
namespace {

Tensor cached_empty(at::IntArrayRef size, at::ScalarType dtype) {
  return pool::empty(size, at::TensorOptions().dtype(dtype).device(at::kCPU));
}

int64_t release_cpu_cache() { return static_cast<int64_t>(pool::pool().release()); }

int64_t cpu_cache_bytes() {
  pool::Pool& p = pool::pool();
  std::lock_guard<std::mutex> g(p.mu);
  return static_cast<int64_t>(p.cached);
}

}  // namespace
}  // namespace scn_fast::message

TORCH_LIBRARY_FRAGMENT(scn_fast_ext, m) {
  m.def("cached_empty(int[] size, ScalarType dtype) -> Tensor");
  m.def("release_cpu_cache() -> int");
  m.def("cpu_cache_bytes() -> int");
}

TORCH_LIBRARY_IMPL(scn_fast_ext, CatchAll, m) {
  m.impl("cached_empty", &scn_fast::message::cached_empty);
  m.impl("release_cpu_cache", &scn_fast::message::release_cpu_cache);
  m.impl("cpu_cache_bytes", &scn_fast::message::cpu_cache_bytes);
}
