// Single-pass fused Adam/AdamW step in CUDA C, compiled at run time by NVRTC (cupy.RawModule).
//
// One launch updates many tensors through a table of their addresses: blocks take chunks of one
// tensor (grid-stride), threads load param, grad, exp_avg, exp_avg_sq (and max_exp_avg_sq) 16 bytes of
// params at a time where every pointer allows, do the step in fp32, and store param and moments
// rounded to nearest even in their storage types; single elements take the tail (and whole tensors
// whose pointers are not aligned). Indices are 64-bit. The step is elementwise: no shared memory, no
// __syncthreads, no atomics; only 8-bit moments make a warp cooperate (shuffles find a quantization
// block's absmax).
//
// Specializations are template instantiations named by NVRTC name expressions, e.g.
//   adam_gpu::adam_step<__nv_bfloat16, float, true, 0>
// (param type, moment type, amsgrad, master mode): only what changes the types or the memory traffic. The
// weight-decay mode and maximize are run-time values, uniform across a launch (docs/kernel-abi.md).
//
// The table's columns, the device scalars, the modes (kL2, kLeanMaster ...) and the kernel's parameter list
// (ADAM_GPU_STEP_PARAMETERS) are defined by adam_gpu/kernel_abi.py, and the storage formats' block sizes
// (kQuantBlock) by adam_gpu/storage_formats.py, whose definitions adam_gpu/backends/cuda_source.py puts before
// this file.
//
// The same file builds on the host with g++ and tests/cuda_host_shim.h, which defines
// ADAM_GPU_HOST_BUILD: the tests run it on the CPU through the shared correctness tests (the threads of a
// block as OS threads where warps shuffle).

