// Coefficient tables per axis, keyed and cached: they depend only on the sizes (and filter), so a
// batch of same-size photos computes them once. Host only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "resample.h"
#include "resize_plan.h"

namespace nvclip {

// What an axis table depends on. Axes that are not resampled use the identity table (filter -1).
struct AxisKey {
  int32_t in_size = 0;
  int32_t resized = 0;
  int32_t first = 0;
  int32_t count = 0;
  int32_t filter = 0;   // Interpolation, or kIdentityFilter
  int32_t variant = 0;  // what the user of the cache derives from it (e.g. the CPU twin's layout)

  static constexpr int32_t kIdentityFilter = -1;

  bool operator==(const AxisKey& o) const {
    return in_size == o.in_size && resized == o.resized && first == o.first && count == o.count &&
           filter == o.filter && variant == o.variant;
  }
};

struct AxisKeyHash {
  size_t operator()(const AxisKey& k) const {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the six fields
    for (int32_t v : {k.in_size, k.resized, k.first, k.count, k.filter, k.variant}) {
      h = (h ^ static_cast<uint32_t>(v)) * 1099511628211ull;
    }
    return static_cast<size_t>(h);
  }
};

inline AxisKey axis_key(const AxisPlan& a, Interpolation interpolation, int32_t variant = 0) {
  return AxisKey{a.in_size, a.resized, a.first, a.count,
                 a.resample() ? static_cast<int32_t>(interpolation) : AxisKey::kIdentityFilter, variant};
}

// The taps of the axis's surviving outputs: Pillow's coefficients, or the identity when the size
// already matches (torchvision returns such an image untouched; Pillow skips that pass).
inline AxisCoeffs axis_coeffs(const AxisPlan& a, Interpolation interpolation) {
  return a.resample() ? compute_axis_coeffs(a.in_size, a.resized, interpolation, a.first, a.count)
                      : identity_axis_coeffs(a.in_size, a.first, a.count);
}

// A bounded, thread-safe map from AxisKey to an immutable value; when full it starts over (values
// in use stay alive through their shared_ptr).
template <typename Value>
class AxisCache {
 public:
  explicit AxisCache(size_t capacity) : capacity_(capacity) {}

  std::shared_ptr<const Value> get(const AxisKey& key, const std::function<Value()>& make) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = map_.find(key);
      if (it != map_.end()) return it->second;
    }
    auto value = std::make_shared<const Value>(make());  // computed outside the lock
    std::lock_guard<std::mutex> lock(mutex_);
    if (map_.size() >= capacity_) map_.clear();
    return map_.emplace(key, std::move(value)).first->second;
  }

 private:
  size_t capacity_;
  std::mutex mutex_;
  std::unordered_map<AxisKey, std::shared_ptr<const Value>, AxisKeyHash> map_;
};

}  // namespace nvclip
