// Hooks for poolscope's own tests (the `_test` submodule of the extension): faults injected at
// points a test cannot reach from Python, and probes of conditions it cannot create there.
// Nothing here runs unless a test calls it.
#include "test_hooks.h"

#include <pybind11/stl.h>

#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>

#include "scope.h"
#include "os.h"

namespace py = pybind11;

namespace poolscope {

namespace {

std::atomic<int> g_probe_result{-1};

// The least any allocator in poolscope's place can do outside scopes: forward every request to
// the allocator it replaced and, since it cannot know that a raw free is not its own without
// looking, hand raw frees on through a deleter of its own. The floor that churn(via="forwarder")
// measures for raw frees outside every scope.
std::atomic<c10::DeleterFnPtr> g_forward_raw{nullptr};

void forward_raw_free(void* ptr) {
  g_forward_raw.load(std::memory_order_acquire)(ptr);
}

struct Forwarder final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    return replaced_allocator()->allocate(nbytes);
  }
  c10::DeleterFnPtr raw_deleter() const override {
    return &forward_raw_free;
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

// Constructed before the thread's scope stack, so destroyed after it, at thread exit.
struct AllocatesWhenDestroyed {
  Pool* pool = nullptr;
  ~AllocatesWhenDestroyed() {
    if (pool == nullptr) {
      return;
    }
    int64_t before, after;
    {
      Guard lock(g_mu);
      before = pool->blocks_in_use;
    }
    c10::DataPtr memory = c10::GetCPUAllocator()->allocate(size_t{2} << 20);
    {
      Guard lock(g_mu);
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
        Deferred out;
        {
          Guard lock(g_mu);
          return_all_held_locked(out, &pool);  // held blocks are cached too
          for (Block* block : pool.free_blocks) {
            std::memset(block->addr, value, block->size);
          }
        }
        out.run();
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
          Guard lock(g_mu);
          return_all_held_locked(out);  // as the releaser does at each wake
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
      [](const std::shared_ptr<Pool>& pool, int threads, int64_t n, size_t size, bool raw, int depth, const std::string& via) {
        // The engine's own cost, from C++ with the GIL released (benchmarks/allocation.py): each
        // thread allocates and frees `size` bytes `n` times through PyTorch's CPU allocator, inside
        // `depth` nested scopes of its own on `pool` (None: outside every scope). `raw`: the
        // raw_allocate/raw_deallocate interface oneDNN uses. `via`: "installed", PyTorch's CPU
        // allocator (poolscope's once installed); "replaced", the allocator poolscope replaced,
        // as a process that never installed it calls it; "forwarder", a bare allocator that
        // forwards to that one (the floor of any allocator in poolscope's place). All three in
        // one process, so that a comparison is not one between two processes' heaps.
        static Forwarder forwarder;
        if (via != "installed" && replaced_allocator() == nullptr) {
          throw std::invalid_argument("churn(via=\"" + via + "\"): poolscope is not installed yet");
        }
        c10::Allocator* allocator;
        if (via == "installed") {
          allocator = c10::GetCPUAllocator();
        } else if (via == "replaced") {
          allocator = replaced_allocator();
        } else if (via == "forwarder") {
          g_forward_raw.store(replaced_allocator()->raw_deleter(), std::memory_order_release);
          allocator = &forwarder;
        } else {
          throw std::invalid_argument("churn(via=\"" + via + "\"): expected \"installed\", \"replaced\" or \"forwarder\"");
        }
        auto work = [&] {
          std::vector<std::shared_ptr<Scope>> scopes;
          for (int d = 0; pool && d < depth; ++d) {
            auto scope = make_scope();
            scope->pool = pool;
            scope->threshold = 0;
            scope->counts_exits = false;
            enter(scope);
            scopes.push_back(scope);
          }
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
      py::arg("depth") = 1, py::arg("via") = "installed", py::call_guard<py::gil_scoped_release>());
  t.def(
      "spin",
      [](int threads, int64_t n) {
        // The control for churn's thread scaling: `n` steps of arithmetic on each of `threads`
        // threads, nothing shared. What two threads gain here is what the machine gives them.
        auto work = [n] {
          uint64_t x = 88172645463325252ULL;
          for (int64_t i = 0; i < n; ++i) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
          }
          return x;
        };
        std::atomic<uint64_t> sink{0};
        std::vector<std::thread> workers;
        for (int k = 1; k < threads; ++k) {
          workers.emplace_back([&] { sink.fetch_xor(work()); });
        }
        sink.fetch_xor(work());
        for (auto& w : workers) {
          w.join();
        }
        return sink.load();
      },
      py::arg("threads"), py::arg("n"), py::call_guard<py::gil_scoped_release>());
  t.def(
      "stress",
      [](const std::shared_ptr<Pool>& pool, int threads, int64_t n, uint64_t seed) {
        // Two or more threads, each in scopes of its own on `pool`, lend random sizes, free
        // their own blocks and each other's (a mailbox), keep blocks alive across scope exits
        // (escapes), nest and exit out of order, release the pool's cache and use the raw
        // interface, all at once. Every buffer carries its serial at both ends, checked when it is
        // freed: two buffers sharing memory would overwrite each other's. Returns the checks made;
        // throws on a corrupted buffer. For the tests, and for the sanitizers (scripts/sanitize).
        struct Buffer {
          c10::DataPtr memory;
          size_t size = 0;
          uint64_t serial = 0;
        };
        std::mutex mailbox_mu;
        std::vector<Buffer> mailbox;
        std::atomic<uint64_t> serials{1}, checks{0};
        std::atomic<bool> corrupted{false};
        auto check = [&](Buffer& b) {
          uint64_t head, tail;
          std::memcpy(&head, b.memory.get(), 8);
          std::memcpy(&tail, static_cast<char*>(b.memory.get()) + b.size - 8, 8);
          if (head != b.serial || tail != b.serial) {
            corrupted.store(true);
          }
          checks.fetch_add(1, std::memory_order_relaxed);
          b.memory.clear();
        };
        auto work = [&](uint64_t thread_seed) {
          std::mt19937_64 random(thread_seed);
          c10::Allocator* allocator = c10::GetCPUAllocator();
          auto open = [&](std::vector<std::shared_ptr<Scope>>& scopes) {
            auto scope = make_scope();
            scope->pool = pool;
            scope->threshold = 0;
            enter(scope);
            scopes.push_back(scope);
          };
          std::vector<std::shared_ptr<Scope>> scopes;
          std::vector<Buffer> mine;
          open(scopes);
          for (int64_t i = 0; i < n; ++i) {
            const unsigned op = random() % 100;
            if (op < 40 || mine.empty()) {
              if (scopes.empty()) {
                open(scopes);
              }
              Buffer b;
              b.size = 16 + (random() % 4 == 0 ? random() % (6u << 20) : random() % (256u << 10));
              b.memory = allocator->allocate(b.size);
              b.serial = serials.fetch_add(1, std::memory_order_relaxed);
              std::memcpy(b.memory.get(), &b.serial, 8);
              std::memcpy(static_cast<char*>(b.memory.get()) + b.size - 8, &b.serial, 8);
              mine.push_back(std::move(b));
            } else if (op < 65) {
              size_t k = random() % mine.size();
              std::swap(mine[k], mine.back());
              check(mine.back());
              mine.pop_back();
            } else if (op < 75) {  // to another thread
              std::lock_guard<std::mutex> lock(mailbox_mu);
              mailbox.push_back(std::move(mine.back()));
              mine.pop_back();
            } else if (op < 85) {  // from another thread
              Buffer b;
              {
                std::lock_guard<std::mutex> lock(mailbox_mu);
                if (!mailbox.empty()) {
                  b = std::move(mailbox.back());
                  mailbox.pop_back();
                }
              }
              if (b.memory) {
                check(b);
              }
            } else if (op < 92) {  // exit a scope, maybe not the innermost; blocks stay alive
              if (!scopes.empty()) {
                size_t k = random() % scopes.size();
                exit(scopes[k]);
                scopes.erase(scopes.begin() + static_cast<std::ptrdiff_t>(k));
              }
            } else if (op < 96) {  // a nested scope
              open(scopes);
            } else if (op < 98) {
              Deferred out;
              {
                Guard lock(g_mu);
                pool->release(random() % 2 == 0, out);
              }
              out.run();
            } else {
              allocator->raw_deallocate(allocator->raw_allocate(16 + random() % (3u << 20)));
            }
            if (mine.size() > 24) {
              check(mine.front());
              mine.erase(mine.begin());
            }
          }
          for (auto& b : mine) {
            check(b);
          }
          for (auto it = scopes.rbegin(); it != scopes.rend(); ++it) {
            exit(*it);
          }
        };
        std::vector<std::thread> workers;
        for (int k = 1; k < threads; ++k) {
          workers.emplace_back(work, seed + static_cast<uint64_t>(k));
        }
        work(seed);
        for (auto& w : workers) {
          w.join();
        }
        for (auto& b : mailbox) {
          check(b);
        }
        if (corrupted.load()) {
          throw std::runtime_error("poolscope stress: a buffer's serial was overwritten (two buffers shared memory)");
        }
        return checks.load();
      },
      py::arg("pool"), py::arg("threads"), py::arg("n"), py::arg("seed"), py::call_guard<py::gil_scoped_release>());
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
          auto scope = make_scope();
          scope->pool = pool;
          scope->threshold = static_cast<size_t>(threshold);
          enter(scope);
        }).join();
        return g_probe_result.load() == 1;
      },
      py::arg("pool"), py::arg("threshold"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace poolscope
