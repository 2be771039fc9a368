// Selective scan backward: one WARP per (sequence, channel), a block = kCh warps = kCh consecutive
// channels of one sequence; the forward's 2048-step chunks are walked in reverse, and inside a chunk
// the warp works on sub-chunks of kSub = 32 * kIt steps, lane j owning kIt consecutive steps.
// It serves the calls that the state-parallel backward (selective_scan_bwd_tiled.cu, 1.7-2x as
// fast) does not: fixed B/C, float32 B/C with 16-bit u, channel groups not a multiple of its
// blocks, N other than 16, 32, 64, and deterministic mode's per-channel slots.
//
// Math (per state index n). With a_t = exp(dt_t A), b_t = dt_t B_t u_t the forward is
// h_t = a_t h_{t-1} + b_t. The adjoint runs backwards on G_t = a_t g_t (what step t hands to t-1):
//   g_t = C_t dy_t + G_{t+1},   G at the sequence end = d(last_state),
// and G entering the sequence's first step is the gradient of the initial state. With g_t, h_{t-1}:
//   du_t += g_t dt_t B_t,  ddt_t += g_t (A a_t h_{t-1} + B_t u_t),  dA += g_t dt_t a_t h_{t-1},
//   dB_t += g_t dt_t u_t,  dC_t += dy_t h_t,  dy_t also feeds y_t = sum_n C_t h_t + D u_t (for dz).
//
// Why this layout (the previous kernel, one 256-thread block per channel with a block scan per n,
// two __syncthreads and serial cross-warp combines per n, and one float atomic per channel per
// element of input-dependent B/C, was latency- and atomic-bound):
// - A warp-level scan needs no block barrier: per (sub-chunk, n) a warp does a forward affine scan
//   for the states h_{t-1} (10 shuffles) and a reverse one for the adjoint (10 shuffles); the lane's
//   exclusive value comes from one shuffle of its neighbour's *applied* result (not 2 of the maps).
// - The sub-chunk's entering state: a cheap forward pre-pass per chunk, from the chunk's checkpoint
//   through its sub-chunks (fold + warp scan of the maps, no per-step replay), keeps the state
//   entering every sub-chunk per n in shared memory (hsub); the main pass walks the sub-chunks in
//   reverse, carrying the adjoint G per n in shared memory (carry). Only the warp's own lanes touch
//   its hsub/carry, so __syncwarp orders them (once per sub-chunk).
// - Input-dependent dB/dC sum over channels: the kCh warps of a block (channels of one B/C group)
//   stage their per-step values in shared memory, one barrier per n (double-buffered, so one
//   suffices), then each thread sums the kCh values in fixed warp order and issues one atomicAdd per
//   (row, group, n, t) per block: kCh times fewer atomics than one per channel, 32 consecutive
//   addresses per warp instruction. Deterministic mode (bc_grad_per_channel: each channel owns a
//   zeroed slot, see selective_scan.h) runs one warp per block, each storing its own slot (one
//   write per address, coalesced through the same staging).
// - Sums over steps (dA and fixed dB/dC) accumulate per lane in shared memory when n <= 32 (no
//   shuffles per sub-chunk; reduced once at the end), else per warp via warp_sum; dD and
//   ddelta_bias accumulate in registers. They go to the same per-(sequence, channel) partial
//   buffers as before.
// - Per-step values live in registers: dt, dt u, dy and the sums over n of g B, g A a h_{t-1} and
//   C h (6 kIt) across the n loop, from which du = D dy + dt sum(g B) and
//   ddt = sum(g A a h_{t-1}) + u sum(g B) (fewer FLOPs per element than accumulating du, ddt per n);
//   B, C, a, h (4 kIt) per n. u, the softplus and z derivatives are reloaded after the n loop
//   instead of being held through it. A lane's forward and reverse maps share their decay, the
//   product of its a_t, taken as one exp2 of its summed dt. Decays use ex2.approx.ftz.
// - kIt = 8: ptxas puts the kernel at 157-168 registers (capped at 168: 12 warps per SM, no
//   spills; a cap of 128 spills ~250 bytes). kIt = 16 would halve the shuffles per element but
//   doubles the per-step registers (not tried: it could not fit without spills).
// The launcher uses kCh = 4 when the channel count (of the launch) and the B/C groups allow it,
// outside deterministic mode, else one warp per block. Any l (l = 1, partial sub-chunks and chunks, empty varlen sequences:
// lanes past the end run identity steps and write nothing), fixed or input-dependent B/C, float32
// B/C with 16-bit u, any n.
#include "selective_scan/scan_common.cuh"

