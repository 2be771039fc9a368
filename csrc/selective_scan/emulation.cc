// Host emulation of the selective_scan CUDA kernels, for machines without a GPU: every CUDA thread
// is a std::thread, and __syncthreads and the warp shuffles go through one block-wide barrier
// (the kernels call them uniformly across the block). The kernels' own code is compiled as host
// C++ (SSMK_SCAN_EMULATION drops the nvcc-only launchers), so the tests can run it through the op
// layer against the reference. Not part of the CMake build (which globs *.cu and *.cpp only):
//   g++ -std=c++20 -O1 -shared -fPIC -pthread -Icsrc -I<cuda>/include csrc/selective_scan/emulation.cc
#include <condition_variable>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>
#include <limits>

#include "common.h"

struct EmuDim { unsigned x = 0, y = 0, z = 0; };
thread_local EmuDim emu_threadIdx, emu_blockIdx;
#define threadIdx emu_threadIdx
#define blockIdx emu_blockIdx

// A sleeping barrier (std::barrier may spin, which starves hundreds of threads on a few cores).
class EmuBarrier {
 public:
  explicit EmuBarrier(int count) : count_(count) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const long generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_, arrived_ = 0;
  long generation_ = 0;
};

struct EmuBlock {
  EmuBarrier* bar = nullptr;
  float* buf = nullptr;
};
static EmuBlock g_block;
static std::mutex g_atomic;

inline void __syncthreads() { g_block.bar->arrive_and_wait(); }
// Warp-level sync: the block-wide barrier here, so warps must call it uniformly (as the shuffles).
inline void __syncwarp(unsigned = 0xffffffffu) { g_block.bar->arrive_and_wait(); }
inline float emu_exchange(float v, int src_tid, bool take) {
  const int tid = threadIdx.x;
  g_block.buf[tid] = v;
  g_block.bar->arrive_and_wait();
  const float r = take ? g_block.buf[src_tid] : v;
  g_block.bar->arrive_and_wait();
  return r;
}
inline float __shfl_up_sync(unsigned, float v, int off) {
  const int lane = threadIdx.x % 32;
  return emu_exchange(v, threadIdx.x - off, lane >= off);
}
inline float __shfl_down_sync(unsigned, float v, int off) {
  const int lane = threadIdx.x % 32;
  return emu_exchange(v, threadIdx.x + off, lane + off < 32);
}
inline float __shfl_xor_sync(unsigned, float v, int off) { return emu_exchange(v, threadIdx.x ^ off, true); }
inline float __shfl_sync(unsigned, float v, int src) { return emu_exchange(v, (threadIdx.x & ~31u) + (src & 31), true); }
inline float atomicAdd(float* a, float v) {
  std::lock_guard<std::mutex> lock(g_atomic);
  const float old = *a;
  *a = old + v;
  return old;
}

#define SSMK_SCAN_EMULATION
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
namespace ssmk { namespace scan { namespace { float smem[1 << 17]; } } }
#include "selective_scan/selective_scan_fwd.cu"
#include "selective_scan/selective_scan_bwd.cu"

namespace ssmk { namespace scan { namespace {

template <typename Kernel>
void run_grid(Kernel kernel, unsigned gx, unsigned gy, int threads, const Params& p) {
  for (unsigned by = 0; by < gy; ++by) {
    for (unsigned bx = 0; bx < gx; ++bx) {
      std::fill(std::begin(smem), std::end(smem), std::numeric_limits<float>::quiet_NaN());
      EmuBarrier bar(threads);
      std::vector<float> buf(threads);
      g_block = {&bar, buf.data()};
      std::vector<std::thread> ts;
      for (int t = 0; t < threads; ++t) {
        ts.emplace_back([&, t] {
          emu_threadIdx = {static_cast<unsigned>(t), 0, 0};
          emu_blockIdx = {bx, by, 0};
          kernel(p);
        });
      }
      for (auto& t : ts) t.join();
    }
  }
}

template <typename T, typename BC>
void fwd_typed(const Params& p) {
  // Mirrors launch_forward: one warp per channel, kFwdWarps channels per block.
  run_grid(forward_kernel<T, BC>, static_cast<unsigned>(ceil_div(p.dim, kFwdWarps)), p.num_seqs, kFwdThreads, p);
}

template <typename T>
void fwd_dispatch(const Params& p) {
  if (p.bc_dtype == p.dtype) fwd_typed<T, T>(p);
  else fwd_typed<T, float>(p);
}

template <typename T>
void bwd_dispatch(const Params& p) {
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

// The Params layout, so that the Python mirror (tests/scan_emulation.py) can check its own against
// it: the size and the offset of the last field.
extern "C" size_t emu_params_size() { return sizeof(ssmk::scan::Params); }
extern "C" size_t emu_params_stream_offset() { return offsetof(ssmk::scan::Params, stream); }
