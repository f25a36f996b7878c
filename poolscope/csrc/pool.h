// Pools: memory taken from the replaced CPU allocator in segments, carved into blocks, lent
// to the large tensors of scopes, freed back into the pool when the last reference dies, and
// released to the system when nothing reuses it.
//
// Words (the same in the docs, docs/engines.md's glossary): a block is *lent* from the pool to
// a tensor and *freed* into the pool when the tensor's memory dies; cached memory is *released*
// to the system, a whole segment back to the replaced allocator or a free block's pages dropped
// (madvise). "Cached" means free and possibly resident.
//
// Algorithm. A request is rounded up to kGranule and served by best fit (the smallest free
// block that fits, lowest address among equals), split when the rest is worth keeping (within
// 1.25x of the request, no crumbs); with no fit the pool grows by a segment sized in classes of
// 1, 1.25, 1.5, 1.75 x 2^k. A freed block merges with its free neighbours.
//
// Retention (retention.cpp). Two clocks release cached memory: memory no lend reused during the
// last `hold_after` outermost exits (release_stale) and memory nothing used for `hold_idle_us`
// (release_expired, from the releaser thread). A clock the user set is fixed (hold == setting).
// A clock left to learn starts at its setting and learns from what follows a release: when a
// lend faults in memory within the bytes the clocks released, the pause since that memory was
// last used belonged to the traffic, and the clock becomes twice that pause, within [setting,
// kLearnLimit x setting]; a pause of the whole pool past the idle clock's bound (nothing freed
// into it) is the end of work, and both clocks start over.
// A merged free block is as idle as its most idle resident part, and remembers its freshest part
// (the blocks the latest exit freed side by side): a clock that finds the block idle keeps that
// part and releases the rest (release_around_fresh), so the front of a segment a loop reuses
// stays while the idle tail goes.
// Low memory (pressure.cpp) releases every cached block at once and starts the clocks over.
// Caps (max_cached, max_bytes) release oldest first (release_down_to).
//
// Locks. g_mu guards every pool; each thread's Stack (scope.h: its scopes' charging and the
// blocks it holds) has a lock of its own, taken after g_mu and alone by the thread's own lends and
// frees of held blocks (held.cpp), which take no other lock.
//
// Invariants (under g_mu; check_invariants() asserts them in debug builds):
//  1. Every block of a segment is in exactly one state: allocated (lent: in the registry of lent
//     blocks, owned.h; or held by one thread's stack, held.cpp), free (in free_blocks), or
//     decommitting (in neither, in the pool's
//     `decommitting` and a Deferred's list until its pages are dropped, then free again).
//     Blocks of a segment tile it: each block's next starts where it ends, and no two free
//     blocks are neighbours once merged.
//  2. bytes_cached is the sum of `committed` over free_blocks; bytes_in_use the sum of the sizes
//     of allocated blocks, held ones included; segment_bytes the sum of segment sizes; each segment's bytes_in_use
//     the sum of its allocated blocks.
//  3. A Pool lives while anything holds it or any block is lent from it, and a Scope while
//     anything holds it or any block is charged to it: the deleter of their shared_ptr (make_pool,
//     make_scope) deletes one only when none is, else marks it orphaned, and the free of its last
//     block deletes it. So blocks point to their pool and scopes without counting references, and
//     a lend or a free touches no reference count. A pool's destructor releases its free blocks
//     and segments, so it runs only when none is lent.
//  4. Nothing that can run Python, and no system call that releases memory, runs under g_mu:
//     that work goes into a Deferred and runs after unlocking (but for the registry's few pages
//     of an emptied chunk, owned.cpp).
//  5. Running out of memory changes nothing: a lend makes everything it needs (the spare block
//     a split takes, a new block's free-set node, the registry entry) before it changes the
//     pool, and a free allocates nothing it cannot do without: every block carries the free
//     set's node for it while it is out of the set (Block::node), and what a free may release
//     past max_cached waits for the next free when the list of candidates cannot be made.
//  6. Every segment starts kGranule-aligned and its chunks are in the registry (owned.h) from
//     before its first lend to after its release; a lent block is in its slot there from its
//     lend until its free takes it out. A free finds its block without a lock, and a pointer that
//     is not a lent block takes no lock at all.
#pragma once

#include "owned.h"

#include <c10/core/Allocator.h>
#include <c10/util/SmallVector.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#ifdef POOLSCOPE_CHECK_INVARIANTS
#define POOLSCOPE_CHECK(pool) (pool)->check_invariants()
#else
#define POOLSCOPE_CHECK(pool) ((void)0)
#endif

