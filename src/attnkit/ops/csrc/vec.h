// Whole-register vectors for attnkit's C++ kernels (GCC/Clang vector extensions): one
// definition of the vector type and its load, store and lane sum, included by every kernel.
#pragma once

#include <cstdint>

// The machine's vector registers, which the kernels' tiles of accumulators are sized to
// fill: 32 of 64 bytes with AVX-512, 16 of 32 bytes with AVX2. Elsewhere (NEON, SSE) 32-byte
// vectors, which the compiler splits. Vectors wider than the registers cost far more than
// the split: GCC 12 built AVX2 code for 64-byte vectors with every broadcast scalar on the
// stack (on a Xeon, x86-64-v3 builds: the banded kernel 46x slower than with 32-byte
// vectors, the decode matmuls 3.4-20x and decode attention 4-7x slower than torch).
#if defined(__AVX512F__)
constexpr int64_t REGISTER_BYTES = 64;
constexpr int VECTOR_REGISTERS = 32;
#else
constexpr int64_t REGISTER_BYTES = 32;
constexpr int VECTOR_REGISTERS = 16;
#endif

// One register of acc_t as one value (GCC/Clang vector extension).
template <typename acc_t>
using Vec [[gnu::vector_size(REGISTER_BYTES)]] = acc_t;
template <typename acc_t>
constexpr int64_t LANES = REGISTER_BYTES / sizeof(acc_t);

template <typename acc_t>
inline Vec<acc_t> load(const acc_t* p) {
  Vec<acc_t> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename acc_t>
inline void store(acc_t* p, Vec<acc_t> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}
// A vector's lanes folded into one by `op` (a + b, max) as a tree of whole-vector shuffles
// (a plain loop is a serial chain of scalar operations: without -ffast-math the compiler
// may not reorder it).
template <typename acc_t, typename Op>
inline acc_t fold_lanes(Vec<acc_t> v, Op op) {
  if constexpr (LANES<acc_t> == 16) {
    v = op(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    v = op(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
    v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    v = op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  } else if constexpr (LANES<acc_t> == 8) {
    v = op(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
    v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
    v = op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
  } else {
    static_assert(LANES<acc_t> == 4);
    v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1));
    v = op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2));
  }
  return v[0];
}
template <typename acc_t>
inline acc_t sum_lanes(Vec<acc_t> v) {
  return fold_lanes<acc_t>(v, [](Vec<acc_t> a, Vec<acc_t> b) { return a + b; });
}
// The largest lane (for lanes without NaN: the tree's order decides which NaN survives).
template <typename acc_t>
inline acc_t max_lanes(Vec<acc_t> v) {
  return fold_lanes<acc_t>(v, [](Vec<acc_t> a, Vec<acc_t> b) { return a < b ? b : a; });
}

// A vector loaded into a register that the compiler must use as such. GCC otherwise folds
// the load into every FMA that reads the vector (a memory operand): the decode kernel's
// 4-key scores then loaded each query vector 4 times, and its loads outnumbered its FMAs.
// (Only where one register holds the vector: AVX or wider. SSE's 16-byte registers cannot
// take the 32-byte vectors of other builds, and the constraint would not compile.)
template <typename acc_t>
inline Vec<acc_t> load_to_register(const acc_t* p) {
  Vec<acc_t> v = load(p);
#if defined(__x86_64__) && defined(__AVX__)
  asm("" : "+v"(v));
#endif
  return v;
}

// Eight float lanes: the first step of the kernels' narrowing lane sums.
using Float8 [[gnu::vector_size(32)]] = float;

// A float vector folded to 8 lanes: a 16-lane vector's halves added, an 8-lane one as is.
// (A template: the branch not taken must not be compiled for the other width.)
template <typename V>
inline Float8 fold_to_8_lanes(V v) {
  static_assert(sizeof(V) == 64 || sizeof(V) == 32);
  if constexpr (sizeof(V) == 64) {
    return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  } else {
    return v;
  }
}

// The cache a software prefetch fills: L1 (prefetcht0) or L2 (prefetcht2).
enum class CacheLevel { L1, L2 };

// Asks for the cache line holding p to be brought into `level`. On x86-64 it is an asm
// statement: GCC 12 at -O3 deleted __builtin_prefetch from a small loop over a row's lines
// (the decode kernel lost its prefetching and a third of its speed, unnoticed).
template <CacheLevel level = CacheLevel::L2>
inline void prefetch_line(const void* p) {
#if defined(__x86_64__)
  if constexpr (level == CacheLevel::L1) {
    asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
  } else {
    asm volatile("prefetcht2 %0" : : "m"(*static_cast<const char*>(p)));
  }
#else
  __builtin_prefetch(p, 0, level == CacheLevel::L1 ? 3 : 1);
#endif
}

// Asks for a row's cache lines (n elements) to be brought into `level`, one prefetch per
// line. Unrolled: rolled, the loop's counter and branch took more instructions than the
// decode kernel's FMAs (a 32-token tile prefetches 512 lines); unrolled, its contiguous reads
// ran 5-10% faster on a Zen 5 EPYC (builds timed in turn).
constexpr int64_t CACHE_LINE_BYTES = 64;
template <CacheLevel level = CacheLevel::L2, typename T>
inline void prefetch_row(const T* row, int64_t n) {
  // Every line the row touches: from the start of its first line (a row need not begin on
  // one) to its last element.
  const uintptr_t end = reinterpret_cast<uintptr_t>(row + n);
  uintptr_t at = reinterpret_cast<uintptr_t>(row) & ~uintptr_t(CACHE_LINE_BYTES - 1);
#pragma GCC unroll 8
  for (; at < end; at += CACHE_LINE_BYTES) prefetch_line<level>(reinterpret_cast<const void*>(at));
}
