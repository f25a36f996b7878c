// Charging: which scopes a lent block counts toward, at a cost that does not grow with nesting.
//
// Why. A block counts toward every scope of its thread that was open at its lend: their bytes
// alive, peaks and max_bytes. Charging each of them on every lend and free cost O(depth): an
// allocation in a recursive pooled_forward 256 deep cost 45 times one in a flat scope.
//
// What. A thread's open scopes are the levels of its Stack, outermost first; lends happen at the
// top. The stack keeps the bytes alive charged to its outermost level (T, `bytes`), and each level
// its `below`: the part of T charged beneath it, so that its bytes alive are T - below. A lend
// changes T only; a free changes T and the `below` of the levels above the one it is charged to.
// A level's peak is the most of T - below over its life. Only lends raise T, and only at the top,
// so the top's pending_max follows T; a level's peak is settled (the most pending maximum of it and
// the levels above, minus its below) before its below changes, when it closes and when it is read.
// Counts (routed, hits, misses, fallbacks, time) go to the top level and fold into the level
// beneath when it closes. A closed scope keeps its final figures, but its bytes and blocks alive
// still fall as its blocks die: a free walks from the block's innermost scope up its parents,
// taking the block off each closed scope that counted it, to the first open one, its level.
// So a lend costs O(1) and so does a free at the top; a free below the top costs the levels above
// it, a free of a block that escaped closed scopes costs those scopes, and a read costs the
// levels above the scope read. A scope closed beneath open ones (a generator's, exited inside its
// caller's scope) is `buried`: while one still counts live blocks, frees walk the whole chain.
//
// Invariants (under the stack's mu), for a stack with levels L[0..top]:
//  1. L[i]->level == i; L[0]->below == 0 and below never decreases with i; L[i]'s bytes alive
//     are stack.bytes - L[i]->below (blocks likewise).
//  2. Settle times never decrease with i (settling a level settles those above it), so L[i]'s
//     peak is max(its settled peak, max over j >= i of L[j]->pending_max, minus L[i]->below).
//  3. A block counts toward scope S when S is its innermost scope or one of that scope's parents
//     and S was open at its lend: S is open, or S->closed_serial > the block's serial.
#include "scope.h"

#include <algorithm>
#include <climits>

