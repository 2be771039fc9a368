// Selective scan forward, state-parallel form (SPEC.md section 2): each thread runs the recurrence
// of kStates (4 or 8) states of one channel step by step, so no scan over time is needed at all.
//
// Why. The warp-per-channel kernel (selective_scan_fwd.cu) splits a channel's steps over 32 lanes
// and joins them with a shuffle scan per state: per (step, state) it folds, scans and replays, ~14
// instructions, and its serial fold/scan/replay chains leave the schedulers idle (0.31 issued per
// cycle on the H200 at B4 D5120 L4096 N16). Here a (step, state) costs ~6: a = 2^(dt A log2e) (one
// MUFU op), h = a h + dt u B, y += C h, with kStates independent chains per thread.
//
// Layout. A block takes kChannels = 32 channels of one sequence; lane = channel, and warp = slice:
// the kSlices = N / kStates warps of a block hold states [kStates slice, kStates (slice + 1)) of all
// 32 channels. So a step's B and C values are broadcast reads (one address per warp), and a
// slice's partial y of 4 steps is one 16-byte shared store; the slices' parts are added after the
// tile, per (channel, 8 steps). The layout it replaced put a channel's slices on consecutive lanes
// and summed their y by an xor butterfly per step (2-4 shuffles and adds per step, with a serial
// tail): H200, B4 D5120 L4096 bf16 (scripts/scan_forward_variants.py, host time included), lane =
// channel against that: N 16 0.805 / 0.868 ms, 32 1.205 / 1.448, 64 2.219 / 2.606, 128 4.453 / 5.310.
// The bench, mamba_ssm in the same run: N 16 0.711 ms, 64 1.982, 128 4.140 against mamba_ssm's
// 1.441 / 4.860 / 9.449. With delta_bias and D read once per thread instead of per tile (the
// staging waited on those loads): N 16 0.695 ms against mamba_ssm's 1.441 (2026-12-04); with the
// staging in branch-free phases and the 6-instruction softplus: 0.678 against 1.445 (twelfth session).
// With z and a backward to come it also writes y + D u before the gate (Params::out_pre).
//
// Time. The block walks the sequence in tiles of kSteps = 32 steps. Per tile, staged in shared
// memory by the whole block:
//   - dt = softplus(delta + bias) and dt u of each (channel, step), computed once (not per state),
//     and D u, to which the slices' parts are added;
//   - B and C of the tile's steps as float, transposed to [step][n], so a thread reads its states'
//     values of one step with one or two 16-byte loads, and the 32 channels share one conversion.
// The next tile's u, delta, B, C (and this tile's z) are loaded into registers before this tile's
// steps run, so their latency hides behind the compute; two barriers per tile.
// b d N / kStates threads is all the parallel work there is (B4 D5120 N 16: 19 warps per SM with 4
// states), hence 4 states per thread at N 16, where 8 would halve the warps. It is latency-bound
// there (Nsight Compute: 4.2 active warps per scheduler, 2.44 issued per SM cycle of 4, stalls on
// MUFU / shared-memory results 29% and on fixed latencies 21%; FMA the busiest pipe at 35%).
// B and C must be input-dependent with whole blocks per group (32 | channels per group), of u's
// dtype, and N in {16, 32, 64, 128}: tiled_forward_states says which calls qualify; the others take
// the warp-per-channel kernel. Checkpoints (the state entering every kChunk steps) and last_state
// are written exactly as that kernel writes them, so the backward is the same for both.
#include <cstdlib>
#include <cstring>

#include "selective_scan/tiled_common.cuh"