#ifndef ADAM_GPU_HOST_BUILD
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace adam_gpu {

// The per-step scalars of adam_gpu.hyperparameters.StepScalars, formed in float64 on the host, and the launch's
// modes.
struct StepScalars {
  float one_minus_beta1;
  float one_minus_beta2;
  float eps;
  float l2_weight_decay;
  float param_decay;
  float step_size;
  float bias_correction2_sqrt;
  // 1, or from the device: 1 / AMP grad scale x clip coefficient; negated to maximize (-(g x) is g (-x) exactly).
  float grad_multiplier;
  int weight_decay;  // kNoWeightDecay, kL2 or kDecoupled
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// fp32 -> storage type, rounding to nearest even.
template <typename T>
struct Store;
template <>
struct Store<float> {
  static __device__ __forceinline__ float from(float x) { return x; }
};
template <>
struct Store<__half> {
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Store<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

// The lean master: fp32 bits = (bf16 bits << 16) + signed 16-bit remainder.
__device__ __forceinline__ float lean_master(__nv_bfloat16 param, short remainder) {
  const unsigned int high = static_cast<unsigned int>(__bfloat16_as_ushort(param)) << 16;
  return __uint_as_float(high + static_cast<unsigned int>(static_cast<int>(remainder)));
}

// The bf16 param rounded half-up on the bits (so the remainder fits int16: [-0x8000, 0x7FFF]; the param is
// still within half an ulp) and the remainder that restores `value` exactly. NaN stays NaN.
__device__ __forceinline__ void split_lean_master(float value, __nv_bfloat16& param, short& remainder) {
  const unsigned int bits = __float_as_uint(value);
  const unsigned int param_bits = value != value ? ((bits >> 16) | 0x40u) : ((bits + 0x8000u) >> 16);
  param = __ushort_as_bfloat16(static_cast<unsigned short>(param_bits));
  remainder = static_cast<short>(static_cast<unsigned short>((bits - (param_bits << 16)) & 0xFFFFu));
}

// max that propagates NaN, as torch.maximum does.
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

// start + weight * (end - start) formed from the nearer end, as torch.lerp does: weight 1 (beta 0) gives
// end exactly, and a bf16 moment then rounds as torch's. From the end it is end + (weight - 1) * (end - start)
// (weight - 1 is exact for weight >= 0.5). Written as one product and a select of its operands, not two
// branches: the weight is uniform, and the compiler keeps one loop body for both ends (docs/kernel-abi.md).
__device__ __forceinline__ float lerp_from_nearer_end(float start, float end, float weight) {
  const bool from_start = weight < 0.5f;
  return (from_start ? start : end) + (from_start ? weight : weight - 1.0f) * (end - start);
}

template <bool AMSGRAD>
__device__ __forceinline__ void adam_update(float& p, float g, float& m, float& v, float& v_max,
                                            const StepScalars& s) {
  g *= s.grad_multiplier;
  if (s.weight_decay == kL2) g += s.l2_weight_decay * p;
  if (s.weight_decay == kDecoupled) p *= s.param_decay;
  // The textbook beta * m + (1 - beta) * g written as a lerp: see StepScalars in hyperparameters.py.
  m = lerp_from_nearer_end(m, g, s.one_minus_beta1);
  // An infinite v stays infinite (NaN with a NaN grad), as in torch's beta2 * v + (1 - beta2) * g²;
  // the lerp alone would give Inf - Inf.
  v = isinf(v) ? v + s.one_minus_beta2 * g * g : lerp_from_nearer_end(v, g * g, s.one_minus_beta2);
  float second_moment = v;
  if (AMSGRAD) {
    v_max = nan_max(v_max, v);
    second_moment = v_max;
  }
  const float denom = sqrtf(second_moment) / s.bias_correction2_sqrt + s.eps;
  p -= s.step_size * (m / denom);
}

// 8-bit moments (adam_gpu/quantization.py): uint8 codes of a 256-entry ascending map, one fp32 absmax per
// kQuantBlock elements (defined by adam_gpu/storage_formats.py). The moment type S is `unsigned char` exactly when
// the moments are quantized.
template <typename S>
struct IsCode {
  static constexpr bool value = false;
};
template <>
struct IsCode<unsigned char> {
  static constexpr bool value = true;
};

// m[k], the map's non-negative value of magnitude code k, bit for bit the fp32 map's entry. The maps are small
// float formats divided by their largest value, 1.875 (a sign, 4 exponent and 3 mantissa bits for exp_avg; 5 and 3
// for exp_avg_sq; adam_gpu/quantization.py). A magnitude code shifted into fp32's exponent and mantissa fields is
// the format's value times 2^(bias - 127), subnormals included; times 2^64 it is a normal fp32, exactly. The
// division by 1.875 (times the powers of two) is a product by its rounded reciprocal and one FMA correction, which
// rounds as the division would: the map's bits for all 256 codes of both maps (tests/test_quantization.py checks
// every one), where the product alone differs for 96.
template <bool SIGNED>
__device__ __forceinline__ float magnitude_value(unsigned int magnitude_code) {
  // 2^(127 - 64 - bias) / 1.875 rounded to fp32, and its exact inverse 1.875 * 2^(64 + bias - 127); bias 15 or 31.
  constexpr float kReciprocal = SIGNED ? 150119995408384.0f : 2290649344.0f;
  constexpr float kDivisor = SIGNED ? 6.661338147750939e-15f : 4.3655745685100555e-10f;
  const float scaled = __uint_as_float(magnitude_code << 20) * 18446744073709551616.0f;  // 2^64
  const float quotient = scaled * kReciprocal;
  return fmaf(fmaf(-quotient, kDivisor, scaled), kReciprocal, quotient);
}

// The map entry of `code` from its bits, no map read: entries 128 + k of the signed map hold +m[k] and 127 - k hold
// -m[k]; the unsigned map's entry k is m[k].
template <bool SIGNED>
__device__ __forceinline__ float code_value(unsigned int code) {
  if (!SIGNED) return magnitude_value<false>(code);
  // 127 - code below 128 and code - 128 from it are code ^ 0x7F and code ^ 0x80; the sign bit is ~code's top bit.
  const float value = magnitude_value<true>(code ^ (0x7Fu + (code >> 7)));
  return __uint_as_float(__float_as_uint(value) | (~code << 24 & 0x80000000u));  // (the sign bit: 127 is -0.0)
}

// The map entry nearest to x (the lower one on a tie), no map read. The bits of |x| * 1.875 (the format's own scale)
// give the magnitude code k of the last entry <= |x|, off by one only within a few ulps of an entry, where the
// nearer of m[k] and m[k + 1] is that entry anyway. The distances are those of the map's own rule,
// (upper - x) < (x - lower), on magnitudes: rounding to nearest is symmetric, so for a negative x the same two
// distances decide, and a tie goes to the larger magnitude (the lower code). The rule on the map's own pairs gave the
// same code as a binary search of the map for every fp32 x in [-1.0001, 1.0001] (all 2^31, checked in numpy),
// and on magnitudes it takes the same decisions; tests/test_quantization.py checks this function at
// every decision point.
template <bool SIGNED>
__device__ __forceinline__ unsigned char nearest_code(float x) {
  // Exponent bias 15 or 31: smallest normal 2^-14 or 2^-30, subnormal step that / 8.
  constexpr float kSmallestNormal = SIGNED ? 6.103515625e-05f : 9.313225746154785e-10f;
  constexpr float kPerSubnormalStep = SIGNED ? 131072.0f : 8589934592.0f;  // 2^17, 2^33
  constexpr int kExponentOffset = SIGNED ? (127 - 15) << 3 : (127 - 31) << 3;  // fp32's bias to the format's
  constexpr int kLargest = SIGNED ? 127 : 255;
  const float distance = fabsf(x);
  const float magnitude = distance * 1.875f;  // on the format's own scale: largest (1 + 7/8) * 2^0
  // Exponent and top 3 mantissa bits of a normal are its code; a subnormal's is its multiple of the step (the
  // magnitude capped first, so the conversion never overflows).
  const int normal = static_cast<int>(__float_as_uint(magnitude) >> 20) - kExponentOffset;
  const int subnormal = static_cast<int>(fminf(magnitude, kSmallestNormal) * kPerSubnormalStep);
  int low = magnitude >= kSmallestNormal ? normal : subnormal;
  low = low < 0 ? 0 : (low > kLargest - 1 ? kLargest - 1 : low);  // the lower candidate, below the largest
  const float up = magnitude_value<SIGNED>(low + 1) - distance;
  const float down = distance - magnitude_value<SIGNED>(low);
  if (!SIGNED) return static_cast<unsigned char>(low + (up < down));
  return static_cast<unsigned char>(x >= 0.0f ? 128 + low + (up < down) : 127 - low - (up <= down));
}

// N consecutive elements, aligned so that one pack is one (or, for fp32 moments beside 16-bit params,
// two) 16-byte memory transactions.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T lane[N];
};

template <int N, typename T>
__device__ __forceinline__ bool aligned_for(const T* ptr) {
  return reinterpret_cast<unsigned long long>(ptr) % (sizeof(T) * N) == 0;
}

// N consecutive elements from `first`: one pack load (`whole`: all inside the tensor and aligned) or N single ones.
template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* data, long long first, long long n_elements, bool whole) {
  if (whole) return *reinterpret_cast<const Pack<T, N>*>(data + first);
  Pack<T, N> pack{};
#pragma unroll
  for (int k = 0; k < N; ++k) {
    if (first + k < n_elements) pack.lane[k] = data[first + k];
  }
  return pack;
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* data, const Pack<T, N>& pack, long long first, long long n_elements,
                                           bool whole) {
  if (whole) {
    *reinterpret_cast<Pack<T, N>*>(data + first) = pack;
    return;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {
    if (first + k < n_elements) data[first + k] = pack.lane[k];
  }
}

// The element type of the master copy: fp32, or the lean master's int16 remainder.
template <int MASTER>
struct MasterType {
  using type = float;
};
template <>
struct MasterType<kLeanMaster> {
  using type = short;
};

// One quantization block by one warp, every element read and written once. Lane l holds elements 8l .. 8l + 7 of
// the block in registers: one 16-byte load of bf16 params (two of fp32) and one 8-byte load of each moment's codes
// a lane, where the block lies inside its tensor and every address is aligned (else single elements, masked). The
// warp's max of |m| and |v| (shuffles) is the block's new absmax; then every lane writes its codes (params are
// written as soon as they are updated). The whole warp calls this together (the shuffles need all 32 lanes): the
// block loop is uniform in a warp.
constexpr int kWarp = 32;
constexpr int kPerLane = kQuantBlock / kWarp;

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xFFFFFFFFu, x, offset));
  return x;
}

