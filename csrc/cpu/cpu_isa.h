// Runtime ISA selection for the CPU twin's hot loops.
//
// The extension is built without -march flags (its build cache may be shared by machines of different
// CPUs), so each hot function is compiled twice: once for the baseline ISA and once with
// SCN_TARGET_AVX2 (AVX2 + FMA, so gcc vectorises the channel loops 8 floats wide and fuses the
// multiply-adds). cpu_has_avx2_fma() picks the clone at run time. The bodies the clones share must be
// SCN_ALWAYS_INLINE so that they are compiled inside each clone's target.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SCN_HAS_AVX2_CLONE 1
#define SCN_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define SCN_HAS_AVX2_CLONE 0
#define SCN_TARGET_AVX2
#endif

#if defined(__GNUC__) || defined(__clang__)
#define SCN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SCN_ALWAYS_INLINE inline
#endif

namespace scn_fast::cpu {

// Hint the cache to fetch [p, p + bytes) for reading (one prefetch per 64-byte line). rotate_scatter
// uses it one edge ahead: a node's edges come in perm order, so their m blocks are scattered in memory.
SCN_ALWAYS_INLINE void prefetch_bytes(const void* p, int64_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
#else
  (void)p;
  (void)bytes;
#endif
}

// True when the running CPU has AVX2 and FMA (and the avx2 clones exist in this build).
inline bool cpu_has_avx2_fma() {
#if SCN_HAS_AVX2_CLONE
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

}  // namespace scn_fast::cpu
