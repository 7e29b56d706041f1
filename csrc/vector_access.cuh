// Element conversions and 128-bit vector access shared by the kernels (nvcc only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace autoaccum {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void from_float(float v, float* out) { *out = v; }
__device__ __forceinline__ void from_float(float v, __half* out) { *out = __float2half_rn(v); }
__device__ __forceinline__ void from_float(float v, __nv_bfloat16* out) { *out = __float2bfloat16_rn(v); }

// N elements loaded or stored as one aligned unit: 16 bytes is one 128-bit access (ld.global.v4);
// 32 bytes (8 floats beside 8 bf16 gradients) is two.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements per 128-bit access of the gradient's type: 4 float32, 8 bfloat16/float16.
template <typename G>
struct VectorWidth {
  static constexpr int value = static_cast<int>(16 / sizeof(G));
};

__device__ __forceinline__ bool aligned_to(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace autoaccum