template <typename P, int MASTER>
__device__ __forceinline__ void step_quantized_block(P* param, const P* grad, unsigned char* exp_avg,
                                                     unsigned char* exp_avg_sq, float* exp_avg_absmax,
                                                     float* exp_avg_sq_absmax, void* master, long long block,
                                                     long long n_elements, int lane, bool aligned,
                                                     const StepScalars& s) {
  using MasterT = typename MasterType<MASTER>::type;
  const float infinity = __uint_as_float(0x7F800000u);
  const long long first = block * kQuantBlock + lane * kPerLane;
  const bool whole = aligned && (block + 1) * kQuantBlock <= n_elements;
  const float m_scale = exp_avg_absmax[block], v_scale = exp_avg_sq_absmax[block];
  Pack<P, kPerLane> p = load_pack<kPerLane>(param, first, n_elements, whole);
  const Pack<P, kPerLane> g = load_pack<kPerLane>(grad, first, n_elements, whole);
  Pack<unsigned char, kPerLane> m_codes = load_pack<kPerLane>(exp_avg, first, n_elements, whole);
  Pack<unsigned char, kPerLane> v_codes = load_pack<kPerLane>(exp_avg_sq, first, n_elements, whole);
  MasterT* master_copy = static_cast<MasterT*>(master);
  Pack<MasterT, kPerLane> full;
  if constexpr (MASTER != kNoMaster) full = load_pack<kPerLane>(master_copy, first, n_elements, whole);
  float m[kPerLane], v[kPerLane];
  float m_max = 0.0f, v_max = 0.0f;  // a NaN or Inf moment counts as Inf: the block's absmax is then NaN
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    float pk;
    if constexpr (MASTER == kFp32Master) {
      pk = full.lane[k];
    } else if constexpr (MASTER == kLeanMaster) {
      pk = lean_master(p.lane[k], full.lane[k]);
    } else {
      pk = to_float(p.lane[k]);
    }
    m[k] = code_value<true>(m_codes.lane[k]) * m_scale;
    v[k] = code_value<false>(v_codes.lane[k]) * v_scale;
    float unused = 0.0f;
    adam_update<false>(pk, to_float(g.lane[k]), m[k], v[k], unused, s);
    if constexpr (MASTER == kLeanMaster) {
      split_lean_master(pk, p.lane[k], full.lane[k]);
    } else {
      p.lane[k] = Store<P>::from(pk);
    }
    if constexpr (MASTER == kFp32Master) full.lane[k] = pk;
    if (first + k < n_elements) {  // (elements past the tensor's end have no moments to count)
      m_max = fmaxf(m_max, isfinite(m[k]) ? fabsf(m[k]) : infinity);
      v_max = fmaxf(v_max, isfinite(v[k]) ? fabsf(v[k]) : infinity);
    }
  }
  store_pack<kPerLane>(param, p, first, n_elements, whole);  // the param needs no absmax: written now, not kept
  if constexpr (MASTER != kNoMaster) store_pack<kPerLane>(master_copy, full, first, n_elements, whole);
  m_max = warp_max(m_max);
  v_max = warp_max(v_max);
  const float m_divisor = m_max > 0.0f ? m_max : 1.0f, v_divisor = v_max > 0.0f ? v_max : 1.0f;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    m_codes.lane[k] = nearest_code<true>(m[k] / m_divisor);
    v_codes.lane[k] = nearest_code<false>(v[k] / v_divisor);
  }
  store_pack<kPerLane>(exp_avg, m_codes, first, n_elements, whole);
  store_pack<kPerLane>(exp_avg_sq, v_codes, first, n_elements, whole);
  if (lane == 0) {  // quantization.py: a block holding a non-finite moment gets absmax NaN
    exp_avg_absmax[block] = m_max == infinity ? nanf("") : m_max;
    exp_avg_sq_absmax[block] = v_max == infinity ? nanf("") : v_max;
  }
}

