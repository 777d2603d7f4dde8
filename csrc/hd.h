// Qualifiers for code shared by the CPU twin and the CUDA kernels: one source of truth.
#pragma once

#if defined(__CUDACC__)
#define NVCLIP_HD __host__ __device__ __forceinline__
#else
#define NVCLIP_HD inline
#endif
