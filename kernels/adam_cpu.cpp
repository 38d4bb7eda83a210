// The fused Adam/AdamW step on CPU tensors: kernels/adam_cuda.cu's device functions (adam_update, the lean master,
// the 8-bit codes), built for the host with cuda_host_shim.h and called per element in plain loops that g++
// vectorizes. adam_gpu/backends/cpu.py builds one specialization at a time (the driver it generates includes this
// file and names one adam_step_cpu<...>) and passes the same tensor table and parameters as the CUDA launch
// (adam_gpu/kernel_abi.py), after the number of threads.
//
// Threads (OpenMP) take whole chunks of the table; a chunk's elements run in order, 8-bit moments one quantization
// block at a time: every element decoded and updated into a local array while the block's absmax is formed, then
// every element encoded against it.

#include "cuda_host_shim.h"
#include "adam_cuda.cu"

namespace adam_gpu {

// The scalars are taken by value and the tensors through __restrict__ pointers: the compiler then knows that no
// store changes them, keeps the scalars in registers and vectorizes the loop without run-time overlap checks.
template <typename P, typename S, bool AMSGRAD, int MASTER>
void step_elements_cpu(const RowTensors<P, S>& t, long long start, long long stop, const StepScalars s) {
  using MasterT = typename MasterType<MASTER>::type;
  P* __restrict__ param = t.param;
  const P* __restrict__ grad = t.grad;
  S* __restrict__ exp_avg = t.exp_avg;
  S* __restrict__ exp_avg_sq = t.exp_avg_sq;
  S* __restrict__ max_exp_avg_sq = t.max_exp_avg_sq;  // (exp_avg_sq's address without amsgrad: then never used)
  MasterT* __restrict__ master = static_cast<MasterT*>(t.master);
  for (long long i = start; i < stop; ++i) {
    S no_max{};
    MasterT no_master{};
    step_element<P, S, AMSGRAD, MASTER>(param[i], grad[i], exp_avg[i], exp_avg_sq[i],
                                        AMSGRAD ? max_exp_avg_sq[i] : no_max,
                                        MASTER == kNoMaster ? no_master : master[i], s);
  }
}

template <typename P, int MASTER>
void step_quantized_block_cpu(const RowTensors<P, unsigned char>& t, long long block, long long n_elements,
                              const StepScalars s) {
  using MasterT = typename MasterType<MASTER>::type;
  const long long first = block * kQuantBlock;
  const int count = n_elements - first < kQuantBlock ? static_cast<int>(n_elements - first) : kQuantBlock;
  P* __restrict__ param = t.param + first;
  const P* __restrict__ grad = t.grad + first;
  unsigned char* __restrict__ exp_avg = t.exp_avg + first;
  unsigned char* __restrict__ exp_avg_sq = t.exp_avg_sq + first;
  MasterT* __restrict__ master = static_cast<MasterT*>(t.master) + (MASTER == kNoMaster ? 0 : first);
  const float m_scale = t.exp_avg_absmax[block], v_scale = t.exp_avg_sq_absmax[block];
  float m[kQuantBlock], v[kQuantBlock];
  unsigned int m_bits = 0, v_bits = 0;
  for (int k = 0; k < count; ++k) {
    MasterT none{};
    step_quantized_element<P, MASTER>(param[k], grad[k], MASTER == kNoMaster ? none : master[k], exp_avg[k],
                                      exp_avg_sq[k], m_scale, v_scale, m[k], v[k], s);
    m_bits = larger(m_bits, magnitude_bits(m[k]));
    v_bits = larger(v_bits, magnitude_bits(v[k]));
  }
  const float m_max = __uint_as_float(m_bits), v_max = __uint_as_float(v_bits);
  const float m_reciprocal = block_reciprocal(m_max), v_reciprocal = block_reciprocal(v_max);
  for (int k = 0; k < count; ++k) encode_moments(m[k], v[k], m_reciprocal, v_reciprocal, exp_avg[k], exp_avg_sq[k]);
  t.exp_avg_absmax[block] = stored_absmax(m_max);
  t.exp_avg_sq_absmax[block] = stored_absmax(v_max);
}

// The whole step of one launch: every chunk of the table, `threads` at a time.
template <typename P, typename S, bool AMSGRAD, int MASTER>
void adam_step_cpu(int threads, ADAM_GPU_STEP_PARAMETERS) {
  if (step_skipped(grad_scaling, device_scalars)) return;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && n_chunks > 1)
  for (long long chunk = 0; chunk < n_chunks; ++chunk) {
    const int tensor = tensor_of_chunk(chunk, chunk_offsets, n_tensors);
    const long long* row = pointers + static_cast<long long>(kRowWidth) * tensor;
    const StepScalars s = tensor_scalars(row, ADAM_GPU_STEP_ARGUMENTS);
    const RowTensors<P, S> t = row_tensors<P, S, MASTER>(row);
    const ChunkRange range = chunk_range(chunk, tensor, chunk_offsets, numels, chunk_size);
    if constexpr (IsCode<S>::value) {  // (chunk_size is a multiple of kQuantBlock: blocks never straddle chunks)
      for (long long block = range.start / kQuantBlock; block * kQuantBlock < range.stop; ++block) {
        step_quantized_block_cpu<P, MASTER>(t, block, numels[tensor], s);
      }
    } else {
      step_elements_cpu<P, S, AMSGRAD, MASTER>(t, range.start, range.stop, s);
    }
  }
}

}  // namespace adam_gpu