namespace poolscope {

// The pools' lock (the stacks' locks come after it). Critical sections last tens of nanoseconds,
// and a thread that sleeps in the kernel for the lock costs microseconds to wake: waiters spin
// briefly first (glibc's adaptive mutex), which made two threads on one pool that miss their held
// blocks three times as fast.
class EngineMutex {
 public:
  void lock() { pthread_mutex_lock(&mutex_); }
  void unlock() { pthread_mutex_unlock(&mutex_); }
  bool try_lock() { return pthread_mutex_trylock(&mutex_) == 0; }

 private:
#ifdef PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP
  pthread_mutex_t mutex_ = PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP;
#else
  pthread_mutex_t mutex_ = PTHREAD_MUTEX_INITIALIZER;
#endif
};
extern EngineMutex g_mu;
using Guard = std::lock_guard<EngineMutex>;
using UniqueGuard = std::unique_lock<EngineMutex>;

constexpr size_t kGranule = 512;            // block sizes and addresses: 64-byte alignment and more
static_assert(kGranule == owned::kSlotBytes, "a block starts at a registry slot");
// A free block of `block_size` bytes serves `size` whole when what would be left is no block worth
// keeping: under a granule, or under a quarter of the request (and under 1 MiB). Pool::lend_from
// splits otherwise; a thread's held blocks (held.cpp) serve only whole.
inline bool lent_whole(size_t block_size, size_t size) {
  const size_t rest = block_size - size;
  return rest < kGranule || rest < std::min(size / 4, size_t{1} << 20);
}
constexpr size_t kMinSegment = size_t{2} << 20;
constexpr size_t kMaxLend = size_t{1} << 62;  // larger requests are never pooled (no pool could hold one)
constexpr size_t kTraceLimit = 100000;      // events kept per pool while profiling
constexpr int64_t kNone = -1;               // "no limit" for the int64 settings below
constexpr int64_t kLearnLimit = 32;         // a learned clock holds at most this many times its setting

struct Pool;
struct Scope;
struct Segment;

using Context = std::shared_ptr<c10::GatheredContext>;

// A block a thread holds (held.cpp) stays `allocated`: it is lent, as far as the pool knows.
enum class BlockState : uint8_t { free, allocated, decommitting };

struct Block;
struct BySizeThenAddress {
  bool operator()(const Block* a, const Block* b) const;
};
using FreeSet = std::set<Block*, BySizeThenAddress>;

// A byte range of a segment, lent to one storage or free.
struct alignas(64) Block {  // a cache line of its own: threads write the blocks they hold
  Pool* pool = nullptr;
  Segment* segment = nullptr;
  char* addr = nullptr;
  size_t size = 0;
  Block* prev = nullptr;  // neighbours inside the segment, by address
  Block* next = nullptr;
  BlockState state = BlockState::allocated;
  // While allocated:
  size_t bytes_requested = 0;
  Scope* scope = nullptr;  // the innermost scope at its lend (charging.cpp)
  uint64_t serial = 0;     // its stack's serial at its lend
  Context context;                                         // where it was allocated (profiling)
  // While free:
  uint64_t freed_at_exit = 0;  // the pool's exits when it was last given back
  int64_t freed_us = 0;      // when it was last given back (steady clock; merged: its most idle resident part)
  size_t committed = 0;      // bytes that may still be resident (upper bound)
  // Its most recently freed resident part (merged blocks): what the clocks keep cached when they
  // release the rest (Pool::release_around_fresh).
  char* fresh_addr = nullptr;
  size_t fresh_size = 0;
  uint64_t fresh_at_exit = 0;
  int64_t fresh_us = 0;
  bool fresh_counted = false;  // each of its bytes is in `committed` (it was resident when freed)
  // Out of the free set: the set's node for it, so that putting it back allocates nothing (a
  // free must not fail: it runs in a deleter). In the set: empty.
  FreeSet::node_type node;
};

inline bool BySizeThenAddress::operator()(const Block* a, const Block* b) const {
  return a->size != b->size ? a->size < b->size : a->addr < b->addr;
}

// Memory from the replaced allocator, carved into blocks.
struct Segment {
  c10::DataPtr memory;
  Block* first = nullptr;  // the block at base: never merged away while the segment lives
  char* base = nullptr;    // kGranule-aligned, inside memory
  size_t size = 0;
  size_t bytes_in_use = 0;
};

struct TraceEvent {
  const char* action;
  uintptr_t addr;
  size_t size;
  int64_t time_us;
  Context context;
};

// Work to do once g_mu is released: segments to release, ranges whose pages to drop, and the
// last references to scopes, pools and stacks (whose destructors may take g_mu or the GIL).
struct Deferred {
  std::vector<std::unique_ptr<Segment>> segments;
  std::vector<Block*> decommit_blocks;  // out of the free set until their pages are dropped
  std::vector<std::shared_ptr<Scope>> scopes;
  Scope* dead_scopes = nullptr;  // orphaned scopes whose last block died (chained by next_dead)
  Pool* dead_pools = nullptr;    // orphaned pools whose last block died (chained by next_dead)
  void bury(Pool* pool);         // the pool goes (once) when this runs
  std::shared_ptr<Pool> pool;
  std::vector<std::shared_ptr<Pool>> pools;
  Context context;
  bool start_releaser = false;  // the first memory cached with release_idle set: start the thread
  void run();  // call without g_mu
};

// A pool's figures, named as poolscope.PoolStats names them (bindings.cpp converts).
struct PoolFigures {
  int64_t bytes_in_use = 0, bytes_requested = 0, bytes_cached = 0, bytes_reserved = 0, peak_bytes_in_use = 0;
  int64_t blocks_in_use = 0, blocks_cached = 0, segments = 0;
  int64_t hits = 0, misses = 0, releases = 0, bytes_released = 0, fallbacks = 0;
  int64_t bytes_released_by_exits = 0, bytes_released_by_time = 0, bytes_released_by_pressure = 0;
  int64_t working_set_bytes = 0, refaults = 0, bytes_refaulted = 0;
  int64_t max_cached_bytes = kNone, max_bytes = kNone, release_after = 0, release_idle_us = kNone;
  int64_t hold_after = 0, hold_idle_us = kNone;
  bool learn_after = false, learn_idle = false;
};

// Why cached memory is released to the system (a figure per reason).
enum class Reason { other, exits, time, pressure };

struct Pool : std::enable_shared_from_this<Pool> {
  explicit Pool(std::string device) : device(std::move(device)) {}
  ~Pool();

