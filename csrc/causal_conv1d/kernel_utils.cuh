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
// exp overflows, and there the quotient is 0 as it should be. exp by the MUFU's ex2 alone
// (exp2_approx): __expf's fix-ups for subnormal results took 3 of the backward's ~42 instructions
// per position, for values that make the sigmoid 1 either way.
__device__ __forceinline__ float sigmoid(float v) { return __fdividef(1.0f, 1.0f + exp2_approx(-v * kLog2e)); }
__device__ __forceinline__ float silu(float v) { return __fdividef(v, 1.0f + exp2_approx(-v * kLog2e)); }

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

// Two floats as one 32-bit word of two 16-bit T (round to nearest), low half first.
template <typename T> __device__ __forceinline__ uint32_t pack_pair(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
  uint32_t word;
  std::memcpy(&word, &pair, 4);
  return word;
}
template <> __device__ __forceinline__ uint32_t pack_pair<__half>(float lo, float hi) {
  const __half2 pair = __floats2half2_rn(lo, hi);
  uint32_t word;
  std::memcpy(&word, &pair, 4);
  return word;
}

// kN floats as the raw bits of kN elements of T, assembled from 32-bit words (a Raw written
// element by element through a T* reached memory as 16-bit pairs, st.global.v2.u16).
template <typename T, int kN>
__device__ __forceinline__ typename RawBits<kN * sizeof(T)>::type pack_floats(const float* in) {
  constexpr int kWords = kN * static_cast<int>(sizeof(T)) / 4;
  uint32_t w[kWords];
#pragma unroll
  for (int i = 0; i < kWords; ++i) {
    if constexpr (sizeof(T) == 4) {
      std::memcpy(&w[i], &in[i], 4);
    } else {
      w[i] = pack_pair<T>(in[2 * i], in[2 * i + 1]);
    }
  }
  if constexpr (kWords == 4) {
    return make_uint4(w[0], w[1], w[2], w[3]);
  } else if constexpr (kWords == 2) {
    return make_uint2(w[0], w[1]);
  } else {
    return w[0];
  }
}

// One store instruction of a raw vector to global memory. Inside the kernels NVVM split plain
// 16-byte assignments into four 4-byte stores (st.global.u32 in the PTX of the channel-first
// kernels and the decode update, though not in small test kernels; four STG.E per vector, each
// warp instruction covering every sector in pieces), so the vector forms are spelled out. Host
// emulation: plain assignments.
__device__ __forceinline__ void store_raw(void* ptr, uint4 v) {
#ifdef __CUDA_ARCH__
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
#else
  *static_cast<uint4*>(ptr) = v;
#endif
}
__device__ __forceinline__ void store_raw(void* ptr, uint2 v) {
#ifdef __CUDA_ARCH__
  asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(ptr), "r"(v.x), "r"(v.y) : "memory");
#else
  *static_cast<uint2*>(ptr) = v;
#endif
}
__device__ __forceinline__ void store_raw(void* ptr, unsigned int v) { *static_cast<unsigned int*>(ptr) = v; }

template <typename T, int kN>
__device__ __forceinline__ void store_floats(T* ptr, const float* in) {
  store_raw(ptr, pack_floats<T, kN>(in));
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

// The kElts elements of a raw 16-byte vector of T, as float. bfloat16 is the top half of a float:
// one shift or one mask per element (the conversion intrinsic takes a PRMT and a shift for the odd
// ones).
template <typename T>
__device__ __forceinline__ void unpack_vector(const uint4& raw, float* out) {
  const T* elts = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec16<T>::kElts; ++i) out[i] = to_float(elts[i]);
}
template <>
__device__ __forceinline__ void unpack_vector<__nv_bfloat16>(const uint4& raw, float* out) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t low = words[i] << 16, high = words[i] & 0xffff0000u;
    std::memcpy(&out[2 * i], &low, 4);
    std::memcpy(&out[2 * i + 1], &high, 4);
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
