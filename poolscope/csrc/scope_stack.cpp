// The thread's stack of open scopes. The allocator reads only its top (t_innermost), once
// per allocation; entering and exiting run in the thread that owns the stack, without g_mu
// but for the scope's own flags.
#include "scope.h"

#include <algorithm>

namespace poolscope {

// Trivially destructible, it outlives the stack below during thread exit; the stack clears it
// when it dies, so a later thread-local destructor that allocates is served as outside a scope.
thread_local Scope* t_innermost = nullptr;

namespace {

struct ThreadStack {
  std::vector<std::shared_ptr<Scope>> scopes;
  ~ThreadStack() {
    t_innermost = nullptr;
  }
};
thread_local ThreadStack t_stack;

}  // namespace

void enter(const std::shared_ptr<Scope>& scope) {
  scope->parent = t_stack.scopes.empty() ? nullptr : t_stack.scopes.back();
  scope->profiling = scope->own_profiling || (scope->parent && scope->parent->profiling);
  scope->owner = std::this_thread::get_id();
  {
    std::lock_guard<std::mutex> lock(g_mu);
    scope->closed = false;
  }
  t_stack.scopes.push_back(scope);
  t_innermost = scope.get();
}

ExitResult exit(const std::shared_ptr<Scope>& scope) {
  if (scope->owner != std::this_thread::get_id()) {
    return ExitResult::wrong_thread;
  }
  auto it = std::find(t_stack.scopes.begin(), t_stack.scopes.end(), scope);
  if (it == t_stack.scopes.end()) {
    return ExitResult::not_active;
  }
  // Out of order (a generator's scope closed inside its caller's): the others stay open.
  t_stack.scopes.erase(it);
  t_innermost = t_stack.scopes.empty() ? nullptr : t_stack.scopes.back().get();
  Deferred out;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    scope->closed = true;
    if (t_stack.scopes.empty() && scope->counts_exits) {
      tick_all_locked(out);
    }
  }
  out.run();
  return ExitResult::ok;
}

size_t thread_depth() {
  return t_stack.scopes.size();
}

}  // namespace poolscope
