// Selective scan backward, state-parallel form (SPEC.md section 2): each thread runs the adjoint of 4
// states of one channel step by step, backwards, with no scan over time (the counterpart of
// selective_scan_fwd_tiled.cu; the math is in selective_scan_bwd.cu's header).
//
// Why. The warp-per-channel backward (selective_scan_bwd.cu) splits a channel's steps over 32 lanes
// and joins them with two shuffle scans per state (forward for h, reverse for the adjoint), and sums
// input-dependent dB/dC over only 4 channels before its atomics: at B4 D5120 L4096 N16 bf16 on the
// H200 it took 8.0-8.2 ms (scripts/scan_forward_variants.py --backward-kernels). Here a (step,
// state) costs a few FMAs and MUFU ops.
//
// Layout. A block takes kC = 16 or 32 channels of one sequence; a thread holds 4 states (a slice)
// of one channel, and a warp one slice of 32 channels or two of 16 (lane = channel + kC * slice).
// So:
//   - dB_t,n and dC_t,n, sums over channels, stay inside a warp: each lane writes its terms of 2
//     steps to the warp's exchange rows, and every lane then adds one value over 16 rows (16
//     independent shared loads; 32 channels add the other half-warp's sum by one shuffle). The
//     block totals per (n, step) gather in shared memory and the block adds them to dB/dC with one
//     atomic each (32 consecutive steps per warp instruction): kC times fewer atomics than one per
//     channel. (A shuffle reduce-scatter instead, 16 values per 16 shuffles and 30 selects, took
//     5.38 ms against 4.94 for the exchange.)
//   - B_t and C_t are broadcast reads (all lanes of a slice read the same float4);
//   - the per-step sums over n (sum g B for du, sum g A a h for ddelta) cross the slices: each leaves
//     its partial sums in shared memory and the block adds them, per sub-tile;
//   - dz = (y + D u) dout silu'(z) takes y + D u from the forward (Params::out_pre, as mamba_ssm
//     keeps its out), so y = sum C h, a third sum over n, is not recomputed: dz is computed in the
//     staging, 8 steps at a time, and the adjoint does one FMA less per (step, state).
// Time. The forward keeps the state entering every 2048-step chunk (checkpoints). Per chunk, walked
// backwards:
//   1. a forward pass from the checkpoint leaves the state entering each 8-step sub-tile in the
//      global workspace (p.tile_states, a region per block: 256 sub-tiles x kC channels x N floats;
//      resident blocks only, as blocks loop over their (sequence, channel block) items);
//   2. the tiles in reverse: the tile's inputs staged in shared memory as float (dt = softplus(delta
//      + bias), dt u, dy = dout silu(z), u, softplus'; dz goes out from there); per sub-tile in
//      reverse, the 9 states of its steps are recomputed into registers from its entry state (and,
//      at N 16, their decays) and the adjoint G = a g, g = C dy + G runs back over them.
//   The next tile's loads (cp.async into raw rows: no registers held) and its sub-tile entries
//   (cp.async into per-thread slots) are in flight while a tile runs. Storing every sub-tile's entry
//   in pass 1 (the ninth session stored only the tiles' and ran a second forward pass over each
//   tile for the sub-tiles') saves 3/4 of a forward step per (step, state) for 4x the workspace.
//   The workspace is sized by the resident blocks, not the batch: on the H200 173 MB at N 16, 277 MB
//   at N 64, written and read once per backward (B4 D5120 N 16: 1.3 GB of traffic in ~3.5 ms).
//   H200, B4 D5120 L4096 bf16, backward alone: N 16 4.50 -> 4.21 ms, N 32 8.02 -> 7.57, N 64 13.02
//   -> 13.26; then with 2-step output items (kOutSteps): 4.11, 7.17, 12.09 (bench: fwd+bwd N 16
//   4.199 ms against mamba_ssm's 7.205, N 64 13.36 against 27.18). Eleventh session (Nsight Compute
//   stall samples pointed at per-element overheads, not the math): the atomics from per-thread
//   pointers, sub-tile 0's entry by cp.async, bias/D read once per item, the chunk pass's advance
//   unrolled, whole-item staging: N 16 4.04 -> 3.59 ms, N 64 12.00 -> 11.30 (bench: fwd+bwd N 16
//   3.822 ms against mamba_ssm's 7.158, N 64 12.95 against 26.84;
//   benchmarks/results/scan_backward_h200_eleventh_session.txt). Twelfth session: dz from the
//   forward's pregate (N 16 3.59 -> 3.41 ms, N 64 11.30 -> 11.01), the 6-instruction softplus, the
//   staging in branch-free phases (bench: fwd+bwd N 16 3.549 ms against mamba_ssm's 7.150, N 64
//   12.24 against 26.84; N 128, new here, 24.98 against 54.20, where the warp kernel took 56.65).
// Blocks per SM: shared memory and registers allow 5 x 64 threads at N 16 (16 channels; 32 would
// give 3 x 128, and B4 D5120's 640 items on 396 blocks take two rounds where 1.6 would do), 2 x 256
// at N 32, 1 x 512 at N 64 and at N 128 (16 channels: ~197 KB of shared memory). Nsight Compute,
// N 16, twelfth session: 9 warps per SM, 2.17 issued per SM cycle (of 4), no eligible warp 41.5% of
// cycles; stall samples in the sub-tile core 54%, the chunk pass 11%, the reverse staging 8%, the
// dB/dC atomics 3% (benchmarks/results/scan_backward_h200_twelfth_session.txt).
// Serves input-dependent B/C of u's dtype with whole blocks per group (kC | channels per group) and
// N in {16, 32, 64, 128}, outside deterministic mode, with the forward's pregate when z is given;
// the warp-per-channel backward serves the rest.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "selective_scan/tiled_common.cuh"

