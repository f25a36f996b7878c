// Which addresses may lie in a pool's segment: a table of 2 MiB chunks read without any lock.
//
// Why. Once installed, poolscope's raw deleter sees every free the replaced allocator handed out
// through raw_allocate (oneDNN's scratch), inside scopes or not. Taking g_mu and probing the
// registry of lent blocks for each made those frees 0.55-0.83x as fast as with poolscope never
// installed. A pooled block lies in a segment; a pointer in no chunk that a segment touches is not
// pooled, and two atomic loads say so.
//
// What. A two-level radix table over the low 2**48 bytes of the address space (user space with
// four-level page tables on x86_64 and aarch64): per 2 MiB chunk, the number of live segments
// overlapping it. Addresses above it always answer "maybe".
//
// Invariants. Written under g_mu only: a segment is added before any block of it is lent and
// removed once none is (a segment goes back whole only when wholly free). So the free of a lent
// block, which happens after its lend, always reads a nonzero count; a stale nonzero count for a
// chunk whose segment went back only sends a free down the locked path, which finds no block
// there and hands the pointer to the replaced allocator, as before. Leaves are never freed.
#pragma once

#include <cstddef>

namespace poolscope::owned {

void add(const char* base, size_t size);     // under g_mu; may throw bad_alloc (a new leaf) before changing anything
void remove(const char* base, size_t size);  // under g_mu
bool maybe(const void* ptr);                 // any thread, no lock: false means "never a pooled block"

}  // namespace poolscope::owned
