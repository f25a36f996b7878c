// Pools: segments from the replaced allocator, carved into blocks by best fit,
// coalesced when blocks come back, and given back to the system when the
// working set shrinks.
#include "engine.h"
#include "os.h"

#include <algorithm>
#include <chrono>

namespace poolscope {

namespace {

constexpr size_t kMinSplit = size_t{1} << 20;

size_t round_up(size_t n, size_t to) {
  return (n + to - 1) / to * to;
}

// A merged block is as idle as its most idle resident part: memory a loop keeps reusing must
// not lend its recency to a neighbour nobody touches (a one-off spike's segment). Parts whose
// pages were already dropped cost nothing and do not count.
uint64_t merged_epoch(const Block* a, const Block* b) {
  if (a->committed == 0) {
    return b->freed_epoch;
  }
  if (b->committed == 0) {
    return a->freed_epoch;
  }
  return std::min(a->freed_epoch, b->freed_epoch);
}

int64_t merged_time(const Block* a, const Block* b) {
  if (a->committed == 0) {
    return b->freed_us;
  }
  if (b->committed == 0) {
    return a->freed_us;
  }
  return std::min(a->freed_us, b->freed_us);
}

}  // namespace

int64_t now_us() {
  using namespace std::chrono;
  return duration_cast<microseconds>(system_clock::now().time_since_epoch()).count();
}

int64_t mono_us() {
  using namespace std::chrono;
  return duration_cast<microseconds>(steady_clock::now().time_since_epoch()).count();
}

void Releases::run() {
  if (start_releaser) {
    start_releaser = false;
    poolscope::start_releaser();
  }
  for (auto& segment : segments) {
    // The replaced allocator may keep the memory (glibc's heap does for
    // mid-sized blocks), so drop the pages first: the resident size falls either way.
    os::drop_pages(segment->base, segment->size);
    segment->memory.clear();
  }
  segments.clear();
  if (!decommit_blocks.empty()) {
    for (Block* block : decommit_blocks) {
      os::drop_pages(block->addr, block->size);
    }
    std::lock_guard<std::mutex> lock(g_mu);
    for (Block* block : decommit_blocks) {
      block->pool->settle(block);
    }
  }
  decommit_blocks.clear();
  scopes.clear();
  context.reset();
  pool.reset();
}

Pool::~Pool() {
  Releases out;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    for (Block* block : free_blocks) {
      delete block;
    }
    free_blocks.clear();
    out.segments = std::move(segments);
  }
  out.run();
}

Block* Pool::take(size_t size) {
  Block key;
  key.size = size;
  auto it = free_blocks.lower_bound(&key);
  if (it == free_blocks.end()) {
    return nullptr;
  }
  Block* block = *it;
  free_blocks.erase(it);
  committed_free -= block->committed;
  lend_from(block, size);
  return block;
}

void Pool::lend_from(Block* block, size_t size) {
  size_t rest = block->size - size;
  // Keep a lent block within 1.25x of its request, and never split off crumbs.
  if (rest >= kGranule && rest >= std::min(size / 4, kMinSplit)) {
    auto* remainder = new Block;
    remainder->pool = this;
    remainder->segment = block->segment;
    remainder->addr = block->addr + size;
    remainder->size = rest;
    remainder->prev = block;
    remainder->next = block->next;
    if (block->next != nullptr) {
      block->next->prev = remainder;
    }
    block->next = remainder;
    remainder->state = BlockState::free;
    remainder->freed_epoch = block->freed_epoch;
    remainder->freed_us = block->freed_us;
    remainder->committed = std::min(rest, block->committed);
    block->size = size;
    free_blocks.insert(remainder);
    committed_free += remainder->committed;
  }
  block->state = BlockState::allocated;
  block->committed = 0;
}

Block* Pool::add_segment(c10::DataPtr memory, size_t size) {
  auto segment = std::make_unique<Segment>();
  segment->base = static_cast<char*>(memory.get());
  segment->size = size;
  segment->memory = std::move(memory);
  auto* block = new Block;
  block->pool = this;
  block->segment = segment.get();
  block->addr = segment->base;
  block->size = size;
  block->freed_epoch = epoch;
  block->freed_us = mono_us();
  record_segment("segment_alloc", segment.get());
  segments.push_back(std::move(segment));
  reserved_virtual += size;
  return block;  // not in free_blocks: the caller lends from it at once
}

