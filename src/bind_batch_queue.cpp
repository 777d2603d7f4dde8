// BatchQueue for Python: PreprocessStage (+ the NearestResizeStage stand-in), Request and the queue.
// Blocking native work (staging copies, backpressure, waits, close) runs with the GIL released;
// completion callbacks run on the queue's completion thread, a whole group under one GIL hold.
#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cmath>
#include <memory>
#include <mutex>
#include <set>

#include "batch_queue.h"
#include "bind_util.h"
#include "bindings.h"
#include "nearest_resize_stage.h"

namespace py = pybind11;

namespace nvclip {

namespace {

// The Python object of a queue. Its destructor runs with the GIL held (object deallocation) while
// the queue's threads may need the GIL (a Python engine, callbacks): release it around teardown.
class PyBatchQueue;
std::mutex g_live_mutex;
std::set<PyBatchQueue*> g_live_queues;  // closed by an atexit hook, before the interpreter goes away

class PyBatchQueue {
 public:
  PyBatchQueue(std::shared_ptr<Engine> engine, std::shared_ptr<PreprocessStage> stage, BatchQueueOptions options) {
    options.completion_scope = [](const std::function<void()>& run_group) {
      py::gil_scoped_acquire gil;
      run_group();
    };
    // g_live_mutex is only ever taken without the GIL: close_all_queues holds it while queue threads
    // may need the GIL.
    py::gil_scoped_release release;  // TensorRT creates execution contexts, CUDA allocates
    queue_ = std::make_unique<BatchQueue>(std::move(engine), std::move(stage), std::move(options));
    std::lock_guard<std::mutex> lock(g_live_mutex);
    g_live_queues.insert(this);
  }

  ~PyBatchQueue() {
    const auto teardown = [this] {
      {
        std::lock_guard<std::mutex> lock(g_live_mutex);
        g_live_queues.erase(this);
      }
      queue_.reset();
    };
    if (PyGILState_Check()) {
      py::gil_scoped_release release;
      teardown();
    } else {
      teardown();
    }
  }

  BatchQueue& queue() { return *queue_; }

  std::shared_ptr<Request> submit(const py::sequence& images, const std::optional<py::function>& callback) {
    const auto n = static_cast<size_t>(py::len(images));
    std::vector<py::array> keep;  // the arrays stay alive while their pixels are copied without the GIL
    std::vector<ImageView> views(n);
    keep.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      keep.push_back(as_image(images[i], i));
      const py::array& a = keep.back();
      ImageView& v = views[i];
      v.data = static_cast<const uint8_t*>(a.data());
      v.height = static_cast<int32_t>(a.shape(0));
      v.width = static_cast<int32_t>(a.shape(1));
      v.channels = a.ndim() == 3 ? static_cast<int32_t>(a.shape(2)) : 1;
      v.row_stride = a.strides(0);
    }
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
    return queue_->submit(views.data(), static_cast<int64_t>(n), std::move(cb));
  }

  void close(bool cancel) {
    py::gil_scoped_release release;
    queue_->close(cancel ? CloseMode::kCancel : CloseMode::kDrain);
  }

 private:
  // uint8 HW (gray) or HWC (C = 1 or 3) with contiguous pixels within a row; other layouts (a
  // transposed or reversed view) are made contiguous here, everything else is a TypeError/ValueError.
  static py::array as_image(py::handle h, size_t i) {
    const std::string where = "images[" + std::to_string(i) + "]";
    if (!py::isinstance<py::array>(h)) {
      throw py::type_error(where + ": expected a numpy uint8 array (HWC RGB or HW gray), got " +
                           std::string(py::str(py::type::handle_of(h).attr("__name__"))));
    }
    auto a = py::reinterpret_borrow<py::array>(h);
    if (!a.dtype().is(py::dtype::of<uint8_t>())) {
      throw py::type_error(where + ": expected dtype uint8, got " + std::string(py::str(a.dtype())));
    }
    if (a.ndim() != 2 && a.ndim() != 3) {
      throw py::value_error(where + ": expected shape (H, W) or (H, W, C), got " + std::to_string(a.ndim()) +
                            " dimensions");
    }
    const py::ssize_t channels = a.ndim() == 3 ? a.shape(2) : 1;
    if (channels != 1 && channels != 3) {
      throw py::value_error(where + ": expected 1 (gray) or 3 (RGB) channels, got " + std::to_string(channels));
    }
    if (a.shape(0) <= 0 || a.shape(1) <= 0 || a.shape(0) > INT32_MAX || a.shape(1) > INT32_MAX) {
      throw py::value_error(where + ": height and width must be in [1, 2^31), got " + std::to_string(a.shape(0)) +
                            "x" + std::to_string(a.shape(1)));
    }
    const bool rows_contiguous = (a.ndim() == 2 ? a.strides(1) == 1 : a.strides(2) == 1 && a.strides(1) == channels) &&
                                 a.strides(0) >= a.shape(1) * channels;
    if (!rows_contiguous) {
      return py::reinterpret_steal<py::array>(
          py::module_::import("numpy").attr("ascontiguousarray")(a).release());
    }
    return a;
  }

