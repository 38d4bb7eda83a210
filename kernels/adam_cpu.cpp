// The fused Adam/AdamW step on CPU tensors: kernels/adam_cuda.cu's device functions (adam_update, the lean master,
// the 8-bit codes), built for the host with cuda_host_shim.h and called per element in plain loops that g++
// vectorizes. adam_gpu/backends/cpu.py builds one specialization at a time (the driver it generates includes this
// file and names one adam_step_cpu<...>) and passes the same tensor table and parameters as the CUDA launch
// (adam_gpu/kernel_abi.py), after the number of threads.
//
// Threads (OpenMP) take whole chunks of the table; a chunk's elements run in order, 8-bit moments one quantization
// block at a time: every element decoded and updated into a local array while the block's absmax is formed, then
// every element encoded against it. fp16 params on an x86 CPU with F16C go through fp32 copies of a tile of
// params and grads (Widened), converted by the hardware.

#include "cuda_host_shim.h"
#include "adam_cuda.cu"
#ifdef __F16C__
#include <immintrin.h>
#endif

namespace adam_gpu {

// The scalars are taken by value and the tensors through __restrict__ pointers: the compiler then knows that no
// store changes them, keeps the scalars in registers and vectorizes the loop without run-time overlap checks.
// The pointers are the span's first elements.
template <typename P, typename S, bool AMSGRAD, int MASTER>
void step_span_cpu(P* __restrict__ param, const P* __restrict__ grad, S* __restrict__ exp_avg,
                   S* __restrict__ exp_avg_sq, S* __restrict__ max_exp_avg_sq,
                   typename MasterType<MASTER>::type* __restrict__ master, long long count, const StepScalars s) {
  using MasterT = typename MasterType<MASTER>::type;
  for (long long i = 0; i < count; ++i) {
    S no_max{};
    MasterT no_master{};
    step_element<P, S, AMSGRAD, MASTER>(param[i], grad[i], exp_avg[i], exp_avg_sq[i],
                                        AMSGRAD ? max_exp_avg_sq[i] : no_max,
                                        MASTER == kNoMaster ? no_master : master[i], s);
  }
}

// One quantization block of `count` elements (the pointers at its first), its absmaxes read and replaced.
template <typename P, int MASTER>
void step_quantized_span_cpu(P* __restrict__ param, const P* __restrict__ grad, unsigned char* __restrict__ exp_avg,
                             unsigned char* __restrict__ exp_avg_sq, typename MasterType<MASTER>::type* __restrict__ master,
                             float& exp_avg_absmax, float& exp_avg_sq_absmax, int count, const StepScalars s) {
  using MasterT = typename MasterType<MASTER>::type;
  const float m_scale = exp_avg_absmax, v_scale = exp_avg_sq_absmax;
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
  exp_avg_absmax = stored_absmax(m_max);
  exp_avg_sq_absmax = stored_absmax(v_max);
}

// Params of type P stepped as fp32 copies of kTile elements at a time: for fp16 with F16C, whose conversions are one
// instruction a vector where the shim's arithmetic takes about ten. Both round to nearest even, bit for bit alike
// (tests/test_host_shim.py checks every value); every half is a normal fp32, and an fp32 subnormal rounds to a zero
// half either way, so the MXCSR's denormal modes change neither.
template <typename P>
struct Widened {
  static constexpr bool value = false;
};
constexpr int kTile = kQuantBlock;
#ifdef __F16C__
template <>
struct Widened<__half> {
  static constexpr bool value = true;
};
inline void widen(const __half* halves, float* floats, int count) {
  int k = 0;
  for (; k + 8 <= count; k += 8) {
    _mm256_storeu_ps(floats + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(halves + k))));
  }
  for (; k < count; ++k) floats[k] = __half2float(halves[k]);
}
inline void narrow(const float* floats, __half* halves, int count) {
  int k = 0;
  for (; k + 8 <= count; k += 8) {
    const __m128i rounded = _mm256_cvtps_ph(_mm256_loadu_ps(floats + k), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(halves + k), rounded);
  }
  for (; k < count; ++k) halves[k] = __float2half_rn(floats[k]);
}
#endif

template <typename P, typename S, bool AMSGRAD, int MASTER>
void step_elements_cpu(const RowTensors<P, S>& t, long long start, long long stop, const StepScalars s) {
  using MasterT = typename MasterType<MASTER>::type;
  MasterT* master = MASTER == kNoMaster ? nullptr : static_cast<MasterT*>(t.master) + start;
  if constexpr (Widened<P>::value) {
    float param[kTile], grad[kTile];
    for (long long first = start; first < stop; first += kTile) {
      const int count = stop - first < kTile ? static_cast<int>(stop - first) : kTile;
      widen(t.param + first, param, count);
      widen(t.grad + first, grad, count);
      step_span_cpu<float, S, AMSGRAD, MASTER>(param, grad, t.exp_avg + first, t.exp_avg_sq + first,
                                               t.max_exp_avg_sq + first, master ? master + (first - start) : nullptr,
                                               count, s);
      narrow(param, t.param + first, count);
    }
  } else {
    step_span_cpu<P, S, AMSGRAD, MASTER>(t.param + start, t.grad + start, t.exp_avg + start, t.exp_avg_sq + start,
                                         t.max_exp_avg_sq + start, master, stop - start, s);
  }
}

template <typename P, int MASTER>
void step_quantized_block_cpu(const RowTensors<P, unsigned char>& t, long long block, long long n_elements,
                              const StepScalars s) {
  using MasterT = typename MasterType<MASTER>::type;
  const long long first = block * kQuantBlock;
  const int count = n_elements - first < kQuantBlock ? static_cast<int>(n_elements - first) : kQuantBlock;
  MasterT* master = MASTER == kNoMaster ? nullptr : static_cast<MasterT*>(t.master) + first;
  if constexpr (Widened<P>::value) {
    float param[kTile], grad[kTile];
    widen(t.param + first, param, count);
    widen(t.grad + first, grad, count);
    step_quantized_span_cpu<float, MASTER>(param, grad, t.exp_avg + first, t.exp_avg_sq + first, master,
                                           t.exp_avg_absmax[block], t.exp_avg_sq_absmax[block], count, s);
    narrow(param, t.param + first, count);
  } else {
    step_quantized_span_cpu<P, MASTER>(t.param + first, t.grad + first, t.exp_avg + first, t.exp_avg_sq + first,
                                       master, t.exp_avg_absmax[block], t.exp_avg_sq_absmax[block], count, s);
  }
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
