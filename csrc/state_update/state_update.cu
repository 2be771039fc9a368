// selective_state_update kernel: t tokens of the Mamba recurrence applied to a state cache in place.
//
// Work split: a group of `lanes` threads (a power of two <= 32, inside one warp) owns one state
// row (b, h, p, 0:n); each thread of the group keeps `chunks` packs of `kVec` consecutive state
// elements in registers for all tokens, so the state is read once and written once per call.
// Per token: decay and input for every element, then y = sum_n state * C by shuffles inside the
// group. The vector path (kVec > 1) reads and writes the state with 16-byte accesses; it is taken
// when the state's n axis is contiguous and every row start is 16-byte aligned, else kVec = 1.
//
// Templated on the state type, the pack width and whether A is one scalar per head (12 instances): the inputs' element types are
// read at run time (a warp-uniform switch), since callers mix them (bf16 x with fp32 A/D/dt_bias).
#include "common.h"
#include "state_update/state_update.h"

#include <climits>
#include <stdexcept>
#include <string>

namespace ssmk {
namespace state_update {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float load_as_float(const void* base, int64_t offset, int code) {
  switch (static_cast<DType>(code)) {
    case DType::kFloat32: return static_cast<const float*>(base)[offset];
    case DType::kFloat16: return __half2float(static_cast<const __half*>(base)[offset]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[offset]);
    default: return static_cast<float>(static_cast<const double*>(base)[offset]);
  }
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

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename state_t, int kVec, int kChunks, bool kAPerHead>
__global__ void __launch_bounds__(kThreads)
state_update_kernel(const __grid_constant__ Params params, int lanes, int chunks, int64_t p_blocks) {
  constexpr int kElems = kVec * kChunks;
  const int lane = threadIdx.x & 31;
  const int rows_per_warp = 32 / lanes;
  const int row_in_warp = lane / lanes;
  const int lane_in_row = lane % lanes;

  int64_t block = blockIdx.x;
  const int64_t p_block = block % p_blocks;
  block /= p_blocks;
  const int64_t h = block % params.heads;
  const int64_t b = block / params.heads;
  const int64_t p = (p_block * kWarps + (threadIdx.x >> 5)) * rows_per_warp + row_in_warp;
  const bool row_ok = p < params.headdim;
  const int64_t g = h / params.heads_per_group;
  const int64_t n = params.dstate;

  int64_t slot = b;
  if (params.indices != nullptr) {
    slot = params.index_is_int64 ? static_cast<const int64_t*>(params.indices)[b * params.index_stride]
                                 : static_cast<const int32_t*>(params.indices)[b * params.index_stride];
    // Padding rows (and, defensively, any index outside the cache) touch no state: zeros out.
    // Uniform over the block (one batch row per block), so returning here is safe for the shuffles.
    if (slot == params.pad_slot_id || slot < 0 || slot >= params.slots) {
      if (row_ok && lane_in_row == 0) {
        const int64_t base = b * params.out_stride[0] + h * params.out_stride[2] + p * params.out_stride[3];
        for (int64_t t = 0; t < params.tokens; ++t) store_from_float(params.out, base + t * params.out_stride[1],
                                                                     params.out_dtype, 0.f);
      }
      return;
    }
  }

  // Element e = c * kVec + v of this thread sits at n index (c * lanes + lane_in_row) * kVec + v.
  bool valid[kElems];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const int64_t idx = (static_cast<int64_t>(c) * lanes + lane_in_row) * kVec + v;
      valid[c * kVec + v] = row_ok && c < chunks && idx < n;
    }
  }
  auto n_index = [&](int e) -> int64_t {
    return (static_cast<int64_t>(e / kVec) * lanes + lane_in_row) * kVec + e % kVec;
  };

