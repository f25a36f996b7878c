// Every private PyTorch C++ API poolscope uses, behind these declarations:
// torch's CapturedTraceback (the stack capture behind CUDA memory history).
// A torch upgrade that moves it breaks torch_compat.cpp only.
#pragma once

#include <c10/core/Allocator.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace poolscope {

struct Frame {
  std::string filename;
  std::string name;
  uint64_t line;
};

// The calling thread's Python stack (takes the GIL; call without poolscope's lock).
std::shared_ptr<c10::GatheredContext> gather_traceback();

// Frames of each context, innermost first (needs the GIL); null contexts give no frames.
std::vector<std::vector<Frame>> symbolize(const std::vector<c10::GatheredContext*>& contexts);

// Make Python stacks capturable (torch installs the unwinder lazily).
void enable_python_tracebacks();

}  // namespace poolscope
