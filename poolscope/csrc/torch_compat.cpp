#include "torch_compat.h"

#include <torch/csrc/profiler/combined_traceback.h>

namespace torch {
// Defined in libtorch_python; not declared in a public header.
void installCapturedTracebackPython();
}  // namespace torch

namespace poolscope {

std::shared_ptr<c10::GatheredContext> gather_traceback() {
  return torch::CapturedTraceback::gather(/*python=*/true, /*script=*/false, /*cpp=*/false);
}

std::vector<std::vector<Frame>> symbolize(const std::vector<c10::GatheredContext*>& contexts) {
  std::vector<torch::CapturedTraceback*> tracebacks;
  std::vector<size_t> index(contexts.size(), SIZE_MAX);
  for (size_t i = 0; i < contexts.size(); ++i) {
    if (auto* tb = dynamic_cast<torch::CapturedTraceback*>(contexts[i])) {
      index[i] = tracebacks.size();
      tracebacks.push_back(tb);
    }
  }
  std::vector<std::vector<Frame>> result(contexts.size());
  if (tracebacks.empty()) {
    return result;
  }
  torch::SymbolizedTracebacks symbolized = torch::symbolize(tracebacks);
  for (size_t i = 0; i < contexts.size(); ++i) {
    if (index[i] == SIZE_MAX) {
      continue;
    }
    for (uint64_t f : symbolized.tracebacks[index[i]]) {
      const auto& frame = symbolized.all_frames[f];
      result[i].push_back(Frame{frame.filename, frame.funcname, frame.lineno});
    }
  }
  return result;
}

void enable_python_tracebacks() {
  torch::installCapturedTracebackPython();
}

}  // namespace poolscope
