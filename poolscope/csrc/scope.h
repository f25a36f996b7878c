// Scopes and the allocator that reads them.
//
// A scope is one activation of pool_scope on one thread. Each thread keeps a stack of its open
// scopes (scope_stack.cpp); the innermost decides how the thread's allocations are routed.
// The allocator (allocator.cpp) is installed in place of PyTorch's CPU allocator: outside a
// scope, or below the innermost scope's threshold, it forwards to the allocator it replaced;
// inside, it lends from the scope's pool (pool.h) and charges the block to every open scope of
// the thread (charging.cpp), for their figures and max_bytes.
#pragma once

#include "pool.h"

#include <cstdint>
#include <thread>

namespace poolscope {

struct Scope;

struct BlockInfo {
  size_t size;
  size_t bytes_requested;
  Context context;
};

// What a scope counts of the lends made while it was open: routed, hits, misses, fallbacks,
// and time in the pool (each miss's; hits' estimated from the timed ones, allocator.cpp).
struct Counts {
  int64_t allocations_routed = 0, bytes_routed = 0, hits = 0, misses = 0, fallbacks = 0;
  int64_t miss_ns = 0, timed_hit_ns = 0, timed_hits = 0;
  void add(const Counts& other);
  double alloc_seconds() const;
};

// A scope's figures, as poolscope.ScopeStats names them.
struct ScopeFigures {
  Counts counts;
  int64_t bytes_in_use = 0, blocks_in_use = 0, peak_bytes_in_use = 0;
};

// A lock for one thread's state, which other threads take only now and then: one atomic
// exchange when free. Taken after g_mu, never before it.
class SpinLock {
 public:
  void lock() {
    for (int spins = 0; held_.exchange(true, std::memory_order_acquire); ++spins) {
      while (held_.load(std::memory_order_relaxed)) {
        if (++spins > 64) {
          std::this_thread::yield();
        }
      }
    }
  }
  void unlock() { held_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool> held_{false};
};

// A thread's open scopes, outermost first, and the bytes charged to them (charging.cpp); and the
// blocks it freed and holds for its next lends (held.cpp). Under `mu`: the thread's own lends and
// frees take only it; frees, closes and reads from other threads take g_mu, then it.
constexpr int kHeld = 8;                        // blocks a thread holds at most
constexpr size_t kHeldBytes = size_t{32} << 20;  // bytes it holds at most
constexpr size_t kHeldLargest = size_t{8} << 20;  // the largest block it holds

struct Stack {
  SpinLock mu;
  std::vector<Scope*> levels;
  std::vector<Scope*> limited;  // the levels with a max_bytes, outermost first
  int64_t bytes = 0, blocks = 0;  // alive and charged to the outermost level (so to some level)
  uint64_t serial = 0;           // lends and closes so far: which blocks a closed scope counts
  int64_t buried = 0;            // closed scopes beneath open levels that still count live blocks
  // Held blocks (state `held`): lent from `held_pool` as far as the pool knows, free for this thread.
  Pool* held_pool = nullptr;
  Block* held[kHeld] = {};
  int held_count = 0;
  size_t held_bytes = 0;
  int64_t held_hits = 0, held_requested = 0;  // what the pool's hits and bytes_requested lack

