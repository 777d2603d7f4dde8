// The SIMD instruction set the CPU kernels use (reported by build_info()).
//
// A portable x86-64 wheel is compiled for the SSE2 baseline; the CPU twin's hot loops are marked
// NVCLIP_CPU_CLONES, which makes GCC/Clang also compile an AVX2 version of them and pick one at
// load time (function multi-versioning through an ifunc resolver on Linux).
#pragma once

namespace nvclip {

// What the compiler targets for all code (the -m/-march flags of this build).
constexpr const char* cpu_simd_baseline() {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  return "avx512bw";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__AVX__)
  return "avx";
#elif defined(__SSE4_1__)
  return "sse4.1";
#elif defined(__SSE2__) || defined(_M_X64)
  return "sse2";
#elif defined(__ARM_NEON)
  return "neon";
#else
  return "scalar";
#endif
}

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && defined(__linux__) && \
    !defined(__AVX2__)
#define NVCLIP_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#define NVCLIP_CPU_DISPATCH 1
#else
#define NVCLIP_CPU_CLONES
#define NVCLIP_CPU_DISPATCH 0
#endif

// What the CPU twin's hot loops run with on this machine: the AVX2 clone where the CPU has AVX2,
// else the baseline.
inline const char* cpu_simd_level() {
#if NVCLIP_CPU_DISPATCH
  if (__builtin_cpu_supports("avx2")) return "avx2";
#endif
  return cpu_simd_baseline();
}

}  // namespace nvclip
