// Python binding of the CUDA kernels. Compiled by the host compiler against torch's headers, with no
// CUDA header: the stream arrives from Python as an integer (torch.cuda.current_stream().cuda_stream),
// and the caller has made the tensors' device current.
#include <torch/extension.h>

#include <map>
#include <vector>

#include "launchers.h"

namespace {

int grad_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return autoaccum::kFloat32;
    case at::kHalf: return autoaccum::kFloat16;
    case at::kBFloat16: return autoaccum::kBFloat16;
    default: TORCH_CHECK(false, "autoaccum: gradients must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void check_cuda_contiguous(const at::Tensor& t, const char* what, int64_t i) {
  TORCH_CHECK(t.is_cuda(), "autoaccum: ", what, "[", i, "] must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), "autoaccum: ", what, "[", i, "] must be contiguous");
}

void accumulate(const std::vector<at::Tensor>& accs, const std::vector<at::Tensor>& grads, double weight,
                bool assign, int64_t stream) {
  TORCH_CHECK(accs.size() == grads.size(), "autoaccum: accs and grads differ in length");
  struct Group {
    std::vector<void*> accs;
    std::vector<const void*> grads;
    std::vector<int64_t> numels;
  };
  std::map<int, Group> groups;
  for (size_t i = 0; i < accs.size(); ++i) {
    check_cuda_contiguous(accs[i], "accs", i);
    check_cuda_contiguous(grads[i], "grads", i);
    TORCH_CHECK(accs[i].scalar_type() == at::kFloat, "autoaccum: accs[", i, "] must be float32");
    TORCH_CHECK(accs[i].numel() == grads[i].numel(), "autoaccum: accs[", i, "] and grads[", i, "] differ in size");
    Group& g = groups[grad_code(grads[i])];
    g.accs.push_back(accs[i].data_ptr());
    g.grads.push_back(grads[i].data_ptr());
    g.numels.push_back(accs[i].numel());
  }
  for (auto& [code, g] : groups) {
    autoaccum::launch_accumulate(code, g.accs, g.grads, g.numels, static_cast<float>(weight), assign,
                                 reinterpret_cast<void*>(stream));
  }
}

void finalize(const std::vector<at::Tensor>& grads, const at::Tensor& inv_scale, double max_norm, bool apply,
              at::Tensor& result, int64_t stream) {
  TORCH_CHECK(!grads.empty(), "autoaccum: finalize needs at least one gradient");
  TORCH_CHECK(inv_scale.is_cuda() && inv_scale.scalar_type() == at::kFloat && inv_scale.numel() == 1,
              "autoaccum: inv_scale must be a one-element float32 CUDA tensor");
  TORCH_CHECK(result.is_cuda() && result.scalar_type() == at::kFloat && result.numel() == 3 && result.is_contiguous(),
              "autoaccum: result must be a contiguous float32 CUDA tensor of 3 elements");
  struct Group {
    std::vector<void*> grads;
    std::vector<int64_t> numels;
  };
  std::map<int, Group> groups;
  for (size_t i = 0; i < grads.size(); ++i) {
    check_cuda_contiguous(grads[i], "grads", i);
    Group& g = groups[grad_code(grads[i])];
    g.grads.push_back(grads[i].data_ptr());
    g.numels.push_back(grads[i].numel());
  }
  int64_t count = 0;
  for (auto& [code, g] : groups) count += autoaccum::norm_partial_count(g.numels);
  auto options = grads[0].options();
  at::Tensor part_max = at::empty({std::max<int64_t>(count, 1)}, options.dtype(at::kFloat));
  at::Tensor part_ssq = at::empty({std::max<int64_t>(count, 1)}, options.dtype(at::kFloat));
  at::Tensor part_bad = at::empty({std::max<int64_t>(count, 1)}, options.dtype(at::kInt));
  void* s = reinterpret_cast<void*>(stream);
  int64_t offset = 0;
  for (auto& [code, g] : groups) {
    std::vector<const void*> ptrs(g.grads.begin(), g.grads.end());
    autoaccum::launch_norm_partials(code, ptrs, g.numels, part_max.data_ptr<float>(), part_ssq.data_ptr<float>(),
                                    part_bad.data_ptr<int>(), offset, s);
    offset += autoaccum::norm_partial_count(g.numels);
  }
  autoaccum::launch_combine(part_max.data_ptr<float>(), part_ssq.data_ptr<float>(), part_bad.data_ptr<int>(), count,
                            inv_scale.data_ptr<float>(), max_norm, result.data_ptr<float>(), s);
  if (apply) {
    for (auto& [code, g] : groups) autoaccum::launch_scale(code, g.grads, g.numels, result.data_ptr<float>(), s);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "autoaccum's fused gradient kernels (accumulate, finalize)";
  m.def("accumulate", &accumulate, "acc (+)= weight * float(grad) over tensor lists",
        py::arg("accs"), py::arg("grads"), py::arg("weight"), py::arg("assign"), py::arg("stream"));
  m.def("finalize", &finalize, "norm + inf check, then scale in place; writes {norm, found_inf, scale}",
        py::arg("grads"), py::arg("inv_scale"), py::arg("max_norm"), py::arg("apply"), py::arg("result"),
        py::arg("stream"));
}
