// Python bindings of the native engine: pools, scopes and the allocator switch.
// Dicts use the keys of PyTorch's memory snapshots where one exists.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include "engine.h"
#include "test_hooks.h"
#include "torch_compat.h"

namespace py = pybind11;
using namespace poolscope;

namespace {

int64_t limit_arg(int64_t value) {
  return value < 0 ? kNone : value;
}

py::object optional_int(int64_t value) {
  return value == kNone ? py::object(py::none()) : py::object(py::int_(value));
}

py::list frames_list(const std::vector<Frame>& frames) {
  py::list out;
  for (const auto& f : frames) {
    py::dict d;
    d["filename"] = f.filename;
    d["line"] = f.line;
    d["name"] = f.name;
    out.append(std::move(d));
  }
  return out;
}

std::vector<std::vector<Frame>> symbolize_all(const std::vector<Context>& contexts) {
  std::vector<c10::GatheredContext*> raw;
  raw.reserve(contexts.size());
  for (const auto& c : contexts) {
    raw.push_back(c.get());
  }
  return symbolize(raw);
}

py::dict pool_stats(Pool& pool) {
  PoolStatsData s;
  int64_t max_cached, max_bytes, release_after, release_idle_us;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    s = pool.stats();
    max_cached = pool.max_cached;
    max_bytes = pool.max_bytes;
    release_after = pool.release_after;
    release_idle_us = pool.release_idle_us;
  }
  py::dict d;
  d["bytes_in_use"] = s.in_use;
  d["bytes_requested"] = s.requested;
  d["bytes_cached"] = s.cached;
  d["bytes_reserved"] = s.reserved;
  d["bytes_mapped"] = s.mapped;
  d["peak_bytes_in_use"] = s.peak_in_use;
  d["blocks_in_use"] = s.blocks_in_use;
  d["blocks_cached"] = s.blocks_cached;
  d["segments"] = s.segments;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["evictions"] = s.evictions;
  d["bytes_released"] = s.bytes_released;
  d["bytes_released_by_exits"] = s.bytes_released_by_exits;
  d["bytes_released_by_time"] = s.bytes_released_by_time;
  d["fallbacks"] = s.fallbacks;
  d["exits"] = s.epoch;
  d["working_set_bytes"] = s.working_set;
  d["max_cached_bytes"] = optional_int(max_cached);
  d["max_bytes"] = optional_int(max_bytes);
  d["release_after"] = release_after;
  d["release_idle_s"] = release_idle_us == kNone ? py::object(py::none()) : py::object(py::float_(release_idle_us * 1e-6));
  return d;
}

struct BlockCopy {
  uintptr_t addr;
  size_t size;
  size_t requested;
  bool allocated;
  Context context;
};

struct SegmentCopy {
  uintptr_t base;
  size_t size;
  std::vector<BlockCopy> blocks;
};

py::list pool_segments(Pool& pool) {
  std::vector<SegmentCopy> copies;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    for (const auto& segment : pool.segments) {
      copies.push_back(SegmentCopy{reinterpret_cast<uintptr_t>(segment->base), segment->size, {}});
    }
    // Every block: free ones from the free set, lent ones from the registry (blocks
    // being decommitted are in neither and show up as gaps).
    std::vector<const Block*> all(pool.free_blocks.begin(), pool.free_blocks.end());
    for (const Block* block : live_blocks_locked(nullptr)) {
      if (block->pool == &pool) {
        all.push_back(block);
      }
    }
    std::sort(all.begin(), all.end(), [](const Block* a, const Block* b) { return a->addr < b->addr; });
    size_t s = 0;
    std::sort(copies.begin(), copies.end(), [](const auto& a, const auto& b) { return a.base < b.base; });
    for (const Block* block : all) {
      auto addr = reinterpret_cast<uintptr_t>(block->addr);
      while (s < copies.size() && addr >= copies[s].base + copies[s].size) {
        ++s;
      }
      if (s < copies.size() && addr >= copies[s].base) {
        copies[s].blocks.push_back(BlockCopy{
            addr, block->size, block->requested, block->state == BlockState::allocated, block->context});
      }
    }
  }
  std::vector<Context> contexts;
  for (const auto& seg : copies) {
    for (const auto& b : seg.blocks) {
      contexts.push_back(b.context);
    }
  }
  auto frames = symbolize_all(contexts);
  py::list out;
  size_t i = 0;
  for (const auto& seg : copies) {
    py::list blocks;
    int64_t allocated = 0, requested = 0;
    for (const auto& b : seg.blocks) {
      py::dict d;
      d["address"] = b.addr;
      d["size"] = b.size;
      d["requested_size"] = b.allocated ? b.requested : 0;
      d["state"] = b.allocated ? "active_allocated" : "inactive";
      d["frames"] = frames_list(frames[i++]);
      blocks.append(std::move(d));
      if (b.allocated) {
        allocated += static_cast<int64_t>(b.size);
        requested += static_cast<int64_t>(b.requested);
      }
    }
    py::dict d;
    d["address"] = seg.base;
    d["total_size"] = seg.size;
    d["allocated_size"] = allocated;
    d["active_size"] = allocated;
    d["requested_size"] = requested;
    d["stream"] = 0;
    d["segment_type"] = "large";
    d["segment_pool_id"] = py::make_tuple(0, 0);
    d["is_expandable"] = false;
    d["frames"] = py::list();
    d["blocks"] = std::move(blocks);
    out.append(std::move(d));
  }
  return out;
}

