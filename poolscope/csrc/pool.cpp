// Pools (pool.h states the algorithm and the invariants).
#include "pool.h"
#include "scope.h"
#include "os.h"
#include "owned.h"

#include <algorithm>
#include <chrono>
#include <ctime>
#include <new>
#include <utility>

namespace poolscope {

namespace {


size_t round_up(size_t n, size_t to) {
  return (n + to - 1) / to * to;
}

// A block with the free set's node for it: inserting it later allocates nothing.
std::unique_ptr<Block> block_with_node() {
  auto block = std::make_unique<Block>();
  FreeSet scratch;
  scratch.insert(block.get());
  block->node = scratch.extract(scratch.begin());
  return block;
}

// A merged block is as idle as its most idle resident part: memory a loop keeps reusing must
// not lend its recency to a neighbour nobody touches (a one-off spike's segment). Parts whose
// pages were already dropped cost nothing and do not count. It also remembers its freshest
// resident part, which the clocks keep when they release the rest (release_around_fresh): the
// front of a segment a loop keeps reusing stays while its idle tail goes.
template <typename T>
T most_idle(const Block* a, const Block* b, T Block::*when) {
  if (a->committed == 0) {
    return b->*when;
  }
  if (b->committed == 0) {
    return a->*when;
  }
  return std::min(a->*when, b->*when);
}

// `into` absorbs its neighbour `part` (before their sizes and committed bytes are added). Fresh
// parts of the same exit that touch are one part: the blocks one call used and freed together.
void keep_freshest(Block* into, const Block* part) {
  if (part->committed == 0) {
    return;
  }
  if (into->committed > 0 && part->fresh_at_exit == into->fresh_at_exit &&
      (into->fresh_addr + into->fresh_size == part->fresh_addr || part->fresh_addr + part->fresh_size == into->fresh_addr)) {
    into->fresh_addr = std::min(into->fresh_addr, part->fresh_addr);
    into->fresh_size += part->fresh_size;
    into->fresh_us = std::max(into->fresh_us, part->fresh_us);
    into->fresh_counted = into->fresh_counted && part->fresh_counted;
    return;
  }
  const bool fresher = std::make_pair(part->fresh_at_exit, part->fresh_us) > std::make_pair(into->fresh_at_exit, into->fresh_us);
  if (into->committed == 0 || fresher) {
    into->fresh_addr = part->fresh_addr;
    into->fresh_size = part->fresh_size;
    into->fresh_at_exit = part->fresh_at_exit;
    into->fresh_us = part->fresh_us;
    into->fresh_counted = part->fresh_counted;
  }
}

void whole_is_fresh(Block* block) {
  block->fresh_addr = block->addr;
  block->fresh_size = block->size;
  block->fresh_at_exit = block->freed_at_exit;
  block->fresh_us = block->freed_us;
  block->fresh_counted = block->committed == block->size;
}

}  // namespace

int64_t now_us() {
  using namespace std::chrono;
  return duration_cast<microseconds>(system_clock::now().time_since_epoch()).count();
}

namespace {
std::atomic<int64_t> g_test_clock{-1};
}  // namespace

int64_t mono_us() {
  using namespace std::chrono;
  const int64_t fake = g_test_clock.load(std::memory_order_relaxed);
  return fake >= 0 ? fake : duration_cast<microseconds>(steady_clock::now().time_since_epoch()).count();
}

int64_t mono_coarse_us() {
  const int64_t fake = g_test_clock.load(std::memory_order_relaxed);
  if (fake >= 0) {
    return fake;
  }
  timespec now;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &now);  // steady_clock's clock, read at the last tick
  return int64_t{now.tv_sec} * 1000000 + now.tv_nsec / 1000;
}

bool test_clock_set() {
  return g_test_clock.load(std::memory_order_relaxed) >= 0;
}

void set_test_clock(int64_t us) {
  g_test_clock.store(us, std::memory_order_relaxed);
}

