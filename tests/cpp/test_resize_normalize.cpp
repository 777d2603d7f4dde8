// resize_normalize without Python, for the sanitizers: random shapes, strides, channels and
// parameters through the CPU twin (1 and 3 threads) and the emulated CUDA path (with a table arena
// small enough to be recycled), all of which must agree bit for bit. Every image is allocated to
// its last byte, so that AddressSanitizer reports any read past it; bad input must throw. And the
// shared thread pools the Python binding runs the CPU twin on.
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "resize_normalize.h"
#include "resize_normalize_kernel.h"
#include "test_support.h"
#include "thread_pool.h"

namespace {

using nvclip::ImageView;
using nvclip::OutputDType;
using nvclip::PreprocessParams;

struct Image {
  std::vector<uint8_t> bytes;  // exactly (h - 1) * stride + w * c bytes
  ImageView view;
};

Image random_image(std::mt19937& rng, int max_side) {
  std::uniform_int_distribution<int> side(1, max_side), padding(0, 7), coin(0, 1);
  Image im;
  im.view.height = side(rng);
  im.view.width = side(rng);
  im.view.channels = coin(rng) ? 3 : 1;
  im.view.row_stride = int64_t{im.view.width} * im.view.channels + padding(rng);
  im.bytes.resize(static_cast<size_t>((im.view.height - 1) * im.view.row_stride + im.view.width * im.view.channels));
  std::uniform_int_distribution<int> level(0, 255);
  for (auto& b : im.bytes) b = static_cast<uint8_t>(level(rng));
  im.view.data = im.bytes.data();
  return im;
}

PreprocessParams random_params(std::mt19937& rng) {
  static const int32_t sizes[] = {1, 7, 32, 33, 100, 224};
  std::uniform_int_distribution<int> pick(0, 5), three(0, 2), two(0, 1), fill(0, 255);
  PreprocessParams p;
  p.size = sizes[pick(rng)];
  p.resize_mode = static_cast<nvclip::ResizeMode>(three(rng));
  p.interpolation = static_cast<nvclip::Interpolation>(two(rng));
  p.pass_order = static_cast<nvclip::PassOrder>(three(rng));
  p.fill = static_cast<uint8_t>(fill(rng));
  return p;
}

template <typename Fn>
bool throws_invalid(Fn fn) {
  try {
    fn();
  } catch (const std::invalid_argument&) {
    return true;
  }
  return false;
}

}  // namespace

TEST_CASE("cpu_twin_and_emulated_kernel_agree_bit_for_bit") {
  std::mt19937 rng(12345);
  nvclip::ThreadPool one(1), three(3);
  nvclip::ResizeNormalizeEmulated emulated(4096);  // recycled and grown by most batches
  constexpr int kRounds = 40;
  int compared = 0;
  for (int round = 0; round < kRounds; ++round) {
    const PreprocessParams p = random_params(rng);
    std::vector<Image> images;
    const int n = 1 + round % 5;
    for (int i = 0; i < n; ++i) images.push_back(random_image(rng, round % 4 == 0 ? 700 : 90));
    std::vector<ImageView> views;
    for (const Image& im : images) views.push_back(im.view);
    const OutputDType dtype = round % 3 == 0 ? OutputDType::kFloat16 : OutputDType::kFloat32;
    const size_t bytes = static_cast<size_t>(n) * 3 * p.size * p.size * nvclip::output_element_bytes(dtype);
    std::vector<uint8_t> a(bytes, 0x11), b(bytes, 0x22), c(bytes, 0x33);
    try {
      nvclip::resize_normalize_cpu(views.data(), n, p, dtype, a.data(), one);
    } catch (const std::invalid_argument& e) {
      // Only 'longest' may refuse an image (a side rounding to 0 pixels), and then all paths must.
      CHECK_MESSAGE(p.resize_mode == nvclip::ResizeMode::kLongest, "unexpected refusal: " << e.what());
      CHECK_MESSAGE(throws_invalid([&] { nvclip::resize_normalize_cpu(views.data(), n, p, dtype, b.data(), three); }),
                    "three threads accept what one thread refuses");
      CHECK_MESSAGE(throws_invalid([&] { emulated.enqueue(views.data(), n, p, dtype, c.data()); }),
                    "emulated kernel accepts what the CPU twin refuses");
      continue;
    }
    nvclip::resize_normalize_cpu(views.data(), n, p, dtype, b.data(), three);
    emulated.enqueue(views.data(), n, p, dtype, c.data());
    CHECK_MESSAGE(a == b, "round " << round << ": 1 thread != 3 threads");
    CHECK_MESSAGE(a == c, "round " << round << ": CPU twin != emulated kernel");
    ++compared;
  }
  CHECK_MESSAGE(compared >= kRounds / 2, "too few rounds compared: " << compared);
}

TEST_CASE("bad_input_is_refused_before_any_pixel_is_read") {
  nvclip::ThreadPool one(1);
  std::vector<uint8_t> pixels(12, 0), out(3 * 224 * 224 * 4);
  PreprocessParams p;
  ImageView bad;
  bad.data = pixels.data();
  bad.height = 2;
  bad.width = 2;
  bad.channels = 4;
  bad.row_stride = 8;
  CHECK_MESSAGE(throws_invalid([&] { nvclip::resize_normalize_cpu(&bad, 1, p, OutputDType::kFloat32, out.data(), one); }),
                "4 channels accepted");
  bad.channels = 3;
  bad.row_stride = 5;
  CHECK_MESSAGE(throws_invalid([&] { nvclip::resize_normalize_cpu(&bad, 1, p, OutputDType::kFloat32, out.data(), one); }),
                "row stride shorter than a row accepted");
  bad.row_stride = 6;
  p.std[1] = 0.0f;
  CHECK_MESSAGE(throws_invalid([&] { nvclip::resize_normalize_cpu(&bad, 1, p, OutputDType::kFloat32, out.data(), one); }),
                "std 0 accepted");
}

TEST_CASE("shared_thread_pools_keep_only_the_latest_size") {
  std::shared_ptr<nvclip::ThreadPool> a = nvclip::ThreadPool::shared(2), b = nvclip::ThreadPool::shared(2);
  CHECK(a == b);
  CHECK_EQ(a->size(), 2);
  const std::weak_ptr<nvclip::ThreadPool> two = a;
  std::shared_ptr<nvclip::ThreadPool> three = nvclip::ThreadPool::shared(3);
  CHECK_EQ(three->size(), 3);
  CHECK_FALSE(two.expired());  // still held here
  a.reset();
  b.reset();
  CHECK(two.expired());  // no longer kept: one pool per process, not one per size
  CHECK(nvclip::ThreadPool::shared(3) == three);
  CHECK_EQ(nvclip::ThreadPool::shared(0)->size(), nvclip::ThreadPool::available_cores());
}