py::list pool_trace(Pool& pool) {
  std::vector<TraceEvent> events;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    events.assign(pool.trace.begin(), pool.trace.end());
  }
  std::vector<Context> contexts;
  contexts.reserve(events.size());
  for (const auto& e : events) {
    contexts.push_back(e.context);
  }
  auto frames = symbolize_all(contexts);
  py::list out;
  for (size_t i = 0; i < events.size(); ++i) {
    py::dict d;
    d["action"] = events[i].action;
    d["addr"] = events[i].addr;
    d["size"] = events[i].size;
    d["stream"] = 0;
    d["time_us"] = events[i].time_us;
    d["frames"] = frames_list(frames[i]);
    out.append(std::move(d));
  }
  return out;
}

py::list describe(const std::vector<BlockInfo>& infos, const std::vector<uintptr_t>& addresses) {
  std::vector<Context> contexts;
  for (const auto& info : infos) {
    contexts.push_back(info.context);
  }
  auto frames = symbolize_all(contexts);
  py::list out;
  for (size_t i = 0; i < infos.size(); ++i) {
    py::dict d;
    d["address"] = i < addresses.size() ? py::object(py::int_(addresses[i])) : py::object(py::none());
    d["size"] = infos[i].size;
    d["requested_size"] = infos[i].requested;
    d["frames"] = frames_list(frames[i]);
    out.append(std::move(d));
  }
  return out;
}

py::dict scope_stats(Scope& scope) {
  // Copied under the lock, converted after it: making Python objects can run a garbage
  // collection, which can free a pooled tensor, whose deleter takes the lock.
  Scope figures;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    figures.routed = scope.routed;
    figures.routed_bytes = scope.routed_bytes;
    figures.hits = scope.hits;
    figures.misses = scope.misses;
    figures.fallbacks = scope.fallbacks;
    figures.refused = scope.refused;
    figures.live_bytes = scope.live_bytes;
    figures.live_blocks = scope.live_blocks;
    figures.peak_bytes = scope.peak_bytes;
    figures.alloc_ns = scope.alloc_ns;
  }
  py::dict d;
  d["allocations_routed"] = figures.routed;
  d["bytes_routed"] = figures.routed_bytes;
  d["hits"] = figures.hits;
  d["misses"] = figures.misses;
  d["fallbacks"] = figures.fallbacks;
  d["refused"] = figures.refused;
  d["bytes_in_use"] = figures.live_bytes;
  d["blocks_in_use"] = figures.live_blocks;
  d["peak_bytes_in_use"] = figures.peak_bytes;
  d["alloc_seconds"] = static_cast<double>(figures.alloc_ns) * 1e-9;
  return d;
}

}  // namespace