  state_t* state_row = static_cast<state_t*>(params.state) + slot * params.state_stride[0] +
                       h * params.state_stride[1] + (row_ok ? p : 0) * params.state_stride[2];
  float s[kElems];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    if constexpr (kVec > 1) {  // n contiguous, 16-byte aligned rows, n a multiple of kVec
      const int64_t idx = (static_cast<int64_t>(c) * lanes + lane_in_row) * kVec;
      if (valid[c * kVec]) {
        const Pack<state_t, kVec> pack = *reinterpret_cast<const Pack<state_t, kVec>*>(state_row + idx);
#pragma unroll
        for (int v = 0; v < kVec; ++v) s[c * kVec + v] = to_float(pack.v[v]);
      } else {
#pragma unroll
        for (int v = 0; v < kVec; ++v) s[c * kVec + v] = 0.f;
      }
    } else {
      s[c] = valid[c] ? to_float(state_row[n_index(c) * params.state_stride[3]]) : 0.f;
    }
  }

  // Per-row constants. kAPerHead: A has stride 0 over (p, n) (Mamba-2's broadcast scalar per
  // head), one exp per token and row. Otherwise (Mamba-1, full A) A is re-read per token and
  // element (cache hits after the first token) rather than held in registers.
  const int64_t A_row = h * params.A_stride[0] + (row_ok ? p : 0) * params.A_stride[1];
  const float A_head = kAPerHead ? load_as_float(params.A, A_row, params.A_dtype) : 0.f;
  float dt_bias = 0.f, D = 0.f;
  if (row_ok && params.dt_bias != nullptr)
    dt_bias = load_as_float(params.dt_bias, h * params.dt_bias_stride[0] + p * params.dt_bias_stride[1],
                            params.dt_bias_dtype);
  if (row_ok && params.D != nullptr)
    D = load_as_float(params.D, h * params.D_stride[0] + p * params.D_stride[1], params.D_dtype);

  const int64_t x_row = b * params.x_stride[0] + h * params.x_stride[2] + p * params.x_stride[3];
  const int64_t dt_row = b * params.dt_stride[0] + h * params.dt_stride[2] + p * params.dt_stride[3];
  const int64_t z_row = b * params.z_stride[0] + h * params.z_stride[2] + p * params.z_stride[3];
  const int64_t out_row = b * params.out_stride[0] + h * params.out_stride[2] + p * params.out_stride[3];
  const int64_t B_row = b * params.B_stride[0] + g * params.B_stride[2];
  const int64_t C_row = b * params.C_stride[0] + g * params.C_stride[2];

  // B and C of the token are shared by every row of the block (one batch row, one group): staged
  // in shared memory as float, so the per-element loop reads them with 32-bit offsets.
  __shared__ alignas(16) float B_tok[kMaxDState];
  __shared__ alignas(16) float C_tok[kMaxDState];

  for (int64_t t = 0; t < params.tokens; ++t) {
    // The row's scalars of this token are loaded before the barriers, so that their latency
    // overlaps the B/C staging (a load is not moved across __syncthreads by the compiler). At
    // batch 1 the kernel is one wave of latency chains, and each serialized load costs ~1 us.
    float x = 0.f, dt = 0.f, z = 0.f;
    if (row_ok) {
      x = load_as_float(params.x, x_row + t * params.x_stride[1], params.x_dtype);
      dt = load_as_float(params.dt, dt_row + t * params.dt_stride[1], params.dt_dtype);
      if (params.z != nullptr) z = load_as_float(params.z, z_row + t * params.z_stride[1], params.z_dtype);
    }
    __syncthreads();  // the previous token's B/C are no longer read
    const int64_t B_base = B_row + t * params.B_stride[1];
    const int64_t C_base = C_row + t * params.C_stride[1];
    for (int i = threadIdx.x; i < n; i += kThreads) {
      B_tok[i] = load_as_float(params.B, B_base + i * params.B_stride[3], params.B_dtype);
      C_tok[i] = load_as_float(params.C, C_base + i * params.C_stride[3], params.C_dtype);
    }
    __syncthreads();

    dt += dt_bias;
    if (params.dt_softplus) dt = softplus(dt);
    const float dt_x = dt * x;
    const float decay_head = kAPerHead ? expf(A_head * dt) : 0.f;
    float partial = 0.f;
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      if (valid[e]) {
        const int idx = static_cast<int>(n_index(e));
        const float decay = kAPerHead ? decay_head
                                       : expf(load_as_float(params.A, A_row + idx * params.A_stride[2],
                                                            params.A_dtype) * dt);
        s[e] = s[e] * decay + dt_x * B_tok[idx];
        partial += s[e] * C_tok[idx];
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
  }

#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    if constexpr (kVec > 1) {
      if (valid[c * kVec]) {
        const int64_t idx = (static_cast<int64_t>(c) * lanes + lane_in_row) * kVec;
        Pack<state_t, kVec> pack;
#pragma unroll
        for (int v = 0; v < kVec; ++v) pack.v[v] = from_float<state_t>(s[c * kVec + v]);
        *reinterpret_cast<Pack<state_t, kVec>*>(state_row + idx) = pack;
      }
    } else {
      if (valid[c]) state_row[n_index(c) * params.state_stride[3]] = from_float<state_t>(s[c]);
    }
  }
}

