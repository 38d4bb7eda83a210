// Host build of kernels/adam_cuda.cu: just enough of CUDA for g++ to compile the kernel unchanged and
// for a driver to run it thread by thread. Exact for kernels with no __syncthreads, shared memory,
// atomics or warp shuffles (the Adam step has none): sequential threads then compute what parallel
// ones would. Conversions round to nearest even, bit-identical to torch's (NaN -> 0x7FC0 for bf16).
#pragma once
#define ADAM_GPU_HOST_BUILD 1

#include <math.h>
#include <stdint.h>
#include <string.h>

#define __global__
#define __device__
#define __forceinline__ inline

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};
static dim3 threadIdx, blockIdx, blockDim, gridDim;

inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  memcpy(&u, &f, sizeof u);
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

struct __half {
  _Float16 value;  // GCC's IEEE binary16: float -> _Float16 rounds to nearest even
};
inline float __half2float(__half h) { return static_cast<float>(h.value); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t bits = static_cast<uint32_t>(b.bits) << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  if (f != f) return __nv_bfloat16{0x7FC0};
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  return __nv_bfloat16{static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