void Deferred::bury(Pool* pool) {
  if (!pool->buried) {
    pool->buried = true;
    pool->next_dead = std::exchange(dead_pools, pool);
  }
}

void Deferred::run() {
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
    Guard lock(g_mu);
    for (Block* block : decommit_blocks) {
      block->pool->settle(block);
    }
  }
  decommit_blocks.clear();
  scopes.clear();
  while (dead_scopes != nullptr) {  // a chain through next_dead: a free allocates nothing to list them
    Scope* next = dead_scopes->next_dead;
    delete dead_scopes;
    dead_scopes = next;
  }
  while (dead_pools != nullptr) {
    Pool* next = dead_pools->next_dead;
    delete dead_pools;
    dead_pools = next;
  }
  context.reset();
  pool.reset();
  pools.clear();
}

Pool::~Pool() {
  Deferred out;
  {
    Guard lock(g_mu);
    for (Block* block : free_blocks) {
      delete block;
    }
    free_blocks.clear();
    for (const auto& segment : segments) {
      owned::remove(segment->base, segment->size);
    }
    out.segments = std::move(segments);
    unregister_pool_locked(this);
  }
  out.run();
}

void Pool::make_spare() {
  if (!spare) {
    spare = block_with_node();
  }
}

void Pool::put_free(Block* block) {
  if (block->node) {
    free_blocks.insert(std::move(block->node));
  } else {
    free_blocks.insert(block);  // not reached: every block is made with its node
  }
}

void Pool::take_free(Block* block) {
  block->node = free_blocks.extract(block);
}

void Pool::discard(Block* block) {
  if (spare) {
    delete block;
    return;
  }
  FreeSet::node_type node = std::move(block->node);
  *block = Block();
  block->node = std::move(node);
  spare.reset(block);
}

Block* Pool::take(size_t size, size_t room) {
  Block key;
  key.size = size;
  auto it = free_blocks.lower_bound(&key);
  if (it == free_blocks.end()) {
    return nullptr;
  }
  make_spare();  // the one step that may throw, before anything changes
  Block* block = *it;
  block->node = free_blocks.extract(it);
  bytes_cached -= block->committed;
  const size_t resident = std::min(size, block->committed);  // its front part is lent (an estimate)
  lend_from(block, size, room);
  if (resident < size) {
    note_faulted(size - resident, mono_us());
  }
  return block;
}

void Pool::lend_from(Block* block, size_t size, size_t room) {
  size_t rest = block->size - size;
  // Keep a lent block within 1.25x of its request, and never split off crumbs, unless lending
  // it whole would pass a scope's max_bytes (sizes are granules, so a rest is one at least).
  if (spare && rest >= kGranule && (!lent_whole(block->size, size) || block->size > room)) {
    Block* remainder = spare.release();
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
    remainder->freed_at_exit = block->freed_at_exit;
    remainder->freed_us = block->freed_us;
    // What may be resident in it: the block's committed bytes less those of its freshest part
    // that are lent (counted in `committed`, and not in the remainder).
    char* const lo = std::max(block->fresh_addr, remainder->addr);
    char* const hi = std::min(block->fresh_addr + block->fresh_size, remainder->addr + rest);
    const size_t fresh_lent = block->fresh_size - (lo < hi ? static_cast<size_t>(hi - lo) : 0);
    const size_t known_lent = block->fresh_counted ? std::min(fresh_lent, block->committed) : 0;
    remainder->committed = std::min(rest, block->committed - known_lent);
    // Its share of the freshest part, if any; else it is all as idle as the block was.
    whole_is_fresh(remainder);
    if (lo < hi) {
      remainder->fresh_addr = lo;
      remainder->fresh_size = static_cast<size_t>(hi - lo);
      remainder->fresh_at_exit = block->fresh_at_exit;
      remainder->fresh_us = block->fresh_us;
      remainder->fresh_counted = block->fresh_counted;
    }
    block->size = size;
    put_free(remainder);
    bytes_cached += remainder->committed;
  }
  block->state = BlockState::allocated;
  block->committed = 0;
}

