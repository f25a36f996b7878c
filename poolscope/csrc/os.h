// The operating system beneath the pool: its page size, and dropping resident pages.
//
// Kept apart from the pool so that the pool's page arithmetic can be driven, in a test, under a
// page size this machine does not have: kernels use 4, 16 or 64 KiB pages, and madvise() refuses a
// start that is not page-aligned and zeroes whole pages, so a range rounded for a smaller page than
// the kernel's would either give nothing back or zero a live neighbour's bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

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

// Memory pressure (pressure.cpp). Read: /proc/meminfo (MemAvailable of MemTotal) and, from
// /proc/self/cgroup, this process's memory cgroup and its ancestors: cgroup v2 memory.current
// against memory.high and memory.max, cgroup v1 memory.usage_in_bytes against
// memory.limit_in_bytes, less the inactive file cache (memory.stat) that the kernel reclaims
// first. Low: under a tenth of a limit left, by the tightest of them.
struct MemoryReading {
  bool low = false;
  int64_t available = -1;  // bytes left under the tightest limit (-1: no reading)
  int64_t limit = -1;      // that limit
  std::string source;      // the file it came from
};
MemoryReading read_memory();
// Test hook: read those files under `root` instead of "/" ("" : the real ones again).
void set_memory_root(const std::string& root);

}  // namespace poolscope::os