void Pool::give_back(Block* block, Releases& out) {
  in_use -= block->size;
  requested -= block->requested;
  blocks_in_use -= 1;
  block->segment->in_use -= block->size;
  block->requested = 0;
  block->committed = block->size;
  block->freed_epoch = epoch;
  block->freed_us = mono_us();
  block->state = BlockState::free;
  const int64_t freed_us = block->freed_us;
  insert_free(block);
  if (release_idle_us != kNone) {
    note_cached_locked(this, freed_us, out);
  }
  if (max_cached != kNone && committed_free > static_cast<size_t>(max_cached)) {
    shrink_to(static_cast<size_t>(max_cached), out);
  }
}

void Pool::insert_free(Block* block) {
  // Merge with free neighbours, so that smaller requests and larger ones share memory.
  Block* prev = block->prev;
  if (prev != nullptr && prev->state == BlockState::free) {
    free_blocks.erase(prev);
    committed_free -= prev->committed;
    prev->freed_epoch = merged_epoch(prev, block);
    prev->freed_us = merged_time(prev, block);
    prev->size += block->size;
    prev->committed += block->committed;
    prev->next = block->next;
    if (block->next != nullptr) {
      block->next->prev = prev;
    }
    delete block;
    block = prev;
  }
  Block* next = block->next;
  if (next != nullptr && next->state == BlockState::free) {
    free_blocks.erase(next);
    committed_free -= next->committed;
    block->freed_epoch = merged_epoch(block, next);
    block->freed_us = merged_time(block, next);
    block->size += next->size;
    block->committed += next->committed;
    block->next = next->next;
    if (next->next != nullptr) {
      next->next->prev = block;
    }
    delete next;
  }
  free_blocks.insert(block);
  committed_free += block->committed;
}

void Pool::settle(Block* block) {
  block->committed = 0;
  block->state = BlockState::free;
  insert_free(block);
}

void Pool::shrink_to(size_t budget, Releases& out) {
  // With no budget left, wholly free segments go too, resident or not.
  auto whole = [](const Block* b) { return b->prev == nullptr && b->next == nullptr; };
  auto wanted = [&](const Block* b) {
    return committed_free > budget ? b->committed > 0 || whole(b) : budget == 0 && whole(b);
  };
  std::vector<Block*> candidates;
  for (Block* block : free_blocks) {
    if (wanted(block)) {
      candidates.push_back(block);
    }
  }
  // Oldest first, larger first among equals.
  std::sort(candidates.begin(), candidates.end(), [](const Block* a, const Block* b) {
    return a->freed_epoch != b->freed_epoch ? a->freed_epoch < b->freed_epoch : a->size > b->size;
  });
  for (Block* block : candidates) {
    if (wanted(block)) {
      release_block(block, out);
    }
  }
}

void Pool::release_segments_smaller_than(size_t size, Releases& out) {
  // Called when no free block can serve `size`: a wholly free segment smaller than that can
  // never serve it. Without releasing, sizes that keep growing from call to call (random
  // sequence lengths) leave a trail of segments each a little too small, and the cache grows
  // to several times the peak. But the segments the current call has used (freed since the
  // last outermost exit) are what its smaller requests will need again on the next call: a
  // compiled model frees its intermediates before its largest output, and releasing them
  // there made the next call miss. So the stale ones go at once, and the fresh ones, oldest
  // first, only while the pool would reserve more than twice its bytes in use with `size` lent.
  std::vector<Block*> stale, fresh;
  for (Block* block : free_blocks) {
    if (block->size >= size) {
      break;  // ordered by size
    }
    if (block->prev == nullptr && block->next == nullptr) {
      (block->freed_epoch < epoch ? stale : fresh).push_back(block);
    }
  }
  for (Block* block : stale) {
    release_block(block, out);
  }
  std::sort(fresh.begin(), fresh.end(), [](const Block* a, const Block* b) { return a->freed_us < b->freed_us; });
  const size_t bound = 2 * (in_use + size);
  for (Block* block : fresh) {
    if (reserved_virtual + size <= bound) {
      break;
    }
    release_block(block, out);
  }
}

