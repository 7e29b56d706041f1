// The launchers of csrc/launchers.h for the host, so that csrc/bindings.cpp builds and runs on a
// machine without CUDA. By default they do nothing: the host-time benchmark (benchmarks/bench_host.py)
// measures everything the binding does before a launch. Built with -DAUTOACCUM_HOST_ACCUMULATE,
// launch_accumulate does on host memory what the CUDA kernel does on the device, with the same element
// arithmetic, so the tests can check the binding's address tables and dtype groups against the torch
// reference.
#include "launchers.h"

#ifdef AUTOACCUM_HOST_ACCUMULATE
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "element_math.cuh"
#endif

namespace autoaccum {

#ifdef AUTOACCUM_HOST_ACCUMULATE
namespace {
template <typename G>
void accumulate_host(const std::vector<void*>& accs, const std::vector<void*>& grads,
                     const std::vector<int64_t>& numels, float weight, bool assign) {
  for (size_t t = 0; t < accs.size(); ++t) {
    float* acc = static_cast<float*>(accs[t]);
    const G* grad = static_cast<const G*>(grads[t]);
    for (int64_t i = 0; i < numels[t]; ++i) {
      acc[i] = accumulate_element(acc[i], static_cast<float>(grad[i]), weight, assign);
    }
  }
}
}  // namespace

void launch_accumulate(int grad_dtype, const std::vector<void*>& accs, const std::vector<void*>& grads,
                       const std::vector<int64_t>& numels, float weight, bool assign, void*) {
  if (grad_dtype == kFloat32) accumulate_host<float>(accs, grads, numels, weight, assign);
  if (grad_dtype == kFloat16) accumulate_host<c10::Half>(accs, grads, numels, weight, assign);
  if (grad_dtype == kBFloat16) accumulate_host<c10::BFloat16>(accs, grads, numels, weight, assign);
}
#else
void launch_accumulate(int, const std::vector<void*>&, const std::vector<void*>&, const std::vector<int64_t>&, float,
                       bool, void*) {}
#endif

int64_t norm_partial_count(const std::vector<int64_t>& numels) { return static_cast<int64_t>(numels.size()); }

void launch_norm_partials(int, const std::vector<void*>&, const std::vector<int64_t>&, float*, float*, int*, int64_t,
                          void*) {}

void launch_combine(const float*, const float*, const int*, int64_t, const float*, double, float*, void*) {}

void launch_scale(int, const std::vector<void*>&, const std::vector<int64_t>&, const float*, void*) {}

}  // namespace autoaccum