Block* Pool::add_segment(c10::DataPtr& memory, size_t size) {
  auto segment = std::make_unique<Segment>();
  auto block_memory = block_with_node();
  segments.reserve(segments.size() + 1);
  char* base = static_cast<char*>(memory.get());
  base += (kGranule - reinterpret_cast<uintptr_t>(base) % kGranule) % kGranule;
  if (!owned::add(base, size)) {  // the last step that may fail
    return nullptr;
  }
  segment->base = base;
  segment->size = size;
  segment->memory = std::move(memory);
  Block* block = block_memory.release();
  block->pool = this;
  block->segment = segment.get();
  block->addr = segment->base;
  block->size = size;
  block->freed_at_exit = exits;
  block->freed_us = mono_us();
  segment->first = block;
  record_segment("segment_alloc", segment.get());
  segments.push_back(std::move(segment));
  segment_bytes += size;
  return block;  // not in free_blocks: the caller lends from it at once
}

void Pool::free_block(Block* block, Deferred& out) {
  bytes_in_use -= block->size;
  bytes_requested -= block->bytes_requested;
  blocks_in_use -= 1;
  block->segment->bytes_in_use -= block->size;
  block->bytes_requested = 0;
  block->committed = block->size;
  block->freed_at_exit = exits;
  block->freed_us = mono_coarse_us();
  block->state = BlockState::free;
  const int64_t freed_us = block->freed_us;
  last_free_us = freed_us;
  insert_free(block);
  note_cached_locked(this, freed_us, out);  // the idle clock and the pressure watch
  if (max_cached != kNone && bytes_cached > static_cast<size_t>(max_cached)) {
    try {
      release_down_to(static_cast<size_t>(max_cached), out);
    } catch (const std::bad_alloc&) {  // a free must not fail: the cap holds again at the next one
    }
  }
  POOLSCOPE_CHECK(this);
}

void Pool::insert_free(Block* block) {
  // Merge with free neighbours, so that smaller requests and larger ones share memory.
  whole_is_fresh(block);  // one part, freed (or dropped) as a whole
  Block* prev = block->prev;
  if (prev != nullptr && prev->state == BlockState::free) {
    take_free(prev);
    bytes_cached -= prev->committed;
    keep_freshest(prev, block);
    prev->freed_at_exit = most_idle(prev, block, &Block::freed_at_exit);
    prev->freed_us = most_idle(prev, block, &Block::freed_us);
    prev->size += block->size;
    prev->committed += block->committed;
    prev->next = block->next;
    if (block->next != nullptr) {
      block->next->prev = prev;
    }
    discard(block);
    block = prev;
  }
  Block* next = block->next;
  if (next != nullptr && next->state == BlockState::free) {
    take_free(next);
    bytes_cached -= next->committed;
    keep_freshest(block, next);
    block->freed_at_exit = most_idle(block, next, &Block::freed_at_exit);
    block->freed_us = most_idle(block, next, &Block::freed_us);
    block->size += next->size;
    block->committed += next->committed;
    block->next = next->next;
    if (next->next != nullptr) {
      next->next->prev = block;
    }
    discard(next);
  }
  put_free(block);
  bytes_cached += block->committed;
}

void Pool::settle(Block* block) {
  decommitting.erase(std::find(decommitting.begin(), decommitting.end(), block));
  block->committed = 0;
  block->state = BlockState::free;
  insert_free(block);
}

void Pool::after_fork_child() {
  growing = 0;
  for (Block* block : decommitting) {
    block->committed = block->size;
    block->state = BlockState::free;
    insert_free(block);
  }
  decommitting.clear();
}