  const std::string device;
  // Settings (under g_mu).
  int64_t max_cached = kNone;
  int64_t max_bytes = kNone;
  int64_t release_after = 100;      // the exits clock's setting
  int64_t release_idle_us = kNone;  // the idle clock's setting (kNone: no idle clock)
  bool learn_after = false;         // the clocks left to learn from the traffic
  bool learn_idle = false;
  // The clocks in force (retention.cpp): the settings, or what the pool learned.
  int64_t hold_after = 100;  // cached memory no lend reused during this many outermost exits goes back
  int64_t hold_idle_us = kNone;  // cached memory unused this long goes back (releaser.cpp)
  // Memory the clocks released that no lend has faulted in again yet, and the latest moment
  // (time, exits) any of it was in use; learning reads them at the next lend that faults.
  size_t unreturned = 0;
  int64_t unreturned_since_us = 0, released_at_us = 0;
  int64_t last_free_us = 0;  // the latest block freed into the pool: the pool's own pause ends there
  uint64_t unreturned_since_exit = 0;
  int64_t refaults = 0, bytes_refaulted = 0, bytes_released_by_pressure = 0;

  // Everything below is under g_mu.
  bool orphaned = false;  // its last reference is gone; the free of its last block deletes it
  bool buried = false;    // in a Deferred's dead_pools
  Pool* next_dead = nullptr;
  FreeSet free_blocks;
  std::unique_ptr<Block> spare;  // a block with its node, for the next split (make_spare)
  std::vector<std::unique_ptr<Segment>> segments;
  // bytes_in_use counts held blocks, and with peak_bytes_in_use and window_peak is read (and the
  // peaks raised) by a thread's lend from its held blocks without g_mu.
  std::atomic<size_t> bytes_in_use{0};
  size_t bytes_requested = 0, bytes_cached = 0, segment_bytes = 0;
  size_t growing = 0;  // bytes of segments being allocated outside the lock
  std::vector<Block*> decommitting;  // blocks whose pages a Deferred drops outside the lock
  std::atomic<size_t> peak_bytes_in_use{0};
  // Whether threads may hold this pool's freed blocks: not under max_cached_bytes (held blocks
  // would escape the cap), not while tracing, not once orphaned.
  std::atomic<bool> holdable{true};
  int64_t hits = 0, misses = 0, releases = 0, bytes_released = 0, fallbacks = 0;
  int64_t bytes_released_by_exits = 0, bytes_released_by_time = 0;
  int64_t blocks_in_use = 0;
  // Epochs count outermost-scope exits; the working set (a figure) is the peak bytes in
  // use between consecutive exits, over the last release_after of them.
  uint64_t exits = 0;
  std::atomic<size_t> window_peak{0};
  std::deque<std::pair<uint64_t, size_t>> recent_peaks;  // (exits, peak), decreasing peaks
  bool tracing = false;
  std::deque<TraceEvent> trace;

