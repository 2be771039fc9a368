// selective_state_update kernels: t tokens of the Mamba recurrence applied to a state cache in place.
// Two kernels: the head kernel (state_update_head_kernel, below the per-row one) serves Mamba-2
// steps whose state and B/C read in 16-byte packs and whose x/z/out/B/C share one type, the common
// decode call; the per-row kernel serves every other form (Mamba-1's full A, strided or odd-sized
// state rows, mixed input types). The per-row kernel:
//
// Work split: a group of `lanes` threads (a power of two <= 32, inside one warp) owns one state
// row (b, h, p, 0:n); each thread of the group keeps `chunks` packs of `kVec` consecutive state
// elements in registers for all tokens, so the state is read once and written once per call.
// Per token: decay and input for every element, then y = sum_n state * C by shuffles inside the
// group. The vector path (kVec > 1) reads and writes the state with 16-byte accesses; it is taken
// when the state's n axis is contiguous and every row start is 16-byte aligned, else kVec = 1.
//
// Each thread loads the B and C elements of its own packs straight into registers (vector loads
// where B/C are contiguous along n; they hit L1/L2, being shared by the group's heads and rows):
// no shared-memory staging and no barrier, so a block's state loads, its B/C loads and its x/dt
// loads are all in flight at once. Staging B/C behind two __syncthreads serialised two memory
// latencies per block; the H200 ran the batch-256 float32 step at 54% of copy bandwidth so.
//
// Templated on the state type, the pack width, whether A is one scalar per head and B/C's type on
// the vector path (18 instances, see launch_typed; B/C of mixed types or layouts go element by
// element; the head kernel adds 18 more). The other inputs' element types are read at run time
// (warp-uniform switches), since callers mix them (bf16 x with fp32 A/D/dt_bias) and they are one
// load per row and token.
#include "common.h"
#include "state_update/state_update.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace ssmk {
namespace state_update {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

// An element's bits, loaded without converting them, and their conversion (bits_to_float) apart.
// A conversion inside the dtype switch waits on its load before the next switch issues the next
// load: the SASS of the per-row kernel showed six such waits per block (A, dt_bias, D, x, dt, z,
// all L2 hits). Loading all bits first keeps them in flight together with the state's loads. By
// itself it gained little on the H200 (batch 256, float32 state: 63 -> 66% of copy); the rest of the
// per-row kernel's cost is its instruction count (see the head kernel). float64 (rare here) is
// narrowed at its load: only that case waits.
__device__ __forceinline__ uint32_t load_bits(const void* base, int64_t offset, int code) {
  if (code == static_cast<int>(DType::kFloat32)) return static_cast<const uint32_t*>(base)[offset];
  if (code == static_cast<int>(DType::kFloat64))
    return __float_as_uint(static_cast<float>(static_cast<const double*>(base)[offset]));
  return static_cast<const uint16_t*>(base)[offset];
}

__device__ __forceinline__ float bits_to_float(uint32_t bits, int code) {
  switch (static_cast<DType>(code)) {
    case DType::kFloat16: return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
    case DType::kBFloat16: return __uint_as_float(bits << 16);
    default: return __uint_as_float(bits);  // float32, or float64 narrowed by load_bits
  }
}

__device__ __forceinline__ float load_as_float(const void* base, int64_t offset, int code) {
  return bits_to_float(load_bits(base, offset, code), code);
}

__device__ __forceinline__ void store_from_float(void* base, int64_t offset, int code, float value) {
  switch (static_cast<DType>(code)) {
    case DType::kFloat32: static_cast<float*>(base)[offset] = value; break;
    case DType::kFloat16: static_cast<__half*>(base)[offset] = __float2half_rn(value); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(base)[offset] = __float2bfloat16_rn(value); break;
    default: static_cast<double*>(base)[offset] = static_cast<double>(value); break;
  }
}

// Same threshold as torch.nn.functional.softplus: linear above 20.
__device__ __forceinline__ float softplus(float v) { return v <= 20.f ? log1pf(expf(v)) : v; }

// The cache slot batch row b reads and writes: b itself without indices, else its index; -1 for a
// padding row (pad_slot_id, and defensively any index outside the cache), which touches no state
// and gets zeros as output.
__device__ __forceinline__ int64_t cache_slot(const Params& params, int64_t b) {
  if (params.indices == nullptr) return b;
  const int64_t slot = params.index_is_int64 ? static_cast<const int64_t*>(params.indices)[b * params.index_stride]
                                             : static_cast<const int32_t*>(params.indices)[b * params.index_stride];
  return slot == params.pad_slot_id || slot < 0 || slot >= params.slots ? -1 : slot;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// The `kChunks` packs of one B or C row that a thread uses (pack c starts at n index
// (c * lanes + lane_in_row) * kVec); zeros where `valid` is false.
// bc_t = float / __half / __nv_bfloat16: n is contiguous, every pack's start aligned to the pack's
// size, B and C of that type; a pack is one load, kept in its own type until used (half the
// registers of floats). bc_t = void: any strides and dtype codes, element by element, as float.
template <typename bc_t, int kVec, int kChunks>
using BCPacks = Pack<std::conditional_t<std::is_void_v<bc_t>, float, bc_t>, kVec>[kChunks];

template <typename bc_t, int kVec, int kChunks>
__device__ __forceinline__ void load_bc_row(const void* base, int64_t offset, int64_t stride, int code, int lanes,
                                            int lane_in_row, const bool (&valid)[kChunks],
                                            BCPacks<bc_t, kVec, kChunks>& out) {
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int idx = (c * lanes + lane_in_row) * kVec;
    if constexpr (std::is_void_v<bc_t>) {
#pragma unroll
      for (int v = 0; v < kVec; ++v)
        out[c].v[v] = valid[c] ? load_as_float(base, offset + (idx + v) * stride, code) : 0.f;
    } else {
      if (valid[c]) {
        out[c] = *reinterpret_cast<const Pack<bc_t, kVec>*>(static_cast<const bc_t*>(base) + offset + idx);
      } else {
#pragma unroll
        for (int v = 0; v < kVec; ++v) out[c].v[v] = from_float<bc_t>(0.f);
      }
    }
  }
}

template <typename state_t, int kVec, int kChunks, bool kAPerHead, typename bc_t>
__global__ void __launch_bounds__(kThreads)
state_update_kernel(const __grid_constant__ Params params, int lanes, int chunks, int p_blocks, int64_t b_offset) {
  constexpr int kElems = kVec * kChunks;
  const int lane = threadIdx.x & 31;
  const int rows_per_warp = 32 / lanes;
  const int row_in_warp = lane / lanes;
  const int lane_in_row = lane % lanes;

  // Grid: x = (head, block of rows), y = batch row (in launches of at most 65535 rows). 32-bit
  // index math only: the 64-bit divisions of a flat grid index sat in front of every block's state
  // loads (the launcher checks heads * p_blocks < 2^31).
  const int h32 = static_cast<int>(blockIdx.x) / p_blocks;
  const int p_block = static_cast<int>(blockIdx.x) - h32 * p_blocks;
  const int64_t h = h32;
  const int64_t b = b_offset + blockIdx.y;
  const int64_t p = (p_block * kWarps + (threadIdx.x >> 5)) * rows_per_warp + row_in_warp;
  const bool row_ok = p < params.headdim;
  const int64_t g = h32 / static_cast<int>(params.heads_per_group);
  const int n = static_cast<int>(params.dstate);  // <= kMaxDState

  // Uniform over the block (one batch row per block), so returning here is safe for the shuffles.
  const int64_t slot = cache_slot(params, b);
  if (slot < 0) {
    if (row_ok && lane_in_row == 0) {
      const int64_t base = b * params.out_stride[0] + h * params.out_stride[2] + p * params.out_stride[3];
      for (int64_t t = 0; t < params.tokens; ++t) store_from_float(params.out, base + t * params.out_stride[1],
                                                                   params.out_dtype, 0.f);
    }
    return;
  }

  // Element e = c * kVec + v of this thread sits at n index (c * lanes + lane_in_row) * kVec + v.
  // A pack is all valid or all not (kVec > 1 needs n % kVec == 0).
  bool valid[kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) valid[c] = row_ok && c < chunks && (c * lanes + lane_in_row) * kVec < n;

  // Every load of the first token is issued before any value is used: the state's (the ones that
  // reach DRAM) first, then the row constants' and token 0's as raw bits (see load_bits), then B/C.
  // Only then are they converted, so one block waits about one memory latency, not one per input.
  state_t* state_row = static_cast<state_t*>(params.state) + slot * params.state_stride[0] +
                       h * params.state_stride[1] + (row_ok ? p : 0) * params.state_stride[2];
  Pack<state_t, kVec> state_raw[kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int idx = (c * lanes + lane_in_row) * kVec;
    if constexpr (kVec > 1) {  // n contiguous, 16-byte aligned rows, n a multiple of kVec
      if (valid[c]) state_raw[c] = *reinterpret_cast<const Pack<state_t, kVec>*>(state_row + idx);
    } else {
      if (valid[c]) state_raw[c].v[0] = state_row[idx * params.state_stride[3]];
    }
  }

  // Per-row constants. kAPerHead: A has stride 0 over (p, n) (Mamba-2's broadcast scalar per
  // head), one exp per token and row. Otherwise (Mamba-1, full A) A is re-read per token and
  // element (cache hits after the first token) rather than held in registers.
  const int64_t A_row = h * params.A_stride[0] + (row_ok ? p : 0) * params.A_stride[1];
  const uint32_t A_bits = kAPerHead ? load_bits(params.A, A_row, params.A_dtype) : 0;
  const bool has_dt_bias = row_ok && params.dt_bias != nullptr;
  const bool has_D = row_ok && params.D != nullptr;
  const bool has_z = row_ok && params.z != nullptr;
  const uint32_t dt_bias_bits =
      has_dt_bias ? load_bits(params.dt_bias, h * params.dt_bias_stride[0] + p * params.dt_bias_stride[1],
                              params.dt_bias_dtype)
                  : 0;
  const uint32_t D_bits =
      has_D ? load_bits(params.D, h * params.D_stride[0] + p * params.D_stride[1], params.D_dtype) : 0;

  const int64_t x_row = b * params.x_stride[0] + h * params.x_stride[2] + p * params.x_stride[3];
  const int64_t dt_row = b * params.dt_stride[0] + h * params.dt_stride[2] + p * params.dt_stride[3];
  const int64_t z_row = b * params.z_stride[0] + h * params.z_stride[2] + p * params.z_stride[3];
  const int64_t out_row = b * params.out_stride[0] + h * params.out_stride[2] + p * params.out_stride[3];
  const int64_t B_row = b * params.B_stride[0] + g * params.B_stride[2];
  const int64_t C_row = b * params.C_stride[0] + g * params.C_stride[2];

  // One token's inputs as loaded (x, dt, z as bits; B and C in packs).
  uint32_t x_bits = 0, dt_bits = 0, z_bits = 0;
  BCPacks<bc_t, kVec, kChunks> B_tok, C_tok;
  auto load_token = [&](int64_t t) {
    x_bits = row_ok ? load_bits(params.x, x_row + t * params.x_stride[1], params.x_dtype) : 0;
    dt_bits = row_ok ? load_bits(params.dt, dt_row + t * params.dt_stride[1], params.dt_dtype) : 0;
    z_bits = has_z ? load_bits(params.z, z_row + t * params.z_stride[1], params.z_dtype) : 0;
    load_bc_row<bc_t, kVec, kChunks>(params.B, B_row + t * params.B_stride[1], params.B_stride[3], params.B_dtype,
                                     lanes, lane_in_row, valid, B_tok);
    load_bc_row<bc_t, kVec, kChunks>(params.C, C_row + t * params.C_stride[1], params.C_stride[3], params.C_dtype,
                                     lanes, lane_in_row, valid, C_tok);
  };
  load_token(0);

  float s[kElems];
#pragma unroll
  for (int e = 0; e < kElems; ++e) s[e] = valid[e / kVec] ? to_float(state_raw[e / kVec].v[e % kVec]) : 0.f;
  const float A_head = kAPerHead ? bits_to_float(A_bits, params.A_dtype) : 0.f;
  const float dt_bias = has_dt_bias ? bits_to_float(dt_bias_bits, params.dt_bias_dtype) : 0.f;
  const float D = has_D ? bits_to_float(D_bits, params.D_dtype) : 0.f;

  for (int64_t t = 0;;) {
    const float x = row_ok ? bits_to_float(x_bits, params.x_dtype) : 0.f;
    float dt = row_ok ? bits_to_float(dt_bits, params.dt_dtype) : 0.f;
    const float z = has_z ? bits_to_float(z_bits, params.z_dtype) : 0.f;
    dt += dt_bias;
    if (params.dt_softplus) dt = softplus(dt);
    const float dt_x = dt * x;
    const float decay_head = kAPerHead ? expf(A_head * dt) : 0.f;
    float partial = 0.f;
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      if (valid[e / kVec]) {
        const int idx = ((e / kVec) * lanes + lane_in_row) * kVec + e % kVec;
        const float decay = kAPerHead ? decay_head
                                       : expf(load_as_float(params.A, A_row + idx * params.A_stride[2],
                                                            params.A_dtype) * dt);
        s[e] = s[e] * decay + dt_x * to_float(B_tok[e / kVec].v[e % kVec]);
        partial += s[e] * to_float(C_tok[e / kVec].v[e % kVec]);
      }
    }
    for (int offset = lanes >> 1; offset > 0; offset >>= 1)
      partial += __shfl_xor_sync(0xffffffffu, partial, offset);
    if (row_ok && lane_in_row == 0) {
      float y = partial;
      if (params.D != nullptr) y += D * x;
      if (params.z != nullptr) y *= z / (1.f + expf(-z));
      store_from_float(params.out, out_row + t * params.out_stride[1], params.out_dtype, y);
    }
    if (++t == params.tokens) break;
    load_token(t);
  }

#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int idx = (c * lanes + lane_in_row) * kVec;
    if constexpr (kVec > 1) {
      if (valid[c]) {
        Pack<state_t, kVec> pack;
#pragma unroll
        for (int v = 0; v < kVec; ++v) pack.v[v] = from_float<state_t>(s[c * kVec + v]);
        *reinterpret_cast<Pack<state_t, kVec>*>(state_row + idx) = pack;
      }
    } else {
      if (valid[c]) state_row[idx * params.state_stride[3]] = from_float<state_t>(s[c]);
    }
  }
}