void Pool::release_down_to(size_t budget, Deferred& out, Reason reason) {
  // With no budget left, wholly free segments go too, resident or not.
  auto whole = [](const Block* b) { return b->prev == nullptr && b->next == nullptr; };
  auto wanted = [&](const Block* b) {
    return bytes_cached > budget ? b->committed > 0 || whole(b) : budget == 0 && whole(b);
  };
  std::vector<Block*> candidates;
  for (Block* block : free_blocks) {
    if (wanted(block)) {
      candidates.push_back(block);
    }
  }
  // Oldest first, larger first among equals.
  std::sort(candidates.begin(), candidates.end(), [](const Block* a, const Block* b) {
    return a->freed_at_exit != b->freed_at_exit ? a->freed_at_exit < b->freed_at_exit : a->size > b->size;
  });
  for (Block* block : candidates) {
    if (wanted(block)) {
      release_block(block, out, reason);
    }
  }
}

void Pool::release_segments_smaller_than(size_t size, Deferred& out) {
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
      (block->freed_at_exit < exits ? stale : fresh).push_back(block);
    }
  }
  for (Block* block : stale) {
    release_block(block, out);
  }
  std::sort(fresh.begin(), fresh.end(), [](const Block* a, const Block* b) { return a->freed_us < b->freed_us; });
  const size_t bound = 2 * (bytes_in_use.load(std::memory_order_relaxed) + size);
  for (Block* block : fresh) {
    if (segment_bytes + size <= bound) {
      break;
    }
    release_block(block, out);
  }
}

void Pool::release_block(Block* block, Deferred& out, Reason reason) {
  // `block` is free: give its memory back, the whole segment when it is all free, else its pages.
  // Room first: running out of memory here must leave the block where it was.
  const bool whole = block->prev == nullptr && block->next == nullptr;
  if (whole) {
    out.segments.reserve(out.segments.size() + 1);
  } else {
    decommitting.reserve(decommitting.size() + 1);
    out.decommit_blocks.reserve(out.decommit_blocks.size() + 1);
  }
  take_free(block);
  bytes_cached -= block->committed;
  bytes_released += static_cast<int64_t>(block->committed);
  if (reason == Reason::exits) {
    bytes_released_by_exits += static_cast<int64_t>(block->committed);
  } else if (reason == Reason::time) {
    bytes_released_by_time += static_cast<int64_t>(block->committed);
  } else if (reason == Reason::pressure) {
    bytes_released_by_pressure += static_cast<int64_t>(block->committed);
  }
  if (reason == Reason::exits || reason == Reason::time) {
    note_released(block, mono_us());
  }
  releases += 1;
  if (whole) {
    Segment* segment = block->segment;
    record_segment("segment_free", segment);
    owned::remove(segment->base, segment->size);
    segment_bytes -= segment->size;
    auto it = std::find_if(segments.begin(), segments.end(), [&](auto& s) { return s.get() == segment; });
    out.segments.push_back(std::move(*it));
    segments.erase(it);
    discard(block);
  } else {
    // Part of a segment that still holds live blocks: drop its pages. It stays out of the
    // free set until that is done, so nobody is lent it meanwhile.
    block->state = BlockState::decommitting;
    block->committed = 0;
    decommitting.push_back(block);
    out.decommit_blocks.push_back(block);
  }
}

