// A minimal test harness (no external framework): TEST(name) registers a function, CHECK* throw on
// failure with the file, line and values, SKIP(reason) skips. main() runs every test, or those
// whose names contain argv[1], and exits 1 if any failed, 77 (ctest's SKIP_RETURN_CODE) if all
// were skipped.
#pragma once

#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace nvtest {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct Skipped : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct TestCase {
  const char* name;
  std::function<void()> fn;
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

struct Registrar {
  Registrar(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

template <typename A, typename B>
[[noreturn]] void fail_eq(const char* file, int line, const char* a_expr, const char* b_expr, const A& a, const B& b) {
  std::ostringstream out;
  out << file << ":" << line << ": CHECK_EQ(" << a_expr << ", " << b_expr << ") failed: " << a << " != " << b;
  throw Failure(out.str());
}

inline int run_all(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : nullptr;
  int passed = 0, failed = 0, skipped = 0;
  for (const auto& test : registry()) {
    if (filter != nullptr && std::strstr(test.name, filter) == nullptr) continue;
    const auto start = std::chrono::steady_clock::now();
    std::string outcome = "PASS", detail;
    try {
      test.fn();
      ++passed;
    } catch (const Skipped& e) {
      outcome = "SKIP";
      detail = e.what();
      ++skipped;
    } catch (const std::exception& e) {
      outcome = "FAIL";
      detail = e.what();
      ++failed;
    }
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    std::printf("[%s] %s (%.1f ms)%s%s\n", outcome.c_str(), test.name, ms, detail.empty() ? "" : ": ", detail.c_str());
    std::fflush(stdout);
  }
  std::printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
  if (failed > 0) return 1;
  if (passed == 0 && skipped > 0) return 77;
  return 0;
}

}  // namespace nvtest

#define NVTEST_CAT2(a, b) a##b
#define NVTEST_CAT(a, b) NVTEST_CAT2(a, b)
#define TEST(name)                                                          \
  static void name();                                                       \
  static const ::nvtest::Registrar NVTEST_CAT(registrar_, name)(#name, name); \
  static void name()

#define CHECK(cond)                                                                                       \
  do {                                                                                                    \
    if (!(cond)) throw ::nvtest::Failure(std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": CHECK(" #cond ") failed"); \
  } while (0)

#define CHECK_MSG(cond, msg)                                                                              \
  do {                                                                                                    \
    if (!(cond)) {                                                                                        \
      std::ostringstream nvtest_out;                                                                      \
      nvtest_out << __FILE__ << ":" << __LINE__ << ": CHECK(" #cond ") failed: " << msg;                 \
      throw ::nvtest::Failure(nvtest_out.str());                                                          \
    }                                                                                                     \
  } while (0)

#define CHECK_EQ(a, b)                                                          \
  do {                                                                          \
    const auto& nvtest_a = (a);                                                 \
    const auto& nvtest_b = (b);                                                 \
    if (!(nvtest_a == nvtest_b)) ::nvtest::fail_eq(__FILE__, __LINE__, #a, #b, nvtest_a, nvtest_b); \
  } while (0)

// Checks that `expr` throws `type` whose what() contains `substring`.
#define CHECK_THROWS(expr, type, substring)                                                                   \
  do {                                                                                                        \
    bool nvtest_thrown = false;                                                                               \
    try {                                                                                                     \
      (void)(expr);                                                                                           \
    } catch (const type& e) {                                                                                 \
      nvtest_thrown = true;                                                                                   \
      CHECK_MSG(std::string(e.what()).find(substring) != std::string::npos,                                   \
                "message '" << e.what() << "' lacks '" << (substring) << "'");                               \
    }                                                                                                         \
    CHECK_MSG(nvtest_thrown, #expr " did not throw " #type);                                                  \
  } while (0)

#define SKIP(reason) throw ::nvtest::Skipped(reason)

#define NVTEST_MAIN() \
  int main(int argc, char** argv) { return ::nvtest::run_all(argc, argv); }
