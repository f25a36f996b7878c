// The CPU allocator poolscope installs, and the per-thread stack of open scopes.
//
// allocate() reads one thread-local pointer: outside a scope, or below the
// innermost scope's threshold, the request goes straight to the allocator that
// was installed before (the "replaced" one) and its DataPtr comes back
// untouched. Inside a scope the block comes from the scope's pool and its
// DataPtr's deleter gives it back, from whichever thread drops the last
// reference, without the GIL. Context and data pointer are the same, so the
// raw_allocate/raw_deallocate interface that kernels such as oneDNN's use works.
#include "engine.h"
#include "torch_compat.h"

#include <c10/core/CPUAllocator.h>
#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <sstream>

namespace poolscope {

std::mutex g_mu;

namespace {

// Never destroyed: tensors that outlive the interpreter die during static destruction, and
// their deleters must still find these (and the allocator) intact.
auto& g_live = *new std::unordered_map<void*, Block*>();  // lent blocks by address, under g_mu
auto& g_pools = *new std::vector<std::weak_ptr<Pool>>();  // under g_mu
c10::Allocator* g_replaced = nullptr;
c10::DeleterFnPtr g_replaced_raw = nullptr;
std::atomic<bool> g_fail_growth{false};

thread_local Scope* t_top = nullptr;
thread_local std::vector<std::shared_ptr<Scope>> t_stack;

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

void release_ptr(void* ptr);

struct PoolscopeAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    Scope* top = t_top;
    if (C10_LIKELY(top == nullptr) || nbytes < top->threshold || nbytes == 0) {
      return g_replaced->allocate(nbytes);
    }
    return lend(top, nbytes);
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return &release_ptr;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

PoolscopeAllocator& g_allocator = *new PoolscopeAllocator();

void release_ptr(void* ptr) {
  if (ptr == nullptr) {
    return;
  }
  Releases out;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_live.find(ptr);
    if (it != g_live.end()) {
      Block* block = it->second;
      g_live.erase(it);
      for (auto& scope : block->charged) {
        scope->live_bytes -= static_cast<int64_t>(block->size);
        scope->live_blocks -= 1;
        out.scopes.push_back(std::move(scope));
      }
      block->charged.clear();
      Pool* pool = block->pool;
      if (block->context) {
        pool->record("free_requested", block, block->context);
        pool->record("free_completed", block, block->context);
      }
      out.context = std::move(block->context);
      out.pool = std::move(block->owner);
      pool->give_back(block, out);
      ptr = nullptr;
    }
  }
  out.run();
  if (ptr != nullptr) {
    // Not a pooled block: memory the replaced allocator handed out through raw_allocate.
    TORCH_INTERNAL_ASSERT(g_replaced_raw != nullptr, "poolscope: the replaced CPU allocator has no raw deleter");
    g_replaced_raw(ptr);
  }
}

// The innermost open scope of the chain whose max_bytes one more block of `size` would pass.
Scope* over_limit(Scope* top, size_t size) {
  for (Scope* s = top; s != nullptr; s = s->parent.get()) {
    if (!s->closed && s->max_bytes != kNone && s->live_bytes + static_cast<int64_t>(size) > s->max_bytes) {
      return s;
    }
  }
  return nullptr;
}

std::string limit_message(const Scope* limiting, size_t size, size_t nbytes) {
  std::ostringstream msg;
  msg << "poolscope: pool_scope(";
  if (!limiting->name.empty()) {
    msg << "name='" << limiting->name << "', ";
  }
  msg << "max_bytes=" << limiting->max_bytes << ") refused an allocation of " << nbytes << " bytes (a "
      << size << "-byte block): " << limiting->live_bytes << " bytes in " << limiting->live_blocks
      << " pooled block(s) lent on its behalf are alive. Raise max_bytes, drop tensors earlier, or pass "
         "on_limit='fallback' to let the ordinary allocator serve what does not fit.";
  return msg.str();
}

c10::DataPtr register_locked(Scope* top, Block* block, size_t nbytes, bool hit, Context context, int64_t start_ns) {
  Pool* pool = block->pool;
  block->requested = nbytes;
  block->owner = pool->shared_from_this();
  block->context = std::move(context);
  pool->in_use += block->size;
  pool->requested += nbytes;
  pool->blocks_in_use += 1;
  block->segment->in_use += block->size;
  pool->peak_in_use = std::max(pool->peak_in_use, pool->in_use);
  pool->window_peak = std::max(pool->window_peak, pool->in_use);
  (hit ? pool->hits : pool->misses) += 1;
  const auto size = static_cast<int64_t>(block->size);
  const int64_t spent = now_ns() - start_ns;
  for (Scope* s = top; s != nullptr; s = s->parent.get()) {
    if (s->closed) {
      continue;
    }
    s->live_bytes += size;
    s->live_blocks += 1;
    s->peak_bytes = std::max(s->peak_bytes, s->live_bytes);
    s->routed += 1;
    s->routed_bytes += static_cast<int64_t>(nbytes);
    (hit ? s->hits : s->misses) += 1;
    s->alloc_ns += spent;
    block->charged.push_back(s->shared_from_this());
  }
  if (block->context) {
    if (!pool->tracing) {
      pool->tracing = true;
      pool->record_segment("segment_alloc", block->segment);
    }
    block->alloc_us = now_us();
    pool->record("alloc", block, block->context);
  }
  g_live.emplace(block->addr, block);
  return c10::DataPtr(block->addr, block->addr, &release_ptr, c10::Device(c10::DeviceType::CPU));
}

void count_fallback_locked(Scope* top, Pool* pool) {
  pool->fallbacks += 1;
  for (Scope* s = top; s != nullptr; s = s->parent.get()) {
    if (!s->closed) {
      s->fallbacks += 1;
    }
  }
}

// A new segment's block for `size` bytes, or nullptr when the replaced allocator
// cannot supply one (out of memory, or the pool's max_bytes) even after the
// pool gave back its cache.
void run_unlocked(std::unique_lock<std::mutex>& lock, Releases& out) {
  lock.unlock();
  out.run();
  lock.lock();
}

Block* grow_locked(std::unique_lock<std::mutex>& lock, Pool* pool, size_t size) {
  {
    Releases out;
    pool->release_segments_smaller_than(size, out);
    if (!out.segments.empty()) {
      run_unlocked(lock, out);
    }
  }
  for (int attempt = 0; attempt < 2; ++attempt) {
    size_t wanted = segment_size(size);
    if (pool->max_bytes != kNone) {
      size_t held = pool->in_use + pool->committed_free + pool->growing;
      auto limit = static_cast<size_t>(pool->max_bytes);
      if (held + wanted > limit) {
        wanted = held + size <= limit ? size : 0;
      }
    }
    if (wanted > 0) {
      pool->growing += wanted;
      lock.unlock();
      c10::DataPtr memory;
      try {
        if (!g_fail_growth.load(std::memory_order_relaxed)) {
          memory = g_replaced->allocate(wanted);
        }
      } catch (const std::exception&) {
        memory.clear();
      }
      lock.lock();
      pool->growing -= wanted;
      if (memory) {
        Block* block = pool->add_segment(std::move(memory), wanted);
        pool->lend_from(block, size);
        return block;
      }
    }
    if (attempt == 0) {
      Releases out;
      pool->shrink_to(0, out);
      run_unlocked(lock, out);
    }
  }
  return nullptr;
}

void prepare_fork() {
  g_mu.lock();
}

void after_fork() {
  g_mu.unlock();
}

}  // namespace

