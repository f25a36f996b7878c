// poolscope's native engine: a c10::Allocator for CPU memory that serves the
// large allocations of threads inside a pool scope from per-pool segments and
// hands everything else to the allocator it replaced.
//
// One mutex (g_mu) guards every pool, every scope's figures and the registry of
// lent blocks. Nothing that can run Python, and no system call that gives
// memory back, runs while it is held: callers collect that work and do it
// after unlocking.
#pragma once

#include <c10/core/Allocator.h>
#include <c10/util/SmallVector.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace poolscope {

constexpr size_t kGranule = 512;            // block sizes and offsets: 64-byte alignment and more
constexpr size_t kMinSegment = size_t{2} << 20;
constexpr size_t kMaxLend = size_t{1} << 62;  // larger requests are never pooled (no pool could hold one)
constexpr size_t kTraceLimit = 100000;      // events kept per pool while profiling
constexpr int64_t kNone = -1;               // "no limit" for the int64 settings below

struct Pool;
struct Scope;
struct Segment;

using Context = std::shared_ptr<c10::GatheredContext>;

enum class BlockState : uint8_t { free, allocated, decommitting };

// A byte range of a segment, lent to one storage or free.
struct Block {
  Pool* pool = nullptr;
  Segment* segment = nullptr;
  char* addr = nullptr;
  size_t size = 0;
  Block* prev = nullptr;  // neighbours inside the segment, by address
  Block* next = nullptr;
  BlockState state = BlockState::allocated;
  // While allocated:
  size_t requested = 0;
  c10::SmallVector<std::shared_ptr<Scope>, 4> charged;  // open scopes it counts toward
  std::shared_ptr<Pool> owner;                             // keeps the pool alive while lent
  Context context;                                         // where it was allocated (profiling)
  int64_t alloc_us = 0;
  // While free:
  uint64_t freed_epoch = 0;  // the pool's epoch when it was last given back
  int64_t freed_us = 0;      // when it was last given back (steady clock; merged: its most idle resident part)
  size_t committed = 0;      // bytes that may still be resident (upper bound)
};

// Memory from the replaced allocator, carved into blocks.
struct Segment {
  c10::DataPtr memory;
  char* base = nullptr;
  size_t size = 0;
  size_t in_use = 0;
};

struct BySizeThenAddress {
  bool operator()(const Block* a, const Block* b) const {
    return a->size != b->size ? a->size < b->size : a->addr < b->addr;
  }
};

struct TraceEvent {
  const char* action;
  uintptr_t addr;
  size_t size;
  int64_t time_us;
  Context context;
};

// Work to do once g_mu is released: segments to give back, ranges to decommit.
struct Releases {
  std::vector<std::unique_ptr<Segment>> segments;
  std::vector<Block*> decommit_blocks;  // out of the free set until their pages are dropped
  std::vector<std::shared_ptr<Scope>> scopes;
  std::shared_ptr<Pool> pool;
  Context context;
  bool start_releaser = false;  // the first memory cached with release_idle set: start the thread
  void run();  // call without g_mu
};

struct PoolStatsData {
  int64_t in_use = 0, requested = 0, cached = 0, reserved = 0, mapped = 0, peak_in_use = 0;
  int64_t blocks_in_use = 0, blocks_cached = 0, segments = 0;
  int64_t hits = 0, misses = 0, evictions = 0, bytes_released = 0, fallbacks = 0;
  int64_t bytes_released_by_exits = 0, bytes_released_by_time = 0;
  int64_t epoch = 0, working_set = 0;
};

// Why free memory goes back to the system (a figure per reason).
enum class Reason { other, exits, time };

struct Pool : std::enable_shared_from_this<Pool> {
  explicit Pool(std::string device) : device(std::move(device)) {}
  ~Pool();

  const std::string device;
  // Settings (under g_mu).
  int64_t max_cached = kNone;
  int64_t max_bytes = kNone;
  int64_t release_after = 100;  // outermost-scope exits that size the working set
  int64_t release_idle_us = kNone;  // cached memory unused this long goes back (releaser.cpp)