  Stack();   // registers it (g_mu)
  ~Stack();  // unregisters it (g_mu); holds nothing by then
};
using StackGuard = std::lock_guard<SpinLock>;

// Held blocks (held.cpp). Under the stack's mu: the block of `pool` held for a lend of `size`
// bytes (taken out: allocated), or nullptr; hold a block the stack's thread freed, or false.
Block* take_held_locked(Stack& stack, Pool* pool, size_t size);
bool hold_locked(Stack& stack, Block* block);
// Under g_mu and the stack's mu: its held blocks go back to their pool, with what it owes it
// (`out`: the releaser is told; nullptr in a forked child, which has no releaser yet).
void return_held_locked(Stack& stack, Deferred* out);
// Under g_mu: every stack's held blocks of `pool` (nullptr: of every pool) go back.
void return_all_held_locked(Deferred& out, const Pool* pool = nullptr);
// Under g_mu: every stack's mu, in one order (a refusal's list of blocks, segments(), fork).
void lock_all_stacks_locked();
void unlock_all_stacks_locked();
struct AllStacksGuard {
  AllStacksGuard() { lock_all_stacks_locked(); }
  ~AllStacksGuard() { unlock_all_stacks_locked(); }
  AllStacksGuard(const AllStacksGuard&) = delete;
  AllStacksGuard& operator=(const AllStacksGuard&) = delete;
};
// In a forked child, under g_mu and every stack's mu: every held block back, every mu released.
void after_fork_child_all_locked();
Stack* this_thread_stack();  // the calling thread's, or nullptr (scope_stack.cpp)

// One activation of a pool scope on one thread.
struct Scope {
  std::shared_ptr<Pool> pool;
  std::shared_ptr<Scope> parent;  // the thread's innermost open scope when this one was entered
  std::shared_ptr<Stack> stack;   // its thread's, from its entry
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
  bool orphaned = false;      // its last reference is gone; the free of its last block deletes it
  Scope* next_dead = nullptr;  // the next in a Deferred's chain of scopes to delete
  bool closed = true;  // not entered, or exited: no longer charged for new blocks
  // While open (charging.cpp): its level on the stack and what its figures are made of.
  size_t level = 0;
  int64_t below = 0, below_blocks = 0;  // alive and charged to the levels beneath it
  int64_t pending_max = 0;  // the stack's most bytes alive since this level's peak was last settled
  Counts own;               // lends while innermost, and the counts of inner scopes closed since
  // Peak settled so far while open; once closed, its final figures but for what is still alive.
  ScopeFigures figures;
  uint64_t closed_serial = UINT64_MAX;  // the stack's serial at its close
  bool buried = false;  // closed beneath open levels, still counting live blocks (charging.cpp)
  int64_t innermost_blocks = 0;  // alive blocks lent while it was innermost (invariant 3 counts these)
  // The last refusal past a max_bytes that it requested or that its chain passed through down
  // to the limiting scope (whichever with-block the error leaves first converts it): the serial that ends the error's message
  // (poolscope tells its refusals from other out-of-memory errors by it), why, what was alive.
  int64_t refusal_serial = 0;
  std::string refusal_message;
  std::vector<BlockInfo> refusal_blocks;
};

// Charging (charging.cpp), all under the stack's mu (scope->stack). A block counts toward every scope of its thread's
// stack that was open at its lend; each costs O(1) however deep the stack, but for a free below
// the innermost level (O(levels above it)) and a free of a block that escaped closed scopes
// (O(those scopes)).
void push_locked(Stack& stack, Scope* scope);
void pop_locked(Scope* scope);  // any level: out-of-order and cross-thread exits
// The innermost open scope whose max_bytes one more block of `size` would pass, or nullptr.
Scope* over_limit_locked(const Scope* top, size_t size);
// The most bytes one more block may have without passing any max_bytes (SIZE_MAX: no limit).
size_t room_locked(const Scope* top);
void charge_lend_locked(Scope* top, Block* block, size_t nbytes, bool hit, int64_t spent_ns);
void charge_fallback_locked(Scope* top);
void charge_free_locked(Block* block, Deferred& out);
ScopeFigures figures_locked(const Scope& scope);
void reset_peak_locked(Scope& scope);
bool charged_to_locked(const Block* block, const Scope* scope);

enum class ExitResult { ok, not_active };

// The thread's scope stack (scope_stack.cpp).
void enter(const std::shared_ptr<Scope>& scope);
// Out-of-order exits are fine. An exit from another thread closes the scope there (figures
// final, charged no more) and marks it closed_elsewhere; the owner thread drops it from its
// stack (drop_closed_elsewhere). The outermost exit of a scope that counts_exits advances every
// pool's exit count (Pool::tick).
ExitResult exit(const std::shared_ptr<Scope>& scope);
extern thread_local Scope* t_innermost;  // the calling thread's innermost open scope, or nullptr
// Threads whose t_innermost is set. Zero: no thread is inside a scope, and the allocator forwards
// without reading its thread-local (in a library that is loaded late, a call). A thread always
// sees its own change of it, which is all the allocator needs: another thread's stale count only
// sends it to its own t_innermost, null, for nothing.
extern std::atomic<int> g_threads_in_scopes;
// Drop the calling thread's scopes that another thread closed; returns the new t_innermost.
Scope* drop_closed_elsewhere();
size_t thread_depth();  // open scopes on the calling thread (test hooks)

// The allocator (allocator.cpp).
bool install();
// Called when the extension loads: a fork at any moment after that, before the first scope or
// pool included, holds g_mu across fork() and resets the child's in-flight state.
void register_fork_handlers();
bool installed();
// What poolscope forwards to: the CPU allocator it replaced (nullptr before install()).
c10::Allocator* replaced_allocator();
void register_pool(const std::shared_ptr<Pool>& pool);
std::shared_ptr<Scope> make_scope();  // pool.h's invariant 3: the only way to make a Scope
c10::DataPtr lend(Scope* top, size_t nbytes);
void fail_growth(int mode);  // test hook: growing a pool fails (1: out of memory, 2: a non-std exception)
void fail_next_register();  // test hook: the next lend runs out of memory after taking its block
void tick_all_locked(Deferred& out);  // an outermost exit: every pool counts it

// Blocks still lent on behalf of `scope` (or of every scope when null), by address; under g_mu
// and every stack's mu (AllStacksGuard).
std::vector<const Block*> live_blocks_locked(const Scope* scope);

}  // namespace poolscope