c10::DataPtr lend(Scope* top, size_t nbytes) {
  const int64_t start_ns = now_ns();
  // Stacks are gathered before locking: gathering takes the GIL.
  Context context = top->profiling ? gather_traceback() : Context();
  const size_t size = round_up(nbytes, kGranule);
  Pool* pool = top->pool.get();
  std::unique_lock<std::mutex> lock(g_mu);
  if (Scope* limiting = over_limit(top, size)) {
    if (limiting->fallback_on_limit) {
      count_fallback_locked(top, pool);
      lock.unlock();
      return g_replaced->allocate(nbytes);
    }
    limiting->refused += 1;
    std::string message = limit_message(limiting, size, nbytes);
    std::vector<BlockInfo> alive;
    for (const Block* block : live_blocks_locked(limiting)) {
      alive.push_back(BlockInfo{block->size, block->requested, block->context});
    }
    // The requesting scope exits first and turns the error into ScopeLimitError.
    top->limit_message = message;
    top->limit_blocks = std::move(alive);
    lock.unlock();
    TORCH_CHECK_WITH(OutOfMemoryError, false, message);
  }
  if (Block* block = pool->take(size)) {
    return register_locked(top, block, nbytes, true, std::move(context), start_ns);
  }
  if (Block* block = grow_locked(lock, pool, size)) {
    return register_locked(top, block, nbytes, false, std::move(context), start_ns);
  }
  count_fallback_locked(top, pool);
  lock.unlock();
  // PyTorch's own allocator serves it, or raises its own error for it.
  return g_replaced->allocate(nbytes);
}