// The head kernel: the Mamba-2 decode step's fast path (A one scalar per head, the state and B/C
// in 16-byte packs, n / kVec a power of two <= 32, x/z/out/B/C of one type io_t). A block owns
// kRows * rows_per_pass rows of one (batch row, head); a row's packs are spread over `lanes` =
// n / kVec threads, one pack each; a thread keeps its B and C packs, and dt, the decay and D when
// they are one value per head, for all its kRows rows.
// Why: the per-row kernel above executed ~44 instructions per state element (ncu on the H200:
// 0.45 issued per scheduler cycle, 55% of DRAM bandwidth at batch 256): run-time dtype switches,
// 64-bit offsets and the row's setup for every 16 elements. Here the element types are template
// parameters and the per-row work is the state pack, x, z and the output.
// kOneToken: the decode step proper (t = 1), where a row's registers are free once its state is
// stored; several tokens keep every row's state in float registers across them.
template <typename state_t, typename io_t, int kRows, bool kOneToken>
__global__ void __launch_bounds__(kThreads)
state_update_head_kernel(const __grid_constant__ Params params, int lanes_log2, int p_blocks, int64_t b_offset) {
  constexpr int kVec = 16 / sizeof(state_t);
  const int64_t tokens = kOneToken ? 1 : params.tokens;
  const int lanes = 1 << lanes_log2;
  const int lane_in_row = threadIdx.x & (lanes - 1);
  const int rows_per_pass = kThreads >> lanes_log2;
  const int h32 = static_cast<int>(blockIdx.x) / p_blocks;
  const int p_block = static_cast<int>(blockIdx.x) - h32 * p_blocks;
  const int64_t h = h32;
  const int64_t b = b_offset + blockIdx.y;
  const int64_t g = h32 / static_cast<int>(params.heads_per_group);
  // Row j of this thread: p0 + j * rows_per_pass (a thread whose row 0 is past headdim has none).
  const int p0 = p_block * kRows * rows_per_pass + (static_cast<int>(threadIdx.x) >> lanes_log2);
  const int headdim = static_cast<int>(params.headdim);  // the launcher checks it fits
  bool row_ok[kRows];
#pragma unroll
  for (int j = 0; j < kRows; ++j) row_ok[j] = p0 + j * rows_per_pass < headdim;
  const bool out_lane = lane_in_row == 0;
  const bool has_z = params.z != nullptr, has_D = params.D != nullptr, has_dt_bias = params.dt_bias != nullptr;
  io_t* out_head = static_cast<io_t*>(params.out) + b * params.out_stride[0] + h * params.out_stride[2];

  const int64_t slot = cache_slot(params, b);
  if (slot < 0) {  // uniform over the block
    if (out_lane) {
#pragma unroll
      for (int j = 0; j < kRows; ++j) {
        if (!row_ok[j]) continue;
        for (int64_t t = 0; t < tokens; ++t)
          out_head[t * params.out_stride[1] + (p0 + j * rows_per_pass) * params.out_stride[3]] = from_float<io_t>(0.f);
      }
    }
    return;
  }

  // Loads first, conversions after (see load_bits): the state's packs, then the rest.
  const int n_offset = lane_in_row * kVec;
  state_t* state_head = static_cast<state_t*>(params.state) + slot * params.state_stride[0] +
                        h * params.state_stride[1] + n_offset;
  const int64_t state_row_stride = params.state_stride[2];
  Pack<state_t, kVec> state_raw[kRows];
#pragma unroll
  for (int j = 0; j < kRows; ++j)
    if (row_ok[j])
      state_raw[j] = *reinterpret_cast<const Pack<state_t, kVec>*>(state_head + (p0 + j * rows_per_pass) * state_row_stride);

  // Per-head values (Mamba-2's broadcast views), else per row.
  const bool dt_per_head = params.dt_stride[3] == 0 && (!has_dt_bias || params.dt_bias_stride[1] == 0);
  const bool D_per_head = params.D_stride[1] == 0;
  const uint32_t A_bits = load_bits(params.A, h * params.A_stride[0], params.A_dtype);
  uint32_t D_bits[kRows], dt_bias_bits[kRows];
#pragma unroll
  for (int j = 0; j < kRows; ++j) {
    const int64_t p = p0 + j * rows_per_pass;
    const bool first = j == 0;
    D_bits[j] = has_D && row_ok[j] && (first || !D_per_head)
                    ? load_bits(params.D, h * params.D_stride[0] + p * params.D_stride[1], params.D_dtype) : 0;
    dt_bias_bits[j] = has_dt_bias && row_ok[j] && (first || !dt_per_head)
                          ? load_bits(params.dt_bias, h * params.dt_bias_stride[0] + p * params.dt_bias_stride[1],
                                      params.dt_bias_dtype) : 0;
  }
  const io_t* x_head = static_cast<const io_t*>(params.x) + b * params.x_stride[0] + h * params.x_stride[2];
  const io_t* z_head = has_z ? static_cast<const io_t*>(params.z) + b * params.z_stride[0] + h * params.z_stride[2]
                            : nullptr;
  const int64_t dt_head = b * params.dt_stride[0] + h * params.dt_stride[2];
  const io_t* B_head = static_cast<const io_t*>(params.B) + b * params.B_stride[0] + g * params.B_stride[2] + n_offset;
  const io_t* C_head = static_cast<const io_t*>(params.C) + b * params.C_stride[0] + g * params.C_stride[2] + n_offset;

  io_t x_raw[kRows], z_raw[kRows];
  uint32_t dt_bits[kRows];
  Pack<io_t, kVec> B_pack, C_pack;
  auto load_token = [&](int64_t t) {
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      const int64_t p = p0 + j * rows_per_pass;
      x_raw[j] = row_ok[j] ? x_head[t * params.x_stride[1] + p * params.x_stride[3]] : from_float<io_t>(0.f);
      z_raw[j] = has_z && row_ok[j] ? z_head[t * params.z_stride[1] + p * params.z_stride[3]] : from_float<io_t>(0.f);
      dt_bits[j] = row_ok[j] && (j == 0 || !dt_per_head)
                       ? load_bits(params.dt, dt_head + t * params.dt_stride[1] + p * params.dt_stride[3], params.dt_dtype)
                       : 0;
    }
    B_pack = *reinterpret_cast<const Pack<io_t, kVec>*>(B_head + t * params.B_stride[1]);
    C_pack = *reinterpret_cast<const Pack<io_t, kVec>*>(C_head + t * params.C_stride[1]);
  };
  load_token(0);

  float s[kRows][kVec];
