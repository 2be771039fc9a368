// Selective scan backward: one block per (sequence, channel), walking the forward's chunks in
// reverse; thread i owns kItemsBwd consecutive steps of the chunk.
//
// Per state index n and chunk: the states h_t are recomputed from the chunk's checkpoint (forward
// block scan, as in the forward kernel), and the adjoint runs backwards as another block scan of
// affine maps on G_t = a_t g_t (what step t hands to step t-1):
//   g_t = C_t dy_t + G_{t+1},   G_t = a_t g_t,   G at the sequence end = d(last_state).
// The chunk's G at its first step carries to the previous chunk; after the first chunk it is the
// gradient of the initial state. With g_t and h_{t-1}:
//   du_t += g_t dt_t B_t,  ddt_t += g_t (A a_t h_{t-1} + B_t u_t),  dA += g_t dt_t a_t h_{t-1},
//   dB_t += g_t dt_t u_t,  dC_t += dy_t h_t.
// Sums over the block's steps go through warp shuffles and per-warp shared-memory slots (fixed
// order); input-dependent B and C gradients, which sum over channels, use float atomics, issued
// in time order across each warp (staged through shared memory) so that they coalesce.
#include "selective_scan/scan_common.cuh"

namespace ssmk {
namespace scan {
namespace {

constexpr int I = kItemsBwd;
constexpr int W = kWarpsBwd;
constexpr int kExchange = kChunk + kChunk / I;

// Position in the exchange buffers of the chunk's step `step` (one padding slot per thread's run).
__device__ __forceinline__ int exchange_pos(int step) { return step + step / I; }

template <typename input_t, typename bc_t>
__global__ __launch_bounds__(kThreadsBwd) void backward_kernel(const Params p) {
  const int64_t n_state = p.dstate;
  extern __shared__ float smem[];
  float* carry = smem;                   // [2][n]: G entering the current / previous chunk
  float* fwd_a = carry + 2 * n_state;    // [2][W] warp totals of the forward scan
  float* fwd_b = fwd_a + 2 * W;
  float* rev_a = fwd_b + 2 * W;          // [2][W] warp totals of the reverse scan
  float* rev_b = rev_a + 2 * W;
  float* acc_A = rev_b + 2 * W;          // [n][W] per-warp sums over steps
  float* acc_B = acc_A + n_state * W;    // [n][W] (fixed B only)
  float* acc_C = acc_B + n_state * W;    // [n][W] (fixed C only)
  float* acc_D = acc_C + n_state * W;    // [W]
  float* acc_bias = acc_D + W;           // [W]
  // [kChunk + kChunk / I] each: the chunk's B / C gradients of input-dependent layouts, staged so
  // that the atomics go out in time order across the warp (coalesced), padded against bank conflicts.
  float* exchange_B = acc_bias + W;
  float* exchange_C = exchange_B + kExchange;

  const int64_t channel = p.channel_begin + blockIdx.x;
  const int64_t seq = blockIdx.y;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const Span span = sequence_span(p, seq);
  const int64_t state_offset = (seq * p.dim + channel) * n_state;

  const float* A = as_ptr<const float>(p.A) + channel * n_state;
  const float bias = p.delta_bias ? as_ptr<const float>(p.delta_bias)[channel] : 0.f;
  const float D = p.D ? as_ptr<const float>(p.D)[channel] : 0.f;
  for (int64_t n = tid; n < n_state; n += kThreadsBwd) {
    carry[n] = p.dlast_state ? as_ptr<const float>(p.dlast_state)[state_offset + n] : 0.f;
  }
  for (int64_t i = tid; i < 3 * n_state * W + 2 * W; i += kThreadsBwd) acc_A[i] = 0.f;
  __syncthreads();

  const int64_t x_offset = span.row * p.x_batch_stride + channel * p.x_d_stride;
  const float* checkpoints = as_ptr<const float>(p.checkpoints);
  float* dB = as_ptr<float>(p.dB);
  float* dC = as_ptr<float>(p.dC);
  // The dB / dC slot this block adds into: its group, or (deterministic mode) its own channel slot.
  const int64_t grp_b = p.bc_grad_per_channel ? channel - p.channel_begin : channel / p.channels_per_b_group;
  const int64_t grp_c = p.bc_grad_per_channel ? channel - p.channel_begin : channel / p.channels_per_c_group;
  const int64_t num_chunks = ceil_div(span.end - span.start, kChunk);

  for (int64_t kk = 0; kk < num_chunks; ++kk) {
    const int64_t k = num_chunks - 1 - kk;
    const int cur = kk & 1;
    const int64_t chunk_start = span.start + k * kChunk;
    const int64_t t0 = chunk_start + static_cast<int64_t>(tid) * I;
    const int valid = items_in_range<I>(t0, span.end);
    const int64_t t_read = valid > 0 ? t0 : span.start;
    const int64_t slot = span.slot0 + k;

    float u[I], dt[I], sg[I], dy[I], zf[I], y[I], du[I], ddt[I];
    load_items(as_ptr<const input_t>(p.u) + x_offset + t_read, valid, u);
    load_items(as_ptr<const input_t>(p.delta) + x_offset + t_read, valid, dt);
    step_sizes(dt, sg, bias, p.softplus, valid);
    load_items(as_ptr<const input_t>(p.dout) + x_offset + t_read, valid, dy);
#pragma unroll
    for (int i = 0; i < I; ++i) {
      // sg: d dt / d delta (softplus' derivative is the sigmoid), 0 past the end.
      sg[i] = i < valid ? (p.softplus ? 1.f / (1.f + expf(-sg[i])) : 1.f) : 0.f;
      y[i] = D * u[i];
      zf[i] = 0.f;
    }
    if (p.z) {
      float z[I];
      load_items(as_ptr<const input_t>(p.z) + x_offset + t_read, valid, z);
#pragma unroll
      for (int i = 0; i < I; ++i) {
        const float sig = 1.f / (1.f + expf(-z[i]));
        zf[i] = dy[i] * sig * (1.f + z[i] * (1.f - sig));  // dz = y * zf
        dy[i] *= z[i] * sig;
      }
    }
#pragma unroll
    for (int i = 0; i < I; ++i) {
      du[i] = D * dy[i];
      ddt[i] = 0.f;
    }

    for (int64_t step_n = 0; step_n < n_state; ++step_n) {
      // Each channel starts at another state index, so that the blocks running side by side (the
      // channels of one sequence, in the same chunk) spread their B/C atomics over n rows instead
      // of all hitting the same addresses at once.
      const int64_t n = (step_n + channel) % n_state;
      const float An = A[n];
      const float A2 = An * kLog2e;
      float Bv[I], Cv[I], a[I], hs[I];
      const bc_t* B_ptr = BCPointer<bc_t>::at(p.B, p.b_fixed, span.row, channel, p.channels_per_b_group,
                                              p.B_batch_stride, p.B_group_stride, p.B_n_stride, n, t_read);
      const bc_t* C_ptr = BCPointer<bc_t>::at(p.C, p.c_fixed, span.row, channel, p.channels_per_c_group,
                                              p.C_batch_stride, p.C_group_stride, p.C_n_stride, n, t_read);
      if (p.b_fixed) {
        const float b0 = to_float(*B_ptr);
#pragma unroll
        for (int i = 0; i < I; ++i) Bv[i] = i < valid ? b0 : 0.f;
      } else {
        load_items(B_ptr, valid, Bv);
      }
      if (p.c_fixed) {
        const float c0 = to_float(*C_ptr);
#pragma unroll
        for (int i = 0; i < I; ++i) Cv[i] = i < valid ? c0 : 0.f;
      } else {
        load_items(C_ptr, valid, Cv);
      }
      float fa = 1.f, fb = 0.f, ra = 1.f, rb = 0.f;
#pragma unroll
      for (int i = 0; i < I; ++i) {
        a[i] = exp2f(dt[i] * A2);
        fb = fmaf(a[i], fb, dt[i] * u[i] * Bv[i]);
        fa *= a[i];
      }
#pragma unroll
      for (int i = I - 1; i >= 0; --i) {
        rb = a[i] * fmaf(Cv[i], dy[i], rb);
        ra *= a[i];
      }
      warp_scan_affine(fa, fb);
      warp_scan_affine_reverse(ra, rb);
      const int buf = step_n & 1;
      if (lane == 31) {
        fwd_a[buf * W + warp] = fa;
        fwd_b[buf * W + warp] = fb;
      }
      if (lane == 0) {
        rev_a[buf * W + warp] = ra;
        rev_b[buf * W + warp] = rb;
      }
      __syncthreads();
      // State entering this thread's first step.
      float h = checkpoints[(slot * p.dim + channel) * n_state + n];
      for (int w = 0; w < warp; ++w) h = fmaf(fwd_a[buf * W + w], h, fwd_b[buf * W + w]);
      const float ea = __shfl_up_sync(0xffffffffu, fa, 1), eb = __shfl_up_sync(0xffffffffu, fb, 1);
      if (lane > 0) h = fmaf(ea, h, eb);
      // G entering this thread's last step from later steps.
      float x = carry[cur * n_state + n];
      for (int w = W - 1; w > warp; --w) x = fmaf(rev_a[buf * W + w], x, rev_b[buf * W + w]);
      const float na = __shfl_down_sync(0xffffffffu, ra, 1), nb = __shfl_down_sync(0xffffffffu, rb, 1);
      if (lane < 31) x = fmaf(na, x, nb);

      const float h_in = h;
#pragma unroll
      for (int i = 0; i < I; ++i) {
        h = fmaf(a[i], h, dt[i] * u[i] * Bv[i]);
        hs[i] = h;
      }
      float dA_sum = 0.f, dB_sum = 0.f, dC_sum = 0.f;
#pragma unroll
      for (int i = I - 1; i >= 0; --i) {
        const float g = fmaf(Cv[i], dy[i], x);
        x = a[i] * g;
        const float decayed = a[i] * (i > 0 ? hs[i - 1] : h_in);  // a_t h_{t-1}
        const float g_dt = g * dt[i];
        du[i] = fmaf(g_dt, Bv[i], du[i]);
        ddt[i] += g * fmaf(An, decayed, Bv[i] * u[i]);
        dA_sum = fmaf(g_dt, decayed, dA_sum);
        const float grad_B = g_dt * u[i], grad_C = dy[i] * hs[i];
        y[i] = fmaf(Cv[i], hs[i], y[i]);
        if (p.b_fixed) {
          dB_sum += grad_B;
        } else {
          exchange_B[exchange_pos(tid * I + i)] = grad_B;
        }
        if (p.c_fixed) {
          dC_sum += grad_C;
        } else {
          exchange_C[exchange_pos(tid * I + i)] = grad_C;
        }
      }
      if (tid == 0) carry[(cur ^ 1) * n_state + n] = x;  // G at the chunk's first step
      if (!(p.b_fixed && p.c_fixed)) {
        __syncthreads();
        // Striped: step j * kThreadsBwd + tid, so a warp adds to 32 consecutive positions at once.
        // The exchange buffers are rewritten only after the next n's first barrier.
        float* dB_row = dB + span.row * p.dB_batch_stride + grp_b * p.dB_group_stride + n * p.dB_n_stride;
        float* dC_row = dC + span.row * p.dC_batch_stride + grp_c * p.dC_group_stride + n * p.dC_n_stride;
#pragma unroll
        for (int j = 0; j < I; ++j) {
          const int step = j * kThreadsBwd + tid;
          const int64_t t = chunk_start + step;
          if (t < span.end) {
            if (!p.b_fixed) atomicAdd(dB_row + t, exchange_B[exchange_pos(step)]);
            if (!p.c_fixed) atomicAdd(dC_row + t, exchange_C[exchange_pos(step)]);
          }
        }
      }
      dA_sum = warp_sum(dA_sum);
      if (p.b_fixed) dB_sum = warp_sum(dB_sum);
      if (p.c_fixed) dC_sum = warp_sum(dC_sum);
      if (lane == 0) {
        acc_A[n * W + warp] += dA_sum;
        acc_B[n * W + warp] += dB_sum;
        acc_C[n * W + warp] += dC_sum;
      }
    }

    float D_sum = 0.f, bias_sum = 0.f;
#pragma unroll
    for (int i = 0; i < I; ++i) {
      ddt[i] *= sg[i];
      bias_sum += ddt[i];
      D_sum = fmaf(dy[i], u[i], D_sum);
      y[i] *= zf[i];  // dz
    }
    if (valid > 0) {
      const int64_t offset = x_offset + t0;
      store_items(as_ptr<input_t>(p.du) + offset, valid, du);
      store_items(as_ptr<input_t>(p.ddelta) + offset, valid, ddt);
      if (p.z) store_items(as_ptr<input_t>(p.dz) + offset, valid, y);
    }
    D_sum = warp_sum(D_sum);
    bias_sum = warp_sum(bias_sum);
    if (lane == 0) {
      acc_D[warp] += D_sum;
      acc_bias[warp] += bias_sum;
    }
    __syncthreads();  // the previous chunk reads the carry thread 0 just wrote
  }

  const int final_buf = static_cast<int>(num_chunks & 1);
  for (int64_t n = tid; n < n_state; n += kThreadsBwd) {
    if (p.dinitial_state) as_ptr<float>(p.dinitial_state)[state_offset + n] = carry[final_buf * n_state + n];
    float sA = 0.f, sB = 0.f, sC = 0.f;
    for (int w = 0; w < W; ++w) {
      sA += acc_A[n * W + w];
      sB += acc_B[n * W + w];
      sC += acc_C[n * W + w];
    }
    as_ptr<float>(p.dA_part)[state_offset + n] = sA;
    if (p.b_fixed) dB[state_offset + n] = sB;
    if (p.c_fixed) dC[state_offset + n] = sC;
  }
  if (tid == 0) {
    float sD = 0.f, sBias = 0.f;
    for (int w = 0; w < W; ++w) {
      sD += acc_D[w];
      sBias += acc_bias[w];
    }
    as_ptr<float>(p.dD_part)[seq * p.dim + channel] = sD;
    as_ptr<float>(p.dbias_part)[seq * p.dim + channel] = sBias;
  }
}

// Launchers: compiled by nvcc only (emulation.cc builds the kernels above as host code).
#ifndef SSMK_SCAN_EMULATION
template <typename input_t, typename bc_t>
void launch_backward(const Params& p) {
  dim3 grid(static_cast<unsigned>(p.channel_count ? p.channel_count : p.dim), static_cast<unsigned>(p.num_seqs));
  const size_t smem = (2 * p.dstate + 8 * W + 3 * p.dstate * W + 2 * W + 2 * kExchange) * sizeof(float);
  auto kernel = backward_kernel<input_t, bc_t>;
  if (smem > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               "selective_scan backward: shared memory");
  }
  kernel<<<grid, kThreadsBwd, smem, as_stream(p.stream)>>>(p);
  check_launch("selective_scan backward_kernel");
}

#endif  // SSMK_SCAN_EMULATION

}  // namespace

#ifndef SSMK_SCAN_EMULATION
void backward(const Params& p) {
  if (p.num_seqs == 0 || p.dim == 0) return;
  if (p.num_seqs > 65535) throw std::invalid_argument("selective_scan cuda: at most 65535 sequences per call");
  SSMK_DISPATCH_FLOAT(p.dtype, "selective_scan u", [&] {
    using input_t = scalar_t;
    if (p.bc_dtype == p.dtype) {
      launch_backward<input_t, input_t>(p);
    } else if (static_cast<DType>(p.bc_dtype) == DType::kFloat32) {
      launch_backward<input_t, float>(p);
    } else {
      throw std::invalid_argument("selective_scan cuda: B and C must have u's dtype or float32");
    }
  });
}

#endif  // SSMK_SCAN_EMULATION

}  // namespace scan
}  // namespace ssmk
