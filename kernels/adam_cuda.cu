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

// V_FINITE: v is known finite or NaN (a decoded 8-bit moment: a map entry times its block's absmax), so the Inf
// case is left out.
template <bool AMSGRAD, bool V_FINITE = false>
__device__ __forceinline__ void adam_update(float& p, float g, float& m, float& v, float& v_max,
                                            const StepScalars& s) {
  g *= s.grad_multiplier;
  if (s.weight_decay == kL2) g += s.l2_weight_decay * p;
  if (s.weight_decay == kDecoupled) p *= s.param_decay;
  // The textbook beta * m + (1 - beta) * g written as a lerp: see StepScalars in hyperparameters.py.
  m = lerp_from_nearer_end(m, g, s.one_minus_beta1);
  // An infinite v stays infinite (NaN with a NaN grad), as in torch's beta2 * v + (1 - beta2) * g²;
  // the lerp alone would give Inf - Inf.
  v = !V_FINITE && isinf(v) ? v + s.one_minus_beta2 * g * g : lerp_from_nearer_end(v, g * g, s.one_minus_beta2);
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
  // magnitude capped first, so the conversion never overflows; a NaN is capped too, as fminf would, by a select
  // that g++ vectorizes where fminf is a libm call).
  const int normal = static_cast<int>(__float_as_uint(magnitude) >> 20) - kExponentOffset;
  const float capped = magnitude < kSmallestNormal ? magnitude : kSmallestNormal;
  const int subnormal = static_cast<int>(capped * kPerSubnormalStep);
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

// The value a param is stepped from: its fp32 master copy, its lean master (the bf16 param and its remainder), or
// the param itself.
template <int MASTER, typename P>
__device__ __forceinline__ float param_value(P param, typename MasterType<MASTER>::type master) {
  if constexpr (MASTER == kFp32Master) {
    return master;
  } else if constexpr (MASTER == kLeanMaster) {
    return lean_master(param, master);
  } else {
    return to_float(param);
  }
}

// The stepped value `p` stored: as the param rounded (and the fp32 master), or split into the bf16 param and its
// remainder.
template <int MASTER, typename P>
__device__ __forceinline__ void store_param(float p, P& param, typename MasterType<MASTER>::type& master) {
  if constexpr (MASTER == kLeanMaster) {
    split_lean_master(p, param, master);
  } else {
    param = Store<P>::from(p);
  }
  if constexpr (MASTER == kFp32Master) master = p;
}

// One element's step with moments of type S (not 8-bit): the GPU's packs (step_pack) and the CPU's loop
// (kernels/adam_cpu.cpp) call it for each element. max_exp_avg_sq is read and written only with AMSGRAD, master
// only with a MASTER mode.
template <typename P, typename S, bool AMSGRAD, int MASTER>
__device__ __forceinline__ void step_element(P& param, P grad, S& exp_avg, S& exp_avg_sq, S& max_exp_avg_sq,
                                             typename MasterType<MASTER>::type& master, const StepScalars& s) {
  float p = param_value<MASTER>(param, master);
  float m = to_float(exp_avg), v = to_float(exp_avg_sq);
  float v_max = AMSGRAD ? to_float(max_exp_avg_sq) : 0.0f;
  adam_update<AMSGRAD>(p, to_float(grad), m, v, v_max, s);
  store_param<MASTER>(p, param, master);
  exp_avg = Store<S>::from(m);
  exp_avg_sq = Store<S>::from(v);
  if (AMSGRAD) max_exp_avg_sq = Store<S>::from(v_max);
}

// A quantization block's step in two halves per element, which the GPU's warp version (step_quantized_block) and
// the CPU's loop (kernels/adam_cpu.cpp) both call: decode and update every element (step_quantized_element), the
// block's new absmax the max of their magnitude_bits, then encode every element against it (encode_moments).

// One element's step: its moments decoded from their codes and block scales, updated with the param (its master
// where it has one), the param and master stored; `m` and `v` get the new fp32 moments, to encode once the block's
// absmax is known.
template <typename P, int MASTER>
__device__ __forceinline__ void step_quantized_element(P& param, P grad, typename MasterType<MASTER>::type& master,
                                                       unsigned char m_code, unsigned char v_code, float m_scale,
                                                       float v_scale, float& m, float& v, const StepScalars& s) {
  float p = param_value<MASTER>(param, master);
  m = code_value<true>(m_code) * m_scale;
  v = code_value<false>(v_code) * v_scale;
  float unused = 0.0f;
  adam_update<false, true>(p, to_float(grad), m, v, unused, s);
  store_param<MASTER>(p, param, master);
}

// A moment's |x| as the bits of a non-negative float, a NaN or Inf as Inf's (the block's absmax is then NaN):
// unsigned integers order these as the floats do, so a block's absmax is an integer max, which g++ vectorizes (a
// float max with fmaxf's NaN rule is a libm call there).
__device__ __forceinline__ unsigned int magnitude_bits(float x) {
  const unsigned int bits = __float_as_uint(x) & 0x7FFFFFFFu;
  return bits < 0x7F800000u ? bits : 0x7F800000u;
}

__device__ __forceinline__ unsigned int larger(unsigned int a, unsigned int b) { return a > b ? a : b; }

// What a block's elements are multiplied by before encoding: the IEEE reciprocal of its absmax (the max of their
// magnitude_bits), 1 for an all-zero block. One division a block, as in the Triton kernel, not one an element.
__device__ __forceinline__ float block_reciprocal(float absmax) { return 1.0f / (absmax > 0.0f ? absmax : 1.0f); }

// The absmax stored for a block: quantization.py gives a block holding a non-finite moment absmax NaN.
__device__ __forceinline__ float stored_absmax(float absmax) {
  return absmax == __uint_as_float(0x7F800000u) ? nanf("") : absmax;
}

__device__ __forceinline__ void encode_moments(float m, float v, float m_reciprocal, float v_reciprocal,
                                               unsigned char& m_code, unsigned char& v_code) {
  m_code = nearest_code<true>(m * m_reciprocal);
  v_code = nearest_code<false>(v * v_reciprocal);
}

// One quantization block by one warp, every element read and written once. Lane l holds elements 8l .. 8l + 7 of
// the block in registers: one 16-byte load of bf16 params (two of fp32) and one 8-byte load of each moment's codes
// a lane, where the block lies inside its tensor and every address is aligned (else single elements, masked). The
// warp's max of the lanes' magnitudes (shuffles) is the block's new absmax; then every lane writes its codes
// (params are written as soon as they are updated). The whole warp calls this together (the shuffles need all 32
// lanes): the block loop is uniform in a warp.
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
  const long long first = block * kQuantBlock + lane * kPerLane;
  const bool whole = aligned && (block + 1) * kQuantBlock <= n_elements;
  const float m_scale = exp_avg_absmax[block], v_scale = exp_avg_sq_absmax[block];
  Pack<P, kPerLane> p = load_pack<kPerLane>(param, first, n_elements, whole);
  const Pack<P, kPerLane> g = load_pack<kPerLane>(grad, first, n_elements, whole);
  Pack<unsigned char, kPerLane> m_codes = load_pack<kPerLane>(exp_avg, first, n_elements, whole);
  Pack<unsigned char, kPerLane> v_codes = load_pack<kPerLane>(exp_avg_sq, first, n_elements, whole);
  MasterT* master_copy = static_cast<MasterT*>(master);
  Pack<MasterT, kPerLane> full{};
  if constexpr (MASTER != kNoMaster) full = load_pack<kPerLane>(master_copy, first, n_elements, whole);
  float m[kPerLane], v[kPerLane];
  unsigned int m_bits = 0, v_bits = 0;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    step_quantized_element<P, MASTER>(p.lane[k], g.lane[k], full.lane[k], m_codes.lane[k], v_codes.lane[k], m_scale,
                                      v_scale, m[k], v[k], s);
    if (first + k < n_elements) {  // (elements past the tensor's end have no moments to count)
      m_bits = larger(m_bits, magnitude_bits(m[k]));
      v_bits = larger(v_bits, magnitude_bits(v[k]));
    }
  }
  store_pack<kPerLane>(param, p, first, n_elements, whole);  // the param needs no absmax: written now, not kept
  if constexpr (MASTER != kNoMaster) store_pack<kPerLane>(master_copy, full, first, n_elements, whole);
  const float m_max = warp_max(__uint_as_float(m_bits)), v_max = warp_max(__uint_as_float(v_bits));
  const float m_reciprocal = block_reciprocal(m_max), v_reciprocal = block_reciprocal(v_max);
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    encode_moments(m[k], v[k], m_reciprocal, v_reciprocal, m_codes.lane[k], v_codes.lane[k]);
  }
  store_pack<kPerLane>(exp_avg, m_codes, first, n_elements, whole);
  store_pack<kPerLane>(exp_avg_sq, v_codes, first, n_elements, whole);
  if (lane == 0) {
    exp_avg_absmax[block] = stored_absmax(m_max);
    exp_avg_sq_absmax[block] = stored_absmax(v_max);
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
  using MasterT = typename MasterType<MASTER>::type;
  Pack<P, N> p = reinterpret_cast<const Pack<P, N>*>(param)[index];
  const Pack<P, N> g = reinterpret_cast<const Pack<P, N>*>(grad)[index];
  Pack<S, N> m = reinterpret_cast<const Pack<S, N>*>(exp_avg)[index];
  Pack<S, N> v = reinterpret_cast<const Pack<S, N>*>(exp_avg_sq)[index];
  Pack<S, N> v_max{};
  if (AMSGRAD) v_max = reinterpret_cast<const Pack<S, N>*>(max_exp_avg_sq)[index];
  Pack<MasterT, N> full{};  // the fp32 master or the lean master's remainder
  if constexpr (MASTER != kNoMaster) full = reinterpret_cast<const Pack<MasterT, N>*>(master)[index];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    step_element<P, S, AMSGRAD, MASTER>(p.lane[k], g.lane[k], m.lane[k], v.lane[k], v_max.lane[k], full.lane[k], s);
  }
  reinterpret_cast<Pack<P, N>*>(param)[index] = p;
  reinterpret_cast<Pack<S, N>*>(exp_avg)[index] = m;
  reinterpret_cast<Pack<S, N>*>(exp_avg_sq)[index] = v;
  if (AMSGRAD) reinterpret_cast<Pack<S, N>*>(max_exp_avg_sq)[index] = v_max;
  if constexpr (MASTER != kNoMaster) reinterpret_cast<Pack<MasterT, N>*>(master)[index] = full;
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

