// LogCapture: one logger shared by every stream slot of an engine, each failing call getting only
// the errors logged by its own thread while its scope was open.
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

#include "log_capture.h"
#include "test_support.h"

using nvclip::LogCapture;

namespace {

// Lets two threads take turns: wait_for(n) blocks until the shared step reaches n; advance() moves it on.
class Turns {
 public:
  void wait_for(int step) {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return step_ == step; });
  }
  void advance() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++step_;
    }
    cv_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int step_ = 0;
};

}  // namespace

TEST_CASE("two_slots_failing_at_once_keep_their_own_errors") {
  // Slot A logs, then slot B, then A again, then B, all while both calls are in progress; each
  // then raises with its own messages only (a logger shared without scopes would hand "a1; b1;
  // a2" to whichever took the errors first).
  LogCapture log;
  Turns turns;
  std::string got_a, got_b;
  std::thread a([&] {
    LogCapture::Scope call(log);
    turns.wait_for(0);
    log.error("a1: setInputShape failed");
    turns.advance();
    turns.wait_for(2);
    log.error("a2: enqueueV3 failed");
    turns.advance();
    turns.wait_for(4);
    got_a = log.take_errors();
    turns.advance();
  });
  std::thread b([&] {
    LogCapture::Scope call(log);
    turns.wait_for(1);
    log.error("b1: out of memory");
    turns.advance();
    turns.wait_for(3);
    log.error("b2: enqueueV3 failed");
    turns.advance();
    turns.wait_for(5);
    got_b = log.take_errors();
  });
  a.join();
  b.join();
  CHECK_EQ(got_a, std::string("a1: setInputShape failed; a2: enqueueV3 failed"));
  CHECK_EQ(got_b, std::string("b1: out of memory; b2: enqueueV3 failed"));
  CHECK(log.warnings().empty());
}

TEST_CASE("errors_outside_a_scope_are_kept_as_warnings") {
  LogCapture log;
  log.error("from a library thread");
  log.error(nullptr);
  log.warning("slow tactic");
  CHECK(log.take_errors().empty());  // no scope open on this thread
  const auto warnings = log.warnings();
  CHECK_EQ(warnings.size(), size_t{3});
  CHECK_EQ(warnings[0], std::string("error: from a library thread"));
  CHECK_EQ(warnings[1], std::string("error: (null message)"));
  CHECK_EQ(warnings[2], std::string("slow tactic"));
}

TEST_CASE("scopes_nest_per_log") {
  LogCapture engine_a, engine_b;
  LogCapture::Scope outer(engine_a);
  engine_a.error("a before");
  {
    LogCapture::Scope inner(engine_b);  // a call into another engine from inside the first one's
    engine_b.error("b inside");
    engine_a.error("a inside");  // still engine_a's scope: the outer one
    CHECK_EQ(engine_b.take_errors(), std::string("b inside"));
  }
  engine_b.error("b after");  // its scope closed: kept as a warning
  CHECK_EQ(engine_a.take_errors(), std::string("a before; a inside"));
  CHECK_EQ(engine_b.warnings().size(), size_t{1});
  {
    LogCapture::Scope again(engine_a);  // an inner scope of the same log takes what is logged in it
    engine_a.error("inner");
    CHECK_EQ(engine_a.take_errors(), std::string("inner"));
  }
  engine_a.error("outer again");
  CHECK_EQ(engine_a.take_errors(), std::string("outer again"));
}
