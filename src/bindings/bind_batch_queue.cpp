// BatchQueue for Python: PreprocessStage, Request and the queue.
// Blocking native work (staging copies, backpressure, waits, close) runs with the GIL released;
// completion callbacks run on the queue's completion thread, a whole group under one GIL hold.
#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cmath>
#include <memory>
#include <optional>

#include "batch_queue.h"
#include "bind_util.h"
#include "bindings.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace nvclip {

namespace {

// The Python object of a queue. Its destructor runs with the GIL held (object deallocation) while
// the queue's threads may need the GIL (a Python engine, callbacks): release it around teardown.
class PyBatchQueue {
 public:
  PyBatchQueue(std::vector<Replica> replicas, BatchQueueOptions options) {
    options.completion_scope = [](const std::function<void()>& run_group) {
      py::gil_scoped_acquire gil;
      run_group();
    };
    py::gil_scoped_release release;  // TensorRT creates execution contexts, CUDA allocates
    queue_ = std::make_unique<BatchQueue>(std::move(replicas), std::move(options));
  }

  ~PyBatchQueue() {
    std::optional<py::gil_scoped_release> release;
    if (PyGILState_Check()) release.emplace();
    queue_.reset();
  }

  BatchQueue& queue() { return *queue_; }

  std::shared_ptr<Request> submit(const py::sequence& images, const std::optional<py::function>& callback) {
    const NumpyImages arrays = numpy_images(images);  // kept alive while copied without the GIL
    Request::Callback cb;
    if (callback) {
      // The Python callable is released under the GIL wherever the last copy of `cb` dies.
      std::shared_ptr<py::function> fn(new py::function(*callback), [](py::function* f) {
        py::gil_scoped_acquire gil;
        delete f;
      });
      cb = [fn](const std::shared_ptr<Request>& request) {
        // Runs inside the completion scope, with the GIL held.
        try {
          (*fn)(request);
        } catch (py::error_already_set& e) {
          e.discard_as_unraisable("nvclip_fast BatchQueue completion callback");
        }
      };
    }
    py::gil_scoped_release release;
    return queue_->submit(arrays.views.data(), static_cast<int64_t>(arrays.views.size()), std::move(cb));
  }

  void close(bool cancel) {
    py::gil_scoped_release release;
    queue_->close(cancel ? CloseMode::kCancel : CloseMode::kDrain);
  }

 private:
  std::unique_ptr<BatchQueue> queue_;
};

py::array request_rows(const std::shared_ptr<Request>& r) {
  std::vector<int64_t> shape = r->output().shape;
  shape[0] = r->size();
  // The request owns the rows; the array keeps the request alive.
  return numpy_view(r->output().dtype, shape, r->rows(), py::cast(r), /*writeable=*/true);
}

bool request_wait(const Request& r, std::optional<double> timeout) {
  py::gil_scoped_release release;
  if (!timeout) {
    r.wait();
    return true;
  }
  if (!std::isfinite(*timeout) || *timeout < 0) throw py::value_error("timeout must be a finite number >= 0");
  return r.wait_for(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::duration<double>(*timeout)));
}

}  // namespace

