// Selective scan (Mamba-1, SPEC.md section 2): params struct and launchers. Torch-free: the Python
// side (ssmkernels/ops/selective_scan/cuda.py) fills every field from tensors.
//
// Layout contract (the op layer makes these tensors contiguous): u, delta, z, out (b, d, l) with
// unit stride along l; B, C either fixed (d, n) or input-dependent (b, g, n, l) with unit stride
// along l (a shared (b, n, l) is g = 1 with group stride 0); A (d, n), D (d,), delta_bias (d,),
// initial_state / last_state (s, d, n) and checkpoints (slots, d, n) are float32.
#pragma once

#include <cstdint>

namespace ssmk {
namespace scan {

// The checkpoint interval: the forward stores the state entering every kChunk steps of each
// sequence, from which the backward recomputes the states (one warp scans one channel in both).
constexpr int kChunk = 2048;

struct Params {
  int64_t batch = 0, dim = 0, seqlen = 0, dstate = 0;
  int64_t num_seqs = 0;         // batch rows, or sequences of cu_seqlens
  int64_t chunks_per_row = 0;   // ceil(seqlen / kChunk): checkpoint slots of one batch row
  int dtype = 0;                // ssmk::DType of u, delta, z, out (and of the gradients du, ddelta, dz)
  int bc_dtype = 0;             // ssmk::DType of B and C (the same dtype for both)
  bool b_fixed = false, c_fixed = false, softplus = false;
  int64_t channels_per_b_group = 1, channels_per_c_group = 1;

  std::uintptr_t u = 0, delta = 0, z = 0, out = 0;        // (b, d, l)
  std::uintptr_t A = 0, B = 0, C = 0, D = 0, delta_bias = 0;
  std::uintptr_t initial_state = 0, last_state = 0, checkpoints = 0;
  std::uintptr_t cu_seqlens = 0;                          // int32 (s + 1,) or 0
  // (b, d, l) in u's dtype, or 0: the output before the z gate (y + D u), written by the forward
  // when asked (z given, a backward to come) and read by the state-parallel backward, whose dz
  // (= pregate dout silu'(z)) then needs no sum over the states of y (see selective_scan_bwd_tiled.cu).
  std::uintptr_t out_pre = 0;
  int64_t x_batch_stride = 0, x_d_stride = 0;             // shared by u, delta, z, out (contiguous)
  // B and C: fixed -> (d_stride in group_stride, n_stride); varying -> (batch, group, n).
  int64_t B_batch_stride = 0, B_group_stride = 0, B_n_stride = 0;
  int64_t C_batch_stride = 0, C_group_stride = 0, C_n_stride = 0;

  // Backward only.
  std::uintptr_t dout = 0, dlast_state = 0;
  std::uintptr_t du = 0, ddelta = 0, dz = 0, dinitial_state = 0;  // written
  std::uintptr_t dA_part = 0, dD_part = 0, dbias_part = 0;          // (s, d, n), (s, d), (s, d) float32
  std::uintptr_t dB = 0, dC = 0;  // float32: fixed -> (s, d, n) partials; varying -> (b, g, n, l) atomics
  int64_t dB_batch_stride = 0, dB_group_stride = 0, dB_n_stride = 0;
  int64_t dC_batch_stride = 0, dC_group_stride = 0, dC_n_stride = 0;
  // Deterministic mode (varying B/C): one launch per slice of channels [channel_begin, channel_begin +
  // channel_count), and dB/dC index their "group" axis by channel - channel_begin, so every address
  // gets exactly one add (onto zeros): bitwise reproducible; the caller sums the slots in fixed order.
  // channel_count 0: every channel, grouped as usual.
  int64_t channel_begin = 0, channel_count = 0;
  bool bc_grad_per_channel = false;
  // Workspace of the state-parallel backward (backward_workspace_floats() float32 values, 0 when it
  // takes none): the state entering every 8-step sub-tile of the chunk it is working on, per block.
  std::uintptr_t tile_states = 0;

  std::uintptr_t stream = 0;
};

void forward(const Params& params);
// The state-parallel forward (selective_scan_fwd_tiled.cu) when it serves the call; false otherwise.
bool forward_tiled(const Params& params);
// The state-parallel backward (selective_scan_bwd_tiled.cu) when it serves the call and its
// workspace is given; false otherwise.
bool backward_tiled(const Params& params);
// Float32 values of workspace (Params::tile_states) the backward of this call takes; 0: none.
int64_t backward_workspace_floats(const Params& params);
void backward(const Params& params);

}  // namespace scan
}  // namespace ssmk