  std::unique_ptr<BatchQueue> queue_;
};

void close_all_queues() {
  py::gil_scoped_release release;
  // Held throughout, so no queue is destroyed while it is being closed here.
  std::lock_guard<std::mutex> lock(g_live_mutex);
  for (PyBatchQueue* q : g_live_queues) q->queue().close(CloseMode::kCancel);
}

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

  py::class_<NearestResizeStage, PreprocessStage, py::smart_holder>(
      m, "NearestResizeStage",
      "Test stand-in stage: nearest-neighbour squash to size x size, x / 255, gray -> 3 channels. Not open_clip's "
      "transform. An image whose first byte equals fail_marker fails as an item (-1: never).")
      .def(py::init([](int32_t size, const std::string& device, int32_t fail_marker) {
             return std::make_shared<NearestResizeStage>(size, device_kind_from_name(device), fail_marker);
           }),
           py::arg("size"), py::arg("device") = "cpu", py::arg("fail_marker") = kNoFailMarker);

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

  py::class_<PyBatchQueue>(m, "BatchQueue", "Dynamic batching of many callers' images onto one engine.")
      .def(py::init([](std::shared_ptr<Engine> engine, std::shared_ptr<PreprocessStage> stage, int64_t max_batch,
                       double max_delay_ms, int32_t streams, size_t staging_bytes, std::string output) {
             if (!std::isfinite(max_delay_ms) || max_delay_ms < 0) {
               throw py::value_error("max_delay_ms must be a finite number >= 0, got " + std::to_string(max_delay_ms));
             }
             BatchQueueOptions options;
             options.max_batch = max_batch;
             options.max_delay = std::chrono::duration_cast<std::chrono::microseconds>(
                 std::chrono::duration<double, std::milli>(max_delay_ms));
             options.streams = streams;
             options.staging_bytes = staging_bytes;
             options.output = std::move(output);
             return std::make_unique<PyBatchQueue>(std::move(engine), std::move(stage), std::move(options));
           }),
           py::arg("engine"), py::arg("stage"), py::kw_only(), py::arg("max_batch") = 0,
           py::arg("max_delay_ms") = std::chrono::duration<double, std::milli>(kDefaultMaxDelay).count(),
           py::arg("streams") = kDefaultStreams, py::arg("staging_bytes") = kDefaultStagingBytes,
           py::arg("output") = "")
      .def("submit", &PyBatchQueue::submit, py::arg("images"), py::arg("callback") = py::none(),
           "Queue uint8 images (HWC RGB / HW gray numpy arrays); returns a Request at once (blocks, without "
           "the GIL, while the staging ring is full). callback(request) runs on the completion thread.")
      .def("close", &PyBatchQueue::close, py::arg("cancel") = false,
           "Finish (or, cancel=True, cancel) queued work and stop the threads; never leaves a request unresolved.")
      .def_property_readonly("closed", [](PyBatchQueue& q) { return q.queue().closed(); })
      .def_property_readonly("device", [](PyBatchQueue& q) { return device_kind_name(q.queue().device()); })
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
        py::dict d;
        d["batches"] = s.batches;
        d["failed_batches"] = s.failed_batches;
        d["images"] = s.images;
        d["cancelled_images"] = s.cancelled_images;
        d["requests"] = s.requests;
        d["largest_batch"] = s.largest_batch;
        d["oversized_images"] = s.oversized_images;
        d["callback_failures"] = s.callback_failures;
        return d;
      })
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyBatchQueue& q, const py::args&) { q.close(false); });

  // Queues still open at interpreter exit are cancelled while their threads can still take the GIL.
  m.def("_close_all_queues", &close_all_queues, "Cancel and close every open BatchQueue (atexit hook).");
  py::module_::import("atexit").attr("register")(m.attr("_close_all_queues"));
}

}  // namespace nvclip
