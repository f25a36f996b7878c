// Linux implementation of os.h.
#include "os.h"

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

namespace poolscope::os {

namespace {

std::atomic<size_t> g_simulated{0};
std::atomic<int64_t> g_refused{0};

size_t kernel_page_size() {
  static const size_t page = [] {
    long value = sysconf(_SC_PAGESIZE);
    return value > 0 ? static_cast<size_t>(value) : size_t{4096};
  }();
  return page;
}

int simulated_madvise(char* addr, size_t length, size_t page) {
  if (reinterpret_cast<uintptr_t>(addr) % page != 0) {
    errno = EINVAL;
    return -1;
  }
  std::memset(addr, 0, (length + page - 1) / page * page);  // the kernel works in whole pages
  return 0;
}

}  // namespace

size_t page_size() {
  size_t simulated = g_simulated.load(std::memory_order_relaxed);
  return simulated != 0 ? simulated : kernel_page_size();
}

size_t drop_pages(char* addr, size_t size) {
  const size_t simulated = g_simulated.load(std::memory_order_relaxed);
  const size_t page = simulated != 0 ? simulated : kernel_page_size();
  const auto start = reinterpret_cast<uintptr_t>(addr);
  const uintptr_t first = (start + page - 1) / page * page;
  const uintptr_t last = (start + size) / page * page;
  if (last <= first) {
    return 0;
  }
  char* from = reinterpret_cast<char*>(first);
  const size_t length = last - first;
  int rc = simulated != 0 ? simulated_madvise(from, length, simulated) : madvise(from, length, MADV_DONTNEED);
  if (rc != 0) {
    g_refused.fetch_add(1, std::memory_order_relaxed);
    return 0;
  }
  return length;
}

void simulate_page_size(size_t page) {
  g_simulated.store(page, std::memory_order_relaxed);
}

int64_t refused_drops() {
  return g_refused.load(std::memory_order_relaxed);
}

}  // namespace poolscope::os
