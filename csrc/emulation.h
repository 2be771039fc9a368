// Host emulation of CUDA kernels, for machines without a GPU (the tests' CPU runs): every CUDA
// thread of a block is a std::thread; __syncthreads and the warp shuffles go through one block-wide
// barrier, so kernels must call them uniformly across the block (ours do). A kernel's own code is
// compiled as host C++ by g++ with the CUDA headers; its file's emulation.cc includes this header
// first, then the kernel's .cu. Not part of the CMake build (which globs *.cu and *.cpp only).
#pragma once

#include <condition_variable>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define SSMK_EMULATION  // before common.h: it picks SSMK_LAUNCH's form
#include "common.h"

struct EmuDim { unsigned x = 0, y = 0, z = 0; };
inline thread_local EmuDim emu_threadIdx, emu_blockIdx, emu_gridDim;
#define threadIdx emu_threadIdx
#define blockIdx emu_blockIdx
#define gridDim emu_gridDim
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

// The runtime calls that launch checks make (no CUDA runtime is linked).
extern "C" inline cudaError_t cudaGetLastError() { return cudaSuccess; }
extern "C" inline const char* cudaGetErrorString(cudaError_t) { return "(emulated)"; }

// Device intrinsics that cuda_runtime declares for device code only: bit casts, the rounded reciprocal.
inline unsigned __float_as_uint(float v) {
  unsigned bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
}
inline float __frcp_rn(float v) { return 1.f / v; }
inline float __uint_as_float(unsigned bits) {
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

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
inline EmuBlock g_block;
inline std::mutex g_atomic;

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

// Runs `thread_body()` on `threads` threads per block for every block of the grid, block after
// block; `block_setup()` runs before each block (e.g. to fill shared memory with NaN).
inline void emu_run_grid(unsigned gx, unsigned gy, unsigned gz, int threads, const std::function<void()>& block_setup,
                         const std::function<void()>& thread_body) {
  for (unsigned bz = 0; bz < gz; ++bz) {
    for (unsigned by = 0; by < gy; ++by) {
      for (unsigned bx = 0; bx < gx; ++bx) {
        block_setup();
        EmuBarrier bar(threads);
        std::vector<float> buf(threads);
        g_block = {&bar, buf.data()};
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; ++t) {
          ts.emplace_back([&, t] {
            emu_threadIdx = {static_cast<unsigned>(t), 0, 0};
            emu_blockIdx = {bx, by, bz};
            emu_gridDim = {gx, gy, gz};
            thread_body();
          });
        }
        for (auto& t : ts) t.join();
      }
    }
  }
}

// What a `kernel<<<grid, threads, 0, stream>>>(args...)` launch becomes (SSMK_LAUNCH in common.h).
template <typename Kernel, typename... Args>
void emu_launch(Kernel kernel, dim3 grid, int threads, Args... args) {
  emu_run_grid(grid.x, grid.y, grid.z, threads, [] {}, [&] { kernel(args...); });
}
