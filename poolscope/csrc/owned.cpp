// The chunk table of owned.h.
#include "owned.h"

#include <atomic>
#include <cstdint>
#include <new>

namespace poolscope::owned {

namespace {

constexpr int kChunkBits = 21;  // 2 MiB, the smallest segment
constexpr int kLeafBits = 14;
constexpr int kAddressBits = 48;
constexpr int kTopBits = kAddressBits - kChunkBits - kLeafBits;

struct Leaf {
  std::atomic<uint32_t> segments[size_t{1} << kLeafBits];
};

std::atomic<Leaf*> g_top[size_t{1} << kTopBits];  // zero-initialized (static storage)

constexpr uintptr_t kLimit = uintptr_t{1} << kAddressBits;

template <typename F>
void each_chunk(const char* base, size_t size, F f) {
  const auto first = reinterpret_cast<uintptr_t>(base) >> kChunkBits;
  const auto last = (reinterpret_cast<uintptr_t>(base) + size - 1) >> kChunkBits;
  for (uintptr_t chunk = first; chunk <= last; ++chunk) {
    f(chunk >> kLeafBits, chunk & ((uintptr_t{1} << kLeafBits) - 1));
  }
}

bool in_table(const char* base, size_t size) {
  const auto start = reinterpret_cast<uintptr_t>(base);
  return start < kLimit && size <= kLimit - start;
}

}  // namespace

void add(const char* base, size_t size) {
  if (size == 0 || !in_table(base, size)) {
    return;  // above the table: maybe() answers "maybe" there anyway
  }
  // Every leaf first: running out of memory then changes nothing.
  each_chunk(base, size, [](uintptr_t top, uintptr_t) {
    if (g_top[top].load(std::memory_order_relaxed) == nullptr) {
      g_top[top].store(new Leaf(), std::memory_order_release);
    }
  });
  each_chunk(base, size, [](uintptr_t top, uintptr_t index) {
    g_top[top].load(std::memory_order_relaxed)->segments[index].fetch_add(1, std::memory_order_release);
  });
}

void remove(const char* base, size_t size) {
  if (size == 0 || !in_table(base, size)) {
    return;
  }
  each_chunk(base, size, [](uintptr_t top, uintptr_t index) {
    g_top[top].load(std::memory_order_relaxed)->segments[index].fetch_sub(1, std::memory_order_relaxed);
  });
}

bool maybe(const void* ptr) {
  const auto address = reinterpret_cast<uintptr_t>(ptr);
  if (address >= kLimit) {
    return true;
  }
  const uintptr_t chunk = address >> kChunkBits;
  const Leaf* leaf = g_top[chunk >> kLeafBits].load(std::memory_order_acquire);
  return leaf != nullptr &&
         leaf->segments[chunk & ((uintptr_t{1} << kLeafBits) - 1)].load(std::memory_order_acquire) != 0;
}

}  // namespace poolscope::owned
