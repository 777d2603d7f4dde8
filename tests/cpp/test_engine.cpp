// Engine descriptions, and TrtEngine's behaviour where it can run here: error paths without a GPU
// or TensorRT library, and the logger that turns TensorRT's messages into EngineErrors (its routing
// per call: test_log_capture).
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>

#include "cuda_util.h"
#include "engine.h"
#include "errors.h"
#include "harness.h"
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

TEST(dtype_names_round_trip) {
  for (auto dtype : {TensorDType::kFloat32, TensorDType::kFloat16, TensorDType::kBFloat16, TensorDType::kInt8,
                     TensorDType::kUInt8, TensorDType::kInt32, TensorDType::kInt64, TensorDType::kBool}) {
    CHECK(dtype_from_name(dtype_name(dtype)) == dtype);
  }
  CHECK_EQ(dtype_size(TensorDType::kFloat16), size_t{2});
  CHECK_EQ(dtype_size(TensorDType::kInt64), size_t{8});
  CHECK_THROWS(dtype_from_name("float"), std::invalid_argument, "unknown tensor dtype 'float' (expected one of float32");
}

TEST(tensor_spec_row_bytes) {
  TensorSpec spec{"pixels", TensorDType::kFloat16, {-1, 3, 224, 224}};
  CHECK_EQ(spec.row_bytes(), size_t{3 * 224 * 224 * 2});
  CHECK_EQ(spec.to_string(), std::string("pixels: float16[-1, 3, 224, 224]"));
  TensorSpec dynamic{"x", TensorDType::kFloat32, {-1, -1, 4}};
  CHECK_THROWS(dynamic.row_bytes(), std::invalid_argument, "dimension 1 must be a fixed positive size");
  TensorSpec scalar{"s", TensorDType::kFloat32, {}};
  CHECK_THROWS(scalar.row_bytes(), std::invalid_argument, "rank 0");
}

TEST(engine_info_validation) {
  valid_info().validate();
  EngineInfo info = valid_info();
  info.outputs.clear();
  CHECK_THROWS(info.validate(), std::invalid_argument, "no output");
  info = valid_info();
  info.outputs[0].name = "pixels";
  CHECK_THROWS(info.validate(), std::invalid_argument, "'pixels' appears twice");
  info = valid_info();
  info.batch = {4, 2, 8};
  CHECK_THROWS(info.validate(), std::invalid_argument, "1 <= min <= opt <= max");
  info = valid_info();
  info.inputs[0].shape[0] = 256;
  CHECK_THROWS(info.validate(), std::invalid_argument, "fixed batch of 256 outside the batch profile [1, 128]");
  info = valid_info();
  info.inputs[0].shape[0] = 0;
  CHECK_THROWS(info.validate(), std::invalid_argument, "batch dimension must be -1");
  info = valid_info();
  CHECK_EQ(info.output("embeds").name, std::string("embeds"));
  CHECK_THROWS(info.output("x"), std::invalid_argument, "no output named 'x' (outputs: 'embeds')");
}

TEST(engine_construction_validates_its_info) {
  class Noop final : public Engine {
   public:
    explicit Noop(EngineInfo i) : Engine(std::move(i)) {}
    void enqueue(const EngineCall&) override {}
  };
  EngineInfo bad = valid_info();
  bad.inputs.clear();
  CHECK_THROWS(Noop(bad), std::invalid_argument, "no input");
  Noop engine(valid_info());
  engine.attach(2);
  CHECK_THROWS(engine.attach(2), EngineError, "already serves a BatchQueue");
  engine.detach();
  engine.attach(1);
}

#if NVCLIP_WITH_TENSORRT

namespace {
std::string temp_path(const char* name) {
  const char* dir = std::getenv("TMPDIR");
  return std::string(dir != nullptr ? dir : "/tmp") + "/" + name;
}
}  // namespace

TEST(trt_logger_routes_errors_to_the_call_and_keeps_recent_warnings) {
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

TEST(trt_engine_missing_plan_names_the_file) {
  CHECK_THROWS(TrtEngine("/nonexistent/dir/x.plan"), EngineError, "cannot read TensorRT plan '/nonexistent/dir/x.plan'");
}

TEST(trt_engine_without_gpu_raises_engine_error) {
  // The acceptance check of issue 5: on a machine with no GPU (and here no TensorRT library either)
  // loading a plan is a clear EngineError, never a crash.
  if (cuda_device_count() > 0) SKIP("a CUDA device is present: the no-GPU path cannot be exercised");
  const std::string path = temp_path("nvclip_test_not_a_plan.plan");
  {
    std::ofstream out(path, std::ios::binary);
    out << "not a TensorRT plan";
  }
  CHECK_THROWS(TrtEngine(path), EngineError, "cannot run TensorRT plan '" + path + "' on cuda:0");
  CHECK_THROWS(TrtEngine(path, TrtEngineOptions{{}, 3}), EngineError, "cuda:3");
  std::remove(path.c_str());
}

TEST(trt_engine_rejects_a_corrupt_plan_with_tensorrt_errors) {
  if (cuda_device_count() == 0) SKIP("gpu: " + cuda_unavailable_reason());
  const std::string path = temp_path("nvclip_test_corrupt.plan");
  {
    std::ofstream out(path, std::ios::binary);
    out << std::string(4096, 'x');
  }
  try {
    TrtEngine engine(path);
    CHECK_MSG(false, "a corrupt plan deserialized");
  } catch (const EngineError& e) {
    const std::string what = e.what();
    // Either no TensorRT library is installed, or it refused the bytes with its own errors.
    CHECK_MSG(what.find("could not load the TensorRT") != std::string::npos ||
                  what.find("deserialization failed") != std::string::npos,
              what);
  }
  std::remove(path.c_str());
}

#endif

NVTEST_MAIN()