// Tells the compiler that `ptr` (an address read from the tensor table, which it cannot trace) is in global
// memory. Only for addresses that are: a wrong assumption is undefined behaviour.
template <typename T>
__device__ __forceinline__ void assume_global(const T* ptr) {
  __builtin_assume(__isGlobal(ptr));
}

// Update the N elements of pack number `index` (element index * N onwards).
template <int N, typename P, typename S, bool AMSGRAD, int MASTER>
__device__ __forceinline__ void step_pack(P* param, const P* grad, S* exp_avg, S* exp_avg_sq, S* max_exp_avg_sq,
                                          void* master, long long index, const StepScalars& s) {
  Pack<P, N> p = reinterpret_cast<const Pack<P, N>*>(param)[index];
  const Pack<P, N> g = reinterpret_cast<const Pack<P, N>*>(grad)[index];
  Pack<S, N> m = reinterpret_cast<const Pack<S, N>*>(exp_avg)[index];
  Pack<S, N> v = reinterpret_cast<const Pack<S, N>*>(exp_avg_sq)[index];
  Pack<S, N> v_max;
  if (AMSGRAD) v_max = reinterpret_cast<const Pack<S, N>*>(max_exp_avg_sq)[index];
  Pack<float, N> full;   // kFp32Master
  Pack<short, N> low;    // kLeanMaster
  if constexpr (MASTER == kFp32Master) full = reinterpret_cast<const Pack<float, N>*>(master)[index];
  if constexpr (MASTER == kLeanMaster) low = reinterpret_cast<const Pack<short, N>*>(master)[index];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    float pk;
    if constexpr (MASTER == kFp32Master) {
      pk = full.lane[k];
    } else if constexpr (MASTER == kLeanMaster) {
      pk = lean_master(p.lane[k], low.lane[k]);
    } else {
      pk = to_float(p.lane[k]);
    }
    float mk = to_float(m.lane[k]);
    float vk = to_float(v.lane[k]);
    float v_max_k = AMSGRAD ? to_float(v_max.lane[k]) : 0.0f;
    adam_update<AMSGRAD>(pk, to_float(g.lane[k]), mk, vk, v_max_k, s);
    if constexpr (MASTER == kLeanMaster) {
      split_lean_master(pk, p.lane[k], low.lane[k]);
    } else {
      p.lane[k] = Store<P>::from(pk);
    }
    if constexpr (MASTER == kFp32Master) full.lane[k] = pk;
    m.lane[k] = Store<S>::from(mk);
    v.lane[k] = Store<S>::from(vk);
    if (AMSGRAD) v_max.lane[k] = Store<S>::from(v_max_k);
  }
  reinterpret_cast<Pack<P, N>*>(param)[index] = p;
  reinterpret_cast<Pack<S, N>*>(exp_avg)[index] = m;
  reinterpret_cast<Pack<S, N>*>(exp_avg_sq)[index] = v;
  if (AMSGRAD) reinterpret_cast<Pack<S, N>*>(max_exp_avg_sq)[index] = v_max;
  if constexpr (MASTER == kFp32Master) reinterpret_cast<Pack<float, N>*>(master)[index] = full;
  if constexpr (MASTER == kLeanMaster) reinterpret_cast<Pack<short, N>*>(master)[index] = low;
}