int pow2_at_least(int64_t value) {
  int result = 1;
  while (result < 32 && result < value) result <<= 1;
  return result;
}

template <typename state_t, int kVec>
void launch_typed(const Params& params) {
  constexpr int kChunks = kMaxStateElemsPerLane / kVec;
  const int64_t packs = ceil_div(params.dstate, kVec);
  // Up to 4 packs per thread: more 16-byte accesses in flight per thread, and fewer threads. At
  // batch 1 (8192 rows of the issue's shape) one pack per thread made 2048 blocks of 80-register
  // threads, ~2.6 waves of serialized load latencies (13.6 us on the H100 against Triton's 5.9);
  // 4 packs make 512 blocks, one wave. At large batch 4 packs were already the choice.
  const int64_t target_chunks = kChunks < 4 ? kChunks : 4;
  const int lanes = pow2_at_least(ceil_div(packs, target_chunks));
  const int chunks = static_cast<int>(ceil_div(packs, lanes));
  if (chunks > kChunks) throw std::invalid_argument("selective_state_update: d_state too large for the CUDA kernel");
  const int rows_per_block = (32 / lanes) * kWarps;
  const int64_t p_blocks = ceil_div(params.headdim, rows_per_block);
  const int64_t blocks = params.batch * params.heads * p_blocks;
  if (blocks > INT_MAX) throw std::invalid_argument("selective_state_update: grid of " + std::to_string(blocks) +
                                                    " blocks exceeds the CUDA limit");
  const bool A_per_head = params.A_stride[1] == 0 && params.A_stride[2] == 0;
  auto kernel = A_per_head ? state_update_kernel<state_t, kVec, kChunks, true>
                           : state_update_kernel<state_t, kVec, kChunks, false>;
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, params.stream>>>(params, lanes, chunks, p_blocks);
  check_launch("selective_state_update kernel");
}

template <typename state_t>
void launch_state(const Params& params) {
  constexpr int kVec = 16 / sizeof(state_t);
  const auto& st = params.state_stride;
  const bool vector = st[3] == 1 && params.dstate % kVec == 0 &&
                      reinterpret_cast<std::uintptr_t>(params.state) % 16 == 0 && st[0] % kVec == 0 &&
                      st[1] % kVec == 0 && st[2] % kVec == 0;
  if (vector) {
    launch_typed<state_t, kVec>(params);
  } else {
    launch_typed<state_t, 1>(params);
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
  if (params.batch == 0 || params.tokens == 0 || params.heads == 0 || params.headdim == 0) return;
  SSMK_DISPATCH_FLOAT(params.state_dtype, "selective_state_update state", [&] { launch_state<scalar_t>(params); });
}

}  // namespace state_update
}  // namespace ssmk