// What a launch shares with the CPU driver (kernels/adam_cpu.cpp): the tensors of a table's row, the step's
// scalars for one of them, and the elements of a chunk.

// A row's addresses (Column) as the tensors they point to (exp_avg_sq again as max_exp_avg_sq without amsgrad;
// null for a part the param does not have).
template <typename P, typename S>
struct RowTensors {
  P* param;
  const P* grad;
  S* exp_avg;
  S* exp_avg_sq;
  S* max_exp_avg_sq;
  void* master;
  float* exp_avg_absmax;
  float* exp_avg_sq_absmax;
};

// The table's addresses are torch's device allocations: global memory. Said so, loads and stores are
// ld.global/st.global (LDG/STG) rather than generic ones, which first test the address space.
template <typename P, typename S, int MASTER>
__device__ __forceinline__ RowTensors<P, S> row_tensors(const long long* row) {
  RowTensors<P, S> t{reinterpret_cast<P*>(row[kParamColumn]),
                     reinterpret_cast<const P*>(row[kGradColumn]),
                     reinterpret_cast<S*>(row[kExpAvgColumn]),
                     reinterpret_cast<S*>(row[kExpAvgSqColumn]),
                     reinterpret_cast<S*>(row[kMaxExpAvgSqColumn]),
                     reinterpret_cast<void*>(row[kMasterColumn]),
                     reinterpret_cast<float*>(row[kExpAvgAbsmaxColumn]),
                     reinterpret_cast<float*>(row[kExpAvgSqAbsmaxColumn])};
  assume_global(t.param);
  assume_global(t.grad);
  assume_global(t.exp_avg);
  assume_global(t.exp_avg_sq);
  assume_global(t.max_exp_avg_sq);  // (exp_avg_sq again without amsgrad: never 0)
  if constexpr (MASTER != kNoMaster) assume_global(t.master);
  if constexpr (IsCode<S>::value) {
    assume_global(t.exp_avg_absmax);
    assume_global(t.exp_avg_sq_absmax);
  }
  return t;
}

