// Qualifiers for code shared by the CPU twin and the CUDA kernels: one source of truth.
#pragma once

#if defined(__CUDACC__)
#define NVCLIP_HD __host__ __device__ __forceinline__
// Keep a loop rolled on the device (register pressure); no effect on the host.
#define NVCLIP_NO_UNROLL _Pragma("unroll 1")
#else
#define NVCLIP_HD inline
#define NVCLIP_NO_UNROLL
#endif