#pragma unroll
  for (int j = 0; j < kRows; ++j)
#pragma unroll
    for (int v = 0; v < kVec; ++v) s[j][v] = row_ok[j] ? to_float(state_raw[j].v[v]) : 0.f;
  auto store_state_row = [&](int j) {
    if (!row_ok[j]) return;
    Pack<state_t, kVec> pack;
#pragma unroll
    for (int v = 0; v < kVec; ++v) pack.v[v] = from_float<state_t>(s[j][v]);
    *reinterpret_cast<Pack<state_t, kVec>*>(state_head + (p0 + j * rows_per_pass) * state_row_stride) = pack;
  };
  const float A = bits_to_float(A_bits, params.A_dtype);
  float D[kRows];
#pragma unroll
  for (int j = 0; j < kRows; ++j)
    D[j] = j > 0 && D_per_head ? D[0] : has_D ? bits_to_float(D_bits[j], params.D_dtype) : 0.f;

  for (int64_t t = 0;;) {
    float dt[kRows], decay[kRows];
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      if (j > 0 && dt_per_head) {
        dt[j] = dt[0];
        decay[j] = decay[0];
        continue;
      }
      dt[j] = bits_to_float(dt_bits[j], params.dt_dtype);
      if (has_dt_bias) dt[j] += bits_to_float(dt_bias_bits[j], params.dt_bias_dtype);
      if (params.dt_softplus) dt[j] = softplus(dt[j]);
      decay[j] = expf(A * dt[j]);
    }
    float B[kVec], C[kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      B[v] = to_float(B_pack.v[v]);
      C[v] = to_float(C_pack.v[v]);
    }
    float y[kRows];
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      const float dt_x = dt[j] * to_float(x_raw[j]);
      float partial = 0.f;
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        s[j][v] = s[j][v] * decay[j] + dt_x * B[v];
        partial += s[j][v] * C[v];
      }
      y[j] = partial;
      if (kOneToken) store_state_row(j);  // its registers are free from here
    }
    // Sums over the row's lanes (aligned groups of `lanes` threads inside a warp).
