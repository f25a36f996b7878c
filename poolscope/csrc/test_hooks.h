// The extension's `_test` submodule (test_hooks.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace poolscope {

void register_test_hooks(pybind11::module_& m);

}  // namespace poolscope
