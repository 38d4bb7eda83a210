// Host build of kernels/adam_cuda.cu: just enough of CUDA for g++ to compile the kernel unchanged, for the CPU
// step (adam_cpu.cpp, which calls its device functions in loops) and for the tests' emulation of GPU threads
// (tests/cuda_host.py), which runs the kernel itself. There, threads that never cooperate run one after another (exact: sequential threads
// compute what parallel ones would). Threads that shuffle within a warp (8-bit moments) run as OS threads,
// a block at a time, and __shfl_xor_sync exchanges values through a barrier per warp: exact too, and a
// shuffle that not every lane of a warp reaches stops the program with a message instead of hanging.
// No __syncthreads, shared memory or atomics (the kernel has none). Conversions round to nearest even,
// bit-identical to torch's (NaN -> 0x7FC0 for bf16).
#pragma once
#define ADAM_GPU_HOST_BUILD 1

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <chrono>
#include <condition_variable>
#include <mutex>

#define __global__
#define __device__
#define __forceinline__ inline

// Every host address counts as "global"; the assumption itself is for the device compiler only.
template <typename T>
inline bool __isGlobal(const T*) { return true; }
#ifndef __clang__
#define __builtin_assume(condition) ((void)(condition))
#endif

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

// All `count` threads wait until the last one arrives; reusable.
class HostBarrier {
 public:
  explicit HostBarrier(unsigned count) : count_(count) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned generation = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      released_.notify_all();
      return;
    }
    if (!released_.wait_for(lock, std::chrono::seconds(20), [&] { return generation != generation_; })) {
      fprintf(stderr, "cuda_host_shim: a warp shuffle that not all 32 lanes reached (block %u, thread %u)\n",
              blockIdx.x, threadIdx.x);
      abort();
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  const unsigned count_;
  unsigned waiting_ = 0, generation_ = 0;
};

// The warps of the block being run: a barrier and one exchange slot per lane.
struct HostWarp {
  HostBarrier barrier{32};
  float lanes[32];
};
static HostWarp* host_warps = nullptr;

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  if (mask != 0xFFFFFFFFu || blockDim.x % 32 != 0) {
    fprintf(stderr, "cuda_host_shim: __shfl_xor_sync needs full warps (mask %x, blockDim.x %u)\n", mask, blockDim.x);
    abort();
  }
  HostWarp& warp = host_warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  warp.lanes[lane] = value;
  warp.barrier.arrive_and_wait();
  const float other = warp.lanes[lane ^ static_cast<unsigned>(lane_mask)];
  warp.barrier.arrive_and_wait();  // nobody overwrites a slot before every lane has read
  return other;
}

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

// IEEE binary16 as its bits, converted with integer and fp32 arithmetic that g++ vectorizes (its _Float16
// conversions are library calls): bit for bit what _Float16 gives for every half and every float, NaNs made quiet
// with their top payload bits (tests/test_host_shim.py checks them all).
struct __half {
  uint16_t bits;
};
inline float __half2float(__half h) {
  const uint32_t magnitude = static_cast<uint32_t>(h.bits & 0x7FFFu) << 13;
  // A half's exponent and mantissa in fp32's fields are its value times 2^-112, subnormals too: times 2^112, exact.
  const float scaled = __uint_as_float(magnitude) * 5.192296858534828e+33f;
  const uint32_t special = magnitude | (magnitude > (0x7C00u << 13) ? 0x7FC00000u : 0x7F800000u);  // Inf; quiet NaN
  const uint32_t value = magnitude >= (0x7C00u << 13) ? special : __float_as_uint(scaled);
  return __uint_as_float(value | (static_cast<uint32_t>(h.bits & 0x8000u) << 16));
}
inline __half __float2half_rn(float f) {
  const uint32_t bits = __float_as_uint(f);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  // From 65520 up (what rounds past the largest half): Inf, or a quiet NaN with the top 10 payload bits.
  const uint32_t nan = 0x7E00u | ((magnitude >> 13) & 0x3FFu);
  const uint32_t overflow = magnitude > 0x7F800000u ? nan : 0x7C00u;
  // Normal results: the exponent rebiased, the 13 dropped bits rounded to nearest even.
  const uint32_t normal = (magnitude - ((127u - 15u) << 23) + 0xFFFu + ((magnitude >> 13) & 1u)) >> 13;
  // Below 2^-14: adding 0.5 leaves the half's subnormal steps (2^-24) in fp32's low mantissa bits, rounded to
  // nearest even by the addition itself.
  const uint32_t subnormal = __float_as_uint(__uint_as_float(magnitude) + 0.5f) - 0x3F000000u;
  const uint32_t result = magnitude >= 0x477FF000u ? overflow : (magnitude < 0x38800000u ? subnormal : normal);
  return __half{static_cast<uint16_t>(result | ((bits >> 16) & 0x8000u))};
}

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
