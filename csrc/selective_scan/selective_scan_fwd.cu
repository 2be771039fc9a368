// Selective scan forward: one block per (sequence, channel), chunks of kChunk = kThreads * kItems
// steps, thread i owning kItems consecutive steps of the chunk.
//
// Per state index n the recurrence h_t = a_t h_{t-1} + b_t (a_t = exp(dt_t A), b_t = dt_t u_t B_t)
// is a composition of affine maps: each thread folds its items, the block scans the folded maps
// (warp shuffles, then the kWarps warp totals through shared memory), and each thread replays its
// items from its incoming state to accumulate y_t += C_t h_t. The state entering each chunk is kept
// in shared memory and written to the checkpoints for the backward.
#include "selective_scan/scan_common.cuh"

namespace ssmk {
namespace scan {
namespace {

template <typename input_t, typename bc_t>
__global__ __launch_bounds__(kThreads) void forward_kernel(const Params p) {
  extern __shared__ float smem[];
  float* state = smem;                       // [2][dstate]: state entering the current / next chunk
  float* warp_a = smem + 2 * p.dstate;       // [2][kWarps]: warp totals, double-buffered over n
  float* warp_b = warp_a + 2 * kWarps;

  const int64_t channel = blockIdx.x;  // channels of one sequence run side by side and share B, C in L2
  const int64_t seq = blockIdx.y;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const Span span = sequence_span(p, seq);
  const int64_t n_state = p.dstate;

  const float* A = addr<const float>(p.A) + channel * n_state;
  const float bias = p.delta_bias ? addr<const float>(p.delta_bias)[channel] : 0.f;
  const float D = p.D ? addr<const float>(p.D)[channel] : 0.f;
  const int64_t state_offset = (seq * p.dim + channel) * n_state;
  for (int64_t n = tid; n < n_state; n += kThreads) {
    state[n] = p.initial_state ? addr<const float>(p.initial_state)[state_offset + n] : 0.f;
  }
  __syncthreads();

  const int64_t x_offset = span.row * p.x_batch_stride + channel * p.x_d_stride;
  const input_t* u_ptr = addr<const input_t>(p.u) + x_offset;
  const input_t* delta_ptr = addr<const input_t>(p.delta) + x_offset;
  float* checkpoints = addr<float>(p.checkpoints);
  const int64_t num_chunks = ceil_div(span.end - span.start, kChunk);

  for (int64_t k = 0; k < num_chunks; ++k) {
    const int cur = k & 1;
    const int64_t t0 = span.start + k * kChunk + static_cast<int64_t>(tid) * kItems;
    const int valid = items_in_range<kItems>(t0, span.end);
    const int64_t t_read = valid > 0 ? t0 : span.start;  // keep addresses in range for idle threads

    float u[kItems], dt[kItems], raw[kItems], y[kItems];
    load_items(u_ptr + t_read, valid, u);
    load_items(delta_ptr + t_read, valid, dt);
    step_sizes(dt, raw, bias, p.softplus, valid);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      y[i] = D * u[i];
      u[i] *= dt[i];  // from here on u holds dt * u
    }
    const int64_t slot = span.slot0 + k;

    for (int64_t n = 0; n < n_state; ++n) {
      const float A2 = A[n] * kLog2e;
      float Bv[kItems], Cv[kItems], a[kItems];
      const bc_t* B_ptr = BCPointer<bc_t>::at(p.B, p.b_fixed, span.row, channel, p.channels_per_b_group,
                                              p.B_batch_stride, p.B_group_stride, p.B_n_stride, n, t_read);
      const bc_t* C_ptr = BCPointer<bc_t>::at(p.C, p.c_fixed, span.row, channel, p.channels_per_c_group,
                                              p.C_batch_stride, p.C_group_stride, p.C_n_stride, n, t_read);
      if (p.b_fixed) {
        const float b0 = to_float(*B_ptr);
#pragma unroll
        for (int i = 0; i < kItems; ++i) Bv[i] = b0;
      } else {
        load_items(B_ptr, valid, Bv);
      }
      if (p.c_fixed) {
        const float c0 = to_float(*C_ptr);
#pragma unroll
        for (int i = 0; i < kItems; ++i) Cv[i] = c0;
      } else {
        load_items(C_ptr, valid, Cv);
      }
      // Fold the thread's items into one affine map.
      float fa = 1.f, fb = 0.f;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        a[i] = exp2f(dt[i] * A2);
        Bv[i] *= u[i];
        fb = fmaf(a[i], fb, Bv[i]);
        fa *= a[i];
      }
      warp_scan_affine(fa, fb);
      const int buf = n & 1;
      if (lane == 31) {
        warp_a[buf * kWarps + warp] = fa;
        warp_b[buf * kWarps + warp] = fb;
      }
      __syncthreads();
      const float h_chunk = state[cur * n_state + n];
      float h = h_chunk;
      for (int w = 0; w < warp; ++w) h = fmaf(warp_a[buf * kWarps + w], h, warp_b[buf * kWarps + w]);
      // Exclusive prefix inside the warp: the inclusive value of the previous lane.
      const float ea = __shfl_up_sync(0xffffffffu, fa, 1);
      const float eb = __shfl_up_sync(0xffffffffu, fb, 1);
      if (lane > 0) h = fmaf(ea, h, eb);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        h = fmaf(a[i], h, Bv[i]);
        y[i] = fmaf(Cv[i], h, y[i]);
      }
      if (tid == 0) checkpoints[(slot * p.dim + channel) * n_state + n] = h_chunk;
      // Identity maps past the end, so the last thread holds the state leaving the chunk.
      if (tid == kThreads - 1) state[(cur ^ 1) * n_state + n] = h;
    }

    if (valid > 0) {
      const int64_t offset = x_offset + t0;
      if (p.z) {
        float z[kItems];
        load_items(addr<const input_t>(p.z) + offset, valid, z);
#pragma unroll
        for (int i = 0; i < kItems; ++i) y[i] *= z[i] / (1.f + expf(-z[i]));
      }
      store_items(addr<input_t>(p.out) + offset, valid, y);
    }
    __syncthreads();  // the next chunk reads the state the last thread just wrote
  }

  const int final_buf = static_cast<int>(num_chunks & 1);
  float* last = addr<float>(p.last_state);
  for (int64_t n = tid; n < n_state; n += kThreads) last[state_offset + n] = state[final_buf * n_state + n];
}

template <typename input_t, typename bc_t>
void launch_forward(const Params& p) {
  dim3 grid(static_cast<unsigned>(p.dim), static_cast<unsigned>(p.num_seqs));
  const size_t smem = (2 * p.dstate + 4 * kWarps) * sizeof(float);
  forward_kernel<input_t, bc_t><<<grid, kThreads, smem, as_stream(p.stream)>>>(p);
  check_launch("selective_scan forward_kernel");
}

}  // namespace

void forward(const Params& p) {
  if (p.num_seqs == 0 || p.dim == 0) return;
  if (p.num_seqs > 65535) throw std::invalid_argument("selective_scan cuda: at most 65535 sequences per call");
  SSMK_DISPATCH_FLOAT(p.dtype, "selective_scan u", [&] {
    using input_t = scalar_t;
    if (p.bc_dtype == p.dtype) {
      launch_forward<input_t, input_t>(p);
    } else if (static_cast<DType>(p.bc_dtype) == DType::kFloat32) {
      launch_forward<input_t, float>(p);
    } else {
      throw std::invalid_argument("selective_scan cuda: B and C must have u's dtype or float32");
    }
  });
}

}  // namespace scan
}  // namespace ssmk