namespace ssmk {
namespace scan {
namespace tiled {

constexpr int kBwdStates = 4;                    // states per thread
constexpr int kSub = 8;                          // steps per sub-tile (their states held in registers)
constexpr int kSubs = kSteps / kSub;
constexpr int kTilesPerChunk = kChunk / kSteps;
constexpr int kPartRow = kSub;                   // a warp's per-step partial sums of one channel, one sub-tile
// The float4 half of a part row where steps 4h .. 4h + 3 of channel c sit: halves swapped for
// every other group of 4 channels, so that a quarter-warp's 16-byte accesses (8 channels, 32-byte
// rows) cover all banks once.
static_assert(kPartRow == 8, "part_column swaps the two float4 halves of a row");
__device__ __forceinline__ int part_column(int c, int t4) { return t4 ^ (((c / 4) & 1) * 4); }
constexpr int kRedRow = kSteps + 4;              // [2N][step] rows of a tile's dB / dC block sums
constexpr int kExchangeRow = 16 + 4;             // a lane's dB/dC terms of 2 steps (+4: float4 stores spread over banks)
constexpr unsigned kAllLanes = 0xffffffffu;
static_assert(kSteps % kSub == 0 && kSub % 4 == 0, "sub-tiles tile a tile in float4 groups");
// Steps per output item of a sub-tile (du, ddelta, dz of one channel): 2, so that the kC * kSub / 2
// items take every thread of the N 16 block (64 threads) rather than one warp of two.
constexpr int kOutSteps = 2;

// A block: kC channels (16 or 32) of one sequence, N = 4 kSlices states; thread = (channel c, slice
// of 4 states), lane = c + kC (slice % (32 / kC)): a warp holds one slice of 32 channels or two of
// 16, so the sums over channels stay inside a warp.
template <int kN_, int kC_, bool kKeepDecays_ = kN_ == 16>
struct BwdShape {
  static constexpr int kN = kN_, kC = kC_;
  static constexpr int kSlices = kN / kBwdStates;
  static constexpr int kThreads = kC * kSlices;
  static constexpr int kSlicesPerWarp = 32 / kC;
  static_assert((kC == 16 || kC == 32) && kThreads % 32 == 0, "a warp holds whole slices");
  static constexpr int kBCRow = kN + 4;                      // [step][n] rows of B and C
  static constexpr int kXItems = kC * kItemsPerRow;
  static constexpr int kBCItems = kN * kItemsPerRow;
  static constexpr int kOutItems = kC * (kSub / kOutSteps);  // (channel, kOutSteps steps) of a sub-tile's outputs
  static_assert(kThreads >= kXItems && kThreads >= kBCItems && kThreads >= kOutItems,
                "at most one load or output item of each kind per thread");
  // Shared memory, in floats: 5 [kC][kRow] arrays (dt, dt u, dy, u, softplus'), B and C
  // [kSteps][kBCRow], the dB/dC block sums [2N][kRedRow], the slices' partial sums
  // [kSlices][kPartSums][kC][kPartRow], the sub-tile entry states [kSubs - 1][kThreads] float4 (slot
  // s - 1: sub-tile s's; slot 0 also sub-tile 0's, see pass 2), the warps' exchange rows
  // [warp][lane][kExchangeRow]; then the raw loads of the next tile in the inputs' dtype: u, delta,
  // dout, z, out_pre [kC][kSteps] and the B, C items.
  static constexpr int kChannelArrays = 5;
  static constexpr int kPartSums = 2;   // sum g B, sum g A log2(e) a h
  static constexpr int kRawKinds = 5;   // u, delta, dout, z, out_pre
  static constexpr int kOffBC = kChannelArrays * kC * kRow;
  static constexpr int kOffRed = kOffBC + 2 * kSteps * kBCRow;
  static constexpr int kOffPart = kOffRed + 2 * kN * kRedRow;
  static constexpr int kOffEntry = kOffPart + kSlices * kPartSums * kC * kPartRow;
  static constexpr int kOffExchange = kOffEntry + (kSubs - 1) * kThreads * 4;
  static constexpr int kOffRaw = kOffExchange + kThreads * kExchangeRow;
  static constexpr int kRawElements = (kRawKinds * kC + 2 * kN) * kSteps;
  template <typename T>
  static constexpr size_t smem_bytes() { return kOffRaw * sizeof(float) + kRawElements * sizeof(T); }
  // Keep the sub-tile's decays a_t from the recompute for the adjoint (32 registers, one MUFU op
  // less per step and state) where registers allow: N 16's 168. H200, B4 D5120 L4096 bf16
  // backward: 4.94 ms kept, 4.98 recomputed.
  static constexpr bool kKeepDecays = kKeepDecays_;
  // Blocks per SM the registers are set for: 168 per thread with the kept decays, else 128.
  static constexpr int kMinBlocks = (kKeepDecays ? 384 : 512) / kThreads;
};

// An item (8 elements) from global to 16-byte aligned shared memory: asynchronous 16-byte copies
// when it is whole and aligned, else element by element (zeros past `valid`).
template <typename T>
__device__ __forceinline__ void load_item_async(const T* src, int valid, T* dst) {
  constexpr int kPerCopy = 16 / sizeof(T);
  if (valid >= kItem && reinterpret_cast<std::uintptr_t>(src) % 16 == 0) {
#pragma unroll
    for (int c = 0; c < kItem / kPerCopy; ++c) async_copy16(dst + c * kPerCopy, src + c * kPerCopy, true);
  } else {
#pragma unroll
    for (int j = 0; j < kItem; ++j) dst[j] = j < valid ? src[j] : from_float<T>(0.f);
  }
}

// kOutSteps floats to consecutive elements: one 4- or 8-byte store when `whole` (all valid, the
// destination aligned to the pair; the caller decides once for the item's three outputs), else
// element by element up to `valid`.
template <typename T>
__device__ __forceinline__ void store_steps(T* dst, bool whole, int valid, const float (&v)[kOutSteps]) {
  static_assert(kOutSteps == 2, "one float2 or one packed pair of 16-bit values");
  if (whole) {
    if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float2*>(dst) = make_float2(v[0], v[1]);
    } else {
      const auto bits = [](float value) {
        const T t = from_float<T>(value);
        std::uint16_t raw;
        std::memcpy(&raw, &t, sizeof raw);
        return static_cast<std::uint32_t>(raw);
      };
      *reinterpret_cast<std::uint32_t*>(dst) = bits(v[0]) | bits(v[1]) << 16;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kOutSteps; ++j)
      if (j < valid) dst[j] = from_float<T>(v[j]);
  }
}

// Which calls the tiled backward serves, as its instance (N * 100 + channels per block); 0: the warp
// kernel's. 16 channels per block at N 16: twice the items, of half the size, so that the resident
// blocks (5 per SM instead of 3) take them in whole rounds (H200, B4 D5120: 1280 items on 660
// blocks, against 640 on 396).
inline int tiled_backward_instance(const Params& p) {
  if (warp_kernel_forced("SSMKERNELS_SCAN_BACKWARD_KERNEL")) return 0;
  if (p.bc_grad_per_channel || p.channel_count != 0) return 0;  // deterministic slices
  if (p.dstate != 16 && p.dstate != 32 && p.dstate != 64 && p.dstate != 128) return 0;
  if (p.z && !p.out_pre) return 0;  // dz takes the forward's y + D u
  // N 128: 16 channels (512 threads, ~200 KB of shared memory); 32 would need twice that.
  int channels = p.dstate == 16 || p.dstate == 128 ? 16 : 32;
  if (const char* force = std::getenv("SSMKERNELS_SCAN_BWD_CHANNELS")) {  // A/B timing at N 16
    if (p.dstate == 16) channels = std::atoi(force) == 32 ? 32 : 16;
  }
  if (!tiled_blocks_fit(p, channels)) return 0;
  return static_cast<int>(p.dstate) * 100 + channels;
}

template <typename Visit>
void visit_backward_shape(int instance, Visit&& visit) {
  switch (instance) {
    case 1616: return visit(BwdShape<16, 16>{});
    case 1632: return visit(BwdShape<16, 32>{});
    case 3232: return visit(BwdShape<32, 32>{});
    case 6432: return visit(BwdShape<64, 32>{});
    case 12816: return visit(BwdShape<128, 16>{});
    default: throw std::logic_error("selective_scan tiled backward: no instance for this call");
  }
}

// Work items: (sequence, block of kC channels).
template <typename S>
__host__ __device__ inline int64_t backward_items(const Params& p) { return p.num_seqs * (p.dim / S::kC); }

__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ void store4(float* p, float a, float b, float c, float d) {
  *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}

template <typename T, typename S>
__global__ __launch_bounds__(S::kThreads, S::kMinBlocks) void backward_tiled_kernel(const Params p) {
  constexpr int kN = S::kN, kC = S::kC;
  extern __shared__ float smem[];
  float* const dt_s = smem;                // each [kC][kRow]
  float* const dtu_s = dt_s + kC * kRow;
  float* const dy_s = dtu_s + kC * kRow;   // dout silu(z) (dout without z)
  float* const u_s = dy_s + kC * kRow;
  float* const dsp_s = u_s + kC * kRow;    // softplus'(delta + bias) (1 without softplus)
  float* const B_s = smem + S::kOffBC;           // [kSteps][kBCRow]
  float* const C_s = B_s + kSteps * S::kBCRow;
  float* const red_s = smem + S::kOffRed;        // [2N][kRedRow]: dB rows, then dC rows
  float* const part_s = smem + S::kOffPart;      // [slice][sum g B, sum g A log2(e) a h][channel][step]
  float4* const entry_s = reinterpret_cast<float4*>(smem + S::kOffEntry);  // [slot][thread]
  // [lane][2 steps x (dB, dC) x 4 states] of this warp: its dB/dC terms before the sums over channels.
  float* const exchange = smem + S::kOffExchange + (threadIdx.x / 32) * 32 * kExchangeRow;
  T* const raw_s = reinterpret_cast<T*>(smem + S::kOffRaw);  // u, delta, dout, z, out_pre, then B, C rows

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int c = lane % kC, slice = warp * S::kSlicesPerWarp + lane / kC;  // this thread's channel, states
  const int64_t blocks_per_row = p.dim / kC;
  // This block's region of the workspace: the state entering each sub-tile of the current chunk,
  // [tile][sub-tile][thread].
  float4* const tile_states =
      as_ptr<float4>(p.tile_states) + static_cast<int64_t>(blockIdx.x) * kTilesPerChunk * kSubs * S::kThreads + tid;
  // Load items: x item tid (tid < 4 kC) is channel tid / 4, steps (tid % 4) * 8 ..; B/C item tid is
  // state tid % N, steps (tid / N) * 8 .. (consecutive lanes, consecutive states: the staging's
  // column writes hit different banks). Each thread stages the items it loaded itself, so the raw
  // rows need no barrier.
  const bool has_x = tid < S::kXItems, has_bc = tid < S::kBCItems;
  const int item_row = tid / kItemsPerRow, item_t = (tid % kItemsPerRow) * kItem;
  const int bc_n = tid % kN, bc_t = (tid / kN) * kItem;
  T* const raw_x = raw_s + item_row * kSteps + item_t;   // + kind * kC * kSteps (u, delta, dout, z, out_pre)
  // B/C raw items side by side in the thread order ([item][8], not [n][step]): 16-byte accesses of
  // consecutive lanes are consecutive.
  T* const raw_bc = raw_s + S::kRawKinds * kC * kSteps + tid * kItem;  // + kind * kN * kSteps (B, C)
  // Output items: (channel tid / 4, steps (tid % 4) * 2 .. + 1) of each sub-tile.
  const bool has_out = tid < S::kOutItems;
  const int out_c = tid / (kSub / kOutSteps), out_t = (tid % (kSub / kOutSteps)) * kOutSteps;
  // dB/dC atomics of a tile: the block's threads cover kRedRowsPerPass rows of kSteps per pass.
  constexpr int kRedRowsPerPass = S::kThreads / kSteps, kRedPasses = kN / kRedRowsPerPass;
  static_assert(S::kThreads % kSteps == 0 && kN % kRedRowsPerPass == 0, "whole rows per pass, whole passes per B/C");
  const int red_t = tid % kSteps, red_row0 = tid / kSteps;
  const bool out_bases_aligned = ((p.du | p.ddelta) % (kOutSteps * sizeof(T))) == 0;

  for (int64_t work = blockIdx.x; work < backward_items<S>(p); work += gridDim.x) {
    const int64_t seq = work / blocks_per_row;
    const int64_t channel0 = (work % blocks_per_row) * kC;
    const Span span = sequence_span(p, seq);
    const int64_t num_tiles = ceil_div(span.end - span.start, kSteps);
    const int64_t x0 = span.row * p.x_batch_stride + channel0 * p.x_d_stride;
    const int64_t x_item_row = x0 + item_row * p.x_d_stride;  // the x item's (u, delta, dout, z, out_pre, dz)
    // The output item's row (du, ddelta, dz share u's strides), and whether its pairs of steps are
    // aligned vectors: the tiles start span.start plus multiples of kSteps, the items at even steps.
    const int64_t out_row = x0 + out_c * p.x_d_stride;
    const bool out_pairs_aligned = out_bases_aligned && (out_row + span.start) % kOutSteps == 0;
    // The block's channels share one B group and one C group (tiled_backward_instance).
    const int64_t group_b = channel0 / p.channels_per_b_group, group_c = channel0 / p.channels_per_c_group;
    const float* bias = p.delta_bias ? as_ptr<const float>(p.delta_bias) + channel0 : nullptr;
    // Per-channel constants read once per item (read per tile / sub-tile, their loads stalled the
    // first use: 2% of the stall samples).
    const float item_bias = has_x && bias ? bias[item_row] : 0.f;  // of the x item's channel
    // This thread's dB / dC atomics at the sequence's step red_t (add the tile's first step).
    float* const dB_thread = as_ptr<float>(p.dB) + span.row * p.dB_batch_stride + group_b * p.dB_group_stride +
                             red_row0 * p.dB_n_stride + span.start + red_t;
    float* const dC_thread = as_ptr<float>(p.dC) + span.row * p.dC_batch_stride + group_c * p.dC_group_stride +
                             red_row0 * p.dC_n_stride + span.start + red_t;
    const int64_t dB_pass_stride = kRedRowsPerPass * p.dB_n_stride, dC_pass_stride = kRedRowsPerPass * p.dC_n_stride;
    const float* Dvec = p.D ? as_ptr<const float>(p.D) + channel0 : nullptr;
    const float item_D = has_out && Dvec ? Dvec[out_c] : 0.f; // of the output item's channel

    // The thread's states: channel channel0 + c, n = 4 slice .. 4 slice + 3.
    const int64_t state_offset = (seq * p.dim + channel0 + c) * kN + slice * kBwdStates;
    float A2[kBwdStates], G[kBwdStates], dA[kBwdStates];
    {
      const float4 a4 = load4(as_ptr<const float>(p.A) + (channel0 + c) * kN + slice * kBwdStates);
      const float4 g4 = p.dlast_state ? load4(as_ptr<const float>(p.dlast_state) + state_offset)
                                      : make_float4(0.f, 0.f, 0.f, 0.f);
      A2[0] = a4.x * kLog2e, A2[1] = a4.y * kLog2e, A2[2] = a4.z * kLog2e, A2[3] = a4.w * kLog2e;
      G[0] = g4.x, G[1] = g4.y, G[2] = g4.z, G[3] = g4.w;
#pragma unroll
      for (int k = 0; k < kBwdStates; ++k) dA[k] = 0.f;
    }
    float dD_sum = 0.f, dbias_sum = 0.f;  // of output item threads: their channel's steps

    // A tile's inputs into the raw rows (asynchronous); `full`: also what the adjoint needs (dout,
    // z, C).
    auto load_tile = [&](int64_t tile, bool full) {
      const int64_t t0 = span.start + tile * kSteps;
      const int valid = items_in_range<kItem>(t0 + item_t, span.end);
      const int valid_bc = items_in_range<kItem>(t0 + bc_t, span.end);
      if (has_x && valid > 0) {
        const int64_t at = x_item_row + t0 + item_t;
        load_item_async(as_ptr<const T>(p.u) + at, valid, raw_x);
        load_item_async(as_ptr<const T>(p.delta) + at, valid, raw_x + kC * kSteps);
        if (full) {
          load_item_async(as_ptr<const T>(p.dout) + at, valid, raw_x + 2 * kC * kSteps);
          if (p.z) {
            load_item_async(as_ptr<const T>(p.z) + at, valid, raw_x + 3 * kC * kSteps);
            load_item_async(as_ptr<const T>(p.out_pre) + at, valid, raw_x + 4 * kC * kSteps);
          }
        }
      }
      if (has_bc) {  // zeros past the end
        const int64_t at = span.row * p.B_batch_stride + group_b * p.B_group_stride + bc_n * p.B_n_stride;
        load_item_async(as_ptr<const T>(p.B) + at + t0 + bc_t, valid_bc, raw_bc);
        if (full) {
          const int64_t at_c = span.row * p.C_batch_stride + group_c * p.C_group_stride + bc_n * p.C_n_stride;
          load_item_async(as_ptr<const T>(p.C) + at_c + t0 + bc_t, valid_bc, raw_bc + kN * kSteps);
        }
      }
      async_commit();
    };
    // The loaded tile (this thread's items) into shared memory as float; every per-step value is 0
    // past the end (identity steps that add nothing). With z, the x item's dz goes out from here.
    auto stage_tile = [&](int64_t tile, bool full) {
      async_wait<0>();
      const int64_t t0 = span.start + tile * kSteps;
      const int valid = items_in_range<kItem>(t0 + item_t, span.end);
      // The x item, in two forms: whole (the common case: no per-element range selects) and partial.
      const auto stage_x = [&](auto whole_tag) {
        constexpr bool kWhole = decltype(whole_tag)::value;
        const float b = item_bias;
        // The raw items as 16-byte shared loads (zeros where the fill wrote them; unread past `valid`).
        const auto raw_item = [&](int kind) { return *reinterpret_cast<const Item<T>*>(raw_x + kind * kC * kSteps); };
        const Item<T> u_item = raw_item(0), delta_item = raw_item(1);
        const Item<T> dout_item = full ? raw_item(2) : u_item, z_item = full && p.z ? raw_item(3) : u_item;
        const Item<T> pre_item = full && p.z ? raw_item(4) : u_item;
        float dt[kItem], dtu[kItem], dy[kItem], uu[kItem], dsp[kItem], dz[kItem];
        // In phases, each a loop over the 8 elements with no branch inside, so that their MUFU
        // chains interleave: one loop with per-element branches on the uniform p.softplus and p.z
        // ran the elements one after another (Nsight Compute, N 16: the staging took 12% of the
        // stall samples for 8% of the instructions, most waiting on MUFU results).
        const auto in = [&](int j) { return kWhole || j < valid; };
#pragma unroll
        for (int j = 0; j < kItem; ++j) {
          uu[j] = in(j) ? to_float(u_item.v[j]) : 0.f;
          dt[j] = (in(j) ? to_float(delta_item.v[j]) : 0.f) + b;
          dsp[j] = 1.f;
        }
        if (p.softplus) {
#pragma unroll
          for (int j = 0; j < kItem; ++j) {
            const float raw = dt[j];
            if constexpr (sizeof(T) < 4) {
              dt[j] = full ? softplus_fast_with_slope(raw, dsp[j]) : softplus_fast(raw);
            } else {
              dt[j] = softplus(raw);
              if (full) dsp[j] = sigmoid(raw);
            }
          }
        }
#pragma unroll
        for (int j = 0; j < kItem; ++j) {
          if (!in(j)) dt[j] = 0.f, dsp[j] = 0.f;  // identity steps past the end
          dtu[j] = dt[j] * uu[j];
        }
        if (full) {
#pragma unroll
          for (int j = 0; j < kItem; ++j) dy[j] = in(j) ? to_float(dout_item.v[j]) : 0.f;
          if (p.z) {
#pragma unroll
            for (int j = 0; j < kItem; ++j) {
              const float zj = in(j) ? to_float(z_item.v[j]) : 0.f, go = dy[j];
              const float sig = sizeof(T) < 4 ? sigmoid_fast(zj) : sigmoid(zj);
              dy[j] = go * zj * sig;
              dz[j] = to_float(pre_item.v[j]) * go * sig * fmaf(zj, 1.f - sig, 1.f);  // (unstored past valid)
            }
          }
        }
        const int at = item_row * kRow + item_t;
        store_floats(dt_s + at, dt);
        store_floats(dtu_s + at, dtu);
        if (full) {
          store_floats(dy_s + at, dy);
          store_floats(u_s + at, uu);
          store_floats(dsp_s + at, dsp);
          if (p.z) store_items(as_ptr<T>(p.dz) + x_item_row + t0 + item_t, kWhole ? kItem : valid, dz);
        }
      };
      if (has_x) {
        if (valid >= kItem) stage_x(std::true_type{});
        else stage_x(std::false_type{});
      }
      if (has_bc) {
        const Item<T> B_item = *reinterpret_cast<const Item<T>*>(raw_bc);
        const Item<T> C_item = full ? *reinterpret_cast<const Item<T>*>(raw_bc + kN * kSteps) : B_item;
#pragma unroll
        for (int j = 0; j < kItem; ++j) {
          B_s[(bc_t + j) * S::kBCRow + bc_n] = to_float(B_item.v[j]);
          if (full) C_s[(bc_t + j) * S::kBCRow + bc_n] = to_float(C_item.v[j]);
        }
      }
    };

    const float* dt_row = dt_s + c * kRow;
    const float* dtu_row = dtu_s + c * kRow;
    const float* dy_row = dy_s + c * kRow;
    const float* B_col = B_s + slice * kBwdStates;
    const float* C_col = C_s + slice * kBwdStates;
    // h through the kSub steps of the staged tile's sub-tile at t_begin (unrolled: its second half's
    // loads go out with the first's; a loop of 4-step groups stalled on each group's loads).
    auto advance_sub_tile = [&](float (&h)[kBwdStates], int t_begin) {
#pragma unroll
      for (int t4 = t_begin; t4 < t_begin + kSub; t4 += 4) {
        const float4 dt4 = load4(dt_row + t4), dtu4 = load4(dtu_row + t4);
        const float dts[4] = {dt4.x, dt4.y, dt4.z, dt4.w}, dtus[4] = {dtu4.x, dtu4.y, dtu4.z, dtu4.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float4 b4 = load4(B_col + (t4 + q) * S::kBCRow);
          const float Bv[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
          for (int k = 0; k < kBwdStates; ++k) h[k] = fmaf(exp2_approx(dts[q] * A2[k]), h[k], dtus[q] * Bv[k]);
        }
      }
    };

    const float* checkpoints = as_ptr<const float>(p.checkpoints);
    int64_t tile_begin = 0;  // of the current chunk
    // This thread's workspace slot of sub-tile s of the chunk's tile `tile`.
    const auto entry_slot = [&](int64_t tile, int s) {  // (32-bit offsets: a chunk's tiles)
      return tile_states + (static_cast<int>(tile - tile_begin) * kSubs + s) * S::kThreads;
    };
    const int64_t num_chunks = ceil_div(num_tiles, kTilesPerChunk);
    for (int64_t chunk = num_chunks - 1; chunk >= 0; --chunk) {
      tile_begin = chunk * kTilesPerChunk;
      const int64_t tile_end = num_tiles < tile_begin + kTilesPerChunk ? num_tiles : tile_begin + kTilesPerChunk;

      // 1. The state entering each sub-tile of the chunk, from its checkpoint.
      {
        float h[kBwdStates];
        const float4 c4 = load4(checkpoints + ((span.slot0 + chunk) * p.dim + channel0 + c) * kN + slice * kBwdStates);
        h[0] = c4.x, h[1] = c4.y, h[2] = c4.z, h[3] = c4.w;
        load_tile(tile_begin, false);
        for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
          __syncthreads();  // the previous tile's shared memory is read
          stage_tile(tile, false);
          if (tile + 1 < tile_end) load_tile(tile + 1, false);
          __syncthreads();
#pragma unroll 1
          for (int s = 0; s < kSubs; ++s) {
            *entry_slot(tile, s) = make_float4(h[0], h[1], h[2], h[3]);
            if (tile + 1 < tile_end || s + 1 < kSubs) advance_sub_tile(h, s * kSub);  // not past the chunk's last
          }
        }
      }

      // 2. The tiles in reverse. Sub-tile entries come into the thread's own entry_s slots by cp.async
      // (no barrier): slot s - 1 holds sub-tile s's (s >= 1) and is refilled with the next tile's as
      // soon as it has been read; slot 0 in between holds sub-tile 0's, fetched as sub-tile 1 begins
      // (one sub-tile ahead: a load of it as the tile began stalled on its first use, 3.4% of the
      // stall samples, Nsight Compute, N 16).
      const auto fetch_entry = [&](int64_t tile, int s, int slot) {
        async_copy16(entry_s + slot * S::kThreads + tid, entry_slot(tile, s), true);
        async_commit();
      };
      for (int s = 1; s < kSubs; ++s) fetch_entry(tile_end - 1, s, s - 1);
      load_tile(tile_end - 1, true);
      for (int64_t tile = tile_end - 1; tile >= tile_begin; --tile) {
        const int64_t t0 = span.start + tile * kSteps;
        __syncthreads();  // the previous tile's shared memory is read
        stage_tile(tile, true);
        if (tile > tile_begin) load_tile(tile - 1, true);
        __syncthreads();
#pragma unroll 1
        for (int s = kSubs - 1; s >= 0; --s) {
          const int t_sub = s * kSub;
          // hs[j] = the state entering step j of the sub-tile (hs[kSub]: after its last step).
          float hs[kSub + 1][kBwdStates];
          float decay[S::kKeepDecays ? kSub : 1][kBwdStates];  // a of each step, when kept
          {
            if (s == 0) async_wait<0>();  // sub-tile 0's entry (and what was issued before it)
            const int slot = s == 0 ? 0 : s - 1;
            const float4 e = entry_s[slot * S::kThreads + tid];
            hs[0][0] = e.x, hs[0][1] = e.y, hs[0][2] = e.z, hs[0][3] = e.w;
            if (s == 1) {
              fetch_entry(tile, 0, 0);
            } else if (tile > tile_begin) {
              fetch_entry(tile - 1, s == 0 ? 1 : s, slot);
            }
          }
#pragma unroll
          for (int j4 = 0; j4 < kSub; j4 += 4) {
            const float4 dt4 = load4(dt_row + t_sub + j4), dtu4 = load4(dtu_row + t_sub + j4);
            const float dts[4] = {dt4.x, dt4.y, dt4.z, dt4.w}, dtus[4] = {dtu4.x, dtu4.y, dtu4.z, dtu4.w};
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              const float4 b4 = load4(B_col + (t_sub + j4 + q) * S::kBCRow);
              const float Bv[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
              for (int k = 0; k < kBwdStates; ++k) {
                const float a = exp2_approx(dts[q] * A2[k]);
                if constexpr (S::kKeepDecays) decay[j4 + q][k] = a;
                hs[j4 + q + 1][k] = fmaf(a, hs[j4 + q][k], dtus[q] * Bv[k]);
              }
            }
          }
          // The adjoint, backwards. Each step's dB, dC terms of the thread's 4 states go to the warp's
          // exchange rows; every second step the warp sums them over the channels of each slice.
#pragma unroll
          for (int j4 = kSub - 4; j4 >= 0; j4 -= 4) {
            const float4 dt4 = load4(dt_row + t_sub + j4), dtu4 = load4(dtu_row + t_sub + j4);
            const float4 dy4 = load4(dy_row + t_sub + j4);
            const float dts[4] = {dt4.x, dt4.y, dt4.z, dt4.w}, dtus[4] = {dtu4.x, dtu4.y, dtu4.z, dtu4.w};
            const float dys[4] = {dy4.x, dy4.y, dy4.z, dy4.w};
            float sum_gB[4], sum_gAh[4];
#pragma unroll
            for (int q = 3; q >= 0; --q) {
              const int j = j4 + q;
              const float4 b4 = load4(B_col + (t_sub + j) * S::kBCRow);
              const float4 c4 = load4(C_col + (t_sub + j) * S::kBCRow);
              const float Bv[4] = {b4.x, b4.y, b4.z, b4.w}, Cv[4] = {c4.x, c4.y, c4.z, c4.w};
              float gB = 0.f, gAh = 0.f, terms_B[kBwdStates], terms_C[kBwdStates];
#pragma unroll
              for (int k = 0; k < kBwdStates; ++k) {
                const float a = S::kKeepDecays ? decay[S::kKeepDecays ? j : 0][k] : exp2_approx(dts[q] * A2[k]);
                const float g = fmaf(Cv[k], dys[q], G[k]);  // dL/dh_t
                G[k] = a * g;                               // handed to step t - 1
                const float decayed = G[k] * hs[j][k];      // g a h_{t-1}
                gAh = fmaf(decayed, A2[k], gAh);
                dA[k] = fmaf(decayed, dts[q], dA[k]);
                gB = fmaf(g, Bv[k], gB);
                terms_B[k] = g * dtus[q];
                terms_C[k] = dys[q] * hs[j + 1][k];
              }
              float* const my_row = exchange + lane * kExchangeRow + (q % 2) * 8;
              store4(my_row, terms_B[0], terms_B[1], terms_B[2], terms_B[3]);
              store4(my_row + 4, terms_C[0], terms_C[1], terms_C[2], terms_C[3]);
              sum_gB[q] = gB, sum_gAh[q] = gAh;
              if (q % 2 == 0) {
                // Lane L sums value v = L % 16 (step j + v / 8, dB or dC by (v / 4) % 2, state v % 4)
                // over the 16 rows (lanes) 16 (L / 16) .. + 15: 16 channels of one slice, or (32
                // channels) half of them, the other half's sum coming by one shuffle. The half-warps
                // start 4 rows apart, which puts them on different banks.
                __syncwarp();
                const int v = lane % 16, half = lane / 16;
                float sums[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int r = 0; r < 16; ++r) {
                  sums[r % 4] += exchange[(16 * half + ((r + 4 * half) & 15)) * kExchangeRow + v];
                }
                float total = (sums[0] + sums[1]) + (sums[2] + sums[3]);
                if constexpr (kC == 32) total += __shfl_xor_sync(kAllLanes, total, 16);
                if (kC == 16 || lane < 16) {
                  const int row = ((v / 4) % 2) * kN + (kC == 16 ? slice : warp) * kBwdStates + v % 4;
                  red_s[row * kRedRow + t_sub + j + v / 8] = total;
                }
                __syncwarp();  // the rows are read (the next steps rewrite them)
              }
            }
            float* part = part_s + (slice * S::kPartSums * kC + c) * kPartRow + part_column(c, j4);
            store4(part, sum_gB[0], sum_gB[1], sum_gB[2], sum_gB[3]);
            store4(part + kC * kPartRow, sum_gAh[0], sum_gAh[1], sum_gAh[2], sum_gAh[3]);
          }
          __syncthreads();  // the slices' partial sums are in
          // du, ddelta of 2 steps of one channel from the slices' sums; dD and ddelta_bias sums.
          if (has_out) {
            // The item's float2 in its channel's part row (part_column swaps float4 halves).
            const int part_at = part_column(out_c, out_t & ~3) + (out_t & 3);
            float2 sum[S::kPartSums];
#pragma unroll
            for (int what = 0; what < S::kPartSums; ++what) {
              sum[what] = make_float2(0.f, 0.f);
#pragma unroll
              for (int w = 0; w < S::kSlices; ++w) {
                const float2 v = load2(part_s + ((w * S::kPartSums + what) * kC + out_c) * kPartRow + part_at);
                sum[what].x += v.x, sum[what].y += v.y;
              }
            }
            const int at = out_c * kRow + t_sub + out_t;
            const float2 dt2 = load2(dt_s + at), dy2 = load2(dy_s + at), u2 = load2(u_s + at);
            const float2 dsp2 = load2(dsp_s + at);
            const float gBs[2] = {sum[0].x, sum[0].y}, gAhs[2] = {sum[1].x, sum[1].y};
            const float dts[2] = {dt2.x, dt2.y}, dys[2] = {dy2.x, dy2.y}, us[2] = {u2.x, u2.y};
            const float dsps[2] = {dsp2.x, dsp2.y};
            const float D = item_D;
            float du_v[kOutSteps], ddt_v[kOutSteps];
#pragma unroll
            for (int j = 0; j < kOutSteps; ++j) {
              du_v[j] = fmaf(D, dys[j], dts[j] * gBs[j]);
              ddt_v[j] = dsps[j] * fmaf(us[j], gBs[j], gAhs[j] * kLn2);
              dD_sum = fmaf(dys[j], us[j], dD_sum);  // 0 past the end (dy = 0)
              dbias_sum += ddt_v[j];                 // 0 past the end (softplus' = 0)
            }
            const int valid = items_in_range<kOutSteps>(t0 + t_sub + out_t, span.end);
            if (valid > 0) {
              const int64_t at_x = out_row + t0 + t_sub + out_t;
              const bool whole = valid == kOutSteps && out_pairs_aligned;
              store_steps(as_ptr<T>(p.du) + at_x, whole, valid, du_v);
              store_steps(as_ptr<T>(p.ddelta) + at_x, whole, valid, ddt_v);
            }
          }
          __syncthreads();  // part_s is read (the next sub-tile rewrites it); after the last, red_s is in
        }

        // dB, dC: one atomic per (n, step) of the block; the thread's step red_t of rows red_row0 +
        // kRedRowsPerPass k.
        if (red_t < span.end - t0) {
          float* dB = dB_thread + tile * kSteps;
          float* dC = dC_thread + tile * kSteps;
#pragma unroll
          for (int k = 0; k < kRedPasses; ++k, dB += dB_pass_stride) {
            atomicAdd(dB, red_s[(red_row0 + k * kRedRowsPerPass) * kRedRow + red_t]);
          }
#pragma unroll
          for (int k = 0; k < kRedPasses; ++k, dC += dC_pass_stride) {
            atomicAdd(dC, red_s[(kN + red_row0 + k * kRedRowsPerPass) * kRedRow + red_t]);
          }
        }
      }
    }

    // The item's gradients that are not per step.
    if (p.dinitial_state) store4(as_ptr<float>(p.dinitial_state) + state_offset, G[0], G[1], G[2], G[3]);
    store4(as_ptr<float>(p.dA_part) + state_offset, dA[0], dA[1], dA[2], dA[3]);
    // A channel's output items are consecutive lanes.
#pragma unroll
    for (int offset = 1; offset < kSub / kOutSteps; offset *= 2) {
      dD_sum += __shfl_xor_sync(kAllLanes, dD_sum, offset);
      dbias_sum += __shfl_xor_sync(kAllLanes, dbias_sum, offset);
    }
    if (has_out && out_t == 0) {
      as_ptr<float>(p.dD_part)[seq * p.dim + channel0 + out_c] = dD_sum;
      as_ptr<float>(p.dbias_part)[seq * p.dim + channel0 + out_c] = dbias_sum;
    }
    __syncthreads();  // the next item restages shared memory
  }
}

// The instance's resident blocks on the current device. Its shared-memory limit is raised there
// first (which its launches need too); both are done once per device and instance (the workspace
// query and the launch of every backward ask for them).
template <typename T, typename S>
int64_t resident_blocks() {
#ifdef SSMK_SCAN_EMULATION
  return 2;
#else
  constexpr int kCachedDevices = 64;
  static std::atomic<int64_t> cached[kCachedDevices] = {};
  int device = 0;
  check_cuda(cudaGetDevice(&device), "selective_scan tiled backward: device");
  if (device < kCachedDevices) {
    if (const int64_t known = cached[device].load(std::memory_order_relaxed)) return known;
  }
  int sms = 0, per_sm = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "selective_scan: SM count");
  auto kernel = backward_tiled_kernel<T, S>;
  const size_t smem = S::template smem_bytes<T>();
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
             "selective_scan tiled backward: shared memory");
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, S::kThreads, smem),
             "selective_scan tiled backward: occupancy");
  const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  if (device < kCachedDevices) cached[device].store(resident, std::memory_order_relaxed);
  return resident;
