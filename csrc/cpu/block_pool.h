// A cache of the CPU twin's large blocks (weight gradients, saved activations, per-call gradients
// that go straight into a GEMM): a freed block is kept and handed to the next request of its size
// class instead of going back to the C library, which returns big blocks to the kernel, so that the
// next step page-faults the same memory in again (measured on a 2-core Xeon VM at scn-t4-b2: ~1 us
// per 4 KiB page, ~3% of a training step). The same idea as PyTorch's CUDA caching allocator, for
// the tensors this extension creates only.
//
//   empty(sizes, options): a CPU tensor of at least kMinBytes from the cache (else a plain at::empty).
//     Blocks come in size classes, 2^k (1 + j/8) bytes (at most 12.5% over the request), so that sizes
//     that move a little from step to step, as edge counts do in MD, keep reusing the same blocks; its
//     storage returns the block to the cache when the last reference goes.
//   release(): frees every cached block (scn_fast.release_cpu_cache()); returns the bytes freed.
//   The cache keeps at most limit() bytes of idle blocks (SCN_FAST_CPU_CACHE_BYTES, a decimal byte
//   count, default 4 GiB; 0 turns caching off; anything else is an error); a request the C library
//   cannot serve releases the cache and retries.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace scn_fast::cpu::block_pool {

inline constexpr int64_t kMinBytes = int64_t{1} << 20;

// The size class of a request of n bytes: n rounded up to a multiple of 2^k / 8, 2^k < n <= 2^(k+1).
inline size_t size_class(size_t n) {
  size_t p2 = 4096;  // 2^(k+1), the first power of two >= n
  while (p2 < n) p2 <<= 1;
  const size_t step = p2 / 16;
  return (n + step - 1) / step * step;
}

// The cache limit from SCN_FAST_CPU_CACHE_BYTES: unset -> 4 GiB; otherwise decimal digits only (no
// sign, exponent, suffix or spaces) that fit in size_t, else an error naming the variable (strtoull
// alone read "1e9" as 1, "abc" as 0 and "-1" as unlimited).
inline size_t parse_limit(const char* env) {
  if (env == nullptr) return size_t{4} << 30;
  const std::string text(env);
  bool ok = !text.empty() && text.size() <= 20;
  for (char c : text) ok = ok && c >= '0' && c <= '9';
  unsigned long long value = 0;
  if (ok) {
    errno = 0;
    value = std::strtoull(text.c_str(), nullptr, 10);
    ok = errno != ERANGE && value <= std::numeric_limits<size_t>::max();
  }
  TORCH_CHECK(ok, "SCN_FAST_CPU_CACHE_BYTES must be a whole number of bytes written in decimal digits "
              "(e.g. 1000000000; 0 turns the cache off), got '", text, "'");
  return static_cast<size_t>(value);
}

struct Pool {
  std::mutex mu;
  std::unordered_map<size_t, std::vector<void*>> idle;  // idle blocks by size class
  size_t cached = 0;
  size_t limit = parse_limit(std::getenv("SCN_FAST_CPU_CACHE_BYTES"));

  // A block for a request of that many bytes: (pointer, its size: the request's size class).
  std::pair<void*, size_t> take(size_t request) {
    const size_t n = size_class(request);
    {
      std::lock_guard<std::mutex> g(mu);
      auto it = idle.find(n);
      if (it != idle.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached -= n;
        return {p, n};
      }
    }
    void* p = allocate(n);
    if (p == nullptr) {
      release();
      p = allocate(n);
    }
    TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr,
                     "scn_fast_ext: can't allocate memory: you tried to allocate ", n, " bytes");
    return {p, n};
  }

  // 64-byte aligned, as ATen's CPU allocator aligns.
  static void* allocate(size_t n) {
    void* p = nullptr;
    return posix_memalign(&p, 64, n) == 0 ? p : nullptr;
  }

  void give(void* p, size_t n) {
    {
      std::lock_guard<std::mutex> g(mu);
      if (cached + n <= limit) {
        idle[n].push_back(p);
        cached += n;
        return;
      }
    }
    std::free(p);
  }

  size_t release() {
    std::unordered_map<size_t, std::vector<void*>> blocks;
    size_t freed = 0;
    {
      std::lock_guard<std::mutex> g(mu);
      blocks.swap(idle);
      freed = cached;
      cached = 0;
    }
    for (auto& [n, ps] : blocks)
      for (void* p : ps) std::free(p);
    return freed;
  }
};

// One cache per process, never destroyed (blocks may be returned during interpreter shutdown).
inline Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

inline at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType()));
  Pool& pl = pool();
  if (!options.device().is_cpu() || nbytes < kMinBytes || pl.limit == 0)
    return at::empty(sizes, options);
  const auto [p, size] = pl.take(static_cast<size_t>(nbytes));
  return at::from_blob(p, sizes, [size = size](void* q) { pool().give(q, size); }, options);
}

inline at::Tensor empty_like(const at::Tensor& t) {
  return t.is_contiguous() ? empty(t.sizes(), t.options()) : at::empty_like(t);
}

}  // namespace scn_fast::cpu::block_pool