void bind_batch_queue(py::module_& m) {
  py::class_<PreprocessStage, py::smart_holder>(m, "PreprocessStage",
                                                "The queue's preprocessing step: uint8 images -> the engine's input tensor.")
      .def_property_readonly("name", &PreprocessStage::name)
      .def_property_readonly("size", &PreprocessStage::size)
      .def_property_readonly("device", [](const PreprocessStage& s) { return device_kind_name(s.device()); });

  py::class_<Request, py::smart_holder>(m, "Request", "The rows of one submit() call, resolved by the queue.")
      .def_property_readonly("id", &Request::id)
      .def("__len__", &Request::size)
      .def("done", &Request::done)
      .def("wait", &request_wait, py::arg("timeout") = py::none(),
           "Wait (without the GIL) until resolved; False on timeout.")
      .def_property_readonly("status", [](const Request& r) { return request_status_name(r.status()); })
      .def_property_readonly("error", [](const Request& r) { return r.error(); })
      .def_property_readonly("item_errors", [](const Request& r) { return r.item_errors(); })
      .def_property_readonly("failed_items", &Request::failed_items)
      .def("rows", &request_rows,
           "The (n, *row_shape) output rows once done (failed items NaN), whatever the status; EngineError "
           "while pending.")
      .def("result",
           [](const std::shared_ptr<Request>& r, std::optional<double> timeout) {
             if (!request_wait(*r, timeout)) {
               PyErr_SetString(PyExc_TimeoutError, "the request was not resolved within the timeout");
               throw py::error_already_set();
             }
             if (r->status() != RequestStatus::kOk) throw EngineError(r->error());
             return request_rows(r);
           },
           py::arg("timeout") = py::none(),
           "Wait, then the rows; raises EngineError when the request failed or was cancelled, TimeoutError on timeout.");

  // The queue's keyword options, shared by both constructors.
  const auto make_queue = [](std::vector<Replica> replicas, int64_t max_batch, double max_delay_ms, int32_t streams,
                             size_t staging_bytes, std::string output) {
    if (!std::isfinite(max_delay_ms) || max_delay_ms < 0) {
      throw py::value_error("max_delay_ms must be a finite number >= 0, got " + std::to_string(max_delay_ms));
    }
    BatchQueueOptions options;
    options.max_batch = max_batch;
    options.max_delay =
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::duration<double, std::milli>(max_delay_ms));
    options.streams = streams;
    options.staging_bytes = staging_bytes;
    options.output = std::move(output);
    return std::make_unique<PyBatchQueue>(std::move(replicas), std::move(options));
  };
  const double default_delay_ms = std::chrono::duration<double, std::milli>(kDefaultMaxDelay).count();

  py::class_<PyBatchQueue>(m, "BatchQueue",
                           "Dynamic batching of many callers' images onto one engine, or onto several replicas "
                           "(engine + stage, one per device) that share the queue.")
      .def(py::init([make_queue](std::shared_ptr<Engine> engine, std::shared_ptr<PreprocessStage> stage,
                                 int64_t max_batch, double max_delay_ms, int32_t streams, size_t staging_bytes,
                                 std::string output) {
             return make_queue({{std::move(engine), std::move(stage)}}, max_batch, max_delay_ms, streams,
                               staging_bytes, std::move(output));
           }),
           py::arg("engine"), py::arg("stage"), py::kw_only(), py::arg("max_batch") = 0,
           py::arg("max_delay_ms") = default_delay_ms, py::arg("streams") = kDefaultStreams,
           py::arg("staging_bytes") = 0, py::arg("output") = "")
      .def(py::init([make_queue](const std::vector<std::pair<std::shared_ptr<Engine>, std::shared_ptr<PreprocessStage>>>&
                                     pairs,
                                 int64_t max_batch, double max_delay_ms, int32_t streams, size_t staging_bytes,
                                 std::string output) {
             std::vector<Replica> replicas;
             for (const auto& [engine, stage] : pairs) replicas.push_back({engine, stage});
             return make_queue(std::move(replicas), max_batch, max_delay_ms, streams, staging_bytes,
                               std::move(output));
           }),
           py::arg("replicas"), py::kw_only(), py::arg("max_batch") = 0, py::arg("max_delay_ms") = default_delay_ms,
           py::arg("streams") = kDefaultStreams, py::arg("staging_bytes") = 0, py::arg("output") = "",
           "replicas: [(engine, stage), ...], one per device, running the same model; each gets `streams` slots "
           "and a batch goes to the first free slot of any of them.")
      .def("submit", &PyBatchQueue::submit, py::arg("images"), py::arg("callback") = py::none(),
           "Queue uint8 images (HWC RGB / HW gray numpy arrays); returns a Request at once (blocks, without "
           "the GIL, while the staging ring is full). callback(request) runs on the completion thread.")
      .def("close", &PyBatchQueue::close, py::arg("cancel") = false,
           "Finish (or, cancel=True, cancel) queued work and stop the threads; never leaves a request unresolved.")
      .def_property_readonly("closed", [](PyBatchQueue& q) { return q.queue().closed(); })
      .def_property_readonly("device", [](PyBatchQueue& q) { return device_kind_name(q.queue().device()); })
      .def_property_readonly("devices",
                             [](PyBatchQueue& q) {
                               std::vector<std::string> names;
                               for (size_t r = 0; r < q.queue().replicas(); ++r) {
                                 names.push_back(q.queue().engine(r).info().device_name());
                               }
                               return names;
                             },
                             "Each replica's device (\"cpu\", \"cuda:N\"), in the queue's order.")
      .def_property_readonly("max_batch", [](PyBatchQueue& q) { return q.queue().max_batch(); })
      .def_property_readonly("streams", [](PyBatchQueue& q) { return q.queue().streams(); })
      .def_property_readonly("max_delay_ms", [](PyBatchQueue& q) {
        return std::chrono::duration<double, std::milli>(q.queue().max_delay()).count();
      })
      .def_property_readonly("staging_bytes", [](PyBatchQueue& q) { return q.queue().staging_bytes(); })
      .def_property_readonly("input", [](PyBatchQueue& q) { return q.queue().input(); })
      .def_property_readonly("output", [](PyBatchQueue& q) { return q.queue().output(); })
      .def("stats", [](PyBatchQueue& q) {
        const BatchQueueStats s = q.queue().stats();
        py::list replicas;
        for (const ReplicaStats& r : s.replicas) {
          replicas.append(py::dict("device"_a = r.device, "batches"_a = r.batches,
                                   "failed_batches"_a = r.failed_batches, "images"_a = r.images));
        }
        return py::dict("batches"_a = s.batches, "failed_batches"_a = s.failed_batches, "images"_a = s.images,
                        "cancelled_images"_a = s.cancelled_images, "requests"_a = s.requests,
                        "largest_batch"_a = s.largest_batch, "oversized_images"_a = s.oversized_images,
                        "callback_failures"_a = s.callback_failures, "batch_sizes"_a = s.batch_sizes,
                        "queued_images"_a = s.queued_images, "replicas"_a = replicas);
      })
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyBatchQueue& q, const py::args&) { q.close(false); });

  // Queues still open at interpreter exit are cancelled while their threads can still take the GIL.
  m.def(
      "_close_all_queues",
      [] {
        py::gil_scoped_release release;
        BatchQueue::close_all(CloseMode::kCancel);
      },
      "Cancel and close every open BatchQueue (atexit hook).");
  py::module_::import("atexit").attr("register")(m.attr("_close_all_queues"));
}

}  // namespace nvclip