#pragma unroll
    for (int j = 0; j < kRows; ++j)
      for (int offset = lanes >> 1; offset > 0; offset >>= 1) y[j] += __shfl_xor_sync(0xffffffffu, y[j], offset);
    if (out_lane) {
#pragma unroll
      for (int j = 0; j < kRows; ++j) {
        if (!row_ok[j]) continue;
        float out = y[j] + D[j] * to_float(x_raw[j]);
        if (has_z) {
          const float z = to_float(z_raw[j]);
          out *= z * __frcp_rn(1.f + expf(-z));
        }
        out_head[t * params.out_stride[1] + (p0 + j * rows_per_pass) * params.out_stride[3]] = from_float<io_t>(out);
      }
    }
    if (++t == tokens) break;
    load_token(t);
  }

  if (!kOneToken) {
#pragma unroll
    for (int j = 0; j < kRows; ++j) store_state_row(j);
  }
}

int pow2_at_least(int64_t value) {
  int result = 1;
  while (result < 32 && result < value) result <<= 1;
  return result;
}

// Tuning knob for scripts/tune_state_update.py: SSMKERNELS_STATE_UPDATE_PACKS=k caps the packs per
// thread at k (1..kMaxPacks) instead of the choice below. Read once per process.
int packs_override() {
  static const int value = [] {
    const char* text = std::getenv("SSMKERNELS_STATE_UPDATE_PACKS");
    const int packs = text == nullptr ? 0 : std::atoi(text);
    return packs >= 1 && packs <= kMaxPacks ? packs : 0;
  }();
  return value;
}

