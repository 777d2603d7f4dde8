// Engine types for Python: TensorSpec, EngineInfo, Engine (subclassable: the trampoline below lets
// ONNX Runtime / PyTorch engines written in Python run inside the BatchQueue), CudaArray and
// TrtEngine.
#include <pybind11/stl.h>
#include <pybind11/stl/filesystem.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>

#include "bind_util.h"
#include "bindings.h"
#include "cuda_util.h"
#include "engine_runner.h"
#include "engine.h"
#if NVCLIP_WITH_TENSORRT
#include "trt_engine.h"
#endif

namespace py = pybind11;

namespace nvclip {

namespace {

// A device tensor shown to Python through __cuda_array_interface__ (version 3), so that
// torch.as_tensor(x, device="cuda"), cupy.asarray(x) or numba see the queue's buffer without a copy.
struct CudaArray {
  uintptr_t ptr = 0;
  std::vector<int64_t> shape;
  TensorDType dtype = TensorDType::kFloat32;
  bool readonly = false;
  uintptr_t stream = 0;  // the slot's stream: the data is ready in that stream's order
  int32_t device = 0;
};

const char* cuda_typestr(TensorDType dtype) {
  switch (dtype) {
    case TensorDType::kFloat32: return "<f4";
    case TensorDType::kFloat16: return "<f2";
    case TensorDType::kInt8: return "|i1";
    case TensorDType::kUInt8: return "|u1";
    case TensorDType::kInt32: return "<i4";
    case TensorDType::kInt64: return "<i8";
    case TensorDType::kBool: return "|b1";
    case TensorDType::kBFloat16: break;
  }
  throw EngineError("bfloat16 has no __cuda_array_interface__ type string");
}

py::dict cuda_array_interface(const CudaArray& a) {
  py::dict d;
  py::tuple shape(a.shape.size());
  for (size_t i = 0; i < a.shape.size(); ++i) shape[i] = a.shape[i];
  d["shape"] = shape;
  d["typestr"] = cuda_typestr(a.dtype);
  // Always False: PyTorch's consumer raises TypeError on a read-only interface ("the read only flag
  // is not supported"), and PyTorch is the main CUDA engine. `writeable` tells engines what to touch.
  d["data"] = py::make_tuple(a.ptr, false);
  d["version"] = 3;
  d["strides"] = py::none();  // C-contiguous
  // CAI v3: 0 is not allowed; our slot streams are created streams, never the legacy default.
  d["stream"] = a.stream != 0 ? py::object(py::int_(a.stream)) : py::object(py::none());
  return d;
}

// Calls the Python subclass's enqueue(batch, inputs, outputs, stream) with the GIL taken for that
// call only (the queue's slot threads run without it). Tensors are numpy views (CPU engines) or
// CudaArray objects (CUDA engines) of the slot's buffers, valid during the call only; inputs are
// read-only. A Python exception fails the batch as an EngineError carrying its type and message.
class PyEngine : public Engine, public py::trampoline_self_life_support {
 public:
  using Engine::Engine;

  void enqueue(const EngineCall& call) override {
    py::gil_scoped_acquire gil;
    py::function override = py::get_override(static_cast<const Engine*>(this), "enqueue");
    if (!override) throw EngineError("Python engine does not implement enqueue(batch, inputs, outputs, stream)");
    try {
      const EngineInfo& io = info();
      py::dict inputs;
      py::dict outputs;
      for (size_t i = 0; i < io.inputs.size(); ++i) {
        inputs[io.inputs[i].name.c_str()] = tensor(io.inputs[i], call.inputs[i], call, /*writeable=*/false);
      }
      for (size_t i = 0; i < io.outputs.size(); ++i) {
        outputs[io.outputs[i].name.c_str()] = tensor(io.outputs[i], call.outputs[i], call, /*writeable=*/true);
      }
      override(call.batch, inputs, outputs, reinterpret_cast<uintptr_t>(call.stream));
    } catch (py::error_already_set& e) {
      throw EngineError(std::string("Python engine enqueue() raised ") + e.what());
    }
  }

 private:
  py::object tensor(const TensorSpec& spec, const void* data, const EngineCall& call, bool writeable) const {
    std::vector<int64_t> shape = spec.shape;
    shape[0] = call.batch;
    if (info().device == DeviceKind::kCuda) {
      CudaArray a{reinterpret_cast<uintptr_t>(data), shape, spec.dtype, !writeable,
                  reinterpret_cast<uintptr_t>(call.stream), info().device_index};
      return py::cast(std::move(a));
    }
    // The memory belongs to the queue's slot: a capsule that frees nothing is the array's base.
    py::capsule unowned(data, [](void*) {});
    return numpy_view(spec.dtype, shape, data, unowned, writeable);
  }
};

// The Python object of an EngineRunner: close() detaches the engine before the object goes away.
class PyEngineRunner {
 public:
  explicit PyEngineRunner(std::shared_ptr<Engine> engine) : runner_(std::make_shared<EngineRunner>(std::move(engine))) {}

