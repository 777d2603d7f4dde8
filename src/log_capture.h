// LogCapture: what a library reports through one shared logger (TensorRT's ILogger: one per
// runtime, shared by every execution context), routed to the call that caused it. While a Scope is
// open on a thread, the errors logged on that thread go to that scope alone, so that two stream
// slots failing at once each raise their own message. Errors logged where no scope is open (a
// library's own thread) are kept with the warnings. Needs no TensorRT header.
#pragma once

#include <cstddef>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

namespace nvclip {

class LogCapture {
 public:
  static constexpr size_t kMaxWarnings = 64;

  // Captures this thread's errors for `log` until destroyed. Scopes nest (an inner one, of this log
  // or another, takes its log's errors until it closes). Not movable: it lives on the stack of the
  // call it serves.
  class Scope {
   public:
    explicit Scope(LogCapture& log);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    friend class LogCapture;
    LogCapture* log_;
    Scope* outer_;  // the scope open on this thread before this one
    std::vector<std::string> errors_;
  };

  // Thread-safe; never throws (an out-of-memory while recording drops the message).
  void error(const char* msg) noexcept;
  void warning(const char* msg) noexcept;

  // The errors the innermost scope of this log on this thread captured since it opened (or since
  // the last take), joined with "; "; "" when none or no scope is open.
  std::string take_errors();
  // The last kMaxWarnings warnings (and errors logged outside any scope, prefixed "error: ").
  std::vector<std::string> warnings() const;

 private:
  Scope* scope_on_this_thread();
  void keep_warning(std::string msg);

  mutable std::mutex mutex_;
  std::deque<std::string> warnings_;
};

}  // namespace nvclip