bool Pool::release_around_fresh(Block* block, Deferred& out, Reason reason) {
  char* const lo = block->fresh_addr;
  char* const hi = lo + block->fresh_size;
  char* const end = block->addr + block->size;
  // Only a part whose bytes are all counted in `committed`: the kept part then takes its own
  // bytes and what the released ones take is all the rest, so nothing resident goes uncounted.
  if (!block->fresh_counted || block->committed < block->fresh_size || lo < block->addr || hi > end || lo >= hi ||
      (lo == block->addr && hi == end)) {
    return false;
  }
  // Pieces in address order: [addr, lo) released, [lo, hi) kept, [hi, end) released. Everything
  // that may throw comes first; `block` stays the first piece (a segment's first block keeps its
  // address).
  const int pieces = 1 + (lo > block->addr) + (hi < end);
  std::unique_ptr<Block> made[2];
  try {
    for (int i = 0; i + 1 < pieces; ++i) {
      made[i] = block_with_node();
    }
    decommitting.reserve(decommitting.size() + 2);
    out.decommit_blocks.reserve(out.decommit_blocks.size() + 2);
  } catch (const std::bad_alloc&) {
    return false;
  }
  take_free(block);
  bytes_cached -= block->committed;
  size_t committed = block->committed;
  const uint64_t idle_exit = block->freed_at_exit;
  const int64_t idle_us = block->freed_us;
  Block* const after = block->next;
  Block* piece[3] = {block, nullptr, nullptr};
  for (int i = 1; i < pieces; ++i) {
    piece[i] = made[i - 1].release();
  }
  char* bounds[4] = {block->addr, nullptr, nullptr, nullptr};
  int n = 0;
  if (lo > block->addr) {
    bounds[++n] = lo;
  }
  if (hi < end) {
    bounds[++n] = hi;
  }
  bounds[++n] = end;
  // The kept piece takes the resident bytes first (it was freed last), the others the rest.
  int kept = lo > block->addr ? 1 : 0;
  size_t share[3] = {0, 0, 0};
  share[kept] = std::min(block->fresh_size, committed);
  committed -= share[kept];
  for (int i = 0; i < pieces; ++i) {
    if (i != kept) {
      share[i] = std::min(static_cast<size_t>(bounds[i + 1] - bounds[i]), committed);
      committed -= share[i];
    }
  }
  const uint64_t fresh_exit = block->fresh_at_exit;
  const int64_t fresh_us = block->fresh_us;
  for (int i = 0; i < pieces; ++i) {
    Block* p = piece[i];
    p->pool = this;
    p->segment = block->segment;
    p->addr = bounds[i];
    p->size = static_cast<size_t>(bounds[i + 1] - bounds[i]);
    p->state = BlockState::free;
    p->committed = share[i];
    p->freed_at_exit = i == kept ? fresh_exit : idle_exit;
    p->freed_us = i == kept ? fresh_us : idle_us;
    whole_is_fresh(p);
    if (i > 0) {
      piece[i - 1]->next = p;
      p->prev = piece[i - 1];
    }
  }
  piece[pieces - 1]->next = after;
  if (after != nullptr) {
    after->prev = piece[pieces - 1];
  }
  for (int i = 0; i < pieces; ++i) {
    put_free(piece[i]);
    bytes_cached += piece[i]->committed;
  }
  for (int i = 0; i < pieces; ++i) {
    if (i != kept) {
      release_block(piece[i], out, reason);  // part of a segment that keeps a free block: its pages
    }
  }
  return true;
}

size_t Pool::working_set() const {
  const size_t window = window_peak.load(std::memory_order_relaxed);
  return recent_peaks.empty() ? window : std::max(window, recent_peaks.front().second);
}

void Pool::release_stale(Deferred& out) {
  // Free memory that no lend of the last `hold_after` outermost-scope exits reused.
  std::vector<Block*> idle;
  for (Block* block : free_blocks) {
    bool whole = block->prev == nullptr && block->next == nullptr;
    bool stale = hold_after <= 0 || block->freed_at_exit + static_cast<uint64_t>(hold_after) < exits;
    if (stale && (block->committed > 0 || whole)) {
      idle.push_back(block);
    }
  }
  for (Block* block : idle) {
    const bool fresh_too = hold_after <= 0 || block->fresh_at_exit + static_cast<uint64_t>(hold_after) < exits;
    if (fresh_too || !release_around_fresh(block, out, Reason::exits)) {
      release_block(block, out, Reason::exits);
    }
  }
}

