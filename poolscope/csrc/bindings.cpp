// Python bindings of the native engine: they convert, and decide nothing. Options come in as
// poolscope's PoolLimits and ScopeOptions, figures go out as its PoolStats, ScopeStats and
// LimitRefusal; blocks and segments as dicts with the keys of PyTorch's memory snapshots.
// Everything is copied under g_mu and becomes a Python object after it (pool.h, invariant 4).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>

#include "scope.h"
#include "test_hooks.h"
#include "torch_compat.h"

namespace py = pybind11;
using namespace poolscope;

namespace {

// None is kNone, poolscope's "no limit"; seconds become microseconds (at least 1). _config
// bounds every value (ints to int64; seconds below LONGEST_SECONDS, longer ones are None).
int64_t limit_of(const py::handle& options, const char* name) {
  py::object value = options.attr(name);
  return value.is_none() ? kNone : value.cast<int64_t>();
}

int64_t micros_of(const py::handle& options, const char* name) {
  py::object value = options.attr(name);
  if (value.is_none()) {
    return kNone;
  }
  const double micros = value.cast<double>() * 1e6;
  // NaN, or 2**62 us (_config.LONGEST_SECONDS) and more: never. _config sends neither.
  if (!(micros < 4611686018427387904.0)) {
    return kNone;
  }
  return std::max<int64_t>(1, std::llround(micros));
}

py::object optional_int(int64_t value) {
  return value == kNone ? py::object(py::none()) : py::object(py::int_(value));
}

py::object figures_type(const char* name) {
  return py::module_::import("poolscope._stats").attr(name);
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

py::object seconds_or_none(int64_t us) {
  return us == kNone ? py::object(py::none()) : py::object(py::float_(static_cast<double>(us) * 1e-6));
}

py::object pool_stats(Pool& pool) {
  PoolFigures f;
  Deferred out;
  {
    Guard lock(g_mu);
    return_all_held_locked(out, &pool);  // exact figures: what threads hold is cached
    f = pool.figures();
  }
  out.run();
  return figures_type("PoolStats")(
      py::arg("device") = pool.device, py::arg("bytes_in_use") = f.bytes_in_use,
      py::arg("bytes_requested") = f.bytes_requested, py::arg("bytes_cached") = f.bytes_cached,
      py::arg("bytes_reserved") = f.bytes_reserved, py::arg("peak_bytes_in_use") = f.peak_bytes_in_use,
      py::arg("blocks_in_use") = f.blocks_in_use, py::arg("blocks_cached") = f.blocks_cached,
      py::arg("segments") = f.segments, py::arg("hits") = f.hits, py::arg("misses") = f.misses,
      py::arg("releases") = f.releases, py::arg("bytes_released") = f.bytes_released,
      py::arg("bytes_released_by_exits") = f.bytes_released_by_exits,
      py::arg("bytes_released_by_time") = f.bytes_released_by_time, py::arg("fallbacks") = f.fallbacks,
      py::arg("working_set_bytes") = f.working_set_bytes, py::arg("max_cached_bytes") = optional_int(f.max_cached_bytes),
      py::arg("max_bytes") = optional_int(f.max_bytes), py::arg("release_after") = f.release_after,
      py::arg("release_idle_s") = seconds_or_none(f.release_idle_us),
      py::arg("bytes_released_by_pressure") = f.bytes_released_by_pressure, py::arg("refaults") = f.refaults,
      py::arg("bytes_refaulted") = f.bytes_refaulted, py::arg("hold_after") = f.hold_after,
      py::arg("hold_idle_s") = seconds_or_none(f.hold_idle_us), py::arg("learning") = f.learn_after || f.learn_idle);
}

struct BlockCopy {
  uintptr_t addr;
  size_t size;
  size_t bytes_requested;
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
  Deferred returned;
  {
    Guard lock(g_mu);
    return_all_held_locked(returned, &pool);  // held blocks are free blocks, as the listing shows them
    AllStacksGuard stacks;                    // lent blocks' fields (held.cpp's invariants)
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
            addr, block->size, block->bytes_requested, block->state == BlockState::allocated, block->context});
      }
    }
  }
  returned.run();
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
    int64_t allocated = 0, bytes_requested = 0;
    for (const auto& b : seg.blocks) {
      py::dict d;
      d["address"] = b.addr;
      d["size"] = b.size;
      d["requested_size"] = b.allocated ? b.bytes_requested : 0;
      d["state"] = b.allocated ? "active_allocated" : "inactive";
      d["frames"] = frames_list(frames[i++]);
      blocks.append(std::move(d));
      if (b.allocated) {
        allocated += static_cast<int64_t>(b.size);
        bytes_requested += static_cast<int64_t>(b.bytes_requested);
      }
    }
    py::dict d;
    d["address"] = seg.base;
    d["total_size"] = seg.size;
    d["allocated_size"] = allocated;
    d["active_size"] = allocated;
    d["requested_size"] = bytes_requested;
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
    Guard lock(g_mu);
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
    d["requested_size"] = infos[i].bytes_requested;
    d["frames"] = frames_list(frames[i]);
    out.append(std::move(d));
  }
  return out;
}

