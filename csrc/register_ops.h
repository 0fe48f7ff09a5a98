// One registration function per op family of the CPU extension. Each family's .cpp file in cpu/
// defines its own pybind11 entry points; bindings.cpp creates the module and calls them all.
#pragma once

#include <torch/extension.h>

namespace fastcontrast {

void register_siglip_ops(pybind11::module_& m);    // cpu/siglip.cpp
void register_momentum_ops(pybind11::module_& m);  // cpu/momentum.cpp
void register_distill_ops(pybind11::module_& m);   // cpu/distill.cpp
void register_task_ops(pybind11::module_& m);      // cpu/tasks.cpp (scheduler probes, tests)
void register_runtime_options(pybind11::module_& m);  // cpu/runtime_options.cpp
void register_host_thread_ops(pybind11::module_& m);  // cpu/host_threads.cpp
void register_matryoshka_ops(pybind11::module_& m);  // cpu/matryoshka_entry.cpp

}  // namespace fastcontrast
