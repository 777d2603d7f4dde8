// The CUDA slot runner under BatchQueue and EngineRunner: pinned staging, H2D copy plans, a stage's
// kernel writing the engine input (NearestResizeStage, and the real ResizeNormalizeStage), a CUDA
// engine on the slot's stream, D2H of the rows. Every case needs a device: without one the
// executable exits 77 (test_main.cpp) and ctest reports the cases skipped.
#include <algorithm>
#include <atomic>
#include <functional>
#include <random>
#include <thread>

#include "batch_queue.h"
#include "cuda_util.h"
#include "engine_runner.h"
#include "errors.h"
#include "nearest_resize_stage.h"
#include "resize_normalize_stage.h"
#include "test_support.h"

using namespace nvclip;
using namespace nvtest;

namespace {

constexpr int32_t kSize = 8;
constexpr int kThreads = 128;
constexpr auto kWaitLimit = std::chrono::seconds(60);

// out[row] = [mean R * 255, mean G * 255, mean B * 255, batch]: one block per (row, channel).
__global__ void channel_mean_kernel(const float* in, int64_t plane, int64_t batch, float* out) {
  __shared__ double partial[kThreads];
  const int64_t row = blockIdx.x, channel = blockIdx.y;
  const float* p = in + (row * 3 + channel) * plane;
  double sum = 0;
  for (int64_t k = threadIdx.x; k < plane; k += blockDim.x) sum += p[k];
  partial[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0;
    for (int t = 0; t < kThreads; ++t) total += partial[t];
    out[row * kOutDim + channel] = static_cast<float>(total / static_cast<double>(plane) * 255.0);
    if (channel == 0) out[row * kOutDim + kBatchColumn] = static_cast<float>(batch);
  }
}

class CudaChannelMeanEngine final : public Engine {
 public:
  explicit CudaChannelMeanEngine(int32_t size, int32_t device = 0) : Engine(cuda_info(size, device)), size_(size) {}
  std::atomic<int> fail_call{-1};  // the call (0-based) to fail, -1: none
  std::atomic<int> calls{0};
  std::function<void()> before_call;  // set before the engine serves a queue; runs at each call

  void enqueue(const EngineCall& call) override {
    if (before_call) before_call();
    if (calls++ == fail_call) throw EngineError("injected failure");
    const dim3 grid(static_cast<unsigned>(call.batch), 3);
    channel_mean_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(call.stream)>>>(
        static_cast<const float*>(call.inputs[0]), static_cast<int64_t>(size_) * size_, call.batch,
        static_cast<float*>(call.outputs[0]));
    NVCLIP_CUDA_CHECK(cudaGetLastError());
  }

 private:
  static EngineInfo cuda_info(int32_t size, int32_t device) {
    EngineInfo info = channel_mean_info(size, {1, 16, 64});
    info.device = DeviceKind::kCuda;
    info.device_index = device;
    return info;
  }
  int32_t size_;
};

BatchQueueOptions options(int64_t max_batch, size_t staging) {
  BatchQueueOptions o;
  o.max_batch = max_batch;
  o.max_delay = std::chrono::milliseconds(1);
  o.streams = 3;
  o.staging_bytes = staging;
  return o;
}

// 8 caller threads of 20 requests each, of 1 to 6 uniform images of random sizes (thread t's rng
// seeded seed + t): the requests that failed or timed out plus the rows that are not their image's.
int wrong_rows_from_concurrent_callers(BatchQueue& queue, unsigned seed) {
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(seed + t);
      for (int c = 0; c < 20; ++c) {
        const int n = 1 + static_cast<int>(rng() % 6);
        std::vector<Image> images;
        for (int j = 0; j < n; ++j) images.push_back(uniform_image(1 + int(rng() % 50), 1 + int(rng() % 50), uint8_t(t), uint8_t(c), uint8_t(j)));
        std::vector<ImageView> views;
        for (const auto& image : images) views.push_back(image.view);
        auto r = queue.submit(views.data(), n);
        if (!r->wait_for(kWaitLimit) || r->status() != RequestStatus::kOk) {
          ++bad;
          continue;
        }
        for (int j = 0; j < n; ++j) bad += row_is(*r, j, t, c, j) ? 0 : 1;
      }
    });
  }
  for (auto& th : threads) th.join();
  return bad.load();
}

}  // namespace

TEST_CASE("cuda_rows_reach_their_callers") {
  auto engine = std::make_shared<CudaChannelMeanEngine>(kSize);
  BatchQueue queue(engine, std::make_shared<NearestResizeStage>(kSize, DeviceKind::kCuda), options(16, 64 << 10));
  CHECK_EQ(wrong_rows_from_concurrent_callers(queue, 0), 0);
}

TEST_CASE("cuda_engine_failure_fails_one_batch_and_the_queue_goes_on") {
  auto engine = std::make_shared<CudaChannelMeanEngine>(kSize);
  engine->fail_call = 0;
  BatchQueue queue(engine, std::make_shared<NearestResizeStage>(kSize, DeviceKind::kCuda), options(4, 1 << 20));
  Image image = uniform_image(5, 5, 1, 2, 3);
  auto first = queue.submit(&image.view, 1);
  CHECK(first->wait_for(kWaitLimit));
  CHECK(first->status() == RequestStatus::kFailed);
  CHECK_MESSAGE(first->error().find("injected failure") != std::string::npos, first->error());
  auto second = queue.submit(&image.view, 1);
  CHECK(second->wait_for(kWaitLimit));
  CHECK_MESSAGE(second->status() == RequestStatus::kOk, second->error());
  CHECK(row_is(*second, 0, 1, 2, 3));
}