py::object scope_stats(Scope& scope) {
  // Copied under the lock, converted after it: making Python objects can run a garbage
  // collection, which can free a pooled tensor, whose deleter takes the lock.
  ScopeFigures f;
  {
    Guard lock(g_mu);
    if (scope.stack) {
      StackGuard guard(scope.stack->mu);
      f = figures_locked(scope);
    } else {
      f = figures_locked(scope);  // never entered
    }
  }
  return figures_type("ScopeStats")(
      py::arg("name") = scope.named ? py::object(py::str(scope.name)) : py::object(py::none()),
      py::arg("allocations_routed") = f.counts.allocations_routed, py::arg("bytes_routed") = f.counts.bytes_routed,
      py::arg("hits") = f.counts.hits, py::arg("misses") = f.counts.misses, py::arg("fallbacks") = f.counts.fallbacks,
      py::arg("escaped") = f.blocks_in_use, py::arg("bytes_in_use") = f.bytes_in_use,
      py::arg("peak_bytes_in_use") = f.peak_bytes_in_use, py::arg("alloc_seconds") = f.counts.alloc_seconds());
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
  register_fork_handlers();

  m.def("install", &install, "Install the allocator (once); true when it serves CPU allocations.");
  m.def("installed", &installed, "Whether poolscope's allocator is PyTorch's CPU allocator now.");

  // Called by the with-statement through functools.partial: no Python frame runs
  // between the statement and the push or pop, so a pending signal cannot skip them.
  m.def("enter_then", [](const py::object& prepare, py::object result) {
    auto scope = prepare().cast<std::shared_ptr<Scope>>();
    enter(scope);
    return result;
  });
  m.def("exit_then", [](const py::object& slot, const py::object& after, const py::args& exc) {
    py::object backend = slot.attr("backend");  // a __slots__ member: read without a Python frame
    const char* outcome = "not_active";
    if (py::isinstance<Scope>(backend)) {
      auto scope = backend.cast<std::shared_ptr<Scope>>();
      ExitResult result;
      {
        py::gil_scoped_release release;
        result = exit(scope);
      }
      outcome = result == ExitResult::ok ? "ok" : "not_active";
    }
    return after(outcome, *exc);
  });

  py::class_<Pool, std::shared_ptr<Pool>>(m, "Pool")
      .def(py::init([](const std::string& device, const py::object& limits) {
             auto pool = make_pool(device);
             int64_t cap = limit_of(limits, "max_cached_bytes"), max_bytes = limit_of(limits, "max_bytes");
             int64_t after = limits.attr("release_after").cast<int64_t>(), idle = micros_of(limits, "release_idle_s");
             bool learn_after = limits.attr("learn_after").cast<bool>(), learn_idle = limits.attr("learn_idle").cast<bool>();
             Deferred out;
             {
               Guard lock(g_mu);
               pool->configure(cap, max_bytes, after, learn_after, idle, learn_idle, out);
             }
             out.run();
             register_pool(pool);
             return pool;
           }),
           py::arg("device"), py::arg("limits"))
      .def("configure",
           [](Pool& pool, const py::object& limits) {
             int64_t cap = limit_of(limits, "max_cached_bytes"), max_bytes = limit_of(limits, "max_bytes");
             int64_t after = limits.attr("release_after").cast<int64_t>(), idle = micros_of(limits, "release_idle_s");
             bool learn_after = limits.attr("learn_after").cast<bool>(), learn_idle = limits.attr("learn_idle").cast<bool>();
             Deferred out;
             {
               py::gil_scoped_release release;
               {
                 Guard lock(g_mu);
                 pool.configure(cap, max_bytes, after, learn_after, idle, learn_idle, out);
               }
               out.run();
             }
           })
      .def("stats", &pool_stats)
      .def(
          "release",
          [](Pool& pool, bool everything) {
            Deferred out;
            {
              Guard lock(g_mu);
              pool.release(everything, out);
            }
            out.run();
          },
          py::arg("everything"), py::call_guard<py::gil_scoped_release>())
      .def("segments", &pool_segments)
      .def("trace", &pool_trace);

  py::class_<Scope, std::shared_ptr<Scope>>(m, "Scope")
      .def(py::init([](std::shared_ptr<Pool> pool, const py::object& options) {
             auto scope = make_scope();
             scope->pool = std::move(pool);
             scope->threshold = options.attr("threshold").cast<size_t>();
             scope->max_bytes = limit_of(options, "max_bytes");
             scope->fallback_on_limit = options.attr("fallback").cast<bool>();
             scope->own_profiling = options.attr("profiling").cast<bool>();
             py::object name = options.attr("name");
             scope->named = !name.is_none();
             scope->name = scope->named ? name.cast<std::string>() : std::string();
             scope->counts_exits = options.attr("counts_exits").cast<bool>();
             return scope;
           }),
           py::arg("pool"), py::arg("options"))
      .def("enter", [](const std::shared_ptr<Scope>& scope) { enter(scope); })
      .def(
          "exit",
          [](const std::shared_ptr<Scope>& scope) {
            return std::string(exit(scope) == ExitResult::ok ? "ok" : "not_active");
          },
          py::call_guard<py::gil_scoped_release>())
      .def("stats", &scope_stats)
      .def("reset_peak",
           [](Scope& scope) {
             Guard lock(g_mu);
             if (scope.stack) {
               StackGuard guard(scope.stack->mu);
               reset_peak_locked(scope);
             }
           })
      .def("live_blocks",
           [](Scope& scope) {
             std::vector<BlockInfo> infos;
             std::vector<uintptr_t> addresses;
             {
               Guard lock(g_mu);
               AllStacksGuard stacks;
               for (const Block* block : live_blocks_locked(&scope)) {
                 infos.push_back(BlockInfo{block->size, block->bytes_requested, block->context});
                 addresses.push_back(reinterpret_cast<uintptr_t>(block->addr));
               }
             }
             return describe(infos, addresses);
           })
      .def("refusal", [](Scope& scope) -> py::object {
        int64_t serial;
        std::string message;
        std::vector<BlockInfo> infos;
        {
          Guard lock(g_mu);
          if (scope.refusal_serial == 0) {
            return py::none();
          }
          serial = scope.refusal_serial;
          message = scope.refusal_message;
          infos = scope.refusal_blocks;
        }
        return figures_type("LimitRefusal")(serial, message, describe(infos, {}));
      });
}