// The tensor whose chunks include `chunk`: the last t with chunk_offsets[t] <= chunk.
__device__ __forceinline__ int tensor_of_chunk(long long chunk, const long long* chunk_offsets, int n_tensors) {
  int low = 0, high = n_tensors;
  while (high - low > 1) {
    const int middle = (low + high) / 2;
    if (chunk_offsets[middle] <= chunk) {
      low = middle;
    } else {
      high = middle;
    }
  }
  return low;
}

// One launch updates every tensor of a table (adam_gpu/backends/tensor_table.py): pointers [T][kRowWidth] (the
// addresses of the columns k...Column), numels [T], chunk_offsets [T + 1]. Blocks stride over the chunks
// (chunk_size elements of one tensor, a multiple of 8); threads over a chunk's packs.
//
// device_step (capturable mode): lr is device_scalars[kLr] and each tensor's step count (float) is read
// through the table; the kernel forms step_size, bias_correction2_sqrt and param_decay itself.
// grad_scaling (AMP, fused clipping): grads are multiplied by device_scalars[kGradMultiplier], and nothing is
// written when device_scalars[kFoundInf] is not zero. These, weight_decay and maximize are run-time values,
// uniform across the launch.
template <typename P, typename S, bool AMSGRAD, int MASTER>
__global__ void adam_step(ADAM_GPU_STEP_PARAMETERS) {
  if (grad_scaling && device_scalars[kFoundInf] != 0.0f) return;  // found_inf: leave everything as it was
  constexpr int kPack = 16 / sizeof(P);  // params per 16-byte load
  for (long long chunk = blockIdx.x; chunk < n_chunks; chunk += gridDim.x) {
    const int tensor = tensor_of_chunk(chunk, chunk_offsets, n_tensors);
    const long long* row = pointers + static_cast<long long>(kRowWidth) * tensor;
    const float grad_multiplier = grad_scaling ? device_scalars[kGradMultiplier] : 1.0f;
    StepScalars s{one_minus_beta1, one_minus_beta2, eps, l2_weight_decay, param_decay, step_size,
                  bias_correction2_sqrt, maximize ? -grad_multiplier : grad_multiplier, weight_decay};
    if (device_step) {
      const float lr = device_scalars[kLr];
      const float* step_count = reinterpret_cast<const float*>(row[kStepColumn]);
      assume_global(step_count);
      const float step = *step_count;
      // 1 - beta^step as -expm1(step ln beta): 1 - exp(...) cancels in fp32 (StepScalars).
      s.step_size = lr / -expm1f(step * ln_beta1);
      s.bias_correction2_sqrt = sqrtf(-expm1f(step * ln_beta2));
      s.param_decay = 1.0f - lr * decoupled_weight_decay;
    }
    P* param = reinterpret_cast<P*>(row[kParamColumn]);
    const P* grad = reinterpret_cast<const P*>(row[kGradColumn]);
    S* exp_avg = reinterpret_cast<S*>(row[kExpAvgColumn]);
    S* exp_avg_sq = reinterpret_cast<S*>(row[kExpAvgSqColumn]);
    S* max_exp_avg_sq = reinterpret_cast<S*>(row[kMaxExpAvgSqColumn]);
    void* master = reinterpret_cast<void*>(row[kMasterColumn]);
    // The table's addresses are torch's device allocations: global memory. Said so, loads and stores are
    // ld.global/st.global (LDG/STG) rather than generic ones, which first test the address space.
    assume_global(param);
    assume_global(grad);
    assume_global(exp_avg);
    assume_global(exp_avg_sq);
    assume_global(max_exp_avg_sq);  // (exp_avg_sq again without amsgrad: never 0)
    if constexpr (MASTER != kNoMaster) assume_global(master);
    const long long start = (chunk - chunk_offsets[tensor]) * chunk_size;
    const long long stop = start + chunk_size < numels[tensor] ? start + chunk_size : numels[tensor];
    if constexpr (IsCode<S>::value) {
      // A warp per quantization block (blockDim.x is a multiple of 32); chunk_size is a multiple of
      // kQuantBlock, so blocks never straddle chunks.
      const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
      float* exp_avg_absmax = reinterpret_cast<float*>(row[kExpAvgAbsmaxColumn]);
      float* exp_avg_sq_absmax = reinterpret_cast<float*>(row[kExpAvgSqAbsmaxColumn]);
      assume_global(exp_avg_absmax);
      assume_global(exp_avg_sq_absmax);
      using MasterT = typename MasterType<MASTER>::type;
      const bool aligned = aligned_for<kPerLane>(param) && aligned_for<kPerLane>(grad) &&
                           aligned_for<kPerLane>(exp_avg) && aligned_for<kPerLane>(exp_avg_sq) &&
                           (MASTER == kNoMaster || aligned_for<kPerLane>(static_cast<const MasterT*>(master)));
      for (long long block = start / kQuantBlock + warp; block * kQuantBlock < stop; block += warps) {
        step_quantized_block<P, MASTER>(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, master,
                                        block, numels[tensor], lane, aligned, s);
      }
    } else {
      const bool vectorized = aligned_for<kPack>(param) && aligned_for<kPack>(grad) && aligned_for<kPack>(exp_avg) &&
                              aligned_for<kPack>(exp_avg_sq) && (!AMSGRAD || aligned_for<kPack>(max_exp_avg_sq)) &&
                              (MASTER != kFp32Master || aligned_for<kPack>(static_cast<const float*>(master))) &&
                              (MASTER != kLeanMaster || aligned_for<kPack>(static_cast<const short*>(master)));
      // Whole packs from `start` (a multiple of kPack) up to `packed_stop`, then single elements.
      const long long packed_stop = vectorized ? start + (stop - start) / kPack * kPack : start;
      for (long long i = start / kPack + threadIdx.x; i < packed_stop / kPack; i += blockDim.x) {
        step_pack<kPack, P, S, AMSGRAD, MASTER>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, i, s);
      }
      for (long long i = packed_stop + threadIdx.x; i < stop; i += blockDim.x) {
        step_pack<1, P, S, AMSGRAD, MASTER>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, i, s);
      }
    }
  }
}

}  // namespace adam_gpu
