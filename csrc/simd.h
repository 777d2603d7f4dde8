// The SIMD instruction set the CPU kernels were compiled for (reported by build_info()).
#pragma once

namespace nvclip {

constexpr const char* cpu_simd_level() {
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

}  // namespace nvclip