int64_t Pool::release_expired(int64_t now, Deferred& out) {
  if (hold_idle_us == kNone) {
    return INT64_MAX;
  }
  int64_t next = INT64_MAX;
  std::vector<Block*> idle;
  for (Block* block : free_blocks) {
    bool whole = block->prev == nullptr && block->next == nullptr;
    if (block->committed == 0 && !whole) {
      continue;  // holds nothing resident
    }
    const int64_t due = deadline_after(block->freed_us, hold_idle_us);
    if (due <= now) {
      idle.push_back(block);
    } else {
      next = std::min(next, due);
    }
  }
  for (Block* block : idle) {
    const int64_t fresh_due = deadline_after(block->fresh_us, hold_idle_us);
    if (fresh_due <= now || !release_around_fresh(block, out, Reason::time)) {
      release_block(block, out, Reason::time);
    } else {
      next = std::min(next, fresh_due);  // the part it kept
    }
  }
  return next;
}

void Pool::tick(Deferred& out) {
  // The working set is a figure for stats(): the peak in use between exits, over the window.
  size_t peak = window_peak.load(std::memory_order_relaxed);
  while (!recent_peaks.empty() && recent_peaks.back().second <= peak) {
    recent_peaks.pop_back();
  }
  recent_peaks.emplace_back(exits, peak);
  exits += 1;
  while (!recent_peaks.empty() &&
         (hold_after <= 0 || recent_peaks.front().first + static_cast<uint64_t>(hold_after) < exits)) {
    recent_peaks.pop_front();
  }
  window_peak.store(bytes_in_use.load(std::memory_order_relaxed), std::memory_order_relaxed);
  release_stale(out);
  POOLSCOPE_CHECK(this);
}

void Pool::record(const char* action, const Block* block, const Context& context) {
  if (!tracing) {
    return;
  }
  try {  // the trace is a figure: an event lost to a full memory must not fail a lend or a free
    trace.push_back(TraceEvent{action, reinterpret_cast<uintptr_t>(block->addr), block->size, now_us(), context});
  } catch (const std::bad_alloc&) {
    return;
  }
  if (trace.size() > kTraceLimit) {
    trace.pop_front();
  }
}

void Pool::record_segment(const char* action, const Segment* segment) {
  if (!tracing) {
    return;
  }
  try {
    trace.push_back(TraceEvent{action, reinterpret_cast<uintptr_t>(segment->base), segment->size, now_us(), nullptr});
  } catch (const std::bad_alloc&) {
    return;
  }
  if (trace.size() > kTraceLimit) {
    trace.pop_front();
  }
}

void Pool::configure(int64_t cap, int64_t limit, int64_t after, bool learn_exits, int64_t idle_us, bool learn_time,
                     Deferred& out) {
  max_cached = cap;
  max_bytes = limit;
  const bool clocks_changed =
      after != release_after || learn_exits != learn_after || idle_us != release_idle_us || learn_time != learn_idle;
  release_after = after;
  release_idle_us = idle_us;
  learn_after = learn_exits;
  learn_idle = learn_time;
  if (clocks_changed) {
    forget_learned();
  }
  if (max_cached != kNone) {
    holdable.store(false, std::memory_order_relaxed);  // held blocks would escape the cap
    return_all_held_locked(out, this);
    release_down_to(static_cast<size_t>(max_cached), out);
  } else if (!tracing) {
    holdable.store(true, std::memory_order_relaxed);
  }
  if (hold_idle_us != kNone) {
    // Blocks cached before the setting: the releaser must see their deadlines too.
    note_cached_locked(this, mono_us() - hold_idle_us, out);
    wake_releaser_locked();
  }
}

void Pool::release(bool everything, Deferred& out) {
  return_all_held_locked(out, this);  // what threads hold is cached memory too
  if (everything) {
    release_down_to(0, out);
  } else {
    release_stale(out);
  }
}

