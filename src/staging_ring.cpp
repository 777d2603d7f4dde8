#include "staging_ring.h"

#include <stdexcept>
#include <string>

#include "host_memory.h"

namespace nvclip {

StagingRing::StagingRing(size_t capacity) : capacity_(capacity / kBufferAlignment * kBufferAlignment) {
  if (capacity_ == 0) {
    throw std::invalid_argument("staging ring capacity must be at least " +
                                std::to_string(kBufferAlignment) + " bytes, got " +
                                std::to_string(capacity));
  }
}

bool StagingRing::fits(size_t bytes) const {
  return align_up(bytes == 0 ? 1 : bytes, kBufferAlignment) <= capacity_;
}

std::optional<StagingBlock> StagingRing::allocate(size_t bytes) {
  const size_t size = align_up(bytes == 0 ? 1 : bytes, kBufferAlignment);
  if (size > capacity_) return std::nullopt;
  size_t offset = 0;
  if (!entries_.empty()) {
    const size_t tail = entries_.front().offset;                   // oldest live byte
    const size_t head = entries_.back().offset + entries_.back().size;  // one past the newest
    // Wrapped: the newest block lies before the oldest, so the free space is [head, tail).
    const bool wrapped = entries_.back().offset < tail;
    if (wrapped) {
      if (head + size > tail) return std::nullopt;
      offset = head;
    } else if (head + size <= capacity_) {
      offset = head;
    } else if (size <= tail) {
      offset = 0;  // wrap: [head, capacity) stays unused until the ring drains past it
    } else {
      return std::nullopt;
    }
  }
  entries_.push_back({offset, size, false});
  live_bytes_ += size;
  return StagingBlock{front_id_ + entries_.size() - 1, offset, size};
}

void StagingRing::release(const StagingBlock& block) {
  if (block.id < front_id_ || block.id - front_id_ >= entries_.size()) {
    throw std::logic_error("StagingRing::release: block " + std::to_string(block.id) + " is not live");
  }
  Entry& entry = entries_[block.id - front_id_];
  if (entry.released || entry.offset != block.offset || entry.size != block.size) {
    throw std::logic_error("StagingRing::release: block " + std::to_string(block.id) +
                           " was already released or does not match");
  }
  entry.released = true;
  live_bytes_ -= entry.size;
  while (!entries_.empty() && entries_.front().released) {
    entries_.pop_front();
    ++front_id_;
  }
}

CopyPlan plan_staging_copies(const StagedBlockRef* items, size_t n) {
  CopyPlan plan;
  plan.item_offsets.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const StagedBlockRef& item = items[i];
    if (!plan.spans.empty()) {
      CopySpan& last = plan.spans.back();
      if (last.host + last.bytes == item.host) {  // back to back in host memory: extend the span
        plan.item_offsets[i] = last.device_offset + last.bytes;
        last.bytes += item.size;
        plan.total_bytes += item.size;
        continue;
      }
    }
    const size_t device_offset = align_up(plan.total_bytes, kBufferAlignment);
    plan.spans.push_back({item.host, device_offset, item.size});
    plan.item_offsets[i] = device_offset;
    plan.total_bytes = device_offset + item.size;
  }
  return plan;
}

}  // namespace nvclip
