// A small fixed pool of worker threads for data-parallel loops (the CPU twin of the preprocess
// kernel; the batch queue's CPU path).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace nvclip {

class ThreadPool {
 public:
  // `threads` counts the calling thread: ThreadPool(1) starts no worker and runs loops inline.
  // 0 means one per core the process may run on.
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn(i) for every i in [0, count) on the workers and the calling thread and returns when all
  // calls have returned. The first exception thrown by fn is rethrown here (the remaining indices
  // are skipped). Calls from several threads are serialized.
  void parallel_for(int64_t count, const std::function<void(int64_t)>& fn);

  // The number of cores this process may run on (its CPU affinity), at least 1.
  static int available_cores();

  // A pool of `threads` threads (0: one per core) shared by every caller asking for that size. Only
  // the most recently asked-for size is kept, so a process that varies the size holds one pool, not
  // one per size; a replaced pool lives on until its last user lets it go.
  static std::shared_ptr<ThreadPool> shared(int threads);

 private:
  void worker_loop();
  void run_indices();

  std::vector<std::thread> workers_;
  std::mutex call_mutex_;  // one parallel_for at a time
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  uint64_t generation_ = 0;
  bool stopping_ = false;
  int busy_workers_ = 0;
  // The current loop (valid while a parallel_for runs).
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t count_ = 0;
  int64_t next_ = 0;  // guarded by mutex_
  std::exception_ptr error_;
};

}  // namespace nvclip
