// Scopes and the allocator that reads them.
//
// A scope is one activation of pool_scope on one thread. Each thread keeps a stack of its open
// scopes (scope_stack.cpp); the innermost decides how the thread's allocations are routed.
// The allocator (allocator.cpp) is installed in place of PyTorch's CPU allocator: outside a
// scope, or below the innermost scope's threshold, it forwards to the allocator it replaced;
// inside, it lends from the scope's pool (pool.h) and charges the block to every open scope of
// the chain, for their figures and max_bytes.
#pragma once

#include "pool.h"

#include <thread>

namespace poolscope {

struct BlockInfo {
  size_t size;
  size_t bytes_requested;
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
  bool counts_exits = true;  // its exit as the thread's outermost scope counts toward retention
  std::string name;
  bool named = false;  // name given (the report's row), else None
  std::atomic<std::thread::id> owner{};
  // Exited from another thread (a generator's scope finalized there): its owner thread drops
  // it from its stack at its next allocation, entry or exit, before routing anything else.
  std::atomic<bool> closed_elsewhere{false};
  // Under g_mu.
  std::shared_ptr<Scope> keep;  // itself while closed with blocks alive (pool.h, invariant 3)
  std::shared_ptr<Scope> next_released;  // the next in a Deferred's chain of scopes to let go
  bool closed = true;  // not entered, or exited: no longer charged for new blocks
  int64_t bytes_in_use = 0, blocks_in_use = 0, peak_bytes_in_use = 0;
  int64_t allocations_routed = 0, bytes_routed = 0, hits = 0, misses = 0, fallbacks = 0;
  // Time in the pool: each miss's, and hits' estimated from the timed ones (allocator.cpp's
  // kTimedEvery); alloc_seconds() is the figure.
  int64_t miss_ns = 0, timed_hit_ns = 0, timed_hits = 0;
  double alloc_seconds() const {
    const double hits_ns = timed_hits == 0 ? 0.0 : static_cast<double>(timed_hit_ns) * static_cast<double>(hits) / static_cast<double>(timed_hits);
    return (static_cast<double>(miss_ns) + hits_ns) * 1e-9;
  }
  // The last refusal past a max_bytes that it requested or that its chain passed through down
  // to the limiting scope (whichever with-block the error leaves first converts it): the serial that ends the error's message
  // (poolscope tells its refusals from other out-of-memory errors by it), why, what was alive.
  int64_t refusal_serial = 0;
  std::string refusal_message;
  std::vector<BlockInfo> refusal_blocks;
};

enum class ExitResult { ok, not_active };

// The thread's scope stack (scope_stack.cpp).
void enter(const std::shared_ptr<Scope>& scope);
// Out-of-order exits are fine. An exit from another thread closes the scope there (figures
// final, charged no more) and marks it closed_elsewhere; the owner thread drops it from its
// stack (drop_closed_elsewhere). The outermost exit of a scope that counts_exits advances every
// pool's exit count (Pool::tick).
ExitResult exit(const std::shared_ptr<Scope>& scope);
extern thread_local Scope* t_innermost;  // the calling thread's innermost open scope, or nullptr
// Drop the calling thread's scopes that another thread closed; returns the new t_innermost.
Scope* drop_closed_elsewhere();
size_t thread_depth();  // open scopes on the calling thread (test hooks)

// The allocator (allocator.cpp).
bool install();
// Called when the extension loads: a fork at any moment after that, before the first scope or
// pool included, holds g_mu across fork() and resets the child's in-flight state.
void register_fork_handlers();
bool installed();
void register_pool(const std::shared_ptr<Pool>& pool);
c10::DataPtr lend(Scope* top, size_t nbytes);
void fail_growth(int mode);  // test hook: growing a pool fails (1: out of memory, 2: a non-std exception)
void fail_next_register();  // test hook: the next lend runs out of memory after taking its block
void tick_all_locked(Deferred& out);  // an outermost exit: every pool counts it

// Blocks still lent on behalf of `scope` (or of every scope when null), by address; under g_mu.
std::vector<const Block*> live_blocks_locked(const Scope* scope);

}  // namespace poolscope