  // Everything below is under g_mu.
  std::set<Block*, BySizeThenAddress> free_blocks;
  std::vector<std::unique_ptr<Segment>> segments;
  size_t in_use = 0, requested = 0, committed_free = 0, reserved_virtual = 0;
  size_t growing = 0;  // bytes of segments being allocated outside the lock
  size_t peak_in_use = 0;
  int64_t hits = 0, misses = 0, evictions = 0, bytes_released = 0, fallbacks = 0;
  int64_t bytes_released_by_exits = 0, bytes_released_by_time = 0;
  int64_t blocks_in_use = 0;
  // Epochs count outermost-scope exits; the working set (a figure) is the peak bytes in
  // use between consecutive exits, over the last release_after of them.
  uint64_t epoch = 0;
  size_t window_peak = 0;
  std::deque<std::pair<uint64_t, size_t>> recent_peaks;  // (epoch, peak), decreasing peaks
  bool tracing = false;
  std::deque<TraceEvent> trace;

  // Best fit among free blocks, split when the rest is worth keeping; nullptr if none fits.
  Block* take(size_t size);
  void lend_from(Block* block, size_t size);
  // A new segment's single block, not yet in the free set.
  Block* add_segment(c10::DataPtr memory, size_t size);
  void give_back(Block* block, Releases& out);
  void insert_free(Block* block);
  void settle(Block* block);  // a decommitted block rejoins the free set
  // Give back free memory, oldest first, until at most `budget` bytes may stay resident.
  void shrink_to(size_t budget, Releases& out);
  void release_segments_smaller_than(size_t size, Releases& out);
  void release_block(Block* block, Releases& out, Reason reason = Reason::other);
  // Give back free memory that no lend of the last `release_after` outermost exits reused.
  void release_idle(Releases& out);
  // Give back free memory unused for release_idle_us by `now`; returns when the next cached
  // block will be (INT64_MAX: none will).
  int64_t release_timed_out(int64_t now, Releases& out);
  void tick(Releases& out);  // an outermost scope exited
  size_t working_set() const;
  void record(const char* action, const Block* block, const Context& context);
  void record_segment(const char* action, const Segment* segment);
  PoolStatsData stats() const;
};

struct BlockInfo {
  size_t size;
  size_t requested;
  Context context;
};

// One activation of a pool scope on one thread.
struct Scope : std::enable_shared_from_this<Scope> {
  std::shared_ptr<Pool> pool;
  std::shared_ptr<Scope> parent;  // the thread's innermost open scope when this one was entered
  size_t threshold = 0;
  int64_t max_bytes = kNone;
  bool fallback_on_limit = false;
  bool profiling = false;  // own setting or inherited from the parent at entry
  bool own_profiling = false;
  bool ticks = true;  // its exit as the thread's outermost scope advances the pools' epoch
  std::string name;
  std::thread::id owner;
  // Under g_mu.
  bool active = false;
  bool closed = false;
  int64_t live_bytes = 0, live_blocks = 0, peak_bytes = 0;
  int64_t routed = 0, routed_bytes = 0, hits = 0, misses = 0, fallbacks = 0, refused = 0;
  int64_t alloc_ns = 0;
  std::string limit_message;           // why its last allocation past a max_bytes was refused
  std::vector<BlockInfo> limit_blocks;  // what was alive then
};

enum class ExitResult { ok, wrong_thread, not_active };

extern std::mutex g_mu;

// The allocator (allocator.cpp).
bool install();
bool installed();
c10::Allocator* replaced();
void register_pool(const std::shared_ptr<Pool>& pool);
void enter(const std::shared_ptr<Scope>& scope);
// Out-of-order exits are fine; exits from another thread are refused.
ExitResult exit(const std::shared_ptr<Scope>& scope);
size_t thread_depth();
c10::DataPtr lend(Scope* top, size_t nbytes);
void fail_growth(int mode);  // test hook: growing a pool fails (1: out of memory, 2: a non-std exception)
void fail_next_register();  // test hook: the next lend runs out of memory after taking its block

// Blocks still lent on behalf of `scope` (or of every scope when null), by address; under g_mu.
std::vector<const Block*> live_blocks_locked(const Scope* scope);
std::vector<std::shared_ptr<Pool>> pools_locked();

int64_t now_us();   // wall clock (trace events)
int64_t mono_us();  // steady clock (idle times)

// The background releaser (releaser.cpp). Under g_mu: a block of `pool` became free at freed_us.
void note_cached_locked(Pool* pool, int64_t freed_us, Releases& out);
void wake_releaser_locked();   // a pool's release_idle changed
void start_releaser();         // without g_mu; from Releases::run
void releaser_after_fork_child();  // in a forked child, under g_mu: the thread did not come along

}  // namespace poolscope
