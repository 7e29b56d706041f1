// Fused gradient accumulation: acc (+)= weight * float(g) over many tensors per launch, with
// 128-bit loads and stores where the tensors are aligned (the gradient buffer aligns every view
// to 64 bytes, the caching allocator every gradient to 512), a scalar tail, a scalar fallback.
#include "element_math.cuh"
#include "launchers.h"
#include "multi_tensor.cuh"
#include "vector_access.cuh"

namespace autoaccum {
namespace {

template <typename G, bool ASSIGN>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(TensorList<2> list, float weight) {
  constexpr int N = VectorWidth<G>::value;
  const int tensor = tensor_of_block(list, blockIdx.x);
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) - list.first_block[tensor];
  const int64_t n = list.sizes[tensor];
  // restrict: an accumulator and its gradient never share memory, so loads of later vectors may be
  // issued before earlier stores (more bytes in flight per thread)
  float* __restrict__ acc = static_cast<float*>(list.addresses[0][tensor]);
  const G* __restrict__ grad = static_cast<const G*>(list.addresses[1][tensor]);
  const int64_t begin = chunk * kChunk;
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  const bool vectorised = aligned_to(acc + begin, N * sizeof(float)) && aligned_to(grad + begin, N * sizeof(G));
  const Stripes s = stripes(begin, end, threadIdx.x, blockDim.x, N, vectorised);
#pragma unroll 4
  for (int64_t i = s.vec_begin; i < s.vec_end; i += s.vec_step) {
    const Pack<G, N> g = *reinterpret_cast<const Pack<G, N>*>(grad + i);
    Pack<float, N> a{};
    if (!ASSIGN) a = *reinterpret_cast<const Pack<float, N>*>(acc + i);
#pragma unroll
    for (int k = 0; k < N; ++k) a.v[k] = accumulate_element(a.v[k], to_float(g.v[k]), weight, ASSIGN);
    *reinterpret_cast<Pack<float, N>*>(acc + i) = a;
  }
  for (int64_t i = s.tail_begin; i < s.tail_end; i += s.tail_step) {
    acc[i] = accumulate_element(ASSIGN ? 0.0f : acc[i], to_float(grad[i]), weight, ASSIGN);
  }
}

template <typename G>
void run(const std::vector<void*>& accs, const std::vector<void*>& grads, const std::vector<int64_t>& numels,
         float weight, bool assign, cudaStream_t stream) {
  const std::vector<std::vector<void*>> addresses{accs, grads};
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

void launch_accumulate(int grad_dtype, const std::vector<void*>& accs, const std::vector<void*>& grads,
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
