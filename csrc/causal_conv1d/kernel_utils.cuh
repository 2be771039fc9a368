// Device helpers of the causal_conv1d kernels: loads of tensors whose element type is only known
// at run time (weight, bias, state: a uniform switch, cheaper than another template dimension),
// and 16-byte vectors of the templated input type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "common.h"

namespace ssmk {
namespace conv {

__device__ __forceinline__ float load_as_float(std::uintptr_t base, int code, int64_t index) {
  switch (static_cast<DType>(code)) {
    case DType::kFloat16: return __half2float(reinterpret_cast<const __half*>(base)[index]);
    case DType::kBFloat16: return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(base)[index]);
    case DType::kFloat64: return static_cast<float>(reinterpret_cast<const double*>(base)[index]);
    default: return reinterpret_cast<const float*>(base)[index];
  }
}

__device__ __forceinline__ void store_from_float(std::uintptr_t base, int code, int64_t index, float value) {
  switch (static_cast<DType>(code)) {
    case DType::kFloat16: reinterpret_cast<__half*>(base)[index] = __float2half_rn(value); break;
    case DType::kBFloat16: reinterpret_cast<__nv_bfloat16*>(base)[index] = __float2bfloat16_rn(value); break;
    case DType::kFloat64: reinterpret_cast<double*>(base)[index] = static_cast<double>(value); break;
    default: reinterpret_cast<float*>(base)[index] = value;
  }
}

// Fast division (two instructions instead of IEEE division's slow path, which showed in the
// bandwidth-bound kernels): 1 / (1 + exp(-v)) is far from __fdividef's range limits except where
// exp overflows, and there the quotient is 0 as it should be.
__device__ __forceinline__ float sigmoid(float v) { return __fdividef(1.0f, 1.0f + __expf(-v)); }
__device__ __forceinline__ float silu(float v) { return v * sigmoid(v); }

// kElts elements of T in one 16-byte access.
template <typename T>
struct Vec16 {
  static constexpr int kElts = 16 / sizeof(T);
};

// The unsigned type of a kBytes-wide access (one load or store instruction).
template <int kBytes> struct RawBits;
template <> struct RawBits<16> { using type = uint4; };
template <> struct RawBits<8> { using type = uint2; };
template <> struct RawBits<4> { using type = unsigned int; };

// kN consecutive elements of T (one aligned access of kN * sizeof(T) bytes), as float.
template <typename T, int kN>
__device__ __forceinline__ void load_floats(const T* ptr, float* out) {
  using Raw = typename RawBits<kN * sizeof(T)>::type;
  Raw raw = *reinterpret_cast<const Raw*>(ptr);
  const T* elts = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kN; ++i) out[i] = to_float(elts[i]);
}

template <typename T, int kN>
__device__ __forceinline__ void store_floats(T* ptr, const float* in) {
  using Raw = typename RawBits<kN * sizeof(T)>::type;
  Raw raw;
  T* elts = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < kN; ++i) elts[i] = from_float<T>(in[i]);
  *reinterpret_cast<Raw*>(ptr) = raw;
}

// kN consecutive elements of a tensor whose type is only known at run time (float32, float16 or
// bfloat16 by code), as float, in the widest aligned accesses kN allows (16 bytes for the decode
// update's weights). base + index must be aligned to that width: kN * element size bytes, or 16.
template <int kN>
__device__ __forceinline__ void load_span_as_float(std::uintptr_t base, int code, int64_t index, float* out) {
  if (static_cast<DType>(code) == DType::kFloat32) {
    static_assert(kN % 4 == 0, "float spans load in 16-byte accesses");
    const float* ptr = reinterpret_cast<const float*>(base) + index;
#pragma unroll
    for (int i = 0; i < kN; i += 4) load_floats<float, 4>(ptr + i, out + i);
    return;
  }
  constexpr int kChunk = kN % 8 == 0 ? 8 : 4;  // 16- or 8-byte accesses of 2-byte elements
  static_assert(kN % kChunk == 0, "half spans load in 8- or 16-byte accesses");
#pragma unroll
  for (int i = 0; i < kN; i += kChunk) {
    if (static_cast<DType>(code) == DType::kBFloat16)
      load_floats<__nv_bfloat16, kChunk>(reinterpret_cast<const __nv_bfloat16*>(base) + index + i, out + i);
    else
      load_floats<__half, kChunk>(reinterpret_cast<const __half*>(base) + index + i, out + i);
  }
}

template <typename T>
__device__ __forceinline__ void load_vec(const T* ptr, float* out) { load_floats<T, Vec16<T>::kElts>(ptr, out); }

template <typename T>
__device__ __forceinline__ void store_vec(T* ptr, const float* in) { store_floats<T, Vec16<T>::kElts>(ptr, in); }

__device__ __forceinline__ float dsilu(float z, float g) {  // g * d silu(z) / dz
  const float sig = sigmoid(z);
  return g * sig * (1.0f + z * (1.0f - sig));
}

inline bool aligned16(std::uintptr_t address) { return address % 16 == 0; }
inline bool aligned_to(std::uintptr_t address, int64_t bytes) { return address % bytes == 0; }

// The positions of sequence r: row r of the batch, or the r-th cu_seqlens sequence of row 0.
struct SequenceSpan {
  int64_t row, start, end;
};

__device__ __forceinline__ SequenceSpan sequence_span(std::uintptr_t cu_seqlens, int64_t r, int64_t seqlen) {
  const int32_t* cu = reinterpret_cast<const int32_t*>(cu_seqlens);
  return cu ? SequenceSpan{0, cu[r], cu[r + 1]} : SequenceSpan{r, 0, seqlen};
}

}  // namespace conv
}  // namespace ssmk