  // Best fit among free blocks, split when the rest is worth keeping or the block is larger
  // than `room` (the bytes a scope's max_bytes leaves); nullptr if none fits. Everything that
  // can throw (bad_alloc) happens before the pool changes.
  Block* take(size_t size, size_t room = SIZE_MAX);
  void lend_from(Block* block, size_t size, size_t room = SIZE_MAX);  // allocates nothing: needs `spare`
  void make_spare();  // may throw bad_alloc; changes nothing else
  // A new segment's single block, not yet in the free set: `size` bytes from the first
  // kGranule-aligned byte of `memory` (which has size + kGranule bytes). nullptr, changing
  // nothing, when the registry cannot hold the segment (owned::add); may throw bad_alloc.
  Block* add_segment(c10::DataPtr& memory, size_t size);  // takes `memory` when it succeeds
  void put_free(Block* block);     // into the free set, with its own node: allocates nothing
  void take_free(Block* block);    // out of the free set, keeping its node
  void discard(Block* block);      // a block merged away: kept as the spare, or deleted
  void free_block(Block* block, Deferred& out);
  void insert_free(Block* block);
  void settle(Block* block);  // a decommitted block rejoins the free set
  // In a forked child, under g_mu: growth and decommits that other threads had in flight will
  // never finish there; their bytes are no longer growing, their blocks free again (resident
  // or not: counted as cached, an upper bound).
  void after_fork_child();
  // Give back free memory, oldest first, until at most `budget` bytes may stay resident.
  void release_down_to(size_t budget, Deferred& out, Reason reason = Reason::other);
  void release_segments_smaller_than(size_t size, Deferred& out);
  void release_block(Block* block, Deferred& out, Reason reason = Reason::other);
  // A block a clock found idle whose freshest part is not: that part stays cached and the rest
  // is released. False, changing nothing, when it has no such part or no room to split it.
  bool release_around_fresh(Block* block, Deferred& out, Reason reason);
  // Give back free memory that no lend of the last `release_after` outermost exits reused.
  void release_stale(Deferred& out);
  // Give back free memory unused for release_idle_us by `now`; returns when the next cached
  // block will be (INT64_MAX: none will).
  int64_t release_expired(int64_t now, Deferred& out);
  void tick(Deferred& out);  // an outermost scope exited
  // Retention (retention.cpp): a clock released `block`; a lend faulted in `bytes` that were
  // not resident; low memory made the pool release its cache and start its clocks over.
  void note_released(const Block* block, int64_t now);
  void note_faulted(size_t bytes, int64_t now);
  void forget_learned();
  size_t working_set() const;
  void record(const char* action, const Block* block, const Context& context);
  void record_segment(const char* action, const Segment* segment);
  // Settings from Python; lowering a cap or turning on release_idle acts at once.
  void configure(int64_t max_cached, int64_t max_bytes, int64_t release_after, bool learn_after,
                 int64_t release_idle_us, bool learn_idle, Deferred& out);
  // Release every cached block (everything), or what no recent exit reused (release_stale).
  void release(bool everything, Deferred& out);
  PoolFigures figures() const;
  // Debug builds (-DPOOLSCOPE_CHECK_INVARIANTS): abort on a broken invariant (pool.h's note).
  void check_invariants() const;
};

// Deadlines saturate: a time past what int64 microseconds hold means "never" (INT64_MAX), so
// that no setting, however large, wraps into a deadline in the past.
inline int64_t deadline_after(int64_t start_us, int64_t delay_us) {
  int64_t due;
  return __builtin_add_overflow(start_us, delay_us, &due) ? INT64_MAX : due;
}

int64_t now_us();   // wall clock (trace events)
int64_t mono_us();  // steady clock (idle times), or the test clock while a test sets one
// The same clock read at its last tick (a few ms behind, a tenth of mono_us's cost): when a
// block is freed, on every free, where the idle clock's seconds do not need more.
int64_t mono_coarse_us();
bool test_clock_set();
void set_test_clock(int64_t us);  // test hook: mono_us() returns `us` (-1: the real clock again)

// The background releaser (releaser.cpp). Under g_mu: a block of `pool` became free at freed_us.
void note_cached_locked(Pool* pool, int64_t freed_us, Deferred& out);
void wake_releaser_locked();   // a pool's release_idle changed
void start_releaser();         // without g_mu; from Deferred::run
void releaser_after_fork_child();  // in a forked child, under g_mu: the thread did not come along
// Under g_mu, once the system or the cgroup is low on memory (os::memory_low): every pool
// releases its cache and its clocks start over (retention.cpp).
void release_under_pressure_locked(const std::vector<std::shared_ptr<Pool>>& pools, Deferred& out);
std::vector<std::shared_ptr<Pool>> live_pools_locked();  // every pool alive (allocator.cpp)
std::shared_ptr<Pool> make_pool(std::string device);      // invariant 3's deleter (allocator.cpp)
void unregister_pool_locked(Pool* pool);  // from its destructor

}  // namespace poolscope
