// Held blocks: a thread's own freed blocks, kept for its next lends without g_mu.
//
// Why. Every lend and every free took the engine's one lock: a pooled hit cost more than
// glibc's malloc+free, and two threads allocating in scopes of their own on one pool ran no
// faster than one (the lock's cache line went back and forth on every call).
//
// What. A thread that frees a block it lent (inside a scope of its own, outside profiling, a block of
// at most kHeldLargest bytes, of a pool without max_cached_bytes) keeps it: at most kHeld blocks
// and kHeldBytes, all of one pool, under its stack's lock only. Its next lend of a size one of them
// serves whole takes it back under that lock only. For the pool a held block is still lent: its
// bytes_in_use, segments and clocks do not change, and nothing else can lend it, merge it or
// release it. The blocks go back into the pool (with the hits and requested bytes the pool's
// figures lack) at the thread's outermost exit, when it lends from the pool under g_mu while they
// are another pool's, before any of the pool's figures is read or its cache is released (clocks,
// caps, pressure, empty_cache), each time the releaser wakes, and at fork.
//
// Invariants. A held block is in exactly one stack's `held`, in state `allocated`, not in the
// registry (owned.h) and not in its pool's free set; a stack holds blocks of held_pool only. What
// a stack holds, and the fields of the blocks it lends and holds (scope, serial,
// bytes_requested), change under its mu only; returning blocks to the pool needs g_mu too. So a
// reader of other stacks' blocks (a refusal's list, segments()) holds g_mu and every stack's mu.
#include "scope.h"

#include <algorithm>

namespace poolscope {

namespace {

auto& g_stacks = *new std::vector<Stack*>();  // every stack alive, under g_mu

}  // namespace

Stack::Stack() {
  Guard lock(g_mu);
  g_stacks.push_back(this);
}

Stack::~Stack() {
  Guard lock(g_mu);
  g_stacks.erase(std::find(g_stacks.begin(), g_stacks.end(), this));
}

Block* take_held_locked(Stack& stack, Pool* pool, size_t size) {
  if (stack.held_pool != pool) {
    return nullptr;
  }
  // The smallest that a lend would take whole (Pool::lend_from's rule: no rest worth splitting).
  int best = -1;
  for (int i = 0; i < stack.held_count; ++i) {
    const Block* b = stack.held[i];
    if (b->size >= size && lent_whole(b->size, size) &&
        (best < 0 || b->size < stack.held[best]->size)) {
      best = i;
    }
  }
  if (best < 0) {
    return nullptr;
  }
  Block* block = stack.held[best];
  stack.held[best] = stack.held[--stack.held_count];
  stack.held_bytes -= block->size;
  return block;
}

bool hold_locked(Stack& stack, Block* block) {
  // Only inside a scope: the outermost exit gives everything back, and nothing is held after it.
  if (stack.levels.empty() || (stack.held_pool != nullptr && stack.held_pool != block->pool) ||
      stack.held_count == kHeld ||
      stack.held_bytes + block->size > kHeldBytes) {
    return false;
  }
  stack.held_pool = block->pool;
  stack.held[stack.held_count++] = block;
  stack.held_bytes += block->size;
  stack.held_requested -= static_cast<int64_t>(block->bytes_requested);
  block->bytes_requested = 0;
  return true;
}

void return_held_locked(Stack& stack, Deferred* out) {
  Pool* pool = stack.held_pool;
  if (pool == nullptr) {
    return;
  }
  const int64_t now = mono_coarse_us();
  for (int i = 0; i < stack.held_count; ++i) {
    Block* block = stack.held[i];
    // What Pool::free_block does, with the block's bytes_requested already taken off (below).
    pool->bytes_in_use -= block->size;
    pool->blocks_in_use -= 1;
    block->segment->bytes_in_use -= block->size;
    block->committed = block->size;
    block->freed_at_exit = pool->exits;
    block->freed_us = now;
    block->state = BlockState::free;
    pool->insert_free(block);
  }
  if (stack.held_count > 0) {
    pool->last_free_us = now;
  }
  pool->hits += stack.held_hits;
  pool->bytes_requested = static_cast<size_t>(static_cast<int64_t>(pool->bytes_requested) + stack.held_requested);
  if (stack.held_count > 0 && out != nullptr) {
    note_cached_locked(pool, now, *out);
    if (pool->orphaned && pool->blocks_in_use == 0) {  // it waited for these
      out->bury(pool);
    }
  }
  stack.held_count = 0;
  stack.held_bytes = 0;
  stack.held_hits = 0;
  stack.held_requested = 0;
  stack.held_pool = nullptr;
  POOLSCOPE_CHECK(pool);
}

void return_all_held_locked(Deferred& out, const Pool* pool) {
  for (Stack* stack : g_stacks) {
    StackGuard guard(stack->mu);
    if (pool == nullptr || stack->held_pool == pool) {
      return_held_locked(*stack, &out);
    }
  }
}

void lock_all_stacks_locked() {
  for (Stack* stack : g_stacks) {
    stack->mu.lock();
  }
}

void unlock_all_stacks_locked() {
  for (Stack* stack : g_stacks) {
    stack->mu.unlock();
  }
}

void after_fork_child_all_locked() {
  for (Stack* stack : g_stacks) {
    return_held_locked(*stack, nullptr);  // the releaser sees them when the child starts one
    stack->mu.unlock();
  }
}

}  // namespace poolscope
