// Shared helpers of the native layer: error checking, dtype conversions, asynchronous copies to
// shared memory and the dtype switch.
// No torch headers anywhere in csrc/: the Python op layer validates and passes raw pointers.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace ssmk {

// Element types as the Python side names them (see ssmkernels/_core/native.py: DTYPE_CODES).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
  }
}

// After a launch: surfaces bad configurations immediately instead of at the next sync.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

inline cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

template <typename T>
__host__ __device__ inline T* as_ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr float kLog2e = 1.4426950408889634f;

// 2^x by the MUFU alone (ex2.approx.ftz: ~2 ulp, flushes subnormal results to 0, harmless for a
// decay factor or a sigmoid's exp); exp2f and __expf (no ftz) add range fix-ups around it, three
// instructions. Host emulation: exp2f.
__device__ __forceinline__ float exp2_approx(float x) {
#ifdef __CUDA_ARCH__
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#else
  return exp2f(x);
#endif
}

// log2(x) by the MUFU (lg2.approx.ftz: ~2^-22 absolute error). Host emulation: log2f.
__device__ __forceinline__ float log2_approx(float x) {
#ifdef __CUDA_ARCH__
  float r;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#else
  return log2f(x);
#endif
}

template <typename T> __device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Asynchronous 16-byte copies from global to shared memory (cp.async, sm_80+): a copy holds no
// register while it is in flight, so a block can keep whole tiles of loads outstanding. `valid`
// false fills the 16 bytes with zeros and reads nothing (src must still be a mapped address). Host
// emulation (tests) copies at once; its barriers then give the same order.
__device__ __forceinline__ void async_copy16(void* smem, const void* src, bool valid) {
#if defined(__CUDA_ARCH__)
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
#else
  if (valid) std::memcpy(smem, src, 16); else std::memset(smem, 0, 16);
#endif
}
__device__ __forceinline__ void async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int kPending>  // wait until at most kPending committed groups of this thread are in flight
__device__ __forceinline__ void async_wait() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

}  // namespace ssmk

// kernel<<<grid, threads, 0, stream>>>(args...), or under the host emulation of the tests
// (csrc/emulation.h) the same grid run on host threads: the launchers' own logic is then tested too.
#ifdef SSMK_EMULATION
#define SSMK_LAUNCH(kernel, grid, threads, stream, ...) emu_launch(kernel, grid, threads, __VA_ARGS__)
#else
#define SSMK_LAUNCH(kernel, grid, threads, stream, ...) kernel<<<grid, threads, 0, stream>>>(__VA_ARGS__)
#endif

// Instantiates BODY with `scalar_t` bound to the C++ type of a DType code.
#define SSMK_DISPATCH_FLOAT(code, NAME, ...)                                                   \
  [&] {                                                                                       \
    switch (static_cast<ssmk::DType>(code)) {                                                 \
      case ssmk::DType::kFloat32: { using scalar_t = float; return __VA_ARGS__(); }           \
      case ssmk::DType::kFloat16: { using scalar_t = __half; return __VA_ARGS__(); }          \
      case ssmk::DType::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }  \
      default: throw std::invalid_argument(std::string(NAME) + ": unsupported dtype code " +   \
                                           std::to_string(code));                             \
    }                                                                                         \
  }()