  py::dict run(const py::dict& arrays) {
    // A reference of our own: close() from another thread cannot free the runner under this call.
    const std::shared_ptr<EngineRunner> runner = runner_;
    if (!runner) throw EngineError("this EngineRunner is closed");
    const EngineInfo& io = runner->engine().info();
    std::vector<py::array> inputs;
    int64_t batch = -1;
    for (const TensorSpec& spec : io.inputs) {
      if (!arrays.contains(spec.name.c_str())) throw py::value_error("missing input '" + spec.name + "'");
      py::array a = py::array::ensure(arrays[spec.name.c_str()], py::array::c_style);
      if (!a || !a.dtype().equal(numpy_dtype(spec.dtype))) {
        throw py::type_error("input '" + spec.name + "': expected a " + dtype_name(spec.dtype) + " array");
      }
      const bool rank_ok = a.ndim() == static_cast<py::ssize_t>(spec.shape.size());
      if (!rank_ok || !std::equal(spec.shape.begin() + 1, spec.shape.end(), a.shape() + 1)) {
        throw py::value_error("input '" + spec.name + "': expected shape " + spec.to_string());
      }
      if (batch >= 0 && a.shape(0) != batch) throw py::value_error("inputs disagree on the batch size");
      batch = a.shape(0);
      inputs.push_back(std::move(a));
    }
    py::dict result;
    std::vector<const void*> in;
    std::vector<void*> out;
    for (const auto& a : inputs) in.push_back(a.data());
    for (const TensorSpec& spec : io.outputs) {
      std::vector<int64_t> shape = spec.shape;
      shape[0] = batch;
      py::array a(numpy_dtype(spec.dtype), std::vector<py::ssize_t>(shape.begin(), shape.end()));
      out.push_back(a.mutable_data());
      result[spec.name.c_str()] = a;
    }
    {
      py::gil_scoped_release release;  // a Python engine takes the GIL back for its own call
      runner->run(batch, in.data(), out.data());
    }
    return result;
  }

  void close() {
    std::shared_ptr<EngineRunner> runner = std::move(runner_);  // (a run in flight keeps its own)
    py::gil_scoped_release release;
    runner.reset();
  }

