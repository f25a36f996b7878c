// Which blocks are lent, by address: a table read and written without any lock.
//
// Why. Every free of CPU memory once poolscope is installed comes through its deleter: pooled
// blocks, and what the replaced allocator handed out (oneDNN's scratch through raw_deallocate,
// inside scopes or not). A hash map of lent blocks under the engine's lock cost a node allocation
// per lend and a locked probe per free: raw frees ran at 0.55-0.83x the rate of a process that
// never installed poolscope, and the map was a large part of a pooled hit's cost.
//
// What. A radix table over the low 2**48 bytes of the address space (user space with four-level
// page tables on x86_64 and aarch64): per 2 MiB chunk that any segment ever touched, a count of
// the live segments overlapping it and a slot per kSlotBytes of address holding the block lent
// there, if any. Segments start kSlotBytes-aligned (Pool::add_segment) and blocks are multiples
// of kSlotBytes, so a block starts at a slot boundary and no other block, pooled or not, starts in
// its slot: a pointer is a lent block exactly when its slot holds one. Chunks and leaves are
// mapped zeroed (pages become resident only where a slot was written) and never unmapped; a
// chunk's slots go back to the system when no segment overlaps it any more.
//
// Invariants. add/remove/lend run under g_mu: a segment is added before any block of it is lent
// and removed once none is. A block's slot holds it from its lend until the free that takes it
// (take_lent, any thread, no lock), and nothing else writes that slot meanwhile.
#pragma once

#include <cstddef>
#include <cstdint>

namespace poolscope {
struct Block;
}

namespace poolscope::owned {

constexpr size_t kSlotBytes = 512;  // pool.h's kGranule

// Under g_mu. False, changing nothing, when the range lies outside the table or the table cannot
// grow (out of memory): such a segment must not be used.
bool add(const char* base, size_t size);
void remove(const char* base, size_t size);  // under g_mu
void lend(Block* block, const char* addr);   // under g_mu: `addr` lies in an added segment
// False for a pointer no block can start at (not slot-aligned): no table is read for it.
inline bool may_be_lent(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % kSlotBytes == 0;
}
// Any thread, no lock: the block lent at `ptr`, which is lent no more; nullptr when none is.
Block* take_lent(const void* ptr);
Block* lent_at(const void* ptr);  // the same without taking it (tests, leak reports: under g_mu)

}  // namespace poolscope::owned
