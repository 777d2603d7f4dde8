// The bookkeeping of the batch queue's staging ring: which byte ranges of one fixed buffer hold
// images that are still queued or in flight. Blocks are handed out in FIFO order and may be returned
// in any order (stream slots finish out of order); space is reclaimed from the oldest block on.
// Not thread-safe: the BatchQueue calls it under its own mutex.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <vector>

namespace nvclip {

struct StagingBlock {
  uint64_t id = 0;     // allocation sequence number
  size_t offset = 0;   // from the start of the ring; a multiple of kBufferAlignment
  size_t size = 0;     // the bytes asked for, rounded up to kBufferAlignment
};

class StagingRing {
 public:
  // `capacity` is rounded down to kBufferAlignment; throws std::invalid_argument when that is 0.
  explicit StagingRing(size_t capacity);

  // A contiguous block of align_up(bytes) bytes, or nullopt when there is no room now (the caller
  // waits for releases). Blocks never wrap around the end: when the tail end is too short the block
  // starts at offset 0 and the short tail stays unused until the ring drains past it.
  std::optional<StagingBlock> allocate(size_t bytes);

  // Returns a block; any order. Throws std::logic_error for a block that is not live (a bug).
  void release(const StagingBlock& block);

  // Whether a block of `bytes` could ever be allocated (fits when the ring is empty).
  bool fits(size_t bytes) const;
  size_t capacity() const { return capacity_; }
  size_t live_bytes() const { return live_bytes_; }  // bytes of blocks not yet released
  bool empty() const { return entries_.empty(); }

 private:
  struct Entry {
    size_t offset;
    size_t size;
    bool released;
  };
  size_t capacity_;
  std::deque<Entry> entries_;  // allocation order; entries_[i] has id front_id_ + i
  uint64_t front_id_ = 0;
  size_t live_bytes_ = 0;
};

// How to copy a batch's staged images to a device buffer with few cudaMemcpyAsync calls: images
// that sit back to back in host memory (the common case: consecutive ring blocks) form one span.
struct StagedBlockRef {
  const uint8_t* host = nullptr;  // start of the item's block (aligned)
  size_t size = 0;                // block size (aligned), >= the image bytes
};

struct CopySpan {
  const uint8_t* host = nullptr;
  size_t device_offset = 0;
  size_t bytes = 0;
};

struct CopyPlan {
  std::vector<CopySpan> spans;
  std::vector<size_t> item_offsets;  // device offset of each item, in input order
  size_t total_bytes = 0;            // device bytes the plan needs
};

CopyPlan plan_staging_copies(const StagedBlockRef* items, size_t n);

}  // namespace nvclip
