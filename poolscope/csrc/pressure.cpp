// Linux implementation of os::read_memory (os.h says what is read and what counts as low).
//
// Why: the clocks hold cached memory through the pauses the traffic taught them (retention.cpp),
// up to minutes. That is right while the machine has memory to spare and wrong the moment it has
// not: a cgroup at its limit would reclaim the process's other memory, or kill it, while the pool
// sits on pages nobody uses. The releaser reads this once a second while any pool caches
// resident memory, without g_mu; each reading is a few small files (tens of microseconds).
#include "os.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

namespace poolscope::os {

namespace {

constexpr int64_t kNoLimit = int64_t{1} << 60;  // cgroup v1 writes "unlimited" as about 2**63
constexpr int64_t kLowShare = 10;             // low: under 1/kLowShare of a limit left

std::mutex g_root_mu;
std::string& g_root = *new std::string();  // leaked: the releaser may read it during exit

std::string slurp(const std::string& path) {
  std::string text;
  if (FILE* file = std::fopen(path.c_str(), "re")) {
    char buffer[4096];
    size_t n;
    while ((n = std::fread(buffer, 1, sizeof buffer, file)) > 0 && text.size() < (size_t{1} << 20)) {
      text.append(buffer, n);
    }
    std::fclose(file);
  }
  return text;
}

// A file holding one number; "max" (cgroup v2's no limit) and anything unreadable: -1.
int64_t number_in(const std::string& path) {
  std::string text = slurp(path);
  if (text.empty() || text[0] < '0' || text[0] > '9') {
    return -1;
  }
  return std::strtoll(text.c_str(), nullptr, 10);
}

// `key value` (memory.stat) or `key: value kB` (meminfo) on a line of its own; -1 when absent.
int64_t field_of(const std::string& text, const std::string& key) {
  size_t at = 0;
  while ((at = text.find(key, at)) != std::string::npos) {
    const bool line_start = at == 0 || text[at - 1] == '\n';
    const size_t after = at + key.size();
    if (line_start && after < text.size() && (text[after] == ' ' || text[after] == ':')) {
      return std::strtoll(text.c_str() + after + 1, nullptr, 10);
    }
    at = after;
  }
  return -1;
}

void consider(MemoryReading& tightest, int64_t limit, int64_t used, const std::string& source) {
  if (limit <= 0 || limit >= kNoLimit || used < 0) {
    return;
  }
  const int64_t left = used >= limit ? 0 : limit - used;
  // The tightest: the least left for its limit (compared as fractions, without overflow).
  if (tightest.limit < 0 ||
      static_cast<long double>(left) / limit < static_cast<long double>(tightest.available) / tightest.limit) {
    tightest.available = left;
    tightest.limit = limit;
    tightest.source = source;
  }
}

// The cgroup folder and each ancestor up to the hierarchy's mount point.
std::vector<std::string> folders(const std::string& mount, const std::string& path) {
  std::vector<std::string> out;
  std::string p = path;
  while (!p.empty() && p != "/") {
    out.push_back(mount + p);
    p = p.substr(0, p.rfind('/'));
  }
  out.push_back(mount);
  return out;
}

}  // namespace

MemoryReading read_memory() {
  std::string root;
  {
    std::lock_guard<std::mutex> lock(g_root_mu);
    root = g_root;
  }
  MemoryReading tightest;
  const std::string meminfo = slurp(root + "/proc/meminfo");
  const int64_t total = field_of(meminfo, "MemTotal"), available = field_of(meminfo, "MemAvailable");
  if (total > 0 && available >= 0) {
    consider(tightest, total * 1024, (total - available) * 1024, root + "/proc/meminfo");
  }
  const std::string groups = slurp(root + "/proc/self/cgroup");
  size_t start = 0;
  while (start < groups.size()) {
    size_t end = groups.find('\n', start);
    if (end == std::string::npos) {
      end = groups.size();
    }
    const std::string line = groups.substr(start, end - start);
    start = end + 1;
    const size_t first = line.find(':'), second = line.find(':', first + 1);
    if (first == std::string::npos || second == std::string::npos) {
      continue;
    }
    const std::string controllers = line.substr(first + 1, second - first - 1), path = line.substr(second + 1);
    const bool v2 = line.compare(0, first, "0") == 0 && controllers.empty();
    const bool v1 = (',' + controllers + ',').find(",memory,") != std::string::npos;
    if (!v1 && !v2) {
      continue;
    }
    for (const std::string& folder : folders(root + (v2 ? "/sys/fs/cgroup" : "/sys/fs/cgroup/memory"), path)) {
      const int64_t usage = number_in(folder + (v2 ? "/memory.current" : "/memory.usage_in_bytes"));
      if (usage < 0) {
        continue;  // not this hierarchy's folder (a container sees its own cgroup as the root)
      }
      const int64_t inactive = field_of(slurp(folder + "/memory.stat"), v2 ? "inactive_file" : "total_inactive_file");
      const int64_t used = usage - std::max<int64_t>(0, std::min(inactive, usage));
      if (v2) {
        consider(tightest, number_in(folder + "/memory.high"), used, folder + "/memory.high");
        consider(tightest, number_in(folder + "/memory.max"), used, folder + "/memory.max");
      } else {
        consider(tightest, number_in(folder + "/memory.limit_in_bytes"), used, folder + "/memory.limit_in_bytes");
      }
    }
  }
  tightest.low = tightest.limit > 0 && tightest.available < tightest.limit / kLowShare;
  return tightest;
}

void set_memory_root(const std::string& root) {
  std::lock_guard<std::mutex> lock(g_root_mu);
  g_root = root;
}

}  // namespace poolscope::os