namespace ssmk {
namespace scan {
namespace {

constexpr int kItBwd = 8;         // steps per lane: kSub = 256-step sub-chunks, 8 per 2048-step chunk
constexpr int kLaneAccMaxN = 32;  // n up to which step sums accumulate per lane in shared memory
constexpr unsigned kFull = 0xffffffffu;

// Shared-memory layout of one block, in floats (the same function sizes it in the launcher).
struct BwdSmem {
  int64_t hsub, carry, accA, accB, accC, exchange, total;
};

__host__ __device__ inline BwdSmem bwd_smem_layout(const Params& p, int kCh, int kIt) {
  const int64_t n = p.dstate, subs = kChunk / (32 * kIt), lanes = n <= kLaneAccMaxN ? 32 : 1;
  BwdSmem m;
  int64_t o = 0;
  m.hsub = o;  o += kCh * subs * n;                  // [kCh][subs][n] state entering each sub-chunk
  m.carry = o; o += kCh * n;                         // [kCh][n] adjoint G from later steps
  m.accA = o;  o += kCh * n * lanes;                 // [kCh][n][lanes] dA sums
  m.accB = o;  if (p.b_fixed) o += kCh * n * lanes;  // fixed B: dB sums
  m.accC = o;  if (p.c_fixed) o += kCh * n * lanes;  // fixed C: dC sums
  m.exchange = o;                                    // [2 buffers][B, C][kCh][32 lanes][kIt + 1]
  if (!(p.b_fixed && p.c_fixed)) o += 2 * 2 * kCh * 32 * (kIt + 1);
  m.total = o;
  return m;
}

// Shared memory a block may take on sm_90 (227 KB).
constexpr int64_t kMaxSmemBytes = 227 * 1024;

// Channels (warps) per block: 4 when the launch's channels split into blocks of 4 that lie in one
// group of each input-dependent B/C (the block sums their dB/dC), else 1. Very large n (past ~1000,
// beyond Mamba's) also falls back to 1, whose shared memory is a quarter.
inline int backward_channels_per_block(const Params& p) {
  const int64_t count = p.channel_count ? p.channel_count : p.dim;
  if (count % 4 != 0 || p.channel_begin % 4 != 0) return 1;
  if (bwd_smem_layout(p, 4, kItBwd).total * static_cast<int64_t>(sizeof(float)) > kMaxSmemBytes) return 1;
  // Deterministic per-channel slots: one warp per block (no block sum; keeps the 4-warp kernel lean).
  if (p.bc_grad_per_channel) return 1;
  if (!p.b_fixed && p.channels_per_b_group % 4 != 0) return 1;
  if (!p.c_fixed && p.channels_per_c_group % 4 != 0) return 1;
  return 4;
}

// Blocks per SM the compiler must fit: 384 threads (12 warps), i.e. at most 168 registers per thread.
template <int kCh>
constexpr int kMinBlocks = 12 / kCh;

template <typename bc_t, int kIt>
__device__ __forceinline__ void load_bc(const bc_t* ptr, bool fixed, int valid, float (&out)[kIt]) {
  if (fixed) {
    const float v = to_float(*ptr);
#pragma unroll
    for (int i = 0; i < kIt; ++i) out[i] = i < valid ? v : 0.f;
  } else {
    load_items(ptr, valid, out);
  }
}

template <typename input_t, typename bc_t, int kIt, int kCh>
__global__ __launch_bounds__(32 * kCh, kMinBlocks<kCh>) void backward_kernel(const Params p) {
  constexpr int kSub = 32 * kIt;
  constexpr int kSubs = kChunk / kSub;
  constexpr int kPad = kIt + 1;  // a lane's run in the exchange rows, padded against bank conflicts
  constexpr int kRow = 32 * kPad;
  static_assert(kChunk % kSub == 0 && kIt % kCh == 0, "sub-chunks tile the chunk; threads tile a sub-chunk");
  extern __shared__ float smem[];
  const int n_state = static_cast<int>(p.dstate);  // <= 256 (validated by the op layer)
  const BwdSmem layout = bwd_smem_layout(p, kCh, kIt);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int lanes = n_state <= kLaneAccMaxN ? 32 : 1;
  float* hsub = smem + layout.hsub + warp * kSubs * n_state;
  float* carry = smem + layout.carry + warp * n_state;
  float* accA = smem + layout.accA + warp * n_state * lanes;
  float* accB = smem + layout.accB + warp * n_state * lanes;
  float* accC = smem + layout.accC + warp * n_state * lanes;
  float* exchange = smem + layout.exchange;

  const int64_t channel = p.channel_begin + static_cast<int64_t>(blockIdx.x) * kCh + warp;
  const int64_t seq = blockIdx.y;
  const Span span = sequence_span(p, seq);
  const int64_t state_offset = (seq * p.dim + channel) * n_state;
  const bool b_var = !p.b_fixed, c_var = !p.c_fixed;
  // Input-dependent dB/dC: summed over the block's warps (one group; the launcher never pairs kCh > 1
  // with deterministic slots), or per warp (one warp per block: atomics, or the deterministic
  // per-channel slots, written with plain stores).
  constexpr bool block_sum = kCh > 1;

  const float* A = as_ptr<const float>(p.A) + channel * n_state;
  const float bias = p.delta_bias ? as_ptr<const float>(p.delta_bias)[channel] : 0.f;
  const float D = p.D ? as_ptr<const float>(p.D)[channel] : 0.f;
  for (int n = lane; n < n_state; n += 32) {
    carry[n] = p.dlast_state ? as_ptr<const float>(p.dlast_state)[state_offset + n] : 0.f;
  }
  for (int i = lane; i < n_state * lanes; i += 32) {
    accA[i] = 0.f;
    if (p.b_fixed) accB[i] = 0.f;
    if (p.c_fixed) accC[i] = 0.f;
  }
  __syncwarp();

  const int64_t x_offset = span.row * p.x_batch_stride + channel * p.x_d_stride;
  const input_t* u_ptr = as_ptr<const input_t>(p.u) + x_offset;
  const input_t* delta_ptr = as_ptr<const input_t>(p.delta) + x_offset;
  const input_t* dout_ptr = as_ptr<const input_t>(p.dout) + x_offset;
  const input_t* z_ptr = p.z ? as_ptr<const input_t>(p.z) + x_offset : nullptr;
  const float* checkpoints = as_ptr<const float>(p.checkpoints);
  const int64_t grp_b = p.bc_grad_per_channel ? channel - p.channel_begin : channel / p.channels_per_b_group;
  const int64_t grp_c = p.bc_grad_per_channel ? channel - p.channel_begin : channel / p.channels_per_c_group;
  float* dB_seq = as_ptr<float>(p.dB) + (b_var ? span.row * p.dB_batch_stride + grp_b * p.dB_group_stride : 0);
  float* dC_seq = as_ptr<float>(p.dC) + (c_var ? span.row * p.dC_batch_stride + grp_c * p.dC_group_stride : 0);
  // B / C of this channel at n = 0 and t = 0 (fixed: its (d, n) row); + n * n_stride + t.
  const bc_t* B_base = BCPointer<bc_t>::at(p.B, p.b_fixed, span.row, channel, p.channels_per_b_group,
                                           p.B_batch_stride, p.B_group_stride, p.B_n_stride, 0, 0);
  const bc_t* C_base = BCPointer<bc_t>::at(p.C, p.c_fixed, span.row, channel, p.channels_per_c_group,
                                           p.C_batch_stride, p.C_group_stride, p.C_n_stride, 0, 0);
  const int64_t num_chunks = ceil_div(span.end - span.start, kChunk);
  float D_lane = 0.f, bias_lane = 0.f;
  int exchange_step = 0;

  for (int64_t kk = 0; kk < num_chunks; ++kk) {
    const int64_t k = num_chunks - 1 - kk;
    const int64_t chunk_start = span.start + k * kChunk;
    const int64_t chunk_len = span.end - chunk_start < kChunk ? span.end - chunk_start : kChunk;
    const int subs = static_cast<int>(ceil_div(chunk_len, kSub));
    const int64_t slot = span.slot0 + k;

    // Pre-pass: the state entering each sub-chunk, from the checkpoint (only the maps' totals).
    for (int n = lane; n < n_state; n += 32) hsub[n] = checkpoints[(slot * p.dim + channel) * n_state + n];
    __syncwarp();
    for (int s = 0; s + 1 < subs; ++s) {
      const int64_t t0 = chunk_start + s * kSub + lane * kIt;
      const int valid = items_in_range<kIt>(t0, span.end);
      const int64_t t_read = valid > 0 ? t0 : span.start;
      float dt[kIt], dtu[kIt], raw[kIt];
      load_items(u_ptr + t_read, valid, dtu);
      load_items(delta_ptr + t_read, valid, dt);
      step_sizes(dt, raw, bias, p.softplus, valid);
#pragma unroll
      for (int i = 0; i < kIt; ++i) dtu[i] *= dt[i];
#pragma unroll 1
      for (int n = 0; n < n_state; ++n) {
        const float A2 = A[n] * kLog2e;
        float Bv[kIt];
        load_bc(B_base + n * p.B_n_stride + (p.b_fixed ? 0 : t_read), p.b_fixed, valid, Bv);
        float fa = 1.f, fb = 0.f;
#pragma unroll
        for (int i = 0; i < kIt; ++i) {
          const float a = exp2_approx(dt[i] * A2);
          fb = fmaf(a, fb, dtu[i] * Bv[i]);
          fa *= a;
        }
        warp_scan_affine(fa, fb);
        if (lane == 31) hsub[(s + 1) * n_state + n] = fmaf(fa, hsub[s * n_state + n], fb);
      }
    }
    __syncwarp();

    // Main pass: sub-chunks in reverse.
    for (int s = subs - 1; s >= 0; --s) {
      const int64_t t_sub = chunk_start + s * kSub;
      const int64_t t0 = t_sub + lane * kIt;
      const int valid = items_in_range<kIt>(t0, span.end);
      const int64_t t_read = valid > 0 ? t0 : span.start;
      // Held through the n loop: dt, dt u, the gated dy, and per step the sums over n of g B
      // (gB), of g A a h_{t-1} (gAh) and of C h (y). Then du = D dy + dt gB, ddt = gAh + u gB.
      float dt[kIt], dtu[kIt], dy[kIt], gB[kIt], gAh[kIt], y[kIt];
      {
        float raw[kIt];
        load_items(u_ptr + t_read, valid, dtu);
        load_items(delta_ptr + t_read, valid, dt);
        step_sizes(dt, raw, bias, p.softplus, valid);
        load_items(dout_ptr + t_read, valid, dy);
        if (z_ptr) {
          float z[kIt];
          load_items(z_ptr + t_read, valid, z);
#pragma unroll
          for (int i = 0; i < kIt; ++i) dy[i] *= z[i] / (1.f + expf(-z[i]));
        }
      }
      float dt_lane = 0.f;
#pragma unroll
      for (int i = 0; i < kIt; ++i) {
        dtu[i] *= dt[i];
        dt_lane += dt[i];
        gB[i] = 0.f;
        gAh[i] = 0.f;
        y[i] = 0.f;
      }

      // Each block starts at another state index, so that blocks running side by side spread their
      // dB/dC atomics over n rows instead of all hitting the same addresses at once.
      int n = static_cast<int>(blockIdx.x % n_state);
#pragma unroll 1
      for (int step_n = 0; step_n < n_state; ++step_n, n = n + 1 == n_state ? 0 : n + 1) {
        const float An = A[n];
        const float A2 = An * kLog2e;
        float Bv[kIt], Cv[kIt], a[kIt], hs[kIt];
        load_bc(B_base + n * p.B_n_stride + (p.b_fixed ? 0 : t_read), p.b_fixed, valid, Bv);
        load_bc(C_base + n * p.C_n_stride + (p.c_fixed ? 0 : t_read), p.c_fixed, valid, Cv);
        // The lane's map is x -> fa x + fb forwards (states) and x -> fa x + rb backwards (adjoint):
        // both decay by the product of its a_t, exp(A * sum dt).
        float fa = exp2_approx(dt_lane * A2), fb = 0.f, rb = 0.f;
#pragma unroll
        for (int i = 0; i < kIt; ++i) {
          a[i] = exp2_approx(dt[i] * A2);
          fb = fmaf(a[i], fb, dtu[i] * Bv[i]);
        }
#pragma unroll
        for (int i = kIt - 1; i >= 0; --i) rb = a[i] * fmaf(Cv[i], dy[i], rb);
        float ra = fa;
        warp_scan_affine(fa, fb);
        warp_scan_affine_reverse(ra, rb);
        // State entering this lane's first step; G entering its last step from later steps: the
        // neighbour's inclusive map applied to the sub-chunk's boundary value.
        const float h_sub = hsub[s * n_state + n];
        const float g_later = carry[n];
        float h = __shfl_up_sync(kFull, fmaf(fa, h_sub, fb), 1);
        float x = __shfl_down_sync(kFull, fmaf(ra, g_later, rb), 1);
        if (lane == 0) h = h_sub;
        if (lane == 31) x = g_later;

        const float h_in = h;
#pragma unroll
        for (int i = 0; i < kIt; ++i) {
          h = fmaf(a[i], h, dtu[i] * Bv[i]);
          hs[i] = h;
          y[i] = fmaf(Cv[i], h, y[i]);
        }
        // Exchange buffer: alternates with every n over the whole kernel (not restarting per sub-chunk,
        // which for odd n would hand the same buffer to two consecutive steps).
        const int buf = exchange_step++ & 1;
        float* ex_B = exchange + ((buf * 2 + 0) * kCh + warp) * kRow + lane * kPad;
        float* ex_C = exchange + ((buf * 2 + 1) * kCh + warp) * kRow + lane * kPad;
        float dA_sum = 0.f, dB_sum = 0.f, dC_sum = 0.f;
#pragma unroll
        for (int i = kIt - 1; i >= 0; --i) {
          const float g = fmaf(Cv[i], dy[i], x);
          x = a[i] * g;
          const float g_decayed = g * (a[i] * (i > 0 ? hs[i - 1] : h_in));  // g_t a_t h_{t-1}
          gAh[i] = fmaf(g_decayed, An, gAh[i]);
          dA_sum = fmaf(g_decayed, dt[i], dA_sum);
          gB[i] = fmaf(g, Bv[i], gB[i]);
          const float grad_B = g * dtu[i], grad_C = dy[i] * hs[i];
          if (p.b_fixed) dB_sum += grad_B; else ex_B[i] = grad_B;
          if (p.c_fixed) dC_sum += grad_C; else ex_C[i] = grad_C;
        }
        if (lane == 0) carry[n] = x;  // G at the sub-chunk's first step (read after the __syncwarp below)
        if (lanes == 32) {
          accA[n * 32 + lane] += dA_sum;
          if (p.b_fixed) accB[n * 32 + lane] += dB_sum;
          if (p.c_fixed) accC[n * 32 + lane] += dC_sum;
        } else {
          dA_sum = warp_sum(dA_sum);
          if (p.b_fixed) dB_sum = warp_sum(dB_sum);
          if (p.c_fixed) dC_sum = warp_sum(dC_sum);
          if (lane == 0) {
            accA[n] += dA_sum;
            if (p.b_fixed) accB[n] += dB_sum;
            if (p.c_fixed) accC[n] += dC_sum;
          }
        }

        if (b_var || c_var) {
          // The staged rows of buffer `buf` are rewritten two steps later, after the next barrier.
          float* dB_row = dB_seq + n * p.dB_n_stride + t_sub;
          float* dC_row = dC_seq + n * p.dC_n_stride + t_sub;
          const int64_t left = span.end - t_sub;  // steps of the sub-chunk inside the sequence
          if constexpr (block_sum) {
            __syncthreads();
#pragma unroll
            for (int j = 0; j < kIt / kCh; ++j) {
              const int q = j * 32 * kCh + tid;  // step in the sub-chunk: consecutive across threads
              const int pos = (q / kIt) * kPad + q % kIt;
              if (q < left) {
                if (b_var) {
                  float sum = 0.f;
#pragma unroll
                  for (int w = 0; w < kCh; ++w) sum += exchange[((buf * 2 + 0) * kCh + w) * kRow + pos];
                  atomicAdd(dB_row + q, sum);
                }
                if (c_var) {
                  float sum = 0.f;
#pragma unroll
                  for (int w = 0; w < kCh; ++w) sum += exchange[((buf * 2 + 1) * kCh + w) * kRow + pos];
                  atomicAdd(dC_row + q, sum);
                }
              }
            }
          } else {
            __syncwarp();
#pragma unroll
            for (int j = 0; j < kIt; ++j) {
              const int q = j * 32 + lane;
              const int pos = (q / kIt) * kPad + q % kIt;
              if (q < left) {
                if (b_var) {
                  const float v = exchange[((buf * 2 + 0) * kCh + warp) * kRow + pos];
                  if (p.bc_grad_per_channel) dB_row[q] = v; else atomicAdd(dB_row + q, v);
                }
                if (c_var) {
                  const float v = exchange[((buf * 2 + 1) * kCh + warp) * kRow + pos];
                  if (p.bc_grad_per_channel) dC_row[q] = v; else atomicAdd(dC_row + q, v);
                }
              }
            }
          }
        }
      }

      // The softplus and z derivatives and u, from reloads (not held through the n loop).
      float du[kIt];
      {
        float raw[kIt], u[kIt], go[kIt], zv[kIt];
        load_items(delta_ptr + t_read, valid, raw);
        load_items(u_ptr + t_read, valid, u);
        if (z_ptr) {
          load_items(dout_ptr + t_read, valid, go);
          load_items(z_ptr + t_read, valid, zv);
        }
#pragma unroll
        for (int i = 0; i < kIt; ++i) {
          du[i] = fmaf(D, dy[i], dt[i] * gB[i]);
          const float sg = i < valid ? (p.softplus ? sigmoid(raw[i] + bias) : 1.f) : 0.f;
          gAh[i] = sg * fmaf(u[i], gB[i], gAh[i]);  // ddelta
          bias_lane += gAh[i];
          D_lane = fmaf(dy[i], u[i], D_lane);
          if (z_ptr) {
            const float sig = sigmoid(zv[i]);
            y[i] = fmaf(D, u[i], y[i]) * go[i] * sig * (1.f + zv[i] * (1.f - sig));  // dz
          }
        }
      }
      if (valid > 0) {
        store_items(as_ptr<input_t>(p.du) + x_offset + t0, valid, du);
        store_items(as_ptr<input_t>(p.ddelta) + x_offset + t0, valid, gAh);
        if (z_ptr) store_items(as_ptr<input_t>(p.dz) + x_offset + t0, valid, y);
      }
      __syncwarp();  // carry written by lane 0 -> read by every lane in the next (earlier) sub-chunk
    }
  }

  for (int n = lane; n < n_state; n += 32) {
    if (p.dinitial_state) as_ptr<float>(p.dinitial_state)[state_offset + n] = carry[n];
    float sA = 0.f, sB = 0.f, sC = 0.f;
    for (int j = 0; j < lanes; ++j) {
      sA += accA[n * lanes + j];
      if (p.b_fixed) sB += accB[n * lanes + j];
      if (p.c_fixed) sC += accC[n * lanes + j];
    }
    as_ptr<float>(p.dA_part)[state_offset + n] = sA;
    if (p.b_fixed) as_ptr<float>(p.dB)[state_offset + n] = sB;
    if (p.c_fixed) as_ptr<float>(p.dC)[state_offset + n] = sC;
  }
  D_lane = warp_sum(D_lane);
  bias_lane = warp_sum(bias_lane);
  if (lane == 0) {
    as_ptr<float>(p.dD_part)[seq * p.dim + channel] = D_lane;
    as_ptr<float>(p.dbias_part)[seq * p.dim + channel] = bias_lane;
  }
}

// Launchers: compiled by nvcc only (emulation.cc builds the kernels above as host code).
#ifndef SSMK_SCAN_EMULATION
template <typename input_t, typename bc_t, int kCh>
void launch_backward_blocks(const Params& p) {
  const int64_t count = p.channel_count ? p.channel_count : p.dim;
  dim3 grid(static_cast<unsigned>(count / kCh), static_cast<unsigned>(p.num_seqs));
  const size_t smem = static_cast<size_t>(bwd_smem_layout(p, kCh, kItBwd).total) * sizeof(float);
  if (static_cast<int64_t>(smem) > kMaxSmemBytes) {
    throw std::invalid_argument("selective_scan cuda backward: d_state " + std::to_string(p.dstate) +
                                " needs more shared memory than a block has (" + std::to_string(smem) + " bytes)");
  }
  auto kernel = backward_kernel<input_t, bc_t, kItBwd, kCh>;
  if (smem > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               "selective_scan backward: shared memory");
  }
  kernel<<<grid, 32 * kCh, smem, as_stream(p.stream)>>>(p);
  check_launch("selective_scan backward_kernel");
}

template <typename input_t, typename bc_t>
void launch_backward(const Params& p) {
  if (backward_channels_per_block(p) == 4) {
    launch_backward_blocks<input_t, bc_t, 4>(p);
  } else {
    launch_backward_blocks<input_t, bc_t, 1>(p);
  }
}

#endif  // SSMK_SCAN_EMULATION

}  // namespace

#ifndef SSMK_SCAN_EMULATION
void backward(const Params& p) {
  if (p.num_seqs == 0 || p.dim == 0) return;
  if (backward_tiled(p)) return;
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
