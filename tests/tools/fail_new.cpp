// A preloaded replacement of the global operator new that fails on request, for
// tests/test_native_corners.py: poolscope_fail_new_arm(n) makes the n-th operator new that
// poolscope's engine makes on the calling thread from then on throw std::bad_alloc (the nothrow
// forms return nullptr); poolscope_fail_new_calls() counts those calls since the last arm. Calls
// from elsewhere (PyTorch, which terminates on some) are never failed nor counted: the caller's
// library is found with dladdr, only while armed.
#include <dlfcn.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <new>

namespace {
thread_local long t_countdown = 0;  // 0: never fail
thread_local long t_calls = 0;

bool from_poolscope(void* caller) {
  Dl_info info;
  return dladdr(caller, &info) != 0 && info.dli_fname != nullptr && std::strstr(info.dli_fname, "poolscope") != nullptr;
}

bool fails(void* caller) {
  if (t_countdown == 0 || !from_poolscope(caller)) {
    return false;
  }
  ++t_calls;
  return --t_countdown == 0;
}

void* get(std::size_t size, std::size_t align, void* caller) {
  if (fails(caller)) {
    return nullptr;
  }
  if (size == 0) {
    size = 1;
  }
  void* p = nullptr;
  if (align <= alignof(std::max_align_t)) {
    p = std::malloc(size);
  } else if (posix_memalign(&p, align, size) != 0) {
    p = nullptr;
  }
  return p;
}

void* get_or_throw(std::size_t size, std::size_t align, void* caller) {
  void* p = get(size, align, caller);
  if (p == nullptr) {
    throw std::bad_alloc();
  }
  return p;
}
}  // namespace

extern "C" void poolscope_fail_new_arm(long n) {
  t_countdown = n;
  t_calls = 0;
}
extern "C" long poolscope_fail_new_calls() {
  return t_calls;
}

#define CALLER __builtin_return_address(0)
void* operator new(std::size_t size) { return get_or_throw(size, 0, CALLER); }
void* operator new[](std::size_t size) { return get_or_throw(size, 0, CALLER); }
void* operator new(std::size_t size, std::align_val_t a) { return get_or_throw(size, static_cast<std::size_t>(a), CALLER); }
void* operator new[](std::size_t size, std::align_val_t a) { return get_or_throw(size, static_cast<std::size_t>(a), CALLER); }
void* operator new(std::size_t size, const std::nothrow_t&) noexcept { return get(size, 0, CALLER); }
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept { return get(size, 0, CALLER); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