#define POOLSCOPE_STR2(x) #x
#define POOLSCOPE_STR(x) POOLSCOPE_STR2(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "poolscope's native engine (CPU allocator, pools, scopes)";
  // What the loader checks: this library was built from the sources and torch it expects.
  m.attr("build_digest") = POOLSCOPE_STR(POOLSCOPE_BUILD_DIGEST);
  register_test_hooks(m);
  enable_python_tracebacks();

  m.def("install", &install, "Install the allocator (once); true when it serves CPU allocations.");
  m.def("installed", &installed, "Whether poolscope's allocator is PyTorch's CPU allocator now.");
  m.def("thread_depth", &thread_depth, "Open scopes on the calling thread.");

  // Called by the with-statement through functools.partial: no Python frame runs
  // between the statement and the push or pop, so a pending signal cannot skip them.
  m.def("enter_then", [](const py::object& prepare, py::object result) {
    auto scope = prepare().cast<std::shared_ptr<Scope>>();
    enter(scope);
    return result;
  });
  m.def("exit_then", [](const py::object& owner, const py::object& after, const py::args& exc) {
    py::object backend = owner.attr("_backend");
    const char* outcome = "not_active";
    if (py::isinstance<Scope>(backend)) {
      auto scope = backend.cast<std::shared_ptr<Scope>>();
      ExitResult result;
      {
        py::gil_scoped_release release;
        result = exit(scope);
      }
      outcome = result == ExitResult::ok ? "ok" : result == ExitResult::wrong_thread ? "wrong_thread" : "not_active";
    }
    return after(outcome, *exc);
  });

  py::class_<Pool, std::shared_ptr<Pool>>(m, "Pool")
      .def(py::init([](const std::string& device, int64_t max_cached, int64_t max_bytes, int64_t release_after,
                       int64_t release_idle_us) {
             auto pool = std::make_shared<Pool>(device);
             pool->max_cached = limit_arg(max_cached);
             pool->max_bytes = limit_arg(max_bytes);
             pool->release_after = release_after;
             pool->release_idle_us = limit_arg(release_idle_us);
             register_pool(pool);
             return pool;
           }),
           py::arg("device"), py::arg("max_cached"), py::arg("max_bytes"), py::arg("release_after"),
           py::arg("release_idle_us"))
      .def("configure",
           [](Pool& pool, int64_t max_cached, int64_t max_bytes, int64_t release_after, int64_t release_idle_us) {
             Releases out;
             {
               std::lock_guard<std::mutex> lock(g_mu);
               pool.max_cached = limit_arg(max_cached);
               pool.max_bytes = limit_arg(max_bytes);
               pool.release_after = release_after;
               pool.release_idle_us = limit_arg(release_idle_us);
               if (pool.max_cached != kNone) {
                 pool.shrink_to(static_cast<size_t>(pool.max_cached), out);
               }
               if (pool.release_idle_us != kNone) {
                 // Blocks cached before the setting: the releaser must see their deadlines too.
                 note_cached_locked(&pool, mono_us() - pool.release_idle_us, out);
                 wake_releaser_locked();
               }
             }
             out.run();
           })
      .def("stats", &pool_stats)
      .def(
          "release",
          [](Pool& pool, bool everything) {
            Releases out;
            {
              std::lock_guard<std::mutex> lock(g_mu);
              if (everything) {
                pool.shrink_to(0, out);
              } else {
                pool.release_idle(out);
              }
            }
            out.run();
          },
          py::arg("everything"), py::call_guard<py::gil_scoped_release>())
      .def(
          "fill_free",
          [](Pool& pool, int value) {
            // Test hook: garbage in every idle block, so that a kernel that reads memory
            // it did not write, or leaves its output unwritten, shows up.
            std::lock_guard<std::mutex> lock(g_mu);
            for (Block* block : pool.free_blocks) {
              std::memset(block->addr, value, block->size);
            }
          },
          py::arg("value"))
      .def("segments", &pool_segments)
      .def("trace", &pool_trace);

  py::class_<Scope, std::shared_ptr<Scope>>(m, "Scope")
      .def(py::init([](std::shared_ptr<Pool> pool, int64_t threshold, int64_t max_bytes, bool fallback,
                       bool profiling, const std::string& name, bool ticks) {
             auto scope = std::make_shared<Scope>();
             scope->pool = std::move(pool);
             scope->threshold = static_cast<size_t>(threshold);
             scope->max_bytes = limit_arg(max_bytes);
             scope->fallback_on_limit = fallback;
             scope->own_profiling = profiling;
             scope->name = name;
             scope->ticks = ticks;
             return scope;
           }),
           py::arg("pool"), py::arg("threshold"), py::arg("max_bytes"), py::arg("fallback"), py::arg("profiling"),
           py::arg("name"), py::arg("ticks"))
      .def("enter", [](const std::shared_ptr<Scope>& scope) { enter(scope); })
      .def(
          "exit",
          [](const std::shared_ptr<Scope>& scope) {
            switch (exit(scope)) {
              case ExitResult::ok:
                return std::string("ok");
              case ExitResult::wrong_thread:
                return std::string("wrong_thread");
              default:
                return std::string("not_active");
            }
          },
          py::call_guard<py::gil_scoped_release>())
      .def("stats", &scope_stats)
      .def("reset_peak",
           [](Scope& scope) {
             std::lock_guard<std::mutex> lock(g_mu);
             scope.peak_bytes = scope.live_bytes;
           })
      .def("live_blocks",
           [](Scope& scope) {
             std::vector<BlockInfo> infos;
             std::vector<uintptr_t> addresses;
             {
               std::lock_guard<std::mutex> lock(g_mu);
               for (const Block* block : live_blocks_locked(&scope)) {
                 infos.push_back(BlockInfo{block->size, block->requested, block->context});
                 addresses.push_back(reinterpret_cast<uintptr_t>(block->addr));
               }
             }
             return describe(infos, addresses);
           })
      .def("limit_error", [](Scope& scope) -> py::object {
        std::string message;
        std::vector<BlockInfo> infos;
        {
          std::lock_guard<std::mutex> lock(g_mu);
          if (scope.limit_message.empty()) {
            return py::none();
          }
          message = scope.limit_message;
          infos = scope.limit_blocks;
        }
        return py::make_tuple(message, describe(infos, {}));
      });
}
