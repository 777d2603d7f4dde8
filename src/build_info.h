// What this build of nvclip_fast was compiled with (reported by nvclip_fast.build_info()).
#pragma once

#include <string>
#include <vector>

namespace nvclip {

struct BuildInfo {
  bool cuda = false;
  std::string cuda_version;             // "" without CUDA
  std::vector<std::string> cuda_archs;  // CMAKE_CUDA_ARCHITECTURES entries, e.g. "75-real", "90"
  bool tensorrt = false;
  std::string tensorrt_version;  // version of the headers compiled against; "" without TensorRT
  std::string compiler;
  std::string cpu_simd;  // SIMD level the CPU kernels run with here (simd.h: baseline or AVX2 clone)
};

BuildInfo build_info();

}  // namespace nvclip
