// Host emulation of the selective_state_update CUDA kernel and its launcher (csrc/emulation.h: a
// std::thread per CUDA thread), so CPU tests run the kernel's own code through the op layer
// against the reference. Built by tests/cuda_emulation.py:
//   g++ -std=c++20 -O1 -shared -fPIC -pthread -Icsrc -I<cuda>/include csrc/state_update/emulation.cc
#include "emulation.h"

#include <stdexcept>
#include <string>

#include "state_update/launch_args.h"
#include "state_update/state_update.cu"

// The binding's call (binding.cpp) on integer arrays; returns "" or the launcher's error message.
extern "C" const char* emu_state_update(const int64_t* params, int n_params, const std::uintptr_t* addresses,
                                        int n_addresses) {
  static thread_local std::string error;
  error.clear();
  try {
    if (n_params != ssmk::state_update::kParams || n_addresses != ssmk::state_update::kAddresses)
      throw std::invalid_argument("state_update: wrong argument counts");
    ssmk::state_update::launch(ssmk::state_update::params_from(params, addresses, 0));
  } catch (const std::exception& exc) {
    error = exc.what();
  }
  return error.c_str();
}

extern "C" int emu_state_update_binding_version() { return ssmk::state_update::kBindingVersion; }
extern "C" long emu_state_update_max_dstate() { return ssmk::state_update::kMaxDState; }