// found_inf (grad_scaling): the launch leaves everything as it was.
__device__ __forceinline__ bool step_skipped(int grad_scaling, const float* device_scalars) {
  return grad_scaling && device_scalars[kFoundInf] != 0.0f;
}

// The step's scalars for the tensor of `row`: the launch's, with the device's grad multiplier (grad_scaling), and
// in capturable mode (device_step) step_size, bias_correction2_sqrt and param_decay formed from the device's lr
// and the tensor's step count (a float, through the table).
__device__ __forceinline__ StepScalars tensor_scalars(const long long* row, ADAM_GPU_STEP_PARAMETERS) {
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
  return s;
}

// Chunk `chunk` of tensor `tensor`: its elements [start, stop).
struct ChunkRange {
  long long start, stop;
};
__device__ __forceinline__ ChunkRange chunk_range(long long chunk, int tensor, const long long* chunk_offsets,
                                                  const long long* numels, long long chunk_size) {
  const long long start = (chunk - chunk_offsets[tensor]) * chunk_size;
  return {start, start + chunk_size < numels[tensor] ? start + chunk_size : numels[tensor]};
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
  if (step_skipped(grad_scaling, device_scalars)) return;
  constexpr int kPack = 16 / sizeof(P);  // params per 16-byte load
  for (long long chunk = blockIdx.x; chunk < n_chunks; chunk += gridDim.x) {
    const int tensor = tensor_of_chunk(chunk, chunk_offsets, n_tensors);
    const long long* row = pointers + static_cast<long long>(kRowWidth) * tensor;
    const StepScalars s = tensor_scalars(row, ADAM_GPU_STEP_ARGUMENTS);
    const RowTensors<P, S> t = row_tensors<P, S, MASTER>(row);
    const ChunkRange range = chunk_range(chunk, tensor, chunk_offsets, numels, chunk_size);
    const long long start = range.start, stop = range.stop;
    if constexpr (IsCode<S>::value) {
      // A warp per quantization block (blockDim.x is a multiple of 32); chunk_size is a multiple of
      // kQuantBlock, so blocks never straddle chunks.
      const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
      using MasterT = typename MasterType<MASTER>::type;
      const bool aligned = aligned_for<kPerLane>(t.param) && aligned_for<kPerLane>(t.grad) &&
                           aligned_for<kPerLane>(t.exp_avg) && aligned_for<kPerLane>(t.exp_avg_sq) &&
                           (MASTER == kNoMaster || aligned_for<kPerLane>(static_cast<const MasterT*>(t.master)));
      for (long long block = start / kQuantBlock + warp; block * kQuantBlock < stop; block += warps) {
        step_quantized_block<P, MASTER>(t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.exp_avg_absmax,
                                        t.exp_avg_sq_absmax, t.master, block, numels[tensor], lane, aligned, s);
      }
    } else {
      const bool vectorized = aligned_for<kPack>(t.param) && aligned_for<kPack>(t.grad) &&
                              aligned_for<kPack>(t.exp_avg) && aligned_for<kPack>(t.exp_avg_sq) &&
                              (!AMSGRAD || aligned_for<kPack>(t.max_exp_avg_sq)) &&
                              (MASTER != kFp32Master || aligned_for<kPack>(static_cast<const float*>(t.master))) &&
                              (MASTER != kLeanMaster || aligned_for<kPack>(static_cast<const short*>(t.master)));
      // Whole packs from `start` (a multiple of kPack) up to `packed_stop`, then single elements.
      const long long packed_stop = vectorized ? start + (stop - start) / kPack * kPack : start;
      for (long long i = start / kPack + threadIdx.x; i < packed_stop / kPack; i += blockDim.x) {
        step_pack<kPack, P, S, AMSGRAD, MASTER>(t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.max_exp_avg_sq, t.master,
                                                i, s);
      }
      for (long long i = packed_stop + threadIdx.x; i < stop; i += blockDim.x) {
        step_pack<1, P, S, AMSGRAD, MASTER>(t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.max_exp_avg_sq, t.master, i,
                                            s);
      }
    }
  }
}

}  // namespace adam_gpu