void Pool::release_block(Block* block, Releases& out, Reason reason) {
  // `block` is free: give its memory back, the whole segment when it is all free, else its pages.
  free_blocks.erase(block);
  committed_free -= block->committed;
  bytes_released += static_cast<int64_t>(block->committed);
  if (reason == Reason::exits) {
    bytes_released_by_exits += static_cast<int64_t>(block->committed);
  } else if (reason == Reason::time) {
    bytes_released_by_time += static_cast<int64_t>(block->committed);
  }
  evictions += 1;
  if (block->prev == nullptr && block->next == nullptr) {
    Segment* segment = block->segment;
    record_segment("segment_free", segment);
    reserved_virtual -= segment->size;
    auto it = std::find_if(segments.begin(), segments.end(), [&](auto& s) { return s.get() == segment; });
    out.segments.push_back(std::move(*it));
    segments.erase(it);
    delete block;
  } else {
    // Part of a segment that still holds live blocks: drop its pages. It stays out of the
    // free set until that is done, so nobody is lent it meanwhile.
    block->state = BlockState::decommitting;
    block->committed = 0;
    out.decommit_blocks.push_back(block);
  }
}

size_t Pool::working_set() const {
  return recent_peaks.empty() ? window_peak : std::max(window_peak, recent_peaks.front().second);
}

void Pool::release_idle(Releases& out) {
  // Free memory that no lend of the last `release_after` outermost-scope exits reused.
  std::vector<Block*> idle;
  for (Block* block : free_blocks) {
    bool whole = block->prev == nullptr && block->next == nullptr;
    bool stale = release_after <= 0 || block->freed_epoch + static_cast<uint64_t>(release_after) < epoch;
    if (stale && (block->committed > 0 || whole)) {
      idle.push_back(block);
    }
  }
  for (Block* block : idle) {
    release_block(block, out, Reason::exits);
  }
}

int64_t Pool::release_timed_out(int64_t now, Releases& out) {
  if (release_idle_us == kNone) {
    return INT64_MAX;
  }
  int64_t next = INT64_MAX;
  std::vector<Block*> idle;
  for (Block* block : free_blocks) {
    bool whole = block->prev == nullptr && block->next == nullptr;
    if (block->committed == 0 && !whole) {
      continue;  // holds nothing resident
    }
    int64_t due = block->freed_us + release_idle_us;
    if (due <= now) {
      idle.push_back(block);
    } else {
      next = std::min(next, due);
    }
  }
  for (Block* block : idle) {
    release_block(block, out, Reason::time);
  }
  return next;
}

void Pool::tick(Releases& out) {
  // The working set is a figure for stats(): the peak in use between exits, over the window.
  size_t peak = window_peak;
  while (!recent_peaks.empty() && recent_peaks.back().second <= peak) {
    recent_peaks.pop_back();
  }
  recent_peaks.emplace_back(epoch, peak);
  epoch += 1;
  while (!recent_peaks.empty() &&
         (release_after <= 0 || recent_peaks.front().first + static_cast<uint64_t>(release_after) < epoch)) {
    recent_peaks.pop_front();
  }
  window_peak = in_use;
  release_idle(out);
}

void Pool::record(const char* action, const Block* block, const Context& context) {
  if (!tracing) {
    return;
  }
  trace.push_back(TraceEvent{action, reinterpret_cast<uintptr_t>(block->addr), block->size, now_us(), context});
  if (trace.size() > kTraceLimit) {
    trace.pop_front();
  }
}

void Pool::record_segment(const char* action, const Segment* segment) {
  if (!tracing) {
    return;
  }
  trace.push_back(TraceEvent{action, reinterpret_cast<uintptr_t>(segment->base), segment->size, now_us(), nullptr});
  if (trace.size() > kTraceLimit) {
    trace.pop_front();
  }
}

PoolStatsData Pool::stats() const {
  PoolStatsData s;
  s.in_use = static_cast<int64_t>(in_use);
  s.requested = static_cast<int64_t>(requested);
  s.cached = static_cast<int64_t>(committed_free);
  s.reserved = static_cast<int64_t>(in_use + committed_free);
  s.mapped = static_cast<int64_t>(reserved_virtual);
  s.peak_in_use = static_cast<int64_t>(peak_in_use);
  s.blocks_in_use = blocks_in_use;
  s.blocks_cached = static_cast<int64_t>(free_blocks.size());
  s.segments = static_cast<int64_t>(segments.size());
  s.hits = hits;
  s.misses = misses;
  s.evictions = evictions;
  s.bytes_released = bytes_released;
  s.bytes_released_by_exits = bytes_released_by_exits;
  s.bytes_released_by_time = bytes_released_by_time;
  s.fallbacks = fallbacks;
  s.epoch = static_cast<int64_t>(epoch);
  s.working_set = static_cast<int64_t>(working_set());
  return s;
}

}  // namespace poolscope