namespace ssmk {
namespace scan {
namespace tiled {

// kStates states per thread (4 or 8), kSlices warps (slices of every channel's states): N = kStates * kSlices.
template <int kStates_, int kSlices_>
struct Shape {
  static constexpr int kStates = kStates_, kSlices = kSlices_;
  static_assert(kStates == 4 || kStates == 8, "a thread's states are read as one or two float4");
  static constexpr int kThreads = kChannels * kSlices;
  static_assert(kThreads <= 512, "at most 512 threads per block (registers)");
  static constexpr int kN = kStates * kSlices;
  static constexpr int kBCRow = kN + 4;  // [step][n] rows of B and C
  static constexpr int kXItems = kChannels * kItemsPerRow;
  static constexpr int kXPerThread = (kXItems + kThreads - 1) / kThreads;
  static constexpr int kBCItems = kN * kItemsPerRow;
  static constexpr int kBCPerThread = (kBCItems + kThreads - 1) / kThreads;
  // Shared memory (floats): dt, dt u, D u [kChannels][kRow]; B, C [kSteps][kBCRow]; the slices'
  // partial y [kSlices][kChannels][kRow].
  static constexpr int kSmemFloats = (3 + kSlices) * kChannels * kRow + 2 * kSteps * kBCRow;
};

// Which calls the tiled kernel serves, as its states per thread (kStates, 4 or 8); 0: the warp
// kernel's. kSlices = N / kStates.
inline int tiled_forward_states(const Params& p) {
  if (warp_kernel_forced("SSMKERNELS_SCAN_FORWARD_KERNEL")) return 0;
  if (!tiled_blocks_fit(p, kChannels)) return 0;
  if (p.dstate != 16 && p.dstate != 32 && p.dstate != 64 && p.dstate != 128) return 0;
  // H200, B4 D5120 L4096 bf16 (scripts/scan_forward_variants.py, one run): 4 states against 8: N 16
  // 0.805 / 0.925 ms (8 halves the warps), N 32 1.431 / 1.205, N 64 2.219 / 2.226, N 128 4.475 / 4.453.
  int states = p.dstate == 16 ? 4 : 8;
  if (const char* force = std::getenv("SSMKERNELS_SCAN_TILED_STATES")) states = std::atoi(force) == 4 ? 4 : 8;
  return p.dstate <= 32 ? states : 8;  // 4 states are built for N 16 and 32 only
}

// Calls visit(Shape<kStates, kSlices>{}) with the instance built for the call's N and `states` per
// thread (tiled_forward_states(p), not 0): the one table of instances, for the launcher and the
// host emulation alike.
template <typename Visit>
void visit_tiled_shape(const Params& p, int states, Visit&& visit) {
  switch (states * 1000 + static_cast<int>(p.dstate)) {
    case 4016: return visit(Shape<4, 4>{});
    case 4032: return visit(Shape<4, 8>{});
    case 8016: return visit(Shape<8, 2>{});
    case 8032: return visit(Shape<8, 4>{});
    case 8064: return visit(Shape<8, 8>{});
    case 8128: return visit(Shape<8, 16>{});
    default: throw std::logic_error("selective_scan tiled forward: no instance for this call");
  }
}

template <typename T, typename S>
__global__ __launch_bounds__(S::kThreads) void forward_tiled_kernel(const Params p) {
  constexpr int kStates = S::kStates, kSlices = S::kSlices;
  extern __shared__ float smem[];
  float* dt_s = smem;                           // [kChannels][kRow]
  float* dtu_s = dt_s + kChannels * kRow;       // [kChannels][kRow]
  float* Du_s = dtu_s + kChannels * kRow;       // [kChannels][kRow]
  float* B_s = Du_s + kChannels * kRow;         // [kSteps][kBCRow]
  float* C_s = B_s + kSteps * S::kBCRow;        // [kSteps][kBCRow]
  float* part_s = C_s + kSteps * S::kBCRow;     // [kSlices][kChannels][kRow]

  const int tid = threadIdx.x;
  const int channel = tid % kChannels, slice = tid / kChannels;  // this thread's channel and its kStates states
  const int64_t channel0 = static_cast<int64_t>(blockIdx.x) * kChannels;
  const int64_t seq = blockIdx.y;
  const Span span = sequence_span(p, seq);
  const int64_t num_tiles = ceil_div(span.end - span.start, kSteps);
  const int64_t n_state = p.dstate;

  const T* u = as_ptr<const T>(p.u) + span.row * p.x_batch_stride + channel0 * p.x_d_stride;
  const T* delta = as_ptr<const T>(p.delta) + span.row * p.x_batch_stride + channel0 * p.x_d_stride;
  const T* z = p.z ? as_ptr<const T>(p.z) + span.row * p.x_batch_stride + channel0 * p.x_d_stride : nullptr;
  T* out = as_ptr<T>(p.out) + span.row * p.x_batch_stride + channel0 * p.x_d_stride;
  T* out_pre = p.out_pre ? as_ptr<T>(p.out_pre) + span.row * p.x_batch_stride + channel0 * p.x_d_stride : nullptr;
  // The block's channels share one B group and one C group (tiled_forward_states).
  const T* B = as_ptr<const T>(p.B) + span.row * p.B_batch_stride + (channel0 / p.channels_per_b_group) * p.B_group_stride;
  const T* C = as_ptr<const T>(p.C) + span.row * p.C_batch_stride + (channel0 / p.channels_per_c_group) * p.C_group_stride;
  const float* bias = p.delta_bias ? as_ptr<const float>(p.delta_bias) + channel0 : nullptr;
  const float* Dvec = p.D ? as_ptr<const float>(p.D) + channel0 : nullptr;

  // The thread's states and A * log2(e).
  const int64_t state_offset = (seq * p.dim + channel0 + channel) * n_state + slice * kStates;
  float h[kStates], A2[kStates];
#pragma unroll
  for (int k = 0; k < kStates; ++k) {
    A2[k] = as_ptr<const float>(p.A)[(channel0 + channel) * n_state + slice * kStates + k] * kLog2e;
    h[k] = p.initial_state ? as_ptr<const float>(p.initial_state)[state_offset + k] : 0.f;
  }

  // Load items: x item i is (channel i / kItemsPerRow, steps (i % kItemsPerRow) * kItem ...); B/C
  // item i is (state i / kItemsPerRow, the same steps). Items past kXItems (32 kSlices > 128 threads) or past
  // kBCItems (kStates 4) are idle.
  Item<T> u_next[S::kXPerThread], delta_next[S::kXPerThread], z_now[S::kXPerThread];
  Item<T> B_next[S::kBCPerThread], C_next[S::kBCPerThread];
  auto x_item = [&](int k, int64_t tile, int& c, int& t, int& valid) {
    const int i = tid + k * S::kThreads;
    c = i / kItemsPerRow;
    t = (i % kItemsPerRow) * kItem;
    valid = i < S::kXItems ? items_in_range<kItem>(span.start + tile * kSteps + t, span.end) : 0;
  };
  auto load_tile = [&](int64_t tile) {
    const int64_t t0 = span.start + tile * kSteps;
#pragma unroll
    for (int k = 0; k < S::kXPerThread; ++k) {
      int c, t, valid;
      x_item(k, tile, c, t, valid);
      if (valid > 0) {
        load_item(u + c * p.x_d_stride + t0 + t, valid, u_next[k]);
        load_item(delta + c * p.x_d_stride + t0 + t, valid, delta_next[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < S::kBCPerThread; ++k) {
      const int i = tid + k * S::kThreads, n = i / kItemsPerRow, t = (i % kItemsPerRow) * kItem;
      if (i >= S::kBCItems) break;  // kStates 4: half the threads have none
      const int valid = items_in_range<kItem>(t0 + t, span.end);
      load_item(B + n * p.B_n_stride + t0 + t, valid, B_next[k]);
      load_item(C + n * p.C_n_stride + t0 + t, valid, C_next[k]);
    }
  };
  // The x items' delta_bias and D, read once (read per tile, a load the staging waited on).
  float item_bias[S::kXPerThread], item_D[S::kXPerThread];
#pragma unroll
  for (int k = 0; k < S::kXPerThread; ++k) {
    int c, t, valid;
    x_item(k, 0, c, t, valid);  // (the item's channel; t and valid unused)
    item_bias[k] = bias && c < kChannels ? bias[c] : 0.f;
    item_D[k] = Dvec && c < kChannels ? Dvec[c] : 0.f;
  }
  // The loaded tile into shared memory: step sizes (0 past the end: identity steps), dt u, D u, B, C.
  // 16-bit inputs take softplus_fast: with 16 states per channel, softplus() cost about as much
  // as the states' own steps.
  auto stage_tile = [&](int64_t tile) {
#pragma unroll
    for (int k = 0; k < S::kXPerThread; ++k) {
      int c, t, valid;
      x_item(k, tile, c, t, valid);
      if (c >= kChannels) continue;
      const float b = item_bias[k], D = item_D[k];
      float dt[kItem], dtu[kItem], Du[kItem], uu[kItem];
      // In phases, with no branch inside a loop over the elements, so that their MUFU chains
      // interleave (as in the backward's staging).
#pragma unroll
      for (int j = 0; j < kItem; ++j) {
        uu[j] = j < valid ? to_float(u_next[k].v[j]) : 0.f;
        dt[j] = (j < valid ? to_float(delta_next[k].v[j]) : 0.f) + b;
      }
      if (p.softplus) {
#pragma unroll
        for (int j = 0; j < kItem; ++j) dt[j] = sizeof(T) < 4 ? softplus_fast(dt[j]) : softplus(dt[j]);
      }
#pragma unroll
      for (int j = 0; j < kItem; ++j) {
        if (j >= valid) dt[j] = 0.f;
        dtu[j] = dt[j] * uu[j];
        Du[j] = D * uu[j];
      }
      store_floats(dt_s + c * kRow + t, dt);
      store_floats(dtu_s + c * kRow + t, dtu);
      store_floats(Du_s + c * kRow + t, Du);
    }
#pragma unroll
    for (int k = 0; k < S::kBCPerThread; ++k) {
      const int i = tid + k * S::kThreads, n = i / kItemsPerRow, t = (i % kItemsPerRow) * kItem;
      if (i >= S::kBCItems) break;
#pragma unroll
      for (int j = 0; j < kItem; ++j) {
        B_s[(t + j) * S::kBCRow + n] = to_float(B_next[k].v[j]);
        C_s[(t + j) * S::kBCRow + n] = to_float(C_next[k].v[j]);
      }
    }
  };

  if (num_tiles > 0) {
    load_tile(0);
    stage_tile(0);
  }
  __syncthreads();
  float* checkpoints = as_ptr<float>(p.checkpoints);
  const float* dt_row = dt_s + channel * kRow;
  const float* dtu_row = dtu_s + channel * kRow;
  float* part_row = part_s + (slice * kChannels + channel) * kRow;
  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    const bool has_next = tile + 1 < num_tiles;
    if (has_next) load_tile(tile + 1);
    if (z) {
      const int64_t t0 = span.start + tile * kSteps;
#pragma unroll
      for (int k = 0; k < S::kXPerThread; ++k) {
        int c, t, valid;
        x_item(k, tile, c, t, valid);
        if (valid > 0) load_item(z + c * p.x_d_stride + t0 + t, valid, z_now[k]);
      }
    }
    if ((tile * kSteps) % kChunk == 0 && checkpoints) {  // the state entering a kChunk chunk
      const int64_t slot = span.slot0 + tile * kSteps / kChunk;
      float* dst = checkpoints + (slot * p.dim + channel0 + channel) * n_state + slice * kStates;
#pragma unroll
      for (int k = 0; k < kStates; ++k) dst[k] = h[k];
    }

    // The tile's steps, four at a time (one float4 of dt and of dt u).
#pragma unroll 1
    for (int t4 = 0; t4 < kSteps; t4 += 4) {
      const float4 dt4 = *reinterpret_cast<const float4*>(dt_row + t4);
      const float4 dtu4 = *reinterpret_cast<const float4*>(dtu_row + t4);
      const float dts[4] = {dt4.x, dt4.y, dt4.z, dt4.w}, dtus[4] = {dtu4.x, dtu4.y, dtu4.z, dtu4.w};
      float ys[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float* Bt = B_s + (t4 + q) * S::kBCRow;
        const float* Ct = C_s + (t4 + q) * S::kBCRow;
        float Bv[kStates], Cv[kStates];
#pragma unroll
        for (int g = 0; g < kStates / 4; ++g) {
          const float4 b4 = *reinterpret_cast<const float4*>(Bt + slice * kStates + 4 * g);
          const float4 c4 = *reinterpret_cast<const float4*>(Ct + slice * kStates + 4 * g);
          Bv[4 * g] = b4.x, Bv[4 * g + 1] = b4.y, Bv[4 * g + 2] = b4.z, Bv[4 * g + 3] = b4.w;
          Cv[4 * g] = c4.x, Cv[4 * g + 1] = c4.y, Cv[4 * g + 2] = c4.z, Cv[4 * g + 3] = c4.w;
        }
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < kStates; ++k) {
          const float a = exp2_approx(dts[q] * A2[k]);
          h[k] = fmaf(a, h[k], dtus[q] * Bv[k]);
          acc = fmaf(Cv[k], h[k], acc);
        }
        ys[q] = acc;
      }
      // The slice's partial sums, added to y after the tile.
      *reinterpret_cast<float4*>(part_row + t4) = make_float4(ys[0], ys[1], ys[2], ys[3]);
    }
    __syncthreads();  // the parts complete; dt, dt u, B, C read

    const int64_t t0 = span.start + tile * kSteps;
#pragma unroll
    for (int k = 0; k < S::kXPerThread; ++k) {
      int c, t, valid;
      x_item(k, tile, c, t, valid);
      if (valid <= 0) continue;
      float y[kItem];
#pragma unroll
      for (int j = 0; j < kItem; ++j) y[j] = Du_s[c * kRow + t + j];
#pragma unroll
      for (int s = 0; s < kSlices; ++s) {
#pragma unroll
        for (int j = 0; j < kItem; ++j) y[j] += part_s[(s * kChannels + c) * kRow + t + j];
      }
      if (out_pre) store_items(out_pre + c * p.x_d_stride + t0 + t, valid, y);  // before the gate
      if (z) {
#pragma unroll
        for (int j = 0; j < kItem; ++j) y[j] *= silu_fast(to_float(z_now[k].v[j]));
      }
      store_items(out + c * p.x_d_stride + t0 + t, valid, y);
    }
    if (has_next) stage_tile(tile + 1);  // the same items this thread just read from Du_s
    __syncthreads();
  }

  if (p.last_state) {
#pragma unroll
    for (int k = 0; k < kStates; ++k) as_ptr<float>(p.last_state)[state_offset + k] = h[k];
  }
}

#ifndef SSMK_SCAN_EMULATION
template <typename T, typename S>
void launch(const Params& p) {
  const dim3 grid(static_cast<unsigned>(p.dim / kChannels), static_cast<unsigned>(p.num_seqs));
  const size_t smem = S::kSmemFloats * sizeof(float);
  auto kernel = forward_tiled_kernel<T, S>;
  if (smem > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               "selective_scan tiled forward: shared memory");
  }
  kernel<<<grid, S::kThreads, smem, as_stream(p.stream)>>>(p);
  check_launch("selective_scan forward_tiled_kernel");
}
#endif  // SSMK_SCAN_EMULATION

}  // namespace tiled

#ifndef SSMK_SCAN_EMULATION
bool forward_tiled(const Params& p) {
  const int states = tiled::tiled_forward_states(p);
  if (states == 0) return false;
  SSMK_DISPATCH_FLOAT(p.dtype, "selective_scan u", [&] {
    tiled::visit_tiled_shape(p, states, [&](auto shape) { tiled::launch<scalar_t, decltype(shape)>(p); });
  });
  return true;
}
#endif  // SSMK_SCAN_EMULATION

}  // namespace scan
}  // namespace ssmk
