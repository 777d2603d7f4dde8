#include "build_info.h"

#include <sstream>

#include "simd.h"

#ifndef NVCLIP_CUDA_VERSION
#define NVCLIP_CUDA_VERSION ""
#endif
#ifndef NVCLIP_CUDA_ARCHS
#define NVCLIP_CUDA_ARCHS ""
#endif
#ifndef NVCLIP_TENSORRT_VERSION
#define NVCLIP_TENSORRT_VERSION ""
#endif

namespace nvclip {

namespace {

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  std::string part;
  while (std::getline(stream, part, ',')) {
    if (!part.empty()) parts.push_back(part);
  }
  return parts;
}

std::string compiler_name() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

}  // namespace

BuildInfo build_info() {
  BuildInfo info;
  info.cuda = NVCLIP_WITH_CUDA != 0;
  info.cuda_version = NVCLIP_CUDA_VERSION;
  info.cuda_archs = split_commas(NVCLIP_CUDA_ARCHS);
  info.tensorrt = NVCLIP_WITH_TENSORRT != 0;
  info.tensorrt_version = NVCLIP_TENSORRT_VERSION;
  info.compiler = compiler_name();
  info.cpu_simd = cpu_simd_level();
  return info;
}

}  // namespace nvclip
