// Host emulation of the selective_scan CUDA kernels (csrc/emulation.h: a std::thread per CUDA
// thread). The kernels' own code is compiled as host C++ (SSMK_SCAN_EMULATION drops the nvcc-only
// launchers), so the tests can run it through the op layer against the reference. Built by
// tests/cuda_emulation.py:
//   g++ -std=c++20 -O1 -shared -fPIC -pthread -Icsrc -I<cuda>/include csrc/selective_scan/emulation.cc
#include "emulation.h"

#define SSMK_SCAN_EMULATION
// The kernels' `extern __shared__ float smem[]`: one buffer per namespace that declares it.
namespace ssmk { namespace scan { namespace { float smem[1 << 17]; } } }
namespace ssmk { namespace scan { namespace tiled { float smem[1 << 17]; } } }
#include "selective_scan/selective_scan_fwd.cu"
#include "selective_scan/selective_scan_fwd_tiled.cu"
#include "selective_scan/selective_scan_bwd.cu"
#include "selective_scan/selective_scan_bwd_tiled.cu"

namespace ssmk { namespace scan { namespace {

template <typename Kernel>
void run_grid(Kernel kernel, unsigned gx, unsigned gy, int threads, const Params& p) {
  emu_run_grid(gx, gy, 1, threads, [] {
                 for (auto* buffer : {&smem, &tiled::smem})
                   std::fill(std::begin(*buffer), std::end(*buffer), std::numeric_limits<float>::quiet_NaN());
               },
               [&] { kernel(p); });
}

template <typename T, typename BC>
void fwd_typed(const Params& p) {
  // Mirrors launch_forward: one warp per channel, kFwdWarps channels per block.
  run_grid(forward_kernel<T, BC>, static_cast<unsigned>(ceil_div(p.dim, kFwdWarps)), p.num_seqs, kFwdThreads, p);
}

template <typename T>
void fwd_dispatch(const Params& p) {
  if (const int states = tiled::tiled_forward_states(p)) {
    // Mirrors tiled::launch: 32 channels per block, kSlices warps.
    return tiled::visit_tiled_shape(p, states, [&](auto shape) {
      using S = decltype(shape);
      run_grid(tiled::forward_tiled_kernel<T, S>, static_cast<unsigned>(p.dim / tiled::kChannels), p.num_seqs,
               S::kThreads, p);
    });
  }
  if (p.bc_dtype == p.dtype) fwd_typed<T, T>(p);
  else fwd_typed<T, float>(p);
}

template <typename T>
void bwd_dispatch(const Params& p) {
  if (const int instance = tiled::tiled_backward_instance(p); instance != 0 && p.tile_states != 0) {
    // Mirrors tiled::launch_backward: backward_grid blocks of 16 or 32 channels, 4 states per thread.
    return tiled::visit_backward_shape(instance, [&](auto shape) {
      using S = decltype(shape);
      run_grid(tiled::backward_tiled_kernel<T, S>, static_cast<unsigned>(tiled::backward_grid<T, S>(p)), 1,
               S::kThreads, p);
    });
  }
  // Mirrors launch_backward: kCh warps (channels) per block.
  const auto channels = static_cast<unsigned>(p.channel_count ? p.channel_count : p.dim);
  const bool same = p.bc_dtype == p.dtype;
  if (backward_channels_per_block(p) == 4) {
    if (same) run_grid(backward_kernel<T, T, kItBwd, 4>, channels / 4, p.num_seqs, 128, p);
    else run_grid(backward_kernel<T, float, kItBwd, 4>, channels / 4, p.num_seqs, 128, p);
  } else {
    if (same) run_grid(backward_kernel<T, T, kItBwd, 1>, channels, p.num_seqs, 32, p);
    else run_grid(backward_kernel<T, float, kItBwd, 1>, channels, p.num_seqs, 32, p);
  }
}

}}}  // namespace

extern "C" void emu_forward(const ssmk::scan::Params* p) {
  using namespace ssmk::scan;
  if (p->num_seqs == 0 || p->dim == 0) return;
  if (p->dtype == 0) fwd_dispatch<float>(*p);
  else if (p->dtype == 1) fwd_dispatch<__half>(*p);
  else fwd_dispatch<__nv_bfloat16>(*p);
}

extern "C" void emu_backward(const ssmk::scan::Params* p) {
  using namespace ssmk::scan;
  if (p->num_seqs == 0 || p->dim == 0) return;
  if (p->dtype == 0) bwd_dispatch<float>(*p);
  else if (p->dtype == 1) bwd_dispatch<__half>(*p);
  else bwd_dispatch<__nv_bfloat16>(*p);
}

extern "C" int64_t emu_backward_workspace(const ssmk::scan::Params* p) {
  return ssmk::scan::backward_workspace_floats(*p);
}

// The Params layout, so that the Python mirror (tests/cuda_emulation.py) can check its own against
// it: the size and the offset of the last field.
extern "C" size_t emu_params_size() { return sizeof(ssmk::scan::Params); }
extern "C" size_t emu_params_stream_offset() { return offsetof(ssmk::scan::Params, stream); }
