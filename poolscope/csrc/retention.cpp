// Retention: how long a pool keeps the memory it cached (pool.h states the policy).
//
// Why learn. A fixed clock cannot tell a pause inside the work from the end of it: released at
// 10 s, a model called every 12 s faults its whole working set in again on every call (more
// page faults than without a pool), while a clock long enough for every pause would hold a
// one-off burst for as long. What follows a release tells them apart: memory faulted in again
// soon after the clocks released it was the traffic's; memory never asked for again was not.
//
// What. A release by either clock adds its resident bytes to `unreturned` and remembers the
// latest moment (time and exits) that memory was in use. A lend that faults in pages while
// `unreturned` is positive is a refault: the pause since then belonged to the traffic, and each
// clock left to learn becomes at least twice that pause, at most kLearnLimit times its setting.
// So a process whose traffic stops gives everything back within kLearnLimit x its settings at
// most (320 s with the defaults), and low memory gives it back at once
// (release_under_pressure_locked).
//
// The end of work is the pool's own pause, not the memory's: when nothing was freed into the
// pool for longer than the idle clock can hold, both clocks start over from their settings and
// the traffic that resumes teaches them again. Memory unused for longer than that while the rest
// of the pool was busy is a rare shape of ongoing traffic: it teaches the limit. (Taking the
// memory's pause for the end of work sent a stream's clock back to 10 s whenever a shape rarer
// than 320 s came back, and the next 15 s pause released the whole working set.)
//
// Invariants (under g_mu): setting <= hold <= kLearnLimit x setting for a learning clock, hold ==
// setting for a fixed one; `last_free_us` is the latest free or return of a block to the pool;
// `unreturned` counts only bytes the clocks released (never caps, growth, pressure or
// empty_cache).
#include "scope.h"

#include <algorithm>

namespace poolscope {

namespace {

int64_t times(int64_t value, int64_t factor) {
  int64_t product;
  return __builtin_mul_overflow(value, factor, &product) ? INT64_MAX : product;
}

// The clock after a pause that belonged to the traffic: twice the pause, within
// [setting, kLearnLimit x setting].
int64_t learned(int64_t setting, int64_t hold, int64_t pause) {
  return std::clamp(std::max(hold, times(pause, 2)), setting, times(setting, kLearnLimit));
}

}  // namespace

void Pool::note_released(const Block* block, int64_t now) {
  if (block->committed == 0) {
    return;
  }
  unreturned += block->committed;
  unreturned_since_us = std::max(unreturned_since_us, block->freed_us);
  unreturned_since_exit = std::max(unreturned_since_exit, block->freed_at_exit);
  released_at_us = now;
}

void Pool::note_faulted(size_t bytes, int64_t now) {
  if (unreturned == 0) {
    return;
  }
  const size_t back = std::min(bytes, unreturned);
  unreturned -= back;
  refaults += 1;
  bytes_refaulted += static_cast<int64_t>(back);
  if (release_idle_us != kNone && now - last_free_us > times(release_idle_us, kLearnLimit)) {
    hold_idle_us = release_idle_us;  // the work had ended
    hold_after = release_after;
  } else {
    if (learn_idle && release_idle_us != kNone) {
      hold_idle_us = learned(release_idle_us, hold_idle_us, now - unreturned_since_us);
    }
    if (learn_after) {
      hold_after = learned(release_after, hold_after, static_cast<int64_t>(exits - unreturned_since_exit));
    }
  }
  if (unreturned == 0) {
    unreturned_since_us = 0;
    unreturned_since_exit = 0;
  }
}

void Pool::forget_learned() {
  hold_after = release_after;
  hold_idle_us = release_idle_us;
  unreturned = 0;
  unreturned_since_us = 0;
  unreturned_since_exit = 0;
}

void release_under_pressure_locked(const std::vector<std::shared_ptr<Pool>>& pools, Deferred& out) {
  return_all_held_locked(out);
  for (const auto& pool : pools) {
    pool->release_down_to(0, out, Reason::pressure);
    pool->forget_learned();
  }
}

}  // namespace poolscope
