// Engine descriptions, EngineRunner on a CPU engine, and TrtEngine's behaviour where it can run
// here: error paths without a GPU or TensorRT library, and the logger that turns TensorRT's
// messages into EngineErrors (its routing per call: test_log_capture).
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>

#include "cuda_util.h"
#include "engine.h"
#include "engine_runner.h"
#include "errors.h"
#include "test_support.h"
#if NVCLIP_WITH_TENSORRT
#include "trt_engine.h"
#endif

using namespace nvclip;

namespace {

EngineInfo valid_info() {
  EngineInfo info;
  info.inputs = {{"pixels", TensorDType::kFloat16, {-1, 3, 224, 224}}};
  info.outputs = {{"embeds", TensorDType::kFloat32, {-1, 1024}}};
  info.batch = {1, 32, 128};
  return info;
}

}  // namespace

TEST_CASE("dtype_names_round_trip") {
  for (auto dtype : {TensorDType::kFloat32, TensorDType::kFloat16, TensorDType::kBFloat16, TensorDType::kInt8,
                     TensorDType::kUInt8, TensorDType::kInt32, TensorDType::kInt64, TensorDType::kBool}) {
    CHECK(dtype_from_name(dtype_name(dtype)) == dtype);
  }
  CHECK_EQ(dtype_size(TensorDType::kFloat16), size_t{2});
  CHECK_EQ(dtype_size(TensorDType::kInt64), size_t{8});
  CHECK_THROWS_CONTAINING(dtype_from_name("float"), std::invalid_argument, "unknown tensor dtype 'float' (expected one of float32");
}

TEST_CASE("tensor_spec_row_bytes") {
  TensorSpec spec{"pixels", TensorDType::kFloat16, {-1, 3, 224, 224}};
  CHECK_EQ(spec.row_bytes(), size_t{3 * 224 * 224 * 2});
  CHECK_EQ(spec.to_string(), std::string("pixels: float16[-1, 3, 224, 224]"));
  TensorSpec dynamic{"x", TensorDType::kFloat32, {-1, -1, 4}};
  CHECK_THROWS_CONTAINING(dynamic.row_bytes(), std::invalid_argument, "dimension 1 must be a fixed positive size");
  TensorSpec scalar{"s", TensorDType::kFloat32, {}};
  CHECK_THROWS_CONTAINING(scalar.row_bytes(), std::invalid_argument, "rank 0");
}

TEST_CASE("engine_info_validation") {
  valid_info().validate();
  EngineInfo info = valid_info();
  info.outputs.clear();
  CHECK_THROWS_CONTAINING(info.validate(), std::invalid_argument, "no output");
  info = valid_info();
  info.outputs[0].name = "pixels";
  CHECK_THROWS_CONTAINING(info.validate(), std::invalid_argument, "'pixels' appears twice");
  info = valid_info();
  info.batch = {4, 2, 8};
  CHECK_THROWS_CONTAINING(info.validate(), std::invalid_argument, "1 <= min <= opt <= max");
  info = valid_info();
  info.inputs[0].shape[0] = 256;
  CHECK_THROWS_CONTAINING(info.validate(), std::invalid_argument, "fixed batch of 256 outside the batch profile [1, 128]");
  info = valid_info();
  info.inputs[0].shape[0] = 0;
  CHECK_THROWS_CONTAINING(info.validate(), std::invalid_argument, "batch dimension must be -1");
  info = valid_info();
  CHECK_EQ(info.output("embeds").name, std::string("embeds"));
  CHECK_THROWS_CONTAINING(info.output("x"), std::invalid_argument, "no output named 'x' (outputs: 'embeds')");
}

TEST_CASE("engine_construction_validates_its_info") {
  class Noop final : public Engine {
   public:
    explicit Noop(EngineInfo i) : Engine(std::move(i)) {}
    void enqueue(const EngineCall&) override {}
  };
  EngineInfo bad = valid_info();
  bad.inputs.clear();
  CHECK_THROWS_CONTAINING(Noop(bad), std::invalid_argument, "no input");
  Noop engine(valid_info());
  engine.attach(2);
  CHECK_THROWS_CONTAINING(engine.attach(2), EngineError, "already serves a BatchQueue");
  engine.detach();
  engine.attach(1);
}

TEST_CASE("call_batches_of_a_fixed_batch_engine") {
  EngineInfo info = valid_info();
  CHECK_EQ(info.call_batches().max, int64_t{128});
  info.inputs[0].shape[0] = 8;
  const BatchProfile fixed = info.call_batches();
  CHECK((fixed.min == 8 && fixed.opt == 8 && fixed.max == 8));
}

