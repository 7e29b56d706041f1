// Host entry points of the kernels. No CUDA or torch types: the binding (bindings.cpp) is compiled
// by the host compiler against torch's headers, the kernels by nvcc without them.
#pragma once

#include <cstdint>
#include <vector>

namespace autoaccum {

enum GradDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr double kClipEps = 1e-6;  // clip_grad_norm_'s epsilon

// acc[i] (+)= weight * float(grad[i]) for every pair; accs float32, grads all of `grad_dtype`.
void launch_accumulate(int grad_dtype, const std::vector<void*>& accs, const std::vector<void*>& grads,
                       const std::vector<int64_t>& numels, float weight, bool assign, void* stream);

// Number of per-block partials launch_norm_partials writes for these tensors.
int64_t norm_partial_count(const std::vector<int64_t>& numels);

// One read pass: per-block (max, ssq, bad) partials written at [offset, offset + count).
void launch_norm_partials(int grad_dtype, const std::vector<void*>& grads, const std::vector<int64_t>& numels,
                          float* part_max, float* part_ssq, int* part_bad, int64_t offset, void* stream);

// One block, fixed order: result = {norm of inv_scale * g (inf if bad), found_inf, applied scale}.
void launch_combine(const float* part_max, const float* part_ssq, const int* part_bad, int64_t count,
                    const float* inv_scale, double max_norm, float* result, void* stream);

// One write pass: g *= result[2] unless result[1] (found_inf) or result[2] == 1.
void launch_scale(int grad_dtype, const std::vector<void*>& grads, const std::vector<int64_t>& numels,
                  const float* result, void* stream);

}  // namespace autoaccum