TEST_CASE("cuda_oversized_image_uses_its_own_buffers") {
  auto engine = std::make_shared<CudaChannelMeanEngine>(kSize);
  BatchQueue queue(engine, std::make_shared<NearestResizeStage>(kSize, DeviceKind::kCuda), options(4, 4096));
  Image big = uniform_image(100, 100, 7, 8, 9);  // 30 KB: larger than the ring and each slot's share
  Image small = uniform_image(4, 4, 1, 1, 1);
  const ImageView views[] = {small.view, big.view, small.view};
  auto r = queue.submit(views, 3);
  CHECK(r->wait_for(kWaitLimit));
  CHECK_MESSAGE(r->status() == RequestStatus::kOk, r->error());
  CHECK((row_is(*r, 0, 1, 1, 1) && row_is(*r, 1, 7, 8, 9) && row_is(*r, 2, 1, 1, 1)));
}

TEST_CASE("cuda_resize_normalize_stage_keeps_its_kernel_per_slot") {
  // The real stage: squash to 8x8 with mean 0 and std 1 maps a uniform image to level / 255.
  PreprocessParams params;
  params.size = kSize;
  params.resize_mode = ResizeMode::kSquash;
  for (int c = 0; c < 3; ++c) {
    params.mean[c] = 0.0f;
    params.std[c] = 1.0f;
  }
  auto engine = std::make_shared<CudaChannelMeanEngine>(kSize);
  auto stage = std::make_shared<ResizeNormalizeStage>(params, DeviceKind::kCuda, 0);
  for (int round = 0; round < 2; ++round) {  // a second queue: the first one's slots are gone with it
    BatchQueue queue(engine, stage, options(4, 64 << 10));
    std::vector<Image> images;
    for (int j = 0; j < 30; ++j) images.push_back(uniform_image(3 + j, 40 - j, uint8_t(j), uint8_t(round), 7));
    std::vector<ImageView> views;
    for (const auto& image : images) views.push_back(image.view);
    auto r = queue.submit(views.data(), static_cast<int64_t>(views.size()));
    REQUIRE(r->wait_for(kWaitLimit));
    REQUIRE_MESSAGE(r->status() == RequestStatus::kOk, r->error());
    for (int j = 0; j < 30; ++j) CHECK_MESSAGE(row_is(*r, j, j, round, 7), "round " << round << " image " << j);
  }
}

TEST_CASE("engine_runner_restores_the_callers_device") {
  // On the last device while the caller's current device is 0 (the same device on a one-GPU machine).
  const int last = cuda_device_count() - 1;
  NVCLIP_CUDA_CHECK(cudaSetDevice(0));
  auto engine = std::make_shared<CudaChannelMeanEngine>(kSize, last);
  EngineRunner runner(engine);
  int current = -1;
  NVCLIP_CUDA_CHECK(cudaGetDevice(&current));
  CHECK_EQ(current, 0);
  std::vector<float> pixels(3 * kSize * kSize, 0.5f), rows(kOutDim);
  const void* inputs[] = {pixels.data()};
  void* outputs[] = {rows.data()};
  runner.run(1, inputs, outputs);
  NVCLIP_CUDA_CHECK(cudaGetDevice(&current));
  CHECK_EQ(current, 0);
  CHECK_EQ(std::lround(rows[0]), 128);  // 0.5 * 255, rounded
  CHECK_EQ(rows[kBatchColumn], 1.0f);
}

TEST_CASE("cuda_replicas_on_every_device") {
  // One replica per CUDA device (two on device 0 where there is only one), each with its own stage
  // and slot; their first calls meet, so every replica runs a batch. Rows reach their callers
  // whichever device ran them, and the stats name each replica's device.
  const int devices = cuda_device_count();
  const int count = std::max(devices, 2);
  Rendezvous meet(count);
  std::vector<std::shared_ptr<CudaChannelMeanEngine>> engines;
  std::vector<Replica> replicas;
  for (int r = 0; r < count; ++r) {
    engines.push_back(std::make_shared<CudaChannelMeanEngine>(kSize, r % devices));
    engines.back()->before_call = [&meet, r] {
      if (!meet.arrive(r)) throw EngineError("the other replicas never ran a batch");
    };
    replicas.push_back({engines.back(), std::make_shared<NearestResizeStage>(kSize, DeviceKind::kCuda)});
  }
  BatchQueueOptions o = options(8, 64 << 10);
  o.streams = 1;
  BatchQueue queue(std::move(replicas), o);
  const int bad = wrong_rows_from_concurrent_callers(queue, 100);
  queue.close();
  CHECK_EQ(bad, 0);
  const BatchQueueStats s = queue.stats();
  REQUIRE_EQ(s.replicas.size(), static_cast<size_t>(count));
  for (int r = 0; r < count; ++r) {
    CHECK_EQ(s.replicas[r].device, "cuda:" + std::to_string(r % devices));
    CHECK_MESSAGE(s.replicas[r].batches > 0, "replica " << r << " ran no batch");
    CHECK_EQ(s.replicas[r].batches, static_cast<uint64_t>(engines[r]->calls.load()));
  }
}
