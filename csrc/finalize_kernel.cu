// Gradient finalize: norm + inf/nan flag in one read pass (per-block partials, then one block that
// combines them in a fixed order: deterministic, no atomics), then the scale in one write pass.
// Both passes use 128-bit accesses where the gradients are aligned, with a scalar tail.
#include "element_math.cuh"
#include "launchers.h"
#include "multi_tensor.cuh"
#include "vector_access.cuh"

namespace autoaccum {
namespace {

// Tree reduction of NormState across a block; every thread returns the block's total.
__device__ NormState block_merge(NormState s) {
  __shared__ float smax[kThreads];
  __shared__ float sssq[kThreads];
  __shared__ int sbad[kThreads];
  smax[threadIdx.x] = s.max;
  sssq[threadIdx.x] = s.ssq;
  sbad[threadIdx.x] = s.bad;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      NormState a{smax[threadIdx.x], sssq[threadIdx.x], sbad[threadIdx.x]};
      NormState b{smax[threadIdx.x + stride], sssq[threadIdx.x + stride], sbad[threadIdx.x + stride]};
      NormState m = norm_merge(a, b);
      smax[threadIdx.x] = m.max;
      sssq[threadIdx.x] = m.ssq;
      sbad[threadIdx.x] = m.bad;
    }
    __syncthreads();
  }
  return NormState{smax[0], sssq[0], sbad[0]};
}

template <typename G>
__global__ void __launch_bounds__(kThreads) partials_kernel(TensorList<1> list, float* part_max, float* part_ssq,
                                                            int* part_bad, int64_t offset) {
  const int tensor = tensor_of_block(list, blockIdx.x);
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) - list.first_block[tensor];
  const int64_t n = list.sizes[tensor];
  constexpr int N = VectorWidth<G>::value;
  const G* grad = static_cast<const G*>(list.addresses[0][tensor]);
  const int64_t begin = chunk * kChunk;
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  const Stripes st = stripes(begin, end, threadIdx.x, blockDim.x, N, aligned_to(grad + begin, N * sizeof(G)));
  NormState s = norm_empty();
#pragma unroll 4
  for (int64_t i = st.vec_begin; i < st.vec_end; i += st.vec_step) {
    const Pack<G, N> g = *reinterpret_cast<const Pack<G, N>*>(grad + i);
#pragma unroll
    for (int k = 0; k < N; ++k) norm_update(s, to_float(g.v[k]));
  }
  for (int64_t i = st.tail_begin; i < st.tail_end; i += st.tail_step) norm_update(s, to_float(grad[i]));
  NormState total = block_merge(s);
  if (threadIdx.x == 0) {
    part_max[offset + blockIdx.x] = total.max;
    part_ssq[offset + blockIdx.x] = total.ssq;
    part_bad[offset + blockIdx.x] = total.bad;
  }
}

__global__ void __launch_bounds__(kThreads) combine_kernel(const float* part_max, const float* part_ssq,
                                                           const int* part_bad, int64_t count, const float* inv_scale,
                                                           double max_norm, float* result) {
  __shared__ double ssum[kThreads];
  __shared__ int sbad[kThreads];
  double sum = 0.0;
  int bad = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {  // fixed assignment: deterministic
    sum += norm_square(part_max[i], part_ssq[i]);
    bad |= part_bad[i];
  }
  ssum[threadIdx.x] = sum;
  sbad[threadIdx.x] = bad;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      ssum[threadIdx.x] += ssum[threadIdx.x + stride];
      sbad[threadIdx.x] |= sbad[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double inv = static_cast<double>(*inv_scale);
    const double norm = sqrt(ssum[0]) * inv;
    result[0] = sbad[0] ? INFINITY : static_cast<float>(norm);
    result[1] = sbad[0] ? 1.0f : 0.0f;
    result[2] = static_cast<float>(clip_scale(norm, inv, max_norm, kClipEps));
  }
}

