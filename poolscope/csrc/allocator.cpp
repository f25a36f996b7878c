// The CPU allocator poolscope installs (scope.h says what it does).
//
// allocate() reads one thread-local pointer: outside a scope, or below the
// innermost scope's threshold, the request goes straight to the allocator that
// was installed before (the "replaced" one) and its DataPtr comes back
// untouched. Inside a scope the block comes from the scope's pool and its
// DataPtr's deleter gives it back, from whichever thread drops the last
// reference, without the GIL. Context and data pointer are the same, so the
// raw_allocate/raw_deallocate interface that kernels such as oneDNN's use works.
#include "scope.h"
#include "os.h"
#include "owned.h"
#include "torch_compat.h"

#include <c10/core/CPUAllocator.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <sstream>
#include <utility>

namespace poolscope {

EngineMutex g_mu;

namespace {

// Never destroyed: tensors that outlive the interpreter die during static destruction, and
// their deleters must still find these (and the allocator) intact.
auto& g_pools = *new std::vector<Pool*>();  // every pool alive: each adds itself and its destructor removes it, under g_mu
// Published (release) before poolscope's allocator becomes PyTorch's, read (acquire) by every
// thread that reaches it: a thread that sees the new allocator also sees what it forwards to.
std::atomic<c10::Allocator*> g_replaced{nullptr};
std::atomic<c10::DeleterFnPtr> g_replaced_raw{nullptr};
std::atomic<int> g_fail_growth{0};    // test hook: 1 growth returns nothing, 2 it throws a non-std exception
std::atomic<bool> g_fail_register{false};  // test hook: the next lend fails after its block was taken
std::atomic<int64_t> g_refusals{0};  // limit refusals so far: each one's serial

constexpr size_t kClassSteps = 4;  // new segments are rounded up to 1, 1.25, 1.5 or 1.75 x 2**k

size_t round_up(size_t n, size_t to) {
  return (n + to - 1) / to * to;
}

size_t segment_size(size_t size) {
  if (size <= kMinSegment) {
    return kMinSegment;
  }
  size_t top = size_t{1} << (63 - __builtin_clzll(size));
  size_t step = top / kClassSteps;
  return round_up(round_up(size, step), kGranule);
}

int64_t now_ns() {
  using namespace std::chrono;
  return duration_cast<nanoseconds>(steady_clock::now().time_since_epoch()).count();
}

void free_ptr(void* ptr);

struct PoolscopeAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    if (C10_LIKELY(g_threads_in_scopes.load(std::memory_order_relaxed) == 0)) {
      return g_replaced.load(std::memory_order_acquire)->allocate(nbytes);
    }
    Scope* top = t_innermost;
    if (C10_UNLIKELY(top != nullptr && top->closed_elsewhere.load(std::memory_order_relaxed))) {
      top = drop_closed_elsewhere();
    }
    if (C10_LIKELY(top == nullptr) || nbytes < top->threshold || nbytes == 0) {
      return replaced_allocator()->allocate(nbytes);
    }
    return lend(top, nbytes);
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return &free_ptr;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

PoolscopeAllocator& g_allocator = *new PoolscopeAllocator();

void free_raw(void* ptr) {
  // Not a pooled block: memory the replaced allocator handed out through raw_allocate.
  c10::DeleterFnPtr raw = g_replaced_raw.load(std::memory_order_acquire);
  TORCH_INTERNAL_ASSERT(raw != nullptr, "poolscope: the replaced CPU allocator has no raw deleter");
  raw(ptr);
}

// The free of a lent block: apart from free_ptr, so that a free of memory poolscope does not
// own (a raw free outside every scope) pays for none of its stack frame.
__attribute__((noinline)) void free_lent(Block* block);

void free_ptr(void* ptr) {
  // No lock: a pointer that is not a lent block takes none, and most are told by their address.
  Block* block = owned::may_be_lent(ptr) ? owned::take_lent(ptr) : nullptr;
  if (C10_LIKELY(block == nullptr)) {
    if (ptr != nullptr) {
      free_raw(ptr);
    }
    return;
  }
  free_lent(block);
}

void free_lent(Block* block) {
  // Nothing below allocates: a free runs in a deleter and must not fail.
  Deferred out;
  Pool* pool = block->pool;
  Stack& stack = *block->scope->stack;
  // The fast path: the thread that lent it holds it for its next lend (held.cpp), under its
  // stack's lock only.
  if (&stack == this_thread_stack() && !block->context && block->size <= kHeldLargest &&
      pool->holdable.load(std::memory_order_relaxed)) {
    bool held;
    {
      StackGuard guard(stack.mu);
      held = hold_locked(stack, block);
      if (held) {
        charge_free_locked(block, out);
      }
    }
    if (held) {
      out.run();
      return;
    }
  }
  {
    Guard lock(g_mu);
    {
      StackGuard guard(stack.mu);
      charge_free_locked(block, out);
    }
    if (block->context) {
      pool->record("free_requested", block, block->context);
      pool->record("free_completed", block, block->context);
    }
    out.context = std::move(block->context);
    pool->free_block(block, out);
    if (pool->blocks_in_use == 0 && pool->orphaned) {
      out.bury(pool);
    }
  }
  out.run();
}

std::string limit_message(const Scope* limiting, size_t size, size_t nbytes) {
  const ScopeFigures figures = figures_locked(*limiting);
  std::ostringstream msg;
  msg << "poolscope: pool_scope(";
  if (!limiting->name.empty()) {
    msg << "name='" << limiting->name << "', ";
  }
  msg << "max_bytes=" << limiting->max_bytes << ") refused an allocation of " << nbytes << " bytes (a "
      << size << "-byte block): " << figures.bytes_in_use << " bytes in " << figures.blocks_in_use
      << " pooled block(s) lent on its behalf are alive. Raise max_bytes, drop tensors earlier, or pass "
         "on_limit='fallback' to let the ordinary allocator serve what does not fit.";
  return msg.str();
}

// The pool's bytes in use reached `in_use` (its held blocks, which it counts as lent, less the
// calling thread's): its peak and the exits window's rise to it. Without g_mu from a held lend;
// other threads' held blocks may count (at most kHeldBytes each).
void note_peak(Pool* pool, size_t in_use) {
  for (auto* peak : {&pool->peak_bytes_in_use, &pool->window_peak}) {
    size_t seen = peak->load(std::memory_order_relaxed);
    while (in_use > seen && !peak->compare_exchange_weak(seen, in_use, std::memory_order_relaxed)) {
    }
  }
}

// Record a taken block as lent. Nothing here allocates (the registry is a table of slots): only
// the test hook fails, before anything changed, and the caller puts the block back then.
c10::DataPtr register_locked(Scope* top, Block* block, size_t nbytes, bool hit, Context context,
                             int64_t spent) {  // spent: -1 for a hit not timed
  if (C10_UNLIKELY(g_fail_register.load(std::memory_order_relaxed)) && g_fail_register.exchange(false)) {
    throw std::bad_alloc();
  }
  Pool* pool = block->pool;
  block->bytes_requested = nbytes;
  block->context = std::move(context);
  pool->bytes_in_use += block->size;
  pool->bytes_requested += nbytes;
  pool->blocks_in_use += 1;
  block->segment->bytes_in_use += block->size;
  (hit ? pool->hits : pool->misses) += 1;
  {
    Stack& stack = *top->stack;
    StackGuard guard(stack.mu);
    note_peak(pool, pool->bytes_in_use - (stack.held_pool == pool ? stack.held_bytes : 0));
    charge_lend_locked(top, block, nbytes, hit, spent);
  }
  owned::lend(block, block->addr);  // last: a free that finds it finds it whole
  if (block->context) {
    try {  // the trace is a figure: losing an event to a full memory must not lose the block
      if (!pool->tracing) {
        pool->tracing = true;
        pool->holdable.store(false, std::memory_order_relaxed);  // every free is traced from now on
        pool->record_segment("segment_alloc", block->segment);
      }
      pool->record("alloc", block, block->context);
    } catch (const std::bad_alloc&) {
    }
  }
  return c10::DataPtr(block->addr, block->addr, &free_ptr, c10::Device(c10::DeviceType::CPU));
}

void count_fallback_locked(Scope* top, Pool* pool) {
  pool->fallbacks += 1;
  charge_fallback_locked(top);
}

// Run `out` with g_mu dropped: segments go back to the replaced allocator, pages to the system.
void run_unlocked(UniqueGuard& lock, Deferred& out) {
  lock.unlock();
  out.run();
  lock.lock();
}

size_t physical_memory() {
  static const size_t bytes = [] {
    long pages = sysconf(_SC_PHYS_PAGES);
    return pages > 0 ? static_cast<size_t>(pages) * os::page_size() : SIZE_MAX;
  }();
  return bytes;
}

// A new segment's block for `size` bytes, or nullptr when the replaced allocator cannot supply
// one (out of memory, or the pool's max_bytes) even after the pool gave back its cache. The
// pool's max_bytes bounds the bytes of its segments (lent, cached, or mapped and not yet
// touched): every one of them can be lent without another check.
Block* grow_locked(UniqueGuard& lock, Pool* pool, size_t size, size_t room) {
  pool->make_spare();  // for splitting the new segment's block; may throw before anything changed
  // Giving back cached memory helps only a request that could fit in this machine's memory (and
  // in max_bytes) at all; for an impossible one it would only throw the working set away.
  const bool could_fit =
      size <= physical_memory() && (pool->max_bytes == kNone || size <= static_cast<size_t>(pool->max_bytes));
  if (could_fit) {
    Deferred out;
    pool->release_segments_smaller_than(size, out);
    if (!out.segments.empty()) {
      run_unlocked(lock, out);
    }
  }
  for (int attempt = 0; attempt < 2; ++attempt) {
    size_t wanted = segment_size(size);
    if (pool->max_bytes != kNone) {
      size_t held = pool->segment_bytes + pool->growing;
      auto limit = static_cast<size_t>(pool->max_bytes);
      if (held > limit || wanted > limit - held) {
        wanted = held <= limit && size <= limit - held ? size : 0;
      }
    }
    if (wanted > 0) {
      pool->growing += wanted;
      lock.unlock();
      c10::DataPtr memory;
      try {
        int failing = g_fail_growth.load(std::memory_order_relaxed);
        if (failing == 2) {
          throw 42;  // what a foreign allocator may throw: not a std::exception
        }
        if (failing == 0) {
          memory = replaced_allocator()->allocate(wanted + kGranule);  // room to start aligned
        }
      } catch (...) {
        memory.clear();
      }
      lock.lock();
      pool->growing -= wanted;
      Block* block = memory ? pool->add_segment(memory, wanted) : nullptr;
      if (block != nullptr) {
        pool->lend_from(block, size, room);
        pool->note_faulted(size, mono_us());
        return block;
      }
      if (memory) {  // the registry could not take it: back to the replaced allocator, unlocked
        lock.unlock();
        memory.clear();
        lock.lock();
      }
    }
    if (attempt == 0 && could_fit) {
      Deferred out;
      pool->release_down_to(0, out);
      run_unlocked(lock, out);
    } else {
      break;
    }
  }
  return nullptr;
}

// A taken block that could not be registered goes back to the free set as it was.
void untake_locked(Block* block) {
  block->state = BlockState::free;
  block->committed = block->size;  // an upper bound: it may have been resident
  block->pool->insert_free(block);
}

void prepare_fork() {
  g_mu.lock();
  lock_all_stacks_locked();  // no thread is inside a lend or free of its held blocks
}

void after_fork() {
  unlock_all_stacks_locked();
  g_mu.unlock();
}

// The pools alive at the fork, kept past the unlock: a last reference must not die under g_mu.
std::vector<std::shared_ptr<Pool>>* g_forked_pools = nullptr;

void after_fork_child() {
  // Only the forking thread came along: nothing another thread had in flight will finish here.
  after_fork_child_all_locked();  // the other threads' held blocks: theirs no more
  g_threads_in_scopes.store(t_innermost != nullptr ? 1 : 0, std::memory_order_relaxed);
  releaser_after_fork_child();
  g_forked_pools = new std::vector<std::shared_ptr<Pool>>(live_pools_locked());
  for (auto& pool : *g_forked_pools) {
    pool->after_fork_child();
  }
  g_mu.unlock();
  delete g_forked_pools;
  g_forked_pools = nullptr;
}

}  // namespace

c10::Allocator* replaced_allocator() {
  return g_replaced.load(std::memory_order_acquire);
}

// Time in the pool (a scope's alloc_seconds): reading the clock twice costs about a third of a
// hit, so only a scope's first hit and every kTimedEvery-th after it are timed, and its hits
// count at their mean; every miss is timed.
constexpr int64_t kTimedEvery = 16;

// A lend the thread's held blocks serve (held.cpp), under its stack's lock only; nullptr when they
// do not: limits and profiling take the locked path, where refusals and stacks are exact.
Block* lend_held(Scope* top, Pool* pool, size_t size, size_t nbytes) {
  Stack& stack = *top->stack;
  StackGuard guard(stack.mu);
  if (top->closed || !stack.limited.empty()) {
    return nullptr;
  }
  Block* block = take_held_locked(stack, pool, size);
  if (block == nullptr) {
    return nullptr;
  }
  const bool timed = top->own.hits % kTimedEvery == 0;
  const int64_t start_ns = timed ? now_ns() : 0;
  block->bytes_requested = nbytes;
  stack.held_hits += 1;
  stack.held_requested += static_cast<int64_t>(nbytes);
  note_peak(pool, pool->bytes_in_use.load(std::memory_order_relaxed) - stack.held_bytes);
  charge_lend_locked(top, block, nbytes, true, timed ? now_ns() - start_ns : -1);
  owned::lend(block, block->addr);  // last: a free that finds it finds it whole
  return block;
}

c10::DataPtr lend(Scope* top, size_t nbytes) {
  Pool* pool = top->pool.get();
  if (!top->profiling && nbytes <= kHeldLargest) {
    if (Block* block = lend_held(top, pool, round_up(nbytes, kGranule), nbytes)) {
      return c10::DataPtr(block->addr, block->addr, &free_ptr, c10::Device(c10::DeviceType::CPU));
    }
  }
  // Stacks are gathered before locking: gathering takes the GIL.
  Context context = top->profiling ? gather_traceback() : Context();
  // Larger than any pool can hold (and past where rounding would wrap): never pooled.
  const bool poolable = nbytes <= kMaxLend;
  const size_t size = poolable ? round_up(nbytes, kGranule) : nbytes;
  Stack& stack = *top->stack;
  struct RunAfterUnlock {  // destroyed after `lock`: runs once g_mu is released, on every path
    Deferred out;
    ~RunAfterUnlock() { out.run(); }
  } after_unlock;
  UniqueGuard lock(g_mu);
  bool sampled;
  Scope* limiting;
  size_t room;
  {
    StackGuard guard(stack.mu);
    sampled = top->own.hits % kTimedEvery == 0;
    limiting = over_limit_locked(top, size);
    room = room_locked(top);
    if (stack.held_pool != nullptr && stack.held_pool != pool) {
      // Held blocks of another pool: back to it, so that this one's frees can be held.
      return_held_locked(stack, &after_unlock.out);
    }
  }
  int64_t start_ns = sampled ? now_ns() : 0;
  if (limiting != nullptr) {
    if (limiting->fallback_on_limit) {
      count_fallback_locked(top, pool);
      lock.unlock();
      return replaced_allocator()->allocate(nbytes);
    }
    const int64_t serial = g_refusals.fetch_add(1, std::memory_order_relaxed) + 1;
    std::string message;
    std::vector<BlockInfo> alive;
    {
      AllStacksGuard stacks;  // the blocks charged to it are read (held.cpp's invariants)
      message = limit_message(limiting, size, nbytes);
      for (const Block* block : live_blocks_locked(limiting)) {
        alive.push_back(BlockInfo{block->size, block->bytes_requested, block->context});
      }
    }
    // Whichever scope the error leaves first turns it into ScopeLimitError: the innermost one
    // when the scopes nest as the frames do, the limiting one when a paused generator's scope
    // is above it on the stack (its with-block never sees the error). So every scope from the
    // requesting one down to the limiting one records it.
    for (Scope* s = top; s != nullptr; s = s->parent.get()) {
      s->refusal_serial = serial;
      s->refusal_message = message;
      s->refusal_blocks = alive;
      if (s == limiting) {
        break;
      }
    }
    message += " [poolscope refusal #" + std::to_string(serial) + "]";
    lock.unlock();
    TORCH_CHECK_WITH(OutOfMemoryError, false, message);
  }
  if (poolable) {
    bool hit = true;
    Block* block = pool->take(size, room);
    if (block == nullptr) {
      // What this thread holds of the pool may serve it split: back into the pool before it grows.
      StackGuard guard(stack.mu);
      if (stack.held_pool == pool && stack.held_count > 0) {
        return_held_locked(stack, &after_unlock.out);
        block = pool->take(size, room);
      }
    }
    if (block == nullptr) {
      hit = false;
      if (!sampled) {
        start_ns = now_ns();
      }
      block = grow_locked(lock, pool, size, room);  // another thread may close a scope meanwhile
    }
    if (block != nullptr) {
      try {
        const int64_t spent = hit && !sampled ? -1 : now_ns() - start_ns;
        return register_locked(top, block, nbytes, hit, std::move(context), spent);
      } catch (...) {
        untake_locked(block);
        throw;
      }
    }
  }
  count_fallback_locked(top, pool);
  lock.unlock();
  // PyTorch's own allocator serves it, or raises its own error for it.
  return replaced_allocator()->allocate(nbytes);
}

bool install() {
  static const bool ok = [] {
    c10::Allocator* current = c10::GetCPUAllocator();
    if (current == &g_allocator) {
      return true;
    }
    g_replaced_raw.store(current->raw_deleter(), std::memory_order_release);
    g_replaced.store(current, std::memory_order_release);
    // Take over at the lowest priority that is allowed to replace the current allocator.
    for (int priority = 0; priority < 256 && c10::GetCPUAllocator() != &g_allocator; ++priority) {
      c10::SetCPUAllocator(&g_allocator, static_cast<uint8_t>(priority));
    }
    return c10::GetCPUAllocator() == &g_allocator;
  }();
  return ok && installed();
}

void register_fork_handlers() {
  static const bool registered = [] {
    pthread_atfork(&prepare_fork, &after_fork, &after_fork_child);
    return true;
  }();
  (void)registered;
}

bool installed() {
  return replaced_allocator() != nullptr && c10::GetCPUAllocator() == &g_allocator;
}

void fail_growth(int mode) {
  g_fail_growth.store(mode, std::memory_order_relaxed);
}

void fail_next_register() {
  g_fail_register.store(true);
}

std::shared_ptr<Pool> make_pool(std::string device) {
  return std::shared_ptr<Pool>(new Pool(std::move(device)), [](Pool* pool) {
    Deferred out;
    {
      Guard lock(g_mu);
      pool->holdable.store(false, std::memory_order_relaxed);
      return_all_held_locked(out, pool);
      if (pool->blocks_in_use > 0) {
        pool->orphaned = true;  // the free of its last block deletes it
        pool->release_down_to(0, out);  // nothing can use its cache any more
      } else {
        out.bury(pool);
      }
    }
    out.run();
  });
}

std::shared_ptr<Scope> make_scope() {
  return std::shared_ptr<Scope>(new Scope(), [](Scope* scope) {
    if (scope->stack) {  // entered: its stack's lock guards what its blocks change (charging.cpp)
      Guard lock(g_mu);
      StackGuard guard(scope->stack->mu);
      if (scope->innermost_blocks > 0) {
        scope->orphaned = true;  // the free of its last block deletes it
        return;
      }
    }
    delete scope;
  });
}

void register_pool(const std::shared_ptr<Pool>& pool) {
  Guard lock(g_mu);
  g_pools.push_back(pool.get());
}

void unregister_pool_locked(Pool* pool) {
  g_pools.erase(std::remove(g_pools.begin(), g_pools.end(), pool), g_pools.end());
}

void tick_all_locked(Deferred& out) {
  for (auto& pool : live_pools_locked()) {
    pool->tick(out);
    out.pools.push_back(std::move(pool));  // dies after the lock, with `out`
  }
}

std::vector<const Block*> live_blocks_locked(const Scope* scope) {
  // The registry is by address; the pools' segments say which blocks are lent.
  std::vector<const Block*> blocks;
  for (const Pool* pool : g_pools) {
    for (const auto& segment : pool->segments) {
      for (const Block* block = segment->first; block != nullptr; block = block->next) {
        if (block->state == BlockState::allocated && owned::lent_at(block->addr) == block &&
            (scope == nullptr || charged_to_locked(block, scope))) {
          blocks.push_back(block);
        }
      }
    }
  }
  std::sort(blocks.begin(), blocks.end(), [](const Block* a, const Block* b) { return a->addr < b->addr; });
  return blocks;
}

std::vector<std::shared_ptr<Pool>> live_pools_locked() {
  // A pool whose last reference is gone may still be listed, its destructor waiting for g_mu.
  std::vector<std::shared_ptr<Pool>> pools;
  for (Pool* pool : g_pools) {
    if (auto alive = pool->weak_from_this().lock()) {
      pools.push_back(std::move(alive));
    }
  }
  return pools;
}

}  // namespace poolscope