TEST_CASE("engine_runner_pads_to_the_profile_minimum_and_returns_the_callers_rows") {
  // Output row r of each call = [sum of input row r, rows in the call]; the profile minimum is 4.
  class RowSums final : public Engine {
   public:
    RowSums() : Engine(info()) {}
    std::vector<int64_t> calls;
    void enqueue(const EngineCall& call) override {
      calls.push_back(call.batch);
      const auto* in = static_cast<const float*>(call.inputs[0]);
      auto* out = static_cast<float*>(call.outputs[0]);
      for (int64_t r = 0; r < call.batch; ++r) {
        out[2 * r] = in[3 * r] + in[3 * r + 1] + in[3 * r + 2];
        out[2 * r + 1] = static_cast<float>(call.batch);
      }
      if (in[0] < 0) throw std::runtime_error("negative input");
    }

   private:
    static EngineInfo info() {
      EngineInfo i;
      i.inputs = {{"x", TensorDType::kFloat32, {-1, 3}}};
      i.outputs = {{"y", TensorDType::kFloat32, {-1, 2}}};
      i.batch = {4, 8, 16};
      return i;
    }
  };
  auto engine = std::make_shared<RowSums>();
  EngineRunner runner(engine);
  CHECK_THROWS_CONTAINING(EngineRunner(engine), EngineError, "already serves a BatchQueue");
  for (const int64_t batch : {int64_t{2}, int64_t{5}, int64_t{16}}) {
    std::vector<float> x(static_cast<size_t>(batch) * 3), y(static_cast<size_t>(batch) * 2 + 1, -7.0f);
    for (size_t k = 0; k < x.size(); ++k) x[k] = static_cast<float>(k);
    const void* inputs[] = {x.data()};
    void* outputs[] = {y.data()};
    runner.run(batch, inputs, outputs);
    for (int64_t r = 0; r < batch; ++r) {
      CHECK_EQ(y[2 * r], static_cast<float>(9 * r + 3));  // (3r) + (3r + 1) + (3r + 2)
      CHECK_EQ(y[2 * r + 1], static_cast<float>(std::max<int64_t>(batch, 4)));
    }
    CHECK_EQ(y.back(), -7.0f);  // only the caller's rows are written
  }
  CHECK((engine->calls == std::vector<int64_t>{4, 5, 16}));
  std::vector<float> x(3, -1.0f), y(2);
  const void* inputs[] = {x.data()};
  void* outputs[] = {y.data()};
  CHECK_THROWS_CONTAINING(runner.run(0, inputs, outputs), std::invalid_argument, "batch must be in [1, 16], got 0");
  CHECK_THROWS_CONTAINING(runner.run(1, inputs, outputs), EngineError, "engine failed: negative input");
}

#if NVCLIP_WITH_TENSORRT

namespace {
std::string temp_path(const char* name) {
  const char* dir = std::getenv("TMPDIR");
  return std::string(dir != nullptr ? dir : "/tmp") + "/" + name;
}
}  // namespace

TEST_CASE("trt_logger_routes_errors_to_the_call_and_keeps_recent_warnings") {
  TrtLogger logger;
  using Severity = nvinfer1::ILogger::Severity;
  {
    LogCapture::Scope call(logger.capture());
    logger.log(Severity::kINFO, "progress");
    logger.log(Severity::kVERBOSE, "chatter");
    CHECK(logger.capture().take_errors().empty());
    logger.log(Severity::kERROR, "first");
    logger.log(Severity::kINTERNAL_ERROR, "second");
    logger.log(Severity::kERROR, nullptr);
    CHECK_EQ(logger.capture().take_errors(), std::string("first; second; (null message)"));
    CHECK(logger.capture().take_errors().empty());  // taken once
  }
  for (size_t i = 0; i < LogCapture::kMaxWarnings + 10; ++i) logger.log(Severity::kWARNING, std::to_string(i).c_str());
  const auto warnings = logger.warnings();
  CHECK_EQ(warnings.size(), LogCapture::kMaxWarnings);
  CHECK_EQ(warnings.front(), std::string("10"));  // the oldest were dropped
}

TEST_CASE("trt_engine_missing_plan_names_the_file") {
  CHECK_THROWS_CONTAINING(TrtEngine("/nonexistent/dir/x.plan"), EngineError, "cannot read TensorRT plan '/nonexistent/dir/x.plan'");
}

TEST_CASE("trt_engine_on_a_device_that_does_not_exist_names_it") {
  const std::string path = temp_path("nvclip_test_not_a_plan.plan");
  {
    std::ofstream out(path, std::ios::binary);
    out << "not a TensorRT plan";
  }
  const std::string missing = "cuda:" + std::to_string(cuda_device_count());  // one past the last device
  CHECK_THROWS_CONTAINING(TrtEngine(path, TrtEngineOptions{{}, cuda_device_count()}), EngineError,
                          "cannot run TensorRT plan '" + path + "' on " + missing);
  std::remove(path.c_str());
}

TEST_CASE("trt_engine_refuses_a_corrupt_plan_with_a_clear_error") {
  // Never a crash: without a GPU the device is refused first; with one, either no TensorRT library
  // is installed, or it refuses the bytes with its own errors.
  const std::string path = temp_path("nvclip_test_corrupt.plan");
  {
    std::ofstream out(path, std::ios::binary);
    out << std::string(4096, 'x');
  }
  std::string what;
  try {
    TrtEngine engine(path);
  } catch (const EngineError& e) {
    what = e.what();
  }
  if (cuda_device_count() == 0) {
    CHECK_MESSAGE(what.find("cannot run TensorRT plan '" + path + "' on cuda:0") != std::string::npos, what);
  } else {
    CHECK_MESSAGE((what.find("could not load the TensorRT") != std::string::npos ||
                   what.find("deserialization failed") != std::string::npos),
                  what);
  }
  std::remove(path.c_str());
}

#endif
