// The background releaser: cached memory that nothing has used for a pool's release_idle goes
// back to the system, with no call and no scope exit from the user (jemalloc's decay, tcmalloc's
// background release). Exit-based retention (Pool::release_idle) keeps working alongside it.
//
// One thread per process, started with the first block cached. It sleeps on a condition variable
// until the earliest deadline of any cached block, and while resident memory is cached it also
// wakes once a second to read the memory pressure (pressure.cpp): low memory releases every
// pool's cache at once. With nothing cached it sleeps until woken. It runs no Python and needs no GIL; it holds
// g_mu only to pick blocks, and gives their memory back after dropping it, like every release.
// A forked child has no copy of the thread: the fork handler forgets it, and the next block
// cached in the child starts a new one. The thread is detached and touches only leaked statics,
// so interpreter shutdown and process exit need nothing from it.
#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <thread>

#include "os.h"
#include "scope.h"

namespace poolscope {

namespace {

// Under g_mu. The condition variable is leaked and replaced in a forked child (a copy of one that
// had a waiter is unusable there).
std::condition_variable_any* g_cv = new std::condition_variable_any();
bool g_started = false;
int64_t g_deadline = INT64_MAX;  // when the releaser wakes next (INT64_MAX: when woken)
uint64_t g_wakeups = 0;          // bumped by every wake-up call, so none is lost between waits
bool g_watching = false;         // the releaser reads the pressure every second (memory is cached)

// While any pool caches resident memory, the releaser also reads the memory pressure this often.
constexpr auto kPressureEvery = std::chrono::seconds(1);

bool caches_memory_locked(const std::vector<std::shared_ptr<Pool>>& pools) {
  return std::any_of(pools.begin(), pools.end(), [](const auto& pool) { return pool->bytes_cached > 0; });
}

void loop() {
  pthread_setname_np(pthread_self(), "poolscope-idle");  // what tests and `top -H` see
  UniqueGuard lock(g_mu);
  bool low = false;
  for (;;) {
    Deferred out;
    std::vector<std::shared_ptr<Pool>> pools = live_pools_locked();
    return_all_held_locked(out);  // blocks threads held since the last wake: cached, as the clocks see them
    if (low) {
      release_under_pressure_locked(pools, out);
    }
    int64_t next = INT64_MAX;
    if (!test_clock_set()) {  // a test's clock: the test runs the clocks (run_clocks), not this thread
      const int64_t now = mono_us();
      for (auto& pool : pools) {
        next = std::min(next, pool->release_expired(now, out));
      }
    }
    g_deadline = next;
    const uint64_t seen = g_wakeups;
    const bool watch = g_watching = caches_memory_locked(pools);
    // Pools die outside the lock (a pool's destructor takes it); files are read outside it.
    lock.unlock();
    out.run();
    pools.clear();
    low = watch && os::read_memory().low;
    lock.lock();
    if (low || g_wakeups != seen) {
      continue;
    }
    auto woken = [&] { return g_wakeups != seen; };
    // The clock counts nanoseconds in an int64: a deadline past what that holds (about 292
    // years of uptime) is never, and converting it would wrap into the past (a busy loop).
    constexpr int64_t kLatestWait = INT64_MAX / 1000 - 1;
    auto until = std::chrono::steady_clock::time_point::max();
    if (g_deadline < kLatestWait) {
      until = std::chrono::steady_clock::time_point(std::chrono::microseconds(g_deadline));
    }
    if (watch) {
      until = std::min(until, std::chrono::steady_clock::now() + kPressureEvery);
    }
    if (until == std::chrono::steady_clock::time_point::max()) {
      g_cv->wait(lock, woken);
    } else {
      g_cv->wait_until(lock, until, woken);
    }
  }
}

}  // namespace

void note_cached_locked(Pool* pool, int64_t freed_us, Deferred& out) {
  if (!g_started) {
    g_started = true;
    out.start_releaser = true;
  }
  const int64_t due = pool->hold_idle_us == kNone ? INT64_MAX : deadline_after(freed_us, pool->hold_idle_us);
  if (due < g_deadline || !g_watching) {  // an earlier deadline, or the first block cached: the watch starts
    g_deadline = due;
    g_wakeups += 1;
    g_cv->notify_one();
  }
}

void wake_releaser_locked() {
  g_deadline = INT64_MAX;
  g_wakeups += 1;
  g_cv->notify_one();
}

void start_releaser() {
  try {
    std::thread(loop).detach();
  } catch (const std::system_error&) {  // no thread to be had: try again with the next cached block
    Guard lock(g_mu);
    g_started = false;
  }
}

void releaser_after_fork_child() {
  g_cv = new std::condition_variable_any();
  g_started = false;
  g_deadline = INT64_MAX;
  g_watching = false;
}

}  // namespace poolscope
