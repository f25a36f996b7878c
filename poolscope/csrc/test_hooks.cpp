// Hooks for poolscope's own tests (the `_test` submodule of the extension): faults injected at
// points a test cannot reach from Python, and probes of conditions it cannot create there.
// Nothing here runs unless a test calls it.
#include "test_hooks.h"

#include <pybind11/stl.h>

#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstring>
#include <optional>
#include <string>
#include <thread>

#include "scope.h"
#include "os.h"

namespace py = pybind11;

namespace poolscope {

namespace {

std::atomic<int> g_probe_result{-1};

// Constructed before the thread's scope stack, so destroyed after it, at thread exit.
struct AllocatesWhenDestroyed {
  Pool* pool = nullptr;
  ~AllocatesWhenDestroyed() {
    if (pool == nullptr) {
      return;
    }
    int64_t before, after;
    {
      std::lock_guard<std::mutex> lock(g_mu);
      before = pool->blocks_in_use;
    }
    c10::DataPtr memory = c10::GetCPUAllocator()->allocate(size_t{2} << 20);
    {
      std::lock_guard<std::mutex> lock(g_mu);
      after = pool->blocks_in_use;
    }
    g_probe_result.store(after > before ? 1 : 0);
  }
};

thread_local AllocatesWhenDestroyed t_probe;

}  // namespace

void register_test_hooks(py::module_& m) {
  auto t = m.def_submodule("_test", "Test hooks: fault injection and probes (poolscope's own tests only).");
  t.def("fail_growth", &fail_growth, py::arg("mode"),
        "Growing a pool fails: 0 no longer, 1 as if out of memory, 2 with an exception that is not a std::exception.");
  t.def("fail_next_register", &fail_next_register, "The next lend runs out of memory after its block was taken.");
  t.def("simulate_page_size", &os::simulate_page_size, py::arg("page"),
        "Drop pages as a kernel with this page size would (0: the real kernel).");
  t.def("page_size", &os::page_size);
  t.def("thread_depth", &thread_depth, "Open scopes on the calling thread.");
  t.def(
      "fill_free",
      [](Pool& pool, int value) {
        // Garbage in every cached block, so that a kernel that reads memory it did not write,
        // or leaves its output unwritten, shows up.
        std::lock_guard<std::mutex> lock(g_mu);
        for (Block* block : pool.free_blocks) {
          std::memset(block->addr, value, block->size);
        }
      },
      py::arg("pool"), py::arg("value"));
  t.def("refused_drops", &os::refused_drops);
  t.def(
      "set_clock", [](double seconds) { set_test_clock(seconds < 0 ? -1 : static_cast<int64_t>(seconds * 1e6)); },
      py::arg("seconds"),
      "The pools' steady clock reads `seconds` (negative: the real clock again); meanwhile the releaser "
      "thread leaves the clocks to run_clocks.");
  t.def(
      "run_clocks",
      []() {
        // What the releaser does at its deadlines, now, on the calling thread.
        Deferred out;
        {
          std::lock_guard<std::mutex> lock(g_mu);
          const int64_t now = mono_us();
          for (auto& pool : live_pools_locked()) {
            pool->release_expired(now, out);
            out.pools.push_back(pool);
          }
        }
        out.run();
      },
      py::call_guard<py::gil_scoped_release>());
  t.def(
      "churn",
      [](const std::shared_ptr<Pool>& pool, int threads, int64_t n, size_t size, bool raw, int depth) {
        // The engine's own cost, from C++ with the GIL released (benchmarks/allocation.py): each
        // thread allocates and frees `size` bytes `n` times through PyTorch's CPU allocator, inside
        // `depth` nested scopes of its own on `pool` (None: outside every scope). `raw`: the
        // raw_allocate/raw_deallocate interface oneDNN uses.
        auto work = [&] {
          std::vector<std::shared_ptr<Scope>> scopes;
          for (int d = 0; pool && d < depth; ++d) {
            auto scope = std::make_shared<Scope>();
            scope->pool = pool;
            scope->threshold = 0;
            scope->counts_exits = false;
            enter(scope);
            scopes.push_back(scope);
          }
          c10::Allocator* allocator = c10::GetCPUAllocator();
          for (int64_t i = 0; i < n; ++i) {
            if (raw) {
              allocator->raw_deallocate(allocator->raw_allocate(size));
            } else {
              c10::DataPtr memory = allocator->allocate(size);
            }
          }
          for (auto it = scopes.rbegin(); it != scopes.rend(); ++it) {
            exit(*it);
          }
        };
        std::vector<std::thread> workers;
        for (int k = 1; k < threads; ++k) {
          workers.emplace_back(work);
        }
        work();
        for (auto& w : workers) {
          w.join();
        }
      },
      py::arg("pool"), py::arg("threads"), py::arg("n"), py::arg("size"), py::arg("raw") = false,
      py::arg("depth") = 1, py::call_guard<py::gil_scoped_release>());
  t.def("set_memory_root", &os::set_memory_root, py::arg("root"),
        "Read /proc and /sys/fs/cgroup under this folder (\"\": the real ones).");
  t.def(
      "read_memory",
      []() {
        os::MemoryReading r = os::read_memory();
        return py::dict(py::arg("low") = r.low, py::arg("available") = r.available, py::arg("limit") = r.limit,
                        py::arg("source") = r.source);
      });
  t.def(
      "try_allocate",
      [](size_t nbytes) -> std::optional<std::string> {
        // The CPU allocator called as C++ code calls it, with any size_t. Runs without the GIL:
        // the message becomes a Python object only after the call guard took the GIL back.
        try {
          c10::DataPtr memory = c10::GetCPUAllocator()->allocate(nbytes);
          return std::nullopt;
        } catch (const std::exception& exc) {
          return std::string(exc.what());
        }
      },
      py::arg("nbytes"), py::call_guard<py::gil_scoped_release>());
  t.def(
      "allocate_at_thread_exit",
      [](const std::shared_ptr<Pool>& pool, int64_t threshold) {
        // A thread exits with a scope open; a thread-local destructor that runs after its scope
        // stack is gone allocates 2 MiB. True when that allocation was lent by the pool.
        g_probe_result.store(-1);
        std::thread([pool, threshold] {
          t_probe.pool = pool.get();
          auto scope = std::make_shared<Scope>();
          scope->pool = pool;
          scope->threshold = static_cast<size_t>(threshold);
          enter(scope);
        }).join();
        return g_probe_result.load() == 1;
      },
      py::arg("pool"), py::arg("threshold"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace poolscope
