// What the state-parallel (tiled) selective-scan kernels share (selective_scan_fwd_tiled.cu,
// selective_scan_bwd_tiled.cu): a block takes 32 channels of one sequence and walks it in tiles of
// 32 steps, loading 8-element items (16 bytes of 16-bit types) a tile ahead and staging them in
// shared memory as float.
#pragma once

#include <cstdlib>
#include <cstring>

#include "selective_scan/scan_common.cuh"

namespace ssmk {
namespace scan {
namespace tiled {

constexpr int kChannels = 32;                  // channels per block
constexpr int kSteps = 32;                     // steps per tile
constexpr int kItem = 8;                       // elements per load item (16 bytes of 16-bit types)
constexpr int kItemsPerRow = kSteps / kItem;   // items of one channel's (or one state's) tile row
constexpr int kRow = kSteps + 4;               // [channel][step] rows: +4 floats keep float4 reads conflict-free
static_assert(kChunk % kSteps == 0, "checkpoints must land on tile starts");

// Whether the environment variable `name` is "warp": the call goes to the warp-per-channel kernel
// instead (A/B timing; read at every launch, so that one process can time both).
inline bool warp_kernel_forced(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::strcmp(value, "warp") == 0;
}

// Whether the tiled kernels' layout fits the call with blocks of `channels` channels: B and C
// input-dependent and of u's dtype, the blocks tiling the channels and every B/C group.
inline bool tiled_blocks_fit(const Params& p, int64_t channels) {
  if (p.b_fixed || p.c_fixed || p.bc_dtype != p.dtype) return false;
  return p.dim % channels == 0 && p.channels_per_b_group % channels == 0 && p.channels_per_c_group % channels == 0;
}

// 8 consecutive elements in their own dtype, loaded ahead and converted when staged.
template <typename T>
struct alignas(16) Item {
  T v[kItem];
};

// 8 floats to 16-byte aligned shared memory, as two 16-byte stores.
__device__ __forceinline__ void store_floats(float* dst, const float (&v)[kItem]) {
  reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

template <typename T>
__device__ __forceinline__ void load_item(const T* ptr, int valid, Item<T>& item) {
  if (valid >= kItem && reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0) {
#pragma unroll
    for (int k = 0; k < static_cast<int>(sizeof(Item<T>) / 16); ++k) {
      reinterpret_cast<uint4*>(item.v)[k] = reinterpret_cast<const uint4*>(ptr)[k];
    }
  } else {
#pragma unroll
    for (int j = 0; j < kItem; ++j) item.v[j] = j < valid ? ptr[j] : from_float<T>(0.f);
  }
}

}  // namespace tiled
}  // namespace scan
}  // namespace ssmk