PoolFigures Pool::figures() const {
  PoolFigures f;
  f.bytes_in_use = static_cast<int64_t>(bytes_in_use);
  f.bytes_requested = static_cast<int64_t>(bytes_requested);
  f.bytes_cached = static_cast<int64_t>(bytes_cached);
  f.bytes_reserved = static_cast<int64_t>(bytes_in_use + bytes_cached);
  f.peak_bytes_in_use = static_cast<int64_t>(peak_bytes_in_use);
  f.blocks_in_use = blocks_in_use;
  f.blocks_cached = static_cast<int64_t>(free_blocks.size());
  f.segments = static_cast<int64_t>(segments.size());
  f.hits = hits;
  f.misses = misses;
  f.releases = releases;
  f.bytes_released = bytes_released;
  f.bytes_released_by_exits = bytes_released_by_exits;
  f.bytes_released_by_time = bytes_released_by_time;
  f.bytes_released_by_pressure = bytes_released_by_pressure;
  f.refaults = refaults;
  f.bytes_refaulted = bytes_refaulted;
  f.hold_after = hold_after;
  f.hold_idle_us = hold_idle_us;
  f.learn_after = learn_after;
  f.learn_idle = learn_idle;
  f.fallbacks = fallbacks;
  f.working_set_bytes = static_cast<int64_t>(working_set());
  f.max_cached_bytes = max_cached;
  f.max_bytes = max_bytes;
  f.release_after = release_after;
  f.release_idle_us = release_idle_us;
  return f;
}

void Pool::check_invariants() const {
#ifdef POOLSCOPE_CHECK_INVARIANTS
  // Invariants 1 and 2 of pool.h, for every segment reachable from a free block (a segment
  // wholly lent has no free block to start from; its blocks are the registry's).
  size_t cached = 0, mapped = 0;
  for (const Block* block : decommitting) {
    TORCH_INTERNAL_ASSERT(block->state == BlockState::decommitting && block->pool == this, "a decommitting block in the wrong state");
    TORCH_INTERNAL_ASSERT(block->node, "a decommitting block lost its node: putting it back would allocate");
  }
  for (const Block* block : free_blocks) {
    TORCH_INTERNAL_ASSERT(block->state == BlockState::free && block->pool == this, "a free block in the wrong state");
    TORCH_INTERNAL_ASSERT(!block->node, "a block in the free set still holds its node");
    TORCH_INTERNAL_ASSERT(block->fresh_size > 0 && block->fresh_addr >= block->addr &&
                              block->fresh_addr + block->fresh_size <= block->addr + block->size,
                          "a free block's freshest part lies outside it");
    cached += block->committed;
  }
  std::set<const Segment*> walked;
  for (const Block* block : free_blocks) {
    if (!walked.insert(block->segment).second) {
      continue;
    }
    const Block* b = block;
    while (b->prev != nullptr) {
      b = b->prev;
    }
    const Segment* segment = block->segment;
    TORCH_INTERNAL_ASSERT(b->addr == segment->base, "a segment's first block does not start it");
    size_t lent = 0;
    for (; b != nullptr; b = b->next) {
      TORCH_INTERNAL_ASSERT(b->segment == segment, "a block in another segment's chain");
      TORCH_INTERNAL_ASSERT(b->next == nullptr || b->next->addr == b->addr + b->size, "blocks do not tile");
      TORCH_INTERNAL_ASSERT(b->next != nullptr || b->addr + b->size == segment->base + segment->size,
                            "blocks do not cover their segment");
      TORCH_INTERNAL_ASSERT(!(b->state == BlockState::free && b->next != nullptr && b->next->state == BlockState::free),
                            "free neighbours not merged");
      if (b->state == BlockState::allocated) {
        lent += b->size;
      }
    }
    TORCH_INTERNAL_ASSERT(lent == segment->bytes_in_use, "a segment's bytes_in_use is not its lent blocks");
  }
  for (const auto& segment : segments) {
    mapped += segment->size;
  }
  TORCH_INTERNAL_ASSERT(cached == bytes_cached, "bytes_cached is not the sum over free blocks");
  TORCH_INTERNAL_ASSERT(mapped == segment_bytes, "segment_bytes is not the sum of segment sizes");
  TORCH_INTERNAL_ASSERT(bytes_in_use <= segment_bytes, "more bytes lent than the segments hold");
#endif
}

}  // namespace poolscope