 private:
  std::shared_ptr<EngineRunner> runner_;  // read and reset with the GIL held
};

#if !NVCLIP_WITH_TENSORRT
// Without TensorRT headers at build time TrtEngine still exists, so that Encoder("x.plan") fails
// with the reason instead of an AttributeError.
class TrtEngine final : public Engine {
 public:
  [[noreturn]] TrtEngine() {
    throw EngineError("nvclip_fast was built without TensorRT support (no TensorRT headers at build time); "
                      "rebuild with -Ccmake.define.TensorRT_ROOT=/path/to/TensorRT to run .plan files");
  }
  void enqueue(const EngineCall&) override {}
};
#endif

}  // namespace

void bind_engine(py::module_& m) {
  py::class_<TensorSpec>(m, "TensorSpec", "An engine tensor: name, dtype, shape (shape[0] = -1: dynamic batch).")
      .def(py::init([](std::string name, const std::string& dtype, std::vector<int64_t> shape) {
             return TensorSpec{std::move(name), dtype_from_name(dtype), std::move(shape)};
           }),
           py::arg("name"), py::arg("dtype"), py::arg("shape"))
      .def_readonly("name", &TensorSpec::name)
      .def_property_readonly("dtype", [](const TensorSpec& s) { return dtype_name(s.dtype); })
      .def_readonly("shape", &TensorSpec::shape)
      .def_property_readonly("row_bytes", &TensorSpec::row_bytes)
      .def("__repr__", [](const TensorSpec& s) { return "TensorSpec(" + s.to_string() + ")"; });

  py::class_<EngineInfo>(m, "EngineInfo", "What an engine computes: device, input and output tensors, batch profile.")
      .def(py::init([](std::vector<TensorSpec> inputs, std::vector<TensorSpec> outputs,
                       std::tuple<int64_t, int64_t, int64_t> batch, const std::string& device, int32_t device_index) {
             EngineInfo info;
             info.inputs = std::move(inputs);
             info.outputs = std::move(outputs);
             info.batch = {std::get<0>(batch), std::get<1>(batch), std::get<2>(batch)};
             info.device = device_kind_from_name(device);
             info.device_index = device_index;
             info.validate();
             return info;
           }),
           py::arg("inputs"), py::arg("outputs"), py::arg("batch"), py::arg("device") = "cpu",
           py::arg("device_index") = 0)
      .def_readonly("inputs", &EngineInfo::inputs)
      .def_readonly("outputs", &EngineInfo::outputs)
      .def_property_readonly("batch", [](const EngineInfo& i) { return py::make_tuple(i.batch.min, i.batch.opt, i.batch.max); })
      .def_property_readonly("device", [](const EngineInfo& i) { return device_kind_name(i.device); })
      .def_readonly("device_index", &EngineInfo::device_index);

  py::class_<CudaArray>(m, "CudaArray", "A CUDA buffer of the queue, exposed via __cuda_array_interface__.")
      .def_property_readonly("__cuda_array_interface__", &cuda_array_interface)
      .def_readonly("ptr", &CudaArray::ptr)
      .def_property_readonly("shape", [](const CudaArray& a) { return py::tuple(py::cast(a.shape)); })
      .def_property_readonly("dtype", [](const CudaArray& a) { return dtype_name(a.dtype); })
      .def_property_readonly("writeable", [](const CudaArray& a) { return !a.readonly; })
      .def_readonly("stream", &CudaArray::stream)
      .def_readonly("device", &CudaArray::device);

  py::class_<Engine, PyEngine, py::smart_holder>(m, "Engine", R"doc(
Base class of engines. Subclass it in Python to plug an engine into BatchQueue:

    class MyEngine(Engine):
        def __init__(self):
            super().__init__(EngineInfo(inputs=[...], outputs=[...], batch=(1, 32, 64), device="cpu"))
        def enqueue(self, batch, inputs, outputs, stream):
            outputs["embeds"][:] = run(inputs["pixels"])   # dicts by tensor name, `batch` rows each

The queue calls enqueue once per batch from a slot thread, holding the GIL for that call only.
CPU engines get numpy views; CUDA engines get CudaArray objects (__cuda_array_interface__) and
`stream`, the slot's cudaStream_t as an int: order the work after it and leave it complete or
enqueued on it before returning. The views are valid during the call only.)doc")
      .def(py::init<EngineInfo>(), py::arg("info"))
      .def_property_readonly("info", &Engine::info, py::return_value_policy::reference_internal)
      .def("enqueue", [](Engine&, int64_t, py::dict, py::dict, uintptr_t) {
             throw EngineError("Engine.enqueue is implemented by subclasses (or by TrtEngine natively)");
           },
           py::arg("batch"), py::arg("inputs"), py::arg("outputs"), py::arg("stream"));

  m.def("cuda_stream_synchronize", [](uintptr_t stream) {
    py::gil_scoped_release release;
#if NVCLIP_WITH_CUDA
    NVCLIP_CUDA_CHECK(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)));
#else
    (void)stream;
    throw EngineError("this nvclip_fast was built without CUDA");
#endif
  }, py::arg("stream"), "Wait for a CUDA stream (a cudaStream_t as an int); EngineError on failure.");

  py::class_<PyEngineRunner>(m, "EngineRunner",
                             "Runs an engine synchronously on numpy arrays, outside any BatchQueue (the text tower).")
      .def(py::init<std::shared_ptr<Engine>>(), py::arg("engine"))
      .def("run", &PyEngineRunner::run, py::arg("inputs"),
           "{input name: array of `batch` rows} -> {output name: array}. batch in [1, profile max].")
      .def("close", &PyEngineRunner::close, "Release the engine (it may then serve a queue or another runner).");

  py::class_<TrtEngine, Engine, py::smart_holder> trt(m, "TrtEngine", "A TensorRT plan run natively (dlopen'ed libnvinfer).");
#if NVCLIP_WITH_TENSORRT
  trt.def(py::init([](const std::filesystem::path& path, int32_t device, const std::string& library,
                       const std::vector<std::string>& search_dirs) {
            py::gil_scoped_release release;  // reading + deserializing a plan takes seconds
            return std::make_shared<TrtEngine>(path.string(), TrtEngineOptions{{library, search_dirs}, device});
          }),
          py::arg("path"), py::arg("device") = 0, py::arg("library") = "",
          py::arg("search_dirs") = std::vector<std::string>{})
      .def_property_readonly("path", &TrtEngine::path)
      .def_property_readonly("library_path", &TrtEngine::library_path)
      .def_property_readonly("library_version", &TrtEngine::library_version)
      .def_property_readonly("context_memory_bytes", &TrtEngine::context_memory_bytes,
                             "Device memory each stream slot's execution context allocates (largest batch).")
      .def("warnings", &TrtEngine::warnings, "TensorRT's recent warnings (errors are raised instead).");
#else
  trt.def(py::init([](const std::filesystem::path&, int32_t, const std::string&, const std::vector<std::string>&) {
            return std::make_shared<TrtEngine>();
          }),
          py::arg("path"), py::arg("device") = 0, py::arg("library") = "",
          py::arg("search_dirs") = std::vector<std::string>{});
#endif
}

}  // namespace nvclip
