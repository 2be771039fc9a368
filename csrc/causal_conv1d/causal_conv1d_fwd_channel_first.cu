// causal_conv1d forward for channel-first x (x.stride(2) == 1), and the final states (SPEC.md section 1).
//
// One block per (channel, batch row or cu_seqlens sequence) walks the sequence in chunks of
// kFirstThreads * kPer positions; each thread owns kPer consecutive positions (two 16-byte loads
// when aligned) and takes the w-1 inputs before them from its left neighbour through shared memory
// (thread 0 from the previous chunk, or from the initial states).
//
// Packed sequences: with seq_idx an input feeds an output only when both carry the same seq_idx
// (initial states count as the row's first sequence); with cu_seqlens each block walks one
// sequence from its own initial states. Math in float32; weight and bias may have their own dtype.
#include <climits>
#include <stdexcept>
#include <string>

#include "causal_conv1d/causal_conv1d.h"
#include "causal_conv1d/kernel_utils.cuh"
#include "common.h"

namespace ssmk {
namespace conv {
namespace {

constexpr int kFirstThreads = 128;
// Two 16-byte loads per thread per chunk: twice the bytes in flight of one, which a bandwidth-bound
// kernel needs at the occupancy its registers allow (6 blocks of 128 threads per SM).
constexpr int kVecsPerThread = 2;
constexpr int kChunksPerSplit = 8;

template <int kWidth>
struct Filter {
  float w[kWidth];
  float bias;
  __device__ __forceinline__ Filter(const ForwardParams& p, int64_t c) {
#pragma unroll
    for (int k = 0; k < kWidth; ++k)
      w[k] = load_as_float(p.weight, p.weight_dtype, c * p.weight_c_stride + k * p.weight_width_stride);
    bias = p.bias ? load_as_float(p.bias, p.bias_dtype, c * p.bias_stride) : 0.0f;
  }
};

// ------------------------------------------------------------------------------ channel-first
template <typename T, int kWidth>
__global__ void __launch_bounds__(kFirstThreads, 6) forward_channel_first_kernel(ForwardParams p, bool vec_ok,
                                                                                      int64_t num_groups,
                                                                                      int64_t split_len) {
  constexpr int kElts = Vec16<T>::kElts;
  constexpr int kPer = kVecsPerThread * kElts;  // consecutive positions per thread
  constexpr int kHist = kWidth - 1;
  constexpr int kChunk = kFirstThreads * kPer;
  static_assert(kPer >= kHist, "a thread must hold at least w-1 positions");
  __shared__ float tail[kFirstThreads + 1][kHist];
  __shared__ int tail_seq[kFirstThreads + 1][kHist];

  const int64_t c = static_cast<int64_t>(blockIdx.x) % p.dim;
  const int64_t rest = static_cast<int64_t>(blockIdx.x) / p.dim;
  const int64_t group = rest % num_groups;  // batch row, or sequence (varlen)
  const int64_t split = rest / num_groups;  // which split_len-long piece of the sequence
  const int tid = threadIdx.x;
  const int32_t* cu = reinterpret_cast<const int32_t*>(p.cu_seqlens);
  const int64_t row = cu ? 0 : group;
  const int64_t seq_start = cu ? cu[group] : 0;
  const int64_t seq_end = cu ? cu[group + 1] : p.seqlen;
  const int64_t start = seq_start + split * split_len;
  const int64_t end = start + split_len < seq_end ? start + split_len : seq_end;
  const T* x = reinterpret_cast<const T*>(p.x) + row * p.x_batch_stride + c * p.x_c_stride;
  T* out = reinterpret_cast<T*>(p.out) + row * p.out_batch_stride + c * p.out_c_stride;
  const int32_t* seq = p.seq_idx ? reinterpret_cast<const int32_t*>(p.seq_idx) + row * p.seq_batch_stride : nullptr;
  const Filter<kWidth> f(p, c);

  if (tid == 0) {
    if (split == 0) {  // the sequence's start: its initial states
      const int first_seq = (seq && seq_end > seq_start) ? seq[seq_start * p.seq_l_stride] : 0;
      const T* init = reinterpret_cast<const T*>(p.initial_states);
#pragma unroll
      for (int k = 0; k < kHist; ++k) {
        tail[0][k] = init ? to_float(init[group * p.init_batch_stride + c * p.init_c_stride + k * p.init_l_stride])
                          : 0.0f;
        tail_seq[0][k] = first_seq;
      }
    } else {  // a later piece: the w-1 inputs before it
#pragma unroll
      for (int k = 0; k < kHist; ++k) {
        const int64_t v = start - kHist + k;
        tail[0][k] = to_float(x[v * p.x_l_stride]);
        tail_seq[0][k] = seq ? seq[v * p.seq_l_stride] : 0;
      }
    }
  }
  const bool vec = vec_ok && start % kElts == 0;

  for (int64_t chunk = start; chunk < end; chunk += kChunk) {
    const int64_t p0 = chunk + static_cast<int64_t>(tid) * kPer;
    const bool full_vec = vec && p0 + kPer <= end;
    float xv[kPer];  // inputs, then (in place) outputs
    int sv[kPer];
    if (full_vec) {
#pragma unroll
      for (int v = 0; v < kVecsPerThread; ++v) load_vec(x + p0 + v * kElts, xv + v * kElts);
    } else {
#pragma unroll
      for (int i = 0; i < kPer; ++i) xv[i] = p0 + i < end ? to_float(x[(p0 + i) * p.x_l_stride]) : 0.0f;
    }
    if (seq) {
#pragma unroll
      for (int i = 0; i < kPer; ++i) sv[i] = p0 + i < end ? seq[(p0 + i) * p.seq_l_stride] : INT_MIN;
    }
#pragma unroll
    for (int k = 0; k < kHist; ++k) {
      tail[tid + 1][k] = xv[kPer - kHist + k];
      if (seq) tail_seq[tid + 1][k] = sv[kPer - kHist + k];
    }
    __syncthreads();
    float prev[kHist];
    int prev_seq[kHist];
#pragma unroll
    for (int k = 0; k < kHist; ++k) {
      prev[k] = tail[tid][k];
      prev_seq[k] = seq ? tail_seq[tid][k] : 0;
    }
    // Last position first, so that xv[i] can take its output: lower entries are still inputs.
#pragma unroll
    for (int i = kPer - 1; i >= 0; --i) {
      float acc = f.bias;
#pragma unroll
      for (int k = 0; k < kWidth; ++k) {
        const int idx = i - kHist + k;  // < 0: from the left neighbour
        float value = idx < 0 ? prev[kHist + idx] : xv[idx];
        if (seq && (idx < 0 ? prev_seq[kHist + idx] : sv[idx]) != sv[i]) value = 0.0f;
        acc += f.w[k] * value;
      }
      xv[i] = p.silu ? silu(acc) : acc;
    }
    if (full_vec) {
#pragma unroll
      for (int v = 0; v < kVecsPerThread; ++v) store_vec(out + p0 + v * kElts, xv + v * kElts);
    } else {
#pragma unroll
      for (int i = 0; i < kPer; ++i)
        if (p0 + i < end) out[(p0 + i) * p.out_l_stride] = from_float<T>(xv[i]);
    }
    __syncthreads();
    if (tid == kFirstThreads - 1) {
#pragma unroll
      for (int k = 0; k < kHist; ++k) {
        tail[0][k] = tail[kFirstThreads][k];
        tail_seq[0][k] = tail_seq[kFirstThreads][k];
      }
    }
  }
}

// ------------------------------------------------------------------------------ final states
// final[r, c, m] = input at position end - (w-1) + m of row r's last sequence (sequence r with
// cu_seqlens); positions before that sequence's start come from its initial states when it has
// them (the row's first sequence, or every sequence with cu_seqlens), else zero.
template <typename T>
__global__ void final_states_kernel(ForwardParams p, int hist) {
  const int64_t r = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.dim) return;
  const SequenceSpan span = sequence_span(p.cu_seqlens, r, p.seqlen);
  const int64_t row = span.row, start = span.start, end = span.end;
  const T* x = reinterpret_cast<const T*>(p.x) + row * p.x_batch_stride + c * p.x_c_stride;
  const T* init = reinterpret_cast<const T*>(p.initial_states);
  const int32_t* seq = p.seq_idx ? reinterpret_cast<const int32_t*>(p.seq_idx) + row * p.seq_batch_stride : nullptr;
  bool last_is_first = true;
  int last_seq = 0;
  if (seq && end > 0) {
    last_seq = seq[(end - 1) * p.seq_l_stride];
    last_is_first = last_seq == seq[0];
  }
  T* final_ptr = reinterpret_cast<T*>(p.final_states) + r * p.final_batch_stride + c * p.final_c_stride;
  for (int m = 0; m < hist; ++m) {
    const int64_t u = end - hist + m;
    float value = 0.0f;
    if (u >= start) {
      if (!seq || seq[u * p.seq_l_stride] == last_seq) value = to_float(x[u * p.x_l_stride]);
    } else if (init && last_is_first) {
      value = to_float(init[r * p.init_batch_stride + c * p.init_c_stride + (hist + u - start) * p.init_l_stride]);
    }
    final_ptr[m * p.final_l_stride] = from_float<T>(value);
  }
}

int64_t groups_of(const ForwardParams& p) { return p.cu_seqlens ? p.num_seqs : p.batch; }

}  // namespace

void forward_channel_first(const ForwardParams& p) {
  if (forward_plain(p)) return;
  const int64_t groups = groups_of(p);
  if (groups == 0 || p.dim == 0 || p.seqlen == 0) return;
  SSMK_DISPATCH_FLOAT(p.dtype, "causal_conv1d_fwd", [&] {
    SSMK_DISPATCH_WIDTH(static_cast<int>(p.width), "causal_conv1d_fwd", [&] {
      constexpr int kElts = Vec16<scalar_t>::kElts;
      // Long rows are cut into pieces of kChunksPerSplit chunks, one block each, so that few
      // (batch, channel) pairs still fill the GPU. cu_seqlens sequences are not cut (their lengths
      // are on the device; cutting by the total length would launch mostly empty blocks).
      const int64_t split_len = p.cu_seqlens ? p.seqlen : int64_t{kChunksPerSplit} * kFirstThreads * kVecsPerThread * kElts;
      const int64_t splits = ceil_div(p.seqlen, split_len);
      const int64_t blocks = groups * p.dim * splits;
      if (blocks > INT_MAX) throw std::invalid_argument("causal_conv1d_fwd: input too large for the grid");
      const bool vec_ok = p.x_l_stride == 1 && p.out_l_stride == 1 && aligned16(p.x) && aligned16(p.out) &&
                          p.x_batch_stride % kElts == 0 && p.x_c_stride % kElts == 0 &&
                          p.out_batch_stride % kElts == 0 && p.out_c_stride % kElts == 0;
      forward_channel_first_kernel<scalar_t, kWidth>
          <<<static_cast<unsigned>(blocks), kFirstThreads, 0, as_stream(p.stream)>>>(p, vec_ok, groups, split_len);
      check_launch("causal_conv1d_fwd (channel-first)");
    });
  });
}

void final_states(const ForwardParams& p) {
  const int64_t count = groups_of(p);
  if (count == 0 || p.dim == 0 || p.width < 2) return;
  if (count > 65535) throw std::invalid_argument("causal_conv1d_fwd: at most 65535 final states");
  SSMK_DISPATCH_FLOAT(p.dtype, "causal_conv1d_final_states", [&] {
    constexpr int kThreads = 128;
    dim3 grid(static_cast<unsigned>(ceil_div(p.dim, kThreads)), static_cast<unsigned>(count));
    final_states_kernel<scalar_t><<<grid, kThreads, 0, as_stream(p.stream)>>>(p, static_cast<int>(p.width - 1));
    check_launch("causal_conv1d_final_states");
  });
}

}  // namespace conv
}  // namespace ssmk