template <typename G>
__global__ void __launch_bounds__(kThreads) scale_kernel(TensorList<1> list, const float* result) {
  const float found_inf = result[1];
  const float scale = result[2];
  if (found_inf != 0.0f || scale == 1.0f) return;  // nothing to write: no traffic
  const int tensor = tensor_of_block(list, blockIdx.x);
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) - list.first_block[tensor];
  const int64_t n = list.sizes[tensor];
  constexpr int N = VectorWidth<G>::value;
  G* grad = static_cast<G*>(list.addresses[0][tensor]);
  const int64_t begin = chunk * kChunk;
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  const Stripes st = stripes(begin, end, threadIdx.x, blockDim.x, N, aligned_to(grad + begin, N * sizeof(G)));
#pragma unroll 4
  for (int64_t i = st.vec_begin; i < st.vec_end; i += st.vec_step) {
    Pack<G, N> g = *reinterpret_cast<const Pack<G, N>*>(grad + i);
#pragma unroll
    for (int k = 0; k < N; ++k) from_float(to_float(g.v[k]) * scale, &g.v[k]);
    *reinterpret_cast<Pack<G, N>*>(grad + i) = g;
  }
  for (int64_t i = st.tail_begin; i < st.tail_end; i += st.tail_step) from_float(to_float(grad[i]) * scale, &grad[i]);
}

template <typename G>
void partials(const std::vector<void*>& grads, const std::vector<int64_t>& numels, float* part_max,
              float* part_ssq, int* part_bad, int64_t offset, cudaStream_t stream) {
  const std::vector<std::vector<void*>> addresses(1, grads);
  multi_tensor_apply<1>(addresses, numels, [&](const TensorList<1>& list, int blocks, int64_t before) {
    partials_kernel<G><<<blocks, kThreads, 0, stream>>>(list, part_max, part_ssq, part_bad, offset + before);
    check_launch("norm partials");
  });
}

template <typename G>
void scale(const std::vector<void*>& grads, const std::vector<int64_t>& numels, const float* result,
           cudaStream_t stream) {
  std::vector<std::vector<void*>> addresses(1, grads);
  multi_tensor_apply<1>(addresses, numels, [&](const TensorList<1>& list, int blocks, int64_t) {
    scale_kernel<G><<<blocks, kThreads, 0, stream>>>(list, result);
    check_launch("scale");
  });
}

}  // namespace

int64_t norm_partial_count(const std::vector<int64_t>& numels) { return count_blocks(numels); }

void launch_norm_partials(int grad_dtype, const std::vector<void*>& grads, const std::vector<int64_t>& numels,
                          float* part_max, float* part_ssq, int* part_bad, int64_t offset, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (grad_dtype) {
    case kFloat32: partials<float>(grads, numels, part_max, part_ssq, part_bad, offset, s); break;
    case kFloat16: partials<__half>(grads, numels, part_max, part_ssq, part_bad, offset, s); break;
    case kBFloat16: partials<__nv_bfloat16>(grads, numels, part_max, part_ssq, part_bad, offset, s); break;
    default: throw std::runtime_error("autoaccum finalize: unsupported gradient dtype");
  }
}

void launch_combine(const float* part_max, const float* part_ssq, const int* part_bad, int64_t count,
                    const float* inv_scale, double max_norm, float* result, void* stream) {
  combine_kernel<<<1, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(part_max, part_ssq, part_bad, count,
                                                                        inv_scale, max_norm, result);
  check_launch("combine");
}

void launch_scale(int grad_dtype, const std::vector<void*>& grads, const std::vector<int64_t>& numels,
                  const float* result, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (grad_dtype) {
    case kFloat32: scale<float>(grads, numels, result, s); break;
    case kFloat16: scale<__half>(grads, numels, result, s); break;
    case kBFloat16: scale<__nv_bfloat16>(grads, numels, result, s); break;
    default: throw std::runtime_error("autoaccum finalize: unsupported gradient dtype");
  }
}

}  // namespace autoaccum