// Whether a tensor's rows (state, B or C; innermost axis n) can be read in packs of kVec elements:
// n contiguous, every pack's start aligned to the pack's size.
bool packs_aligned(const void* base, const int64_t (&stride)[4], int elem_bytes, int64_t dstate, int kVec) {
  const int64_t pack_bytes = static_cast<int64_t>(kVec) * elem_bytes;
  return stride[3] == 1 && dstate % kVec == 0 && reinterpret_cast<std::uintptr_t>(base) % pack_bytes == 0 &&
         stride[0] % kVec == 0 && stride[1] % kVec == 0 && stride[2] % kVec == 0;
}

template <typename T>
struct TypeTag {
  using type = T;
};

int dtype_bytes(int code) { return code == static_cast<int>(DType::kFloat32) ? 4 : 2; }

// kChunks: the packs (vector path) or elements (scalar path) one thread holds at most; registers
// are allocated for all of them, so it sets the occupancy.
template <typename state_t, int kVec, int kChunks>
void launch_typed(const Params& params, bool A_per_head) {
  const int64_t packs = ceil_div(params.dstate, kVec);
  // As many packs per thread as the instance holds (or the override, fewer): more 16-byte accesses
  // in flight per thread, and fewer threads. At batch 1 (8192 rows of the issue's shape) one pack
  // per thread made 2048 blocks of 80-register threads, ~2.6 waves of serialized load latencies
  // (13.6 us on the H100 against Triton's 5.9); 4 float32 packs make 512 blocks, one wave.
  const int64_t target_chunks = packs_override() > 0 ? std::min(packs_override(), kChunks) : kChunks;
  const int lanes = pow2_at_least(ceil_div(packs, target_chunks));
  const int chunks = static_cast<int>(ceil_div(packs, lanes));
  if (chunks > kChunks) throw std::invalid_argument("selective_state_update: d_state too large for the CUDA kernel");
  const int rows_per_block = (32 / lanes) * kWarps;
  const int64_t p_blocks = ceil_div(params.headdim, rows_per_block);
  const int64_t head_blocks = params.heads * p_blocks;
  if (head_blocks > INT_MAX)
    throw std::invalid_argument("selective_state_update: heads * row blocks = " + std::to_string(head_blocks) +
                                " exceeds the CUDA grid limit");
  auto launch_with = [&](auto bc_tag, auto a_per_head) {
    using bc_t = typename decltype(bc_tag)::type;
    auto kernel = state_update_kernel<state_t, kVec, kChunks, decltype(a_per_head)::value, bc_t>;
    constexpr int64_t kMaxGridY = 65535;
    for (int64_t b0 = 0; b0 < params.batch; b0 += kMaxGridY) {
      const dim3 grid(static_cast<unsigned>(head_blocks), static_cast<unsigned>(std::min(kMaxGridY, params.batch - b0)));
      SSMK_LAUNCH(kernel, grid, kThreads, params.stream, params, lanes, chunks, static_cast<int>(p_blocks), b0);
    }
  };
  // Instances (18, for build time): the vector path reads B/C in packs of their own type for
  // Mamba-2's per-head A (launch_state sends other B/C there only for a full A, Mamba-1, which reads
  // them element by element); the scalar path reads them element by element for either A.
  if constexpr (kVec > 1) {
    if (A_per_head) {
      SSMK_DISPATCH_FLOAT(params.B_dtype, "selective_state_update B",
                          [&] { launch_with(TypeTag<scalar_t>{}, std::true_type{}); });
    } else {
      launch_with(TypeTag<void>{}, std::false_type{});
    }
  } else if (A_per_head) {
    launch_with(TypeTag<void>{}, std::true_type{});
  } else {
    launch_with(TypeTag<void>{}, std::false_type{});
  }
  check_launch("selective_state_update kernel");
}

