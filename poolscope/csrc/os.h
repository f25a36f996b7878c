// The operating system beneath the pool: its page size, and dropping resident pages.
//
// Kept apart from the pool so that the pool's page arithmetic can be driven, in a test, under a
// page size this machine does not have: kernels use 4, 16 or 64 KiB pages, and madvise() refuses a
// start that is not page-aligned and zeroes whole pages, so a range rounded for a smaller page than
// the kernel's would either give nothing back or zero a live neighbour's bytes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace poolscope::os {

// The kernel's page size (sysconf), or the simulated one while a test sets it.
size_t page_size();

// Give back the resident pages that lie wholly inside [addr, addr + size): never a byte outside it.
// Returns the bytes given back (0 when the range holds no whole page or the kernel refused).
size_t drop_pages(char* addr, size_t size);

// Test hook: behave as a kernel with pages of `page` bytes would (0: the real kernel again).
// Simulated drops zero whole pages, as MADV_DONTNEED makes them read back, and refuse an
// unaligned start with EINVAL, as madvise does.
void simulate_page_size(size_t page);
int64_t refused_drops();  // calls the (real or simulated) kernel refused, since the process started

}  // namespace poolscope::os
