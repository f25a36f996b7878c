// The thread's stack of open scopes. The allocator reads only its top (t_innermost), once
// per allocation; entering and exiting run in the thread that owns the stack, without g_mu
// but for the scope's own flags.
#include "scope.h"

#include <algorithm>

namespace poolscope {

// Trivially destructible, it outlives the stack below during thread exit; the stack clears it
// when it dies, so a later thread-local destructor that allocates is served as outside a scope.
thread_local Scope* t_innermost = nullptr;
alignas(64) std::atomic<int> g_threads_in_scopes{0};

namespace {

// Every write of t_innermost: the count of threads inside a scope follows it.
void set_innermost(Scope* scope) {
  if ((t_innermost == nullptr) != (scope == nullptr)) {
    g_threads_in_scopes.fetch_add(scope == nullptr ? -1 : 1, std::memory_order_relaxed);
  }
  t_innermost = scope;
}

thread_local Stack* t_stack_ptr = nullptr;  // the same lifetime rule: cleared when the stack goes

struct ThreadStack {
  std::vector<std::shared_ptr<Scope>> scopes;  // entered on this thread, not yet dropped from it
  std::shared_ptr<Stack> stack;                // the open ones, as charging sees them
  ~ThreadStack() {
    set_innermost(nullptr);
    t_stack_ptr = nullptr;
    if (!stack) {
      return;
    }
    // A thread that ends with scopes open closes them: nothing can enter or exit them any more;
    // and what it held goes back to the pool.
    Deferred out;
    {
      Guard lock(g_mu);
      StackGuard guard(stack->mu);
      for (auto it = scopes.rbegin(); it != scopes.rend(); ++it) {
        if (!(*it)->closed) {
          pop_locked(it->get());
        }
      }
      return_held_locked(*stack, &out);
    }
    out.run();
  }
};
thread_local ThreadStack t_stack;

// The calling thread's stack lost its last scope: what it held goes back to the pool, and it is
// an outermost exit when one of them counts.
void outermost_exit(bool counts) {
  if (!t_stack.scopes.empty() || !t_stack.stack) {
    return;
  }
  Stack& stack = *t_stack.stack;
  bool holds;
  {
    StackGuard guard(stack.mu);
    holds = stack.held_pool != nullptr;
  }
  if (!holds && !counts) {
    return;
  }
  Deferred out;
  {
    Guard lock(g_mu);
    {
      StackGuard guard(stack.mu);
      return_held_locked(stack, &out);
    }
    if (counts) {
      tick_all_locked(out);
    }
  }
  out.run();
}

}  // namespace

Scope* drop_closed_elsewhere() {
  auto& scopes = t_stack.scopes;
  auto gone = std::stable_partition(scopes.begin(), scopes.end(), [](const std::shared_ptr<Scope>& s) {
    return !s->closed_elsewhere.load(std::memory_order_acquire);
  });
  if (gone == scopes.end()) {
    return t_innermost;
  }
  bool counts = false;
  // Moved out first: a scope's last reference may be here, and it dies after the stack is sound.
  std::vector<std::shared_ptr<Scope>> dropped(std::make_move_iterator(gone), std::make_move_iterator(scopes.end()));
  scopes.erase(gone, scopes.end());
  for (const auto& s : dropped) {
    counts = counts || s->counts_exits;
  }
  set_innermost(scopes.empty() ? nullptr : scopes.back().get());
  outermost_exit(counts);
  return t_innermost;
}

void enter(const std::shared_ptr<Scope>& scope) {
  drop_closed_elsewhere();
  scope->parent = t_stack.scopes.empty() ? nullptr : t_stack.scopes.back();
  scope->profiling = scope->own_profiling || (scope->parent && scope->parent->profiling);
  scope->closed_elsewhere.store(false, std::memory_order_relaxed);
  if (!t_stack.stack) {
    t_stack.stack = std::make_shared<Stack>();
    t_stack_ptr = t_stack.stack.get();
  }
  scope->stack = t_stack.stack;
  t_stack.scopes.reserve(t_stack.scopes.size() + 1);  // no failure once the scope is pushed
  {
    Guard lock(g_mu);
    StackGuard guard(t_stack.stack->mu);
    scope->owner.store(std::this_thread::get_id(), std::memory_order_relaxed);
    push_locked(*t_stack.stack, scope.get());
  }
  t_stack.scopes.push_back(scope);
  set_innermost(scope.get());
}

ExitResult exit(const std::shared_ptr<Scope>& scope) {
  if (scope->owner.load(std::memory_order_relaxed) != std::this_thread::get_id()) {
    // Another thread: a generator entered in one thread and finalized in another ends its scope
    // there. Its owner thread cannot be reached from here, so the scope closes at once (figures
    // final, charged no more) and the owner drops it before it routes anything else.
    Guard lock(g_mu);
    if (!scope->stack) {
      return ExitResult::not_active;  // never entered
    }
    StackGuard guard(scope->stack->mu);
    if (scope->closed) {
      return ExitResult::not_active;
    }
    pop_locked(scope.get());
    scope->closed_elsewhere.store(true, std::memory_order_release);
    return ExitResult::ok;
  }
  drop_closed_elsewhere();
  auto it = std::find(t_stack.scopes.begin(), t_stack.scopes.end(), scope);
  if (it == t_stack.scopes.end()) {
    return ExitResult::not_active;
  }
  // Out of order (a generator's scope closed inside its caller's): the others stay open.
  t_stack.scopes.erase(it);
  set_innermost(t_stack.scopes.empty() ? nullptr : t_stack.scopes.back().get());
  {
    Guard lock(g_mu);
    StackGuard guard(scope->stack->mu);
    pop_locked(scope.get());
  }
  outermost_exit(scope->counts_exits);
  return ExitResult::ok;
}

Stack* this_thread_stack() {
  return t_stack_ptr;
}

size_t thread_depth() {
  drop_closed_elsewhere();
  return t_stack.scopes.size();
}

}  // namespace poolscope
