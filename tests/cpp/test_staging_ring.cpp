// StagingRing (the batch queue's ring bookkeeping) and the H2D copy planner.
#include <stdexcept>

#include "host_memory.h"
#include "staging_ring.h"
#include "test_support.h"

using nvclip::kBufferAlignment;
using nvclip::StagingBlock;
using nvclip::StagingRing;

constexpr size_t A = kBufferAlignment;

TEST_CASE("capacity_rounds_down_and_must_hold_one_block") {
  CHECK_EQ(StagingRing(10 * A + 7).capacity(), 10 * A);
  CHECK_THROWS_CONTAINING(StagingRing(A - 1), std::invalid_argument, "at least");
}

TEST_CASE("blocks_are_aligned_and_fifo") {
  StagingRing ring(4 * A);
  const auto a = ring.allocate(1);
  const auto b = ring.allocate(A + 1);
  CHECK((a && b));
  CHECK_EQ(a->offset, size_t{0});
  CHECK_EQ(a->size, A);
  CHECK_EQ(b->offset, A);
  CHECK_EQ(b->size, 2 * A);
  CHECK_EQ(ring.live_bytes(), 3 * A);
  CHECK(!ring.allocate(2 * A));  // only A left
  const auto c = ring.allocate(A);
  CHECK((c && c->offset == 3 * A));
  CHECK(!ring.allocate(1));  // full
}

TEST_CASE("zero_bytes_takes_one_unit") {
  StagingRing ring(2 * A);
  const auto a = ring.allocate(0);
  CHECK((a && a->size == A));
}

TEST_CASE("out_of_order_release_frees_only_from_the_oldest") {
  StagingRing ring(3 * A);
  const auto a = ring.allocate(A), b = ring.allocate(A), c = ring.allocate(A);
  CHECK((a && b && c));
  ring.release(*b);  // the middle: no contiguous room yet
  CHECK_EQ(ring.live_bytes(), 2 * A);
  CHECK(!ring.allocate(A));
  ring.release(*a);  // now a and b are reclaimed: the ring wraps to offset 0
  const auto d = ring.allocate(2 * A);
  CHECK(d);
  CHECK_EQ(d->offset, size_t{0});
  CHECK(!ring.allocate(1));
  ring.release(*c);
  ring.release(*d);
  CHECK(ring.empty());
  CHECK_EQ(ring.live_bytes(), size_t{0});
}

TEST_CASE("wrap_leaves_the_short_tail_unused") {
  StagingRing ring(5 * A);
  const auto a = ring.allocate(2 * A), b = ring.allocate(2 * A);
  CHECK((a && b));
  ring.release(*a);                  // free: [0, 2A) and the tail [4A, 5A)
  const auto c = ring.allocate(2 * A);  // does not fit the tail: wraps to 0
  CHECK((c && c->offset == 0));
  CHECK(!ring.allocate(1));          // wrapped: the free space is [2A, 2A) = none (b still live)
  ring.release(*b);
  const auto d = ring.allocate(3 * A);  // free now [2A, 5A)
  CHECK((d && d->offset == 2 * A));
  ring.release(*c);
  ring.release(*d);
  CHECK(ring.empty());
  const auto e = ring.allocate(5 * A);  // an empty ring starts over at 0 and holds a full block
  CHECK((e && e->offset == 0));
}

TEST_CASE("fits_is_about_the_whole_ring") {
  StagingRing ring(4 * A);
  CHECK(ring.fits(4 * A));
  CHECK(!ring.fits(4 * A + 1));
  CHECK(!ring.allocate(4 * A + 1));
}

TEST_CASE("double_or_foreign_release_is_a_logic_error") {
  StagingRing ring(4 * A);
  const auto a = ring.allocate(A), b = ring.allocate(A);
  ring.release(*b);
  CHECK_THROWS_CONTAINING(ring.release(*b), std::logic_error, "already released");
  ring.release(*a);
  CHECK_THROWS_CONTAINING(ring.release(*a), std::logic_error, "not live");
  CHECK_THROWS_CONTAINING(ring.release(StagingBlock{99, 0, A}), std::logic_error, "not live");
}

TEST_CASE("long_random_sequence_never_overlaps") {
  // Live blocks must never overlap and never exceed the ring, whatever the release order.
  StagingRing ring(64 * A);
  std::vector<StagingBlock> live;
  uint32_t state = 12345;
  const auto next = [&] { return state = state * 1664525u + 1013904223u; };
  for (int step = 0; step < 20000; ++step) {
    if (live.empty() || next() % 3 != 0) {
      const size_t bytes = next() % (8 * A);
      if (auto block = ring.allocate(bytes)) {
        CHECK(block->offset + block->size <= ring.capacity());
        CHECK(block->offset % A == 0);
        for (const auto& other : live) {
          CHECK((block->offset + block->size <= other.offset || other.offset + other.size <= block->offset));
        }
        live.push_back(*block);
      }
    } else {
      const size_t i = next() % live.size();
      ring.release(live[i]);
      live.erase(live.begin() + static_cast<long>(i));
    }
    size_t total = 0;
    for (const auto& b : live) total += b.size;
    CHECK_EQ(ring.live_bytes(), total);
  }
}

TEST_CASE("copy_plan_merges_back_to_back_blocks") {
  alignas(256) static uint8_t host[16 * A];
  const nvclip::StagedBlockRef items[] = {
      {host, A}, {host + A, 2 * A},  // adjacent: one span
      {host + 8 * A, A},             // elsewhere (after a wrap, or an oversized buffer)
      {host + 9 * A, A},             // adjacent to the previous
  };
  const nvclip::CopyPlan plan = nvclip::plan_staging_copies(items, 4);
  CHECK_EQ(plan.spans.size(), size_t{2});
  CHECK_EQ(plan.spans[0].bytes, 3 * A);
  CHECK_EQ(plan.spans[1].host, static_cast<const uint8_t*>(host + 8 * A));
  CHECK_EQ(plan.spans[1].device_offset, 3 * A);
  CHECK_EQ(plan.item_offsets[0], size_t{0});
  CHECK_EQ(plan.item_offsets[1], A);
  CHECK_EQ(plan.item_offsets[2], 3 * A);
  CHECK_EQ(plan.item_offsets[3], 4 * A);
  CHECK_EQ(plan.total_bytes, 5 * A);
  CHECK(nvclip::plan_staging_copies(items, 0).spans.empty());
}