// Tuning knob for scripts/tune_state_update.py, read once per process:
// SSMKERNELS_STATE_UPDATE_KERNEL=rows sends every call to the per-row kernel (for comparison).
bool per_row_kernel_forced() {
  static const bool value = [] {
    const char* text = std::getenv("SSMKERNELS_STATE_UPDATE_KERNEL");
    return text != nullptr && std::string(text) == "rows";
  }();
  return value;
}

template <typename state_t, int kRows, bool kOneToken>
void launch_head_rows(const Params& params) {
  constexpr int kVec = 16 / sizeof(state_t);
  int lanes_log2 = 0;
  while ((kVec << lanes_log2) < params.dstate) ++lanes_log2;
  const int64_t rows_per_block = static_cast<int64_t>(kRows) * (kThreads >> lanes_log2);
  const int64_t p_blocks = ceil_div(params.headdim, rows_per_block);
  const int64_t head_blocks = params.heads * p_blocks;
  if (head_blocks > INT_MAX)
    throw std::invalid_argument("selective_state_update: heads * row blocks = " + std::to_string(head_blocks) +
                                " exceeds the CUDA grid limit");
  SSMK_DISPATCH_FLOAT(params.x_dtype, "selective_state_update x", [&] {
    auto kernel = state_update_head_kernel<state_t, scalar_t, kRows, kOneToken>;
    constexpr int64_t kMaxGridY = 65535;
    for (int64_t b0 = 0; b0 < params.batch; b0 += kMaxGridY) {
      const dim3 grid(static_cast<unsigned>(head_blocks), static_cast<unsigned>(std::min(kMaxGridY, params.batch - b0)));
      SSMK_LAUNCH(kernel, grid, kThreads, params.stream, params, lanes_log2, static_cast<int>(p_blocks), b0);
    }
  });
  check_launch("selective_state_update head kernel");
}