bool install() {
  static const bool ok = [] {
    c10::Allocator* current = c10::GetCPUAllocator();
    if (current == &g_allocator) {
      return true;
    }
    g_replaced = current;
    g_replaced_raw = current->raw_deleter();
    // Take over at the lowest priority that is allowed to replace the current allocator.
    for (int priority = 0; priority < 256 && c10::GetCPUAllocator() != &g_allocator; ++priority) {
      c10::SetCPUAllocator(&g_allocator, static_cast<uint8_t>(priority));
    }
    pthread_atfork(&prepare_fork, &after_fork, &after_fork);
    return c10::GetCPUAllocator() == &g_allocator;
  }();
  return ok && installed();
}

bool installed() {
  return g_replaced != nullptr && c10::GetCPUAllocator() == &g_allocator;
}

c10::Allocator* replaced() {
  return g_replaced;
}

void fail_growth(bool on) {
  g_fail_growth.store(on, std::memory_order_relaxed);
}

void register_pool(const std::shared_ptr<Pool>& pool) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_pools.erase(
      std::remove_if(g_pools.begin(), g_pools.end(), [](const auto& p) { return p.expired(); }), g_pools.end());
  g_pools.push_back(pool);
}

void enter(const std::shared_ptr<Scope>& scope) {
  scope->parent = t_stack.empty() ? nullptr : t_stack.back();
  scope->profiling = scope->own_profiling || (scope->parent && scope->parent->profiling);
  scope->owner = std::this_thread::get_id();
  {
    std::lock_guard<std::mutex> lock(g_mu);
    scope->active = true;
    scope->closed = false;
  }
  t_stack.push_back(scope);
  t_top = scope.get();
}

ExitResult exit(const std::shared_ptr<Scope>& scope) {
  if (scope->owner != std::this_thread::get_id()) {
    return ExitResult::wrong_thread;
  }
  auto it = std::find(t_stack.begin(), t_stack.end(), scope);
  if (it == t_stack.end()) {
    return ExitResult::not_active;
  }
  // Out of order (a generator's scope closed inside its caller's): the others stay open.
  t_stack.erase(it);
  t_top = t_stack.empty() ? nullptr : t_stack.back().get();
  std::vector<std::shared_ptr<Pool>> pools;
  Releases out;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    scope->active = false;
    scope->closed = true;
    if (t_stack.empty() && scope->ticks) {
      for (auto& weak : g_pools) {
        if (auto pool = weak.lock()) {
          pool->tick(out);
          pools.push_back(std::move(pool));
        }
      }
    }
  }
  out.run();
  return ExitResult::ok;  // `pools` dies here, outside the lock
}

size_t thread_depth() {
  return t_stack.size();
}

std::vector<const Block*> live_blocks_locked(const Scope* scope) {
  std::vector<const Block*> blocks;
  for (const auto& [addr, block] : g_live) {
    if (scope == nullptr ||
        std::any_of(block->charged.begin(), block->charged.end(), [&](const auto& s) { return s.get() == scope; })) {
      blocks.push_back(block);
    }
  }
  std::sort(blocks.begin(), blocks.end(), [](const Block* a, const Block* b) { return a->addr < b->addr; });
  return blocks;
}

std::vector<std::shared_ptr<Pool>> pools_locked() {
  std::vector<std::shared_ptr<Pool>> pools;
  for (auto& weak : g_pools) {
    if (auto pool = weak.lock()) {
      pools.push_back(std::move(pool));
    }
  }
  return pools;
}

}  // namespace poolscope
