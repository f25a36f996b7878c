// The table of owned.h.
#include "owned.h"

#include "os.h"

#include <sys/mman.h>

#include <atomic>
#include <cstdint>

namespace poolscope::owned {

namespace {

constexpr int kChunkBits = 21;  // 2 MiB, the smallest segment
constexpr int kSlotBits = 9;
static_assert(size_t{1} << kSlotBits == kSlotBytes);
constexpr int kLeafBits = 14;
constexpr int kAddressBits = 48;
constexpr int kTopBits = kAddressBits - kChunkBits - kLeafBits;
constexpr uintptr_t kLimit = uintptr_t{1} << kAddressBits;

struct Chunk {
  std::atomic<Block*> lent[size_t{1} << (kChunkBits - kSlotBits)];
  std::atomic<uint32_t> segments;
};

struct Leaf {
  std::atomic<Chunk*> chunks[size_t{1} << kLeafBits];
};

std::atomic<Leaf*> g_top[size_t{1} << kTopBits];  // zero-initialized (static storage)

// Zeroed memory whose pages become resident only when written.
template <typename T>
T* map_zeroed() {
  void* memory = mmap(nullptr, sizeof(T), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return memory == MAP_FAILED ? nullptr : static_cast<T*>(memory);  // all-zero atomics: nullptr and 0
}

template <typename F>
void each_chunk(const char* base, size_t size, F f) {
  const auto first = reinterpret_cast<uintptr_t>(base) >> kChunkBits;
  const auto last = (reinterpret_cast<uintptr_t>(base) + size - 1) >> kChunkBits;
  for (uintptr_t chunk = first; chunk <= last; ++chunk) {
    f(chunk >> kLeafBits, chunk & ((uintptr_t{1} << kLeafBits) - 1));
  }
}

inline Chunk* chunk_of(uintptr_t address) {
  if (address >= kLimit) {
    return nullptr;
  }
  const uintptr_t chunk = address >> kChunkBits;
  const Leaf* leaf = g_top[chunk >> kLeafBits].load(std::memory_order_acquire);
  return leaf == nullptr ? nullptr : leaf->chunks[chunk & ((uintptr_t{1} << kLeafBits) - 1)].load(std::memory_order_acquire);
}

inline std::atomic<Block*>* slot_of(const void* ptr) {
  const auto address = reinterpret_cast<uintptr_t>(ptr);
  if (address % kSlotBytes != 0) {
    return nullptr;  // no block starts there
  }
  Chunk* chunk = chunk_of(address);
  return chunk == nullptr ? nullptr : &chunk->lent[(address & ((uintptr_t{1} << kChunkBits) - 1)) >> kSlotBits];
}

}  // namespace

bool add(const char* base, size_t size) {
  const auto start = reinterpret_cast<uintptr_t>(base);
  if (size == 0 || start >= kLimit || size > kLimit - start) {
    return false;
  }
  // Every leaf and chunk first: running out of memory then changes nothing that matters (a
  // mapped, empty chunk is what a chunk looks like after its segments went).
  bool mapped = true;
  each_chunk(base, size, [&](uintptr_t top, uintptr_t index) {
    Leaf* leaf = g_top[top].load(std::memory_order_relaxed);
    if (leaf == nullptr && mapped) {
      leaf = map_zeroed<Leaf>();
      if (leaf == nullptr) {
        mapped = false;
        return;
      }
      g_top[top].store(leaf, std::memory_order_release);
    }
    if (mapped && leaf->chunks[index].load(std::memory_order_relaxed) == nullptr) {
      Chunk* chunk = map_zeroed<Chunk>();
      if (chunk == nullptr) {
        mapped = false;
        return;
      }
      leaf->chunks[index].store(chunk, std::memory_order_release);
    }
  });
  if (!mapped) {
    return false;
  }
  each_chunk(base, size, [](uintptr_t top, uintptr_t index) {
    g_top[top].load(std::memory_order_relaxed)->chunks[index].load(std::memory_order_relaxed)->segments.fetch_add(
        1, std::memory_order_relaxed);
  });
  return true;
}

void remove(const char* base, size_t size) {
  each_chunk(base, size, [](uintptr_t top, uintptr_t index) {
    Chunk* chunk = g_top[top].load(std::memory_order_relaxed)->chunks[index].load(std::memory_order_relaxed);
    if (chunk->segments.fetch_sub(1, std::memory_order_relaxed) == 1) {
      // No segment overlaps it: its slots are all empty; their pages go back (they read as zeros).
      os::drop_pages(reinterpret_cast<char*>(chunk->lent), sizeof(chunk->lent));
    }
  });
}

void lend(Block* block, const char* addr) {
  slot_of(addr)->store(block, std::memory_order_release);
}

Block* take_lent(const void* ptr) {
  std::atomic<Block*>* slot = slot_of(ptr);
  if (slot == nullptr || slot->load(std::memory_order_relaxed) == nullptr) {
    return nullptr;  // not a pooled block (nothing written: raw frees share no cache line)
  }
  return slot->exchange(nullptr, std::memory_order_acq_rel);
}

Block* lent_at(const void* ptr) {
  std::atomic<Block*>* slot = slot_of(ptr);
  return slot == nullptr ? nullptr : slot->load(std::memory_order_acquire);
}

}  // namespace poolscope::owned