namespace poolscope {

void Counts::add(const Counts& other) {
  allocations_routed += other.allocations_routed;
  bytes_routed += other.bytes_routed;
  hits += other.hits;
  misses += other.misses;
  fallbacks += other.fallbacks;
  miss_ns += other.miss_ns;
  timed_hit_ns += other.timed_hit_ns;
  timed_hits += other.timed_hits;
}

double Counts::alloc_seconds() const {
  const double hit_ns =
      timed_hits == 0 ? 0.0 : static_cast<double>(timed_hit_ns) * static_cast<double>(hits) / static_cast<double>(timed_hits);
  return (static_cast<double>(miss_ns) + hit_ns) * 1e-9;
}

namespace {

// Settle levels [first, top]: each peak takes in the most pending maximum from it up, and the
// pending maxima start again at `now`. Returns that most, for the level beneath to take in.
int64_t settle(Stack& stack, size_t first, int64_t now) {
  int64_t most = INT64_MIN;
  for (size_t i = stack.levels.size(); i-- > first;) {
    Scope* s = stack.levels[i];
    most = std::max(most, s->pending_max);
    s->figures.peak_bytes_in_use = std::max(s->figures.peak_bytes_in_use, most - s->below);
    s->pending_max = now;
  }
  return most;
}

int64_t most_pending_from(const Stack& stack, size_t first) {
  int64_t most = INT64_MIN;
  for (size_t i = first; i < stack.levels.size(); ++i) {
    most = std::max(most, stack.levels[i]->pending_max);
  }
  return most;
}

Counts counts_from(const Stack& stack, size_t first) {
  Counts counts;
  for (size_t i = first; i < stack.levels.size(); ++i) {
    counts.add(stack.levels[i]->own);
  }
  return counts;
}

// A block of `size` bytes charged to level `at` died.
void free_at(Stack& stack, size_t at, int64_t size) {
  if (at + 1 < stack.levels.size()) {  // the levels above: their below falls, their peaks settle first
    Scope* level = stack.levels[at];
    level->pending_max = std::max(level->pending_max, settle(stack, at + 1, stack.bytes - size));
    for (size_t i = at + 1; i < stack.levels.size(); ++i) {
      stack.levels[i]->below -= size;
      stack.levels[i]->below_blocks -= 1;
    }
  }
  stack.bytes -= size;
  stack.blocks -= 1;
}

// The open level a lend at `top` charges: `top`, or its nearest open parent when another thread
// closed it since the allocator last looked (nullptr: none is open).
Scope* charged_level(const Scope* top) {
  const Stack& stack = *top->stack;
  return stack.levels.empty() ? nullptr : stack.levels.back();
}

}  // namespace

void push_locked(Stack& stack, Scope* scope) {
  stack.levels.reserve(stack.levels.size() + 1);  // the steps that may throw, before any change
  if (scope->max_bytes != kNone) {
    stack.limited.reserve(stack.limited.size() + 1);
  }
  scope->level = stack.levels.size();
  scope->below = stack.bytes;
  scope->below_blocks = stack.blocks;
  scope->pending_max = stack.bytes;
  scope->closed = false;
  stack.levels.push_back(scope);
  if (scope->max_bytes != kNone) {
    stack.limited.push_back(scope);
  }
}

void pop_locked(Scope* scope) {
  Stack& stack = *scope->stack;
  const size_t at = scope->level;
  ScopeFigures& f = scope->figures;
  f.peak_bytes_in_use = std::max(f.peak_bytes_in_use, most_pending_from(stack, at) - scope->below);
  f.counts = scope->own;
  f.counts.add(counts_from(stack, at + 1));
  f.bytes_in_use = stack.bytes - scope->below;
  f.blocks_in_use = stack.blocks - scope->below_blocks;
  // What it counted itself (not the levels above) now belongs to the level beneath.
  const int64_t own_bytes = (at + 1 < stack.levels.size() ? stack.levels[at + 1]->below : stack.bytes) - scope->below;
  const int64_t own_blocks =
      (at + 1 < stack.levels.size() ? stack.levels[at + 1]->below_blocks : stack.blocks) - scope->below_blocks;
  if (at > 0) {
    Scope* beneath = stack.levels[at - 1];
    beneath->pending_max = std::max(beneath->pending_max, scope->pending_max);
    beneath->own.add(scope->own);
  } else {
    // The outermost level: what it counted itself leaves the stack (no open scope counts it).
    stack.bytes -= own_bytes;
    stack.blocks -= own_blocks;
    for (size_t i = at + 1; i < stack.levels.size(); ++i) {
      Scope* s = stack.levels[i];
      s->below -= own_bytes;
      s->below_blocks -= own_blocks;
      s->pending_max -= own_bytes;
    }
  }
  stack.levels.erase(stack.levels.begin() + static_cast<std::ptrdiff_t>(at));
  for (size_t i = at; i < stack.levels.size(); ++i) {
    stack.levels[i]->level = i;
  }
  if (scope->max_bytes != kNone) {
    stack.limited.erase(std::find(stack.limited.begin(), stack.limited.end(), scope));
  }
  if (at < stack.levels.size() && f.blocks_in_use > 0) {  // open levels above it count its blocks too
    scope->buried = true;
    stack.buried += 1;
  }
  scope->closed = true;
  scope->closed_serial = ++stack.serial;
}

Scope* over_limit_locked(const Scope* top, size_t size) {
  const Stack& stack = *top->stack;
  for (auto it = stack.limited.rbegin(); it != stack.limited.rend(); ++it) {
    Scope* s = *it;
    const auto limit = static_cast<size_t>(s->max_bytes);
    // Unsigned: a size near 2**63 must not wrap into a negative that passes.
    if (size > limit - std::min(static_cast<size_t>(stack.bytes - s->below), limit)) {
      return s;
    }
  }
  return nullptr;
}

size_t room_locked(const Scope* top) {
  const Stack& stack = *top->stack;
  size_t room = SIZE_MAX;
  for (const Scope* s : stack.limited) {
    const auto limit = static_cast<size_t>(s->max_bytes);
    room = std::min(room, limit - std::min(static_cast<size_t>(stack.bytes - s->below), limit));
  }
  return room;
}

void charge_lend_locked(Scope* top, Block* block, size_t nbytes, bool hit, int64_t spent_ns) {
  Stack& stack = *top->stack;
  block->scope = top;
  block->serial = ++stack.serial;
  top->innermost_blocks += 1;
  Scope* level = charged_level(top);
  if (level == nullptr) {
    return;
  }
  stack.bytes += static_cast<int64_t>(block->size);
  stack.blocks += 1;
  level->pending_max = std::max(level->pending_max, stack.bytes);
  Counts& c = level->own;
  c.allocations_routed += 1;
  c.bytes_routed += static_cast<int64_t>(nbytes);
  if (!hit) {
    c.misses += 1;
    c.miss_ns += spent_ns;
  } else {
    c.hits += 1;
    if (spent_ns >= 0) {
      c.timed_hit_ns += spent_ns;
      c.timed_hits += 1;
    }
  }
}

void charge_fallback_locked(Scope* top) {
  if (Scope* level = charged_level(top)) {
    level->own.fallbacks += 1;
  }
}

void charge_free_locked(Block* block, Deferred& out) {
  Scope* innermost = block->scope;
  Stack& stack = *innermost->stack;
  const auto size = static_cast<int64_t>(block->size);
  bool at_level = false;
  for (Scope* s = innermost; s != nullptr; s = s->parent.get()) {
    if (!s->closed) {
      if (!at_level) {
        free_at(stack, s->level, size);
        at_level = true;
      }
      if (stack.buried == 0) {
        break;  // no closed scope lies beneath an open one: the open levels are all that is left
      }
      continue;
    }
    if (s->closed_serial > block->serial) {  // closed after the lend: it counted the block
      s->figures.bytes_in_use -= size;
      s->figures.blocks_in_use -= 1;
      if (s->buried && s->figures.blocks_in_use == 0) {
        s->buried = false;
        stack.buried -= 1;
      }
    }
  }
  block->scope = nullptr;
  innermost->innermost_blocks -= 1;
  if (innermost->innermost_blocks == 0 && innermost->orphaned) {  // its last block died: it goes
    innermost->next_dead = std::exchange(out.dead_scopes, innermost);
  }
}

ScopeFigures figures_locked(const Scope& scope) {
  if (scope.closed) {
    return scope.figures;
  }
  const Stack& stack = *scope.stack;
  ScopeFigures f;
  f.counts = counts_from(stack, scope.level);
  f.bytes_in_use = stack.bytes - scope.below;
  f.blocks_in_use = stack.blocks - scope.below_blocks;
  f.peak_bytes_in_use = std::max(scope.figures.peak_bytes_in_use, most_pending_from(stack, scope.level) - scope.below);
  return f;
}

void reset_peak_locked(Scope& scope) {
  if (scope.closed) {
    scope.figures.peak_bytes_in_use = scope.figures.bytes_in_use;
    return;
  }
  Stack& stack = *scope.stack;
  if (scope.level > 0) {  // the level beneath keeps what the pending maxima from here up held
    Scope* beneath = stack.levels[scope.level - 1];
    beneath->pending_max = std::max(beneath->pending_max, most_pending_from(stack, scope.level));
  }
  settle(stack, scope.level + 1, stack.bytes);
  scope.pending_max = stack.bytes;
  scope.figures.peak_bytes_in_use = stack.bytes - scope.below;
}

bool charged_to_locked(const Block* block, const Scope* scope) {
  for (const Scope* s = block->scope; s != nullptr; s = s->parent.get()) {
    if (s == scope) {
      return !s->closed || s->closed_serial > block->serial;
    }
  }
  return false;
}

}  // namespace poolscope