template <typename state_t>
void launch_head(const Params& params) {
  // Rows per thread of the one-token instance, H200 batch 256 H128 P64 N128 (GB/s as % of copy,
  // float32 / bf16 state): 4: 80.3 / 55.8, 8: 61.9 / 48.0 (128-168 registers), 16: 43.2 / 18.6
  // (spills); the per-row kernel 66.3 / 44.9. Batch 1: 18.7-19.4 us of GPU time for 4 and 8 alike.
  // (The first form of this kernel, with run-time element types: 2 rows 55.0 / 47.1, 4 rows 62.3 /
  // 41.1.) Several tokens: 16 state elements per thread, as in the per-row kernel.
  if (params.tokens != 1) return launch_head_rows<state_t, (sizeof(state_t) == 4 ? 4 : 2), false>(params);
  return launch_head_rows<state_t, 4, true>(params);
}

template <typename state_t>
void launch_state(const Params& params) {
  constexpr int kVec = 16 / sizeof(state_t);
  // The state in 16-byte packs: n contiguous, every row start 16-byte aligned, n a multiple of kVec.
  const bool vector = packs_aligned(params.state, params.state_stride, sizeof(state_t), params.dstate, kVec);
  // B/C in packs of their own type (the usual case): both of one type, laid out for kVec packs.
  const bool bc_packed = params.B_dtype == params.C_dtype &&
                         packs_aligned(params.B, params.B_stride, dtype_bytes(params.B_dtype), params.dstate, kVec) &&
                         packs_aligned(params.C, params.C_stride, dtype_bytes(params.C_dtype), params.dstate, kVec);
  const bool A_per_head = params.A_stride[1] == 0 && params.A_stride[2] == 0;
  const int64_t packs = params.dstate / kVec;
  // The head kernel: x, z, out, B and C of one float type; rows of a head fit in int.
  const int io = params.x_dtype;
  const bool one_io_type = io <= static_cast<int>(DType::kBFloat16) && params.B_dtype == io && params.out_dtype == io &&
                           (params.z == nullptr || params.z_dtype == io);
  if (vector && bc_packed && one_io_type && A_per_head && packs <= 32 && (packs & (packs - 1)) == 0 &&
      params.headdim <= INT_MAX / 2 && !per_row_kernel_forced()) {
    launch_head<state_t>(params);
    return;
  }
  if (vector && (bc_packed || !A_per_head)) {
    // 16 state elements per thread whatever the type (4 float32 packs, 2 of 16-bit types): with 4
    // packs of 8 the bf16 step took 161 registers a thread (3 blocks per SM) and was no faster
    // (H200 batch 256: 45.4% of copy against 44.9%).
    launch_typed<state_t, kVec, 16 / kVec>(params, A_per_head);
  } else {
    launch_typed<state_t, 1, kMaxStateElemsPerLane>(params, A_per_head);
  }
}

}  // namespace