#endif
}

// Blocks of the launch: the resident ones (each loops over items), so the workspace holds only
// theirs. The host emulation runs blocks one after another: 2, so that one block takes several items.
template <typename T, typename S>
int64_t backward_grid(const Params& p) {
  const int64_t items = backward_items<S>(p), resident = resident_blocks<T, S>();
  return items < resident ? items : resident;
}

// Calls visit(T{}, BwdShape<N, channels>{}) for the call's dtype and instance: the one table of instances.
template <typename Visit>
void visit_backward_instance(const Params& p, int instance, Visit&& visit) {
  SSMK_DISPATCH_FLOAT(p.dtype, "selective_scan u", [&] {
    visit_backward_shape(instance, [&](auto shape) { visit(scalar_t{}, shape); });
  });
}

#ifndef SSMK_SCAN_EMULATION
template <typename T, typename S>
void launch_backward(const Params& p) {
  const auto grid = static_cast<unsigned>(backward_grid<T, S>(p));  // also raises the shared-memory limit
  backward_tiled_kernel<T, S><<<grid, S::kThreads, S::template smem_bytes<T>(), as_stream(p.stream)>>>(p);
  check_launch("selective_scan backward_tiled_kernel");
}
#endif  // SSMK_SCAN_EMULATION

}  // namespace tiled

int64_t backward_workspace_floats(const Params& p) {
  if (p.num_seqs == 0 || p.dim == 0) return 0;
  const int instance = tiled::tiled_backward_instance(p);
  if (instance == 0) return 0;
  int64_t floats = 0;
  tiled::visit_backward_instance(p, instance, [&](auto type, auto shape) {
    using S = decltype(shape);
    floats = tiled::backward_grid<decltype(type), S>(p) * tiled::kTilesPerChunk * tiled::kSubs * S::kThreads * 4;
  });
  return floats;
}

#ifndef SSMK_SCAN_EMULATION
bool backward_tiled(const Params& p) {
  const int instance = tiled::tiled_backward_instance(p);
  if (instance == 0 || p.tile_states == 0) return false;
  tiled::visit_backward_instance(p, instance, [&](auto type, auto shape) {
    tiled::launch_backward<decltype(type), decltype(shape)>(p);
  });
  return true;
}
#endif  // SSMK_SCAN_EMULATION

}  // namespace scan
}  // namespace ssmk
