// main() of the C++ test executables: doctest's, except that an executable whose every case needs a
// CUDA device (built with NVCLIP_TESTS_NEED_GPU=1) exits 77 without running anything where none is
// usable, which ctest reports as skipped (SKIP_RETURN_CODE), never as passed. Listing the cases
// (ctest's discovery, --list-test-cases) works everywhere.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <string>

#include "cuda_util.h"

namespace {

constexpr int kSkipped = 77;

bool listing(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.find("list") != std::string::npos || arg.rfind("-l", 0) == 0) return true;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (NVCLIP_TESTS_NEED_GPU && !listing(argc, argv) && nvclip::cuda_device_count() == 0) {
    std::printf("skipped: every test case here needs a CUDA device (%s)\n", nvclip::cuda_unavailable_reason().c_str());
    return kSkipped;
  }
  return doctest::Context(argc, argv).run();
}
