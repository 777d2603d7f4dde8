// What the C++ tests share: doctest, a check for exception messages, a deterministic CPU test
// engine and image helpers for the BatchQueue tests.
//
// Images are uniform colours (r, g, b). NearestResizeStage maps such an image to a tensor whose
// channel planes are r/255, g/255, b/255 exactly, and ChannelMeanEngine returns, per image,
// [mean R * 255, mean G * 255, mean B * 255, rows in this engine call] — so a row names the image
// it came from, and the batch it ran in.
#pragma once

#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <ostream>  // doctest prints checked values (thread ids, pointers) with it
#include <set>
#include <string>
#include <vector>

#include "engine.h"
#include "image.h"
#include "request.h"

// Checks that `expr` throws `type` whose what() contains `substring`.
#define CHECK_THROWS_CONTAINING(expr, type, substring) \
  CHECK_THROWS_WITH_AS(static_cast<void>(expr), doctest::Contains(std::string(substring).c_str()), type)

namespace nvtest {

constexpr int kOutDim = 4;           // R, G, B, batch rows
constexpr int kBatchColumn = 3;
constexpr uint8_t kPoison = 255;     // a red value ChannelMeanEngine can be told to fail on

inline nvclip::EngineInfo channel_mean_info(int32_t size, nvclip::BatchProfile profile, int64_t batch_dim = -1) {
  nvclip::EngineInfo info;
  info.device = nvclip::DeviceKind::kCpu;
  info.inputs = {{"pixels", nvclip::TensorDType::kFloat32, {batch_dim, 3, size, size}}};
  info.outputs = {{"embeds", nvclip::TensorDType::kFloat32, {batch_dim, kOutDim}}};
  info.batch = profile;
  return info;
}

class ChannelMeanEngine final : public nvclip::Engine {
 public:
  // Runs after the rows are computed, with the call and the rows: throw to fail the batch, sleep
  // to make it slow.
  using Hook = std::function<void(const nvclip::EngineCall&, const float* rows)>;

  explicit ChannelMeanEngine(int32_t size, nvclip::BatchProfile profile = {1, 8, 64}, int64_t batch_dim = -1)
      : Engine(channel_mean_info(size, profile, batch_dim)), size_(size) {}

  void set_hook(Hook hook) {
    std::lock_guard<std::mutex> lock(mutex_);
    hook_ = std::move(hook);
  }

  void enqueue(const nvclip::EngineCall& call) override {
    const auto* in = static_cast<const float*>(call.inputs[0]);
    auto* out = static_cast<float*>(call.outputs[0]);
    const int64_t plane = static_cast<int64_t>(size_) * size_;
    for (int64_t i = 0; i < call.batch; ++i) {
      for (int c = 0; c < 3; ++c) {
        double sum = 0;
        const float* p = in + (i * 3 + c) * plane;
        for (int64_t k = 0; k < plane; ++k) sum += p[k];
        out[i * kOutDim + c] = static_cast<float>(sum / static_cast<double>(plane) * 255.0);
      }
      out[i * kOutDim + kBatchColumn] = static_cast<float>(call.batch);
    }
    Hook hook;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      calls_.push_back(call.batch);
      hook = hook_;
    }
    if (hook) hook(call, out);
  }

  std::vector<int64_t> calls() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return calls_;
  }

 private:
  int32_t size_;
  mutable std::mutex mutex_;
  std::vector<int64_t> calls_;  // rows of every call, in call order
  Hook hook_;
};

// Holds the first engine call of each of `parties` replicas until every one of them has made one: with
// one slot per replica, a batch formed meanwhile can only go to a replica that is still free, so
// every replica runs a batch (deterministically, whatever the scheduling).
class Rendezvous {
 public:
  explicit Rendezvous(int parties) : parties_(parties) {}

  // Party `who`'s engine call: blocks on its first one until all have arrived. False if they did
  // not within a minute (the test then fails instead of hanging).
  bool arrive(int who) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!arrived_.insert(who).second) return true;
    cv_.notify_all();
    return cv_.wait_for(lock, std::chrono::seconds(60), [&] { return static_cast<int>(arrived_.size()) == parties_; });
  }

 private:
  const int parties_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::set<int> arrived_;
};

// A uniform image; keeps its pixels.
struct Image {
  std::vector<uint8_t> pixels;
  nvclip::ImageView view;
};

inline Image uniform_image(int32_t height, int32_t width, uint8_t r, uint8_t g, uint8_t b, int64_t row_padding = 0) {
  Image image;
  const int64_t stride = static_cast<int64_t>(width) * 3 + row_padding;
  image.pixels.assign(static_cast<size_t>(stride * height), 0xEE);  // padding bytes must never be read
  for (int32_t y = 0; y < height; ++y) {
    for (int32_t x = 0; x < width; ++x) {
      uint8_t* p = image.pixels.data() + y * stride + x * 3;
      p[0] = r;
      p[1] = g;
      p[2] = b;
    }
  }
  image.view = {image.pixels.data(), height, width, 3, stride};
  return image;
}

inline Image gray_image(int32_t height, int32_t width, uint8_t value) {
  Image image;
  image.pixels.assign(static_cast<size_t>(height) * width, value);
  image.view = {image.pixels.data(), height, width, 1, width};
  return image;
}

inline const float* row_of(const nvclip::Request& request, int64_t i) {
  return reinterpret_cast<const float*>(request.rows()) + i * kOutDim;
}

// The colour a row reports, rounded (the means are exact up to float rounding).
inline bool row_is(const nvclip::Request& request, int64_t i, int r, int g, int b) {
  const float* row = row_of(request, i);
  return std::lround(row[0]) == r && std::lround(row[1]) == g && std::lround(row[2]) == b;
}

}  // namespace nvtest
