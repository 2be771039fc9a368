// Device helpers shared by the selective-scan forward and backward kernels.
#pragma once

#include <cstdint>

#include "common.h"
#include "selective_scan/selective_scan.h"

namespace ssmk {
namespace scan {

constexpr float kLn2 = 0.6931471805599453f;

// Where one block works: the sequence's bounds along l, its batch row, its first checkpoint slot.
struct Span {
  int64_t start, end, row, slot0;
};

__device__ __forceinline__ Span sequence_span(const Params& p, int64_t seq) {
  if (p.cu_seqlens) {
    const int* cu = as_ptr<const int>(p.cu_seqlens);
    const int64_t start = cu[seq];
    // Sequence j's chunks use slots cu[j] / kChunk + j + k: disjoint and below the buffer's size.
    return {start, static_cast<int64_t>(cu[seq + 1]), 0, start / kChunk + seq};
  }
  return {0, p.seqlen, seq, seq * p.chunks_per_row};
}

// How many of a thread's N steps starting at t0 lie before `end` (0 .. N).
template <int N>
__device__ __forceinline__ int items_in_range(int64_t t0, int64_t end) {
  const int64_t left = end - t0;
  return left <= 0 ? 0 : (left >= N ? N : static_cast<int>(left));
}

// kItems consecutive elements starting at ptr, as float; zero past `valid`. 16-byte vector loads
// when the run is complete and aligned (the common case: l a multiple of 8 for 16-bit types).
template <typename T, int kItems>
__device__ __forceinline__ void load_items(const T* ptr, int valid, float (&out)[kItems]) {
  constexpr int kVec = 16 / sizeof(T);
  static_assert(kItems % kVec == 0, "kItems must be a multiple of the vector width");
  if (valid >= kItems && (reinterpret_cast<std::uintptr_t>(ptr) % 16) == 0) {
#pragma unroll
    for (int v = 0; v < kItems / kVec; ++v) {
      uint4 raw = *reinterpret_cast<const uint4*>(ptr + v * kVec);
      const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < kVec; ++j) out[v * kVec + j] = to_float(elems[j]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) out[i] = i < valid ? to_float(ptr[i]) : 0.f;
  }
}

template <typename T, int kItems>
__device__ __forceinline__ void store_items(T* ptr, int valid, const float (&in)[kItems]) {
  constexpr int kVec = 16 / sizeof(T);
  if (valid >= kItems && (reinterpret_cast<std::uintptr_t>(ptr) % 16) == 0) {
#pragma unroll
    for (int v = 0; v < kItems / kVec; ++v) {
      uint4 raw;
      T* elems = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int j = 0; j < kVec; ++j) elems[j] = from_float<T>(in[v * kVec + j]);
      *reinterpret_cast<uint4*>(ptr + v * kVec) = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      if (i < valid) ptr[i] = from_float<T>(in[i]);
  }
}

// softplus to a few ulps: max(x, 0) + log1p(exp(-|x|)).
__device__ __forceinline__ float softplus(float x) { return fmaxf(x, 0.f) + log1pf(expf(-fabsf(x))); }

// softplus in 6 instructions, for 16-bit inputs (float32 inputs keep softplus()): max(x, 0) +
// ln 2 * log2(1 + e), e = exp(-|x|) in (0, 1]. Its error is absolute, < 3e-7 (the rounding of 1 + e
// and lg2's 2^-22). Relative to dt = softplus(x) it grows as x goes below 0 (dt ~ e there), but
// down to x ~ -11 (dt ~ 2e-5) it stays below what the rounding of the 16-bit delta itself moves dt
// (e |x| 2^-9), and past that the step's whole input dt u B is under 2e-5 |u B|.
// The 5-term log1p series it replaced below e = 1/32 (relative error 5e-6 everywhere) took 7
// instructions more per element, paid in the staging of every tile (H200, B4 D5120 L4096 N 16 bf16:
// backward alone 3.41 -> 3.38 ms, fwd+bwd 3.707 -> 3.665 ms).
__device__ __forceinline__ float softplus_of_decay(float x, float e) {  // e = exp(-|x|)
  return fmaxf(x, 0.f) + log2_approx(1.f + e) * kLn2;
}
__device__ __forceinline__ float softplus_fast(float x) { return softplus_of_decay(x, exp2_approx(-fabsf(x) * kLog2e)); }

// z * sigmoid(z) with the MUFU's exp2 and a fast division (2 ulp each; z < -88 gives -0, as it should).
__device__ __forceinline__ float silu_fast(float z) {
  const float denominator = 1.f + exp2_approx(-z * kLog2e);
#ifdef __CUDA_ARCH__
  return __fdividef(z, denominator);
#else
  return z / denominator;
#endif
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// sigmoid(x) with the MUFU's exp2 and a fast division, for 16-bit inputs (as silu_fast).
__device__ __forceinline__ float sigmoid_fast(float x) {
#ifdef __CUDA_ARCH__
  return __fdividef(1.f, 1.f + exp2_approx(-x * kLog2e));
#else
  return 1.f / (1.f + exp2_approx(-x * kLog2e));
#endif
}

// softplus(x) and its slope sigmoid(x) from one exp(-|x|): sigmoid(x) = (x >= 0 ? 1 : e) / (1 + e).
// The backward's staging of 16-bit inputs (one MUFU op less per step than the two apart).
__device__ __forceinline__ float softplus_fast_with_slope(float x, float& slope) {
  const float e = exp2_approx(-fabsf(x) * kLog2e);
#ifdef __CUDA_ARCH__
  slope = __fdividef(x >= 0.f ? 1.f : e, 1.f + e);
#else
  slope = (x >= 0.f ? 1.f : e) / (1.f + e);
#endif
  return softplus_of_decay(x, e);
}

// Step sizes of a thread's items: delta + delta_bias, then softplus; 0 past `valid` (identity steps).
// `raw` keeps the pre-softplus value (the backward's softplus derivative needs it).
template <int kItems>
__device__ __forceinline__ void step_sizes(float (&dt)[kItems], float (&raw)[kItems], float bias, bool use_softplus,
                                           int valid) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    raw[i] = dt[i] + bias;
    dt[i] = i < valid ? (use_softplus ? softplus(raw[i]) : raw[i]) : 0.f;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Inclusive scan over the lanes of a warp of the affine maps x -> a x + b (lane order = time order).
__device__ __forceinline__ void warp_scan_affine(float& a, float& b) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const float a_prev = __shfl_up_sync(0xffffffffu, a, offset);
    const float b_prev = __shfl_up_sync(0xffffffffu, b, offset);
    if (lane >= offset) {
      b = fmaf(a, b_prev, b);
      a = a * a_prev;
    }
  }
}

// Reverse counterpart: lane order = reverse time order (x -> a x + b applied from the last lane).
__device__ __forceinline__ void warp_scan_affine_reverse(float& a, float& b) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const float a_next = __shfl_down_sync(0xffffffffu, a, offset);
    const float b_next = __shfl_down_sync(0xffffffffu, b, offset);
    if (lane + offset < 32) {
      b = fmaf(a, b_next, b);
      a = a * a_next;
    }
  }
}

template <typename T>
struct BCPointer {
  // Address of element (row, channel, n) at time t0 of B or C, for either layout.
  __device__ __forceinline__ static const T* at(std::uintptr_t base, bool fixed, int64_t row, int64_t channel,
                                                  int64_t channels_per_group, int64_t batch_stride,
                                                  int64_t group_stride, int64_t n_stride, int64_t n, int64_t t0) {
    const T* ptr = as_ptr<const T>(base);
    if (fixed) return ptr + channel * group_stride + n * n_stride;
    return ptr + row * batch_stride + (channel / channels_per_group) * group_stride + n * n_stride + t0;
  }
};

}  // namespace scan
}  // namespace ssmk
