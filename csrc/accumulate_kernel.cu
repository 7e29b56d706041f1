// Fused gradient accumulation: acc (+)= weight * float(g) over many tensors per launch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "element_math.cuh"
#include "launchers.h"
#include "multi_tensor.cuh"

namespace autoaccum {
namespace {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename G, bool ASSIGN>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(TensorList<2> list, float weight) {
  const int tensor = list.block_to_tensor[blockIdx.x];
  const int64_t chunk = list.block_to_chunk[blockIdx.x];
  const int64_t n = list.sizes[tensor];
  float* acc = static_cast<float*>(list.addresses[0][tensor]);
  const G* grad = static_cast<const G*>(list.addresses[1][tensor]);
  const int64_t begin = chunk * kChunk;
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float g = to_float(grad[i]);
    acc[i] = accumulate_element(ASSIGN ? 0.0f : acc[i], g, weight, ASSIGN);
  }
}

template <typename G>
void run(const std::vector<void*>& accs, const std::vector<const void*>& grads, const std::vector<int64_t>& numels,
         float weight, bool assign, cudaStream_t stream) {
  std::vector<std::vector<void*>> addresses(2);
  addresses[0] = accs;
  for (const void* g : grads) addresses[1].push_back(const_cast<void*>(g));
  multi_tensor_apply<2>(addresses, numels, [&](const TensorList<2>& list, int blocks, int64_t) {
    if (assign) {
      accumulate_kernel<G, true><<<blocks, kThreads, 0, stream>>>(list, weight);
    } else {
      accumulate_kernel<G, false><<<blocks, kThreads, 0, stream>>>(list, weight);
    }
    check_launch("accumulate");
  });
}

}  // namespace

void launch_accumulate(int grad_dtype, const std::vector<void*>& accs, const std::vector<const void*>& grads,
                       const std::vector<int64_t>& numels, float weight, bool assign, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (grad_dtype) {
    case kFloat32: run<float>(accs, grads, numels, weight, assign, s); break;
    case kFloat16: run<__half>(accs, grads, numels, weight, assign, s); break;
    case kBFloat16: run<__nv_bfloat16>(accs, grads, numels, weight, assign, s); break;
    default: throw std::runtime_error("autoaccum accumulate: unsupported gradient dtype");
  }
}

}  // namespace autoaccum