void launch(const Params& params) {
  if (params.dstate < 1 || params.dstate > kMaxDState)
    throw std::invalid_argument("selective_state_update: the CUDA kernel takes d_state in [1, " +
                                std::to_string(kMaxDState) + "], got " + std::to_string(params.dstate));
  if (params.heads_per_group < 1 || params.heads % params.heads_per_group != 0)
    throw std::invalid_argument("selective_state_update: heads_per_group must divide heads");
  for (int code : {params.x_dtype, params.dt_dtype, params.A_dtype, params.B_dtype, params.C_dtype, params.D_dtype,
                   params.z_dtype, params.dt_bias_dtype, params.out_dtype}) {
    if (code < 0 || code > 3) throw std::invalid_argument("selective_state_update: bad dtype code " + std::to_string(code));
  }
  for (int code : {params.B_dtype, params.C_dtype}) {  // read in packs by a float32/float16/bfloat16 switch
    if (code < 0 || code > 2)
      throw std::invalid_argument("selective_state_update: B and C must be float32, float16 or bfloat16 (dtype code " +
                                  std::to_string(code) + ")");
  }
  if (params.batch == 0 || params.tokens == 0 || params.heads == 0 || params.headdim == 0) return;
  SSMK_DISPATCH_FLOAT(params.state_dtype, "selective_state_update state", [&] { launch_state<scalar_t>(params); });
}

}  // namespace state_update
}  // namespace ssmk
