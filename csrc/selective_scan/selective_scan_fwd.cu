// Selective scan forward: one block per (sequence, kCh consecutive channels), chunks of
// kChunk = kTh * kIt steps, thread i owning kIt consecutive steps of the chunk.
//
// Per state index n the recurrence h_t = a_t h_{t-1} + b_t (a_t = exp(dt_t A), b_t = dt_t u_t B_t)
// is a composition of affine maps: each thread folds its items, the block scans the folded maps
// (warp shuffles, then the warp totals through shared memory), and each thread replays its items
// from its incoming state to accumulate y_t += C_t h_t. The state entering each chunk is kept in
// shared memory and written to the checkpoints for the backward.
//
// Several channels per block share each load of input-dependent B and C: with one channel per
// block, every channel re-reads B and C from L2 (b * d * n * l elements of traffic at Mamba sizes,
// more than the DRAM traffic of u, delta, z and out together). The launcher uses kCh = 4 when the
// channel count and the B/C groups allow it, else one channel per block.
#include "selective_scan/scan_common.cuh"

namespace ssmk {
namespace scan {
namespace {

template <typename input_t, typename bc_t, int kTh, int kIt, int kCh>
__global__ __launch_bounds__(kTh) void forward_kernel(const Params p) {
  static_assert(kTh * kIt == kChunk, "the chunk is the checkpoint interval shared with the backward");
  constexpr int kW = kTh / 32;
  extern __shared__ float smem[];
  const int64_t n_state = p.dstate;
  float* state = smem;                          // [2][kCh][n]: state entering the current / next chunk
  float* warp_a = smem + 2 * kCh * n_state;     // [2][kCh][kW]: warp totals, double-buffered over n
  float* warp_b = warp_a + 2 * kCh * kW;

  const int64_t channel0 = static_cast<int64_t>(blockIdx.x) * kCh;  // channels of one sequence side by side
  const int64_t seq = blockIdx.y;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const Span span = sequence_span(p, seq);

  float bias[kCh], D[kCh];
#pragma unroll
  for (int c = 0; c < kCh; ++c) {
    bias[c] = p.delta_bias ? as_ptr<const float>(p.delta_bias)[channel0 + c] : 0.f;
    D[c] = p.D ? as_ptr<const float>(p.D)[channel0 + c] : 0.f;
  }
  const int64_t state_offset = (seq * p.dim + channel0) * n_state;  // kCh channels are consecutive
  for (int64_t i = tid; i < kCh * n_state; i += kTh) {
    state[i] = p.initial_state ? as_ptr<const float>(p.initial_state)[state_offset + i] : 0.f;
  }
  __syncthreads();

  const int64_t x_offset = span.row * p.x_batch_stride + channel0 * p.x_d_stride;
  float* checkpoints = as_ptr<float>(p.checkpoints);
  const int64_t num_chunks = ceil_div(span.end - span.start, kChunk);

  for (int64_t k = 0; k < num_chunks; ++k) {
    const int cur = k & 1;
    const int64_t t0 = span.start + k * kChunk + static_cast<int64_t>(tid) * kIt;
    const int valid = items_in_range<kIt>(t0, span.end);
    const int64_t t_read = valid > 0 ? t0 : span.start;  // keep addresses in range for idle threads

    float dt[kCh][kIt], dtu[kCh][kIt], y[kCh][kIt];
#pragma unroll
    for (int c = 0; c < kCh; ++c) {
      float raw[kIt];
      const int64_t offset = x_offset + c * p.x_d_stride + t_read;
      load_items(as_ptr<const input_t>(p.u) + offset, valid, dtu[c]);
      load_items(as_ptr<const input_t>(p.delta) + offset, valid, dt[c]);
      step_sizes(dt[c], raw, bias[c], p.softplus, valid);
#pragma unroll
      for (int i = 0; i < kIt; ++i) {
        y[c][i] = D[c] * dtu[c][i];
        dtu[c][i] *= dt[c][i];
      }
    }
    const int64_t slot = span.slot0 + k;

    for (int64_t n = 0; n < n_state; ++n) {
      float Bv[kIt], Cv[kIt], a[kCh][kIt], fa[kCh], fb[kCh];
      const bc_t* B_ptr = BCPointer<bc_t>::at(p.B, p.b_fixed, span.row, channel0, p.channels_per_b_group,
                                              p.B_batch_stride, p.B_group_stride, p.B_n_stride, n, t_read);
      const bc_t* C_ptr = BCPointer<bc_t>::at(p.C, p.c_fixed, span.row, channel0, p.channels_per_c_group,
                                              p.C_batch_stride, p.C_group_stride, p.C_n_stride, n, t_read);
      if (!p.b_fixed) load_items(B_ptr, valid, Bv);
      if (!p.c_fixed) load_items(C_ptr, valid, Cv);
      const int buf = n & 1;
#pragma unroll
      for (int c = 0; c < kCh; ++c) {
        // Fixed B: (d, n), so the channel's own value (group stride = channel stride).
        const float b_fixed = p.b_fixed ? to_float(B_ptr[c * p.B_group_stride]) : 0.f;
        const float A2 = as_ptr<const float>(p.A)[(channel0 + c) * n_state + n] * kLog2e;
        fa[c] = 1.f;
        fb[c] = 0.f;
#pragma unroll
        for (int i = 0; i < kIt; ++i) {
          a[c][i] = exp2f(dt[c][i] * A2);
          fb[c] = fmaf(a[c][i], fb[c], dtu[c][i] * (p.b_fixed ? b_fixed : Bv[i]));
          fa[c] *= a[c][i];
        }
        warp_scan_affine(fa[c], fb[c]);
        if (lane == 31) {
          warp_a[(buf * kCh + c) * kW + warp] = fa[c];
          warp_b[(buf * kCh + c) * kW + warp] = fb[c];
        }
      }
      __syncthreads();
#pragma unroll
      for (int c = 0; c < kCh; ++c) {
        const float c_fixed = p.c_fixed ? to_float(C_ptr[c * p.C_group_stride]) : 0.f;
        const float b_fixed = p.b_fixed ? to_float(B_ptr[c * p.B_group_stride]) : 0.f;
        const float h_chunk = state[(cur * kCh + c) * n_state + n];
        float h = h_chunk;
        for (int w = 0; w < warp; ++w) {
          h = fmaf(warp_a[(buf * kCh + c) * kW + w], h, warp_b[(buf * kCh + c) * kW + w]);
        }
        // Exclusive prefix inside the warp: the inclusive value of the previous lane.
        const float ea = __shfl_up_sync(0xffffffffu, fa[c], 1);
        const float eb = __shfl_up_sync(0xffffffffu, fb[c], 1);
        if (lane > 0) h = fmaf(ea, h, eb);
#pragma unroll
        for (int i = 0; i < kIt; ++i) {
          h = fmaf(a[c][i], h, dtu[c][i] * (p.b_fixed ? b_fixed : Bv[i]));
          y[c][i] = fmaf(p.c_fixed ? c_fixed : Cv[i], h, y[c][i]);
        }
        if (tid == 0) checkpoints[(slot * p.dim + channel0 + c) * n_state + n] = h_chunk;
        // Identity maps past the end, so the last thread holds the state leaving the chunk.
        if (tid == kTh - 1) state[((cur ^ 1) * kCh + c) * n_state + n] = h;
      }
    }

    if (valid > 0) {
#pragma unroll
      for (int c = 0; c < kCh; ++c) {
        const int64_t offset = x_offset + c * p.x_d_stride + t0;
        if (p.z) {
          float z[kIt];
          load_items(as_ptr<const input_t>(p.z) + offset, valid, z);
#pragma unroll
          for (int i = 0; i < kIt; ++i) y[c][i] *= z[i] / (1.f + expf(-z[i]));
        }
        store_items(as_ptr<input_t>(p.out) + offset, valid, y[c]);
      }
    }
    __syncthreads();  // the next chunk reads the state the last thread just wrote
  }

  const int final_buf = static_cast<int>(num_chunks & 1);
  float* last = as_ptr<float>(p.last_state);
  for (int64_t i = tid; i < kCh * n_state; i += kTh) last[state_offset + i] = state[final_buf * kCh * n_state + i];
}

// Whether the launcher uses 4-channel blocks: they must not straddle a group of B or C, and they
// only pay off when B or C is input-dependent (shared loads).
inline bool four_channel_blocks(const Params& p) {
  return !(p.b_fixed && p.c_fixed) && p.dim % 4 == 0 && (p.b_fixed || p.channels_per_b_group % 4 == 0) &&
         (p.c_fixed || p.channels_per_c_group % 4 == 0);
}

// Launchers: compiled by nvcc only (emulation.cc builds the kernels above as host code).
#ifndef SSMK_SCAN_EMULATION
template <typename input_t, typename bc_t, int kTh, int kIt, int kCh>
void launch(const Params& p) {
  dim3 grid(static_cast<unsigned>(p.dim / kCh), static_cast<unsigned>(p.num_seqs));
  const size_t smem = (2 * kCh * p.dstate + 4 * kCh * (kTh / 32)) * sizeof(float);
  auto kernel = forward_kernel<input_t, bc_t, kTh, kIt, kCh>;
  if (smem > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               "selective_scan forward: shared memory");
  }
  kernel<<<grid, kTh, smem, as_stream(p.stream)>>>(p);
  check_launch("selective_scan forward_kernel");
}

// kMulti: whether to instantiate the 4-channel kernel (only for B/C in u's dtype, the common case,
// to keep the build small; float32 B/C with 16-bit u take the one-channel kernel).
template <typename input_t, typename bc_t, bool kMulti>
void launch_forward(const Params& p) {
  if constexpr (kMulti) {
    if (four_channel_blocks(p)) {
      launch<input_t, bc_t, 256, kChunk / 256, 4>(p);
      return;
    }
  }
  launch<input_t, bc_t, kThreads, kItems, 1>(p);
}

#endif  // SSMK_SCAN_EMULATION

}  // namespace

#ifndef SSMK_SCAN_EMULATION
void forward(const Params& p) {
  if (p.num_seqs == 0 || p.dim == 0) return;
  if (p.num_seqs > 65535) throw std::invalid_argument("selective_scan cuda: at most 65535 sequences per call");
  SSMK_DISPATCH_FLOAT(p.dtype, "selective_scan u", [&] {
    using input_t = scalar_t;
    if (p.bc_dtype == p.dtype) {
      launch_forward<input_t, input_t, true>(p);
    } else if (static_cast<DType>(p.bc_dtype) == DType::kFloat32) {
      launch_forward<input_t, float, false>(p);
    } else {
      throw std::invalid_argument("selective_scan cuda: B and C must have u's dtype or float32");
    }
  });
}

#endif  // SSMK_SCAN_EMULATION

}  // namespace scan
}  // namespace ssmk
