// Python binding of the CUDA kernels. Compiled by the host compiler against torch's headers, with no
// CUDA header: the stream arrives from Python as an integer (torch.cuda.current_stream().cuda_stream),
// and the caller has made the tensors' device current.
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "launchers.h"

namespace {

// Addresses and element counts arrive as CPU int64 tensors that Python builds once per tensor
// list (autoaccum/kernels/group.py): no per-tensor conversion here on every call. Python has
// checked the tensors (dtypes, shapes, devices, dense layout) before it made them.
std::vector<int64_t> int64s(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(),
              "autoaccum: ", what, " must be a 1-D contiguous int64 CPU tensor");
  const int64_t* p = t.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + t.numel());
}

std::vector<void*> pointers(const at::Tensor& t, const char* what) {
  std::vector<void*> out;
  for (int64_t a : int64s(t, what)) out.push_back(reinterpret_cast<void*>(a));
  return out;
}

// What same_tensors finds; the values are the module's SAME, OTHER and MOVED.
enum Sameness : int { kSame = 0, kOther = 1, kMoved = 2 };

// Whether `tensors` (exactly a list or a tuple) holds the Python objects whose addresses are `ids`, in order
// (else kOther), each with its data still at `ptrs` (else kMoved: the cached facts are stale and must go).
// One pass here replaces two in Python (id() and data_ptr() of every tensor: about 60 us at 1,000 tensors).
// Python calls it only while every tensor of the cached list is alive (a weak reference's callback drops
// the entry), so an address that matches is that same tensor. mutable_data_ptr(), as Python's data_ptr():
// the kernels write these tensors, and a copy-on-write storage must take its own memory first.
int same_tensors(py::handle tensors, const at::Tensor& ids, const at::Tensor& ptrs) {
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.is_contiguous() &&
                  ptrs.device().is_cpu() && ptrs.scalar_type() == at::kLong && ptrs.sizes() == ids.sizes() &&
                  ptrs.is_contiguous(),
              "autoaccum: ids and ptrs must be 1-D contiguous int64 CPU tensors of one length");
  PyObject* seq = tensors.ptr();
  // Exactly list or tuple: a subclass could show Python (iteration, indexing) other items than these.
  if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq)) return kOther;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  if (n != ids.numel()) return kOther;
  PyObject** items = PySequence_Fast_ITEMS(seq);
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const int64_t* ptr = ptrs.const_data_ptr<int64_t>();
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (reinterpret_cast<int64_t>(items[i]) != id[i] || !THPVariable_Check(items[i])) return kOther;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (reinterpret_cast<int64_t>(THPVariable_Unpack(items[i]).mutable_data_ptr()) != ptr[i]) return kMoved;
  }
  return kSame;
}

void check_code(int64_t code) {
  TORCH_CHECK(code == autoaccum::kFloat32 || code == autoaccum::kFloat16 || code == autoaccum::kBFloat16,
              "autoaccum: unknown gradient dtype code ", code);
}

void accumulate(const at::Tensor& acc_ptrs, const at::Tensor& grad_ptrs, const at::Tensor& numels, int64_t grad_dtype,
                double weight, bool assign, int64_t stream) {
  check_code(grad_dtype);
  const std::vector<void*> accs = pointers(acc_ptrs, "acc_ptrs");
  const std::vector<void*> grads = pointers(grad_ptrs, "grad_ptrs");
  const std::vector<int64_t> sizes = int64s(numels, "numels");
  TORCH_CHECK(accs.size() == grads.size() && accs.size() == sizes.size(),
              "autoaccum: acc_ptrs, grad_ptrs and numels differ in length");
  autoaccum::launch_accumulate(static_cast<int>(grad_dtype), accs, grads, sizes, static_cast<float>(weight), assign,
                               reinterpret_cast<void*>(stream));
}

// A tensor the kernels cannot read or write as plain memory: one whose operations run Python (fake,
// functional and other __torch_dispatch__ tensors: no real data, and Python must not run while the loop
// below holds the list's item array), a ZeroTensor, or one with the negative bit (a lazy negation).
bool not_plain_memory(const at::Tensor& t) {
  return t.key_set().has(c10::DispatchKey::Python) || t._is_zerotensor() || t.is_neg() || t.is_conj();
}

// accumulate() for gradients Python has not looked at (autograd makes new ones every micro-batch): each
// pair is checked here, grouped by gradient dtype and launched, with no per-tensor work in Python. A None
// gradient is skipped, as by the Python path. Python calls it only with accumulators it has checked
// (float32, contiguous, apart, on the current CUDA device; `acc_numels` their element counts then, so an
// accumulator resized in place since is not written past its old end) and a weight float32 can hold.
// Returns -1 when launched; else the first position this path does not take (not a tensor; another dtype,
// shape or device; not contiguous; not plain memory), with nothing launched: Python's checks then take the
// call, naming the culprit or handling the case (a layout to copy).
int64_t accumulate_lists(py::handle accs, py::handle grads, const at::Tensor& acc_numels, double weight, bool assign,
                         int64_t stream) {
  PyObject* a_seq = accs.ptr();
  PyObject* g_seq = grads.ptr();
  const auto exact = [](PyObject* o) { return PyList_CheckExact(o) || PyTuple_CheckExact(o); };
  if (!exact(a_seq) || !exact(g_seq)) return 0;  // a subclass may show Python other items than these
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(a_seq);
  const std::vector<int64_t> expected = int64s(acc_numels, "acc_numels");
  if (PySequence_Fast_GET_SIZE(g_seq) != n || static_cast<Py_ssize_t>(expected.size()) != n) return 0;
  PyObject** a_items = PySequence_Fast_ITEMS(a_seq);
  PyObject** g_items = PySequence_Fast_ITEMS(g_seq);
  std::vector<void*> acc_ptrs[3], grad_ptrs[3];
  std::vector<int64_t> numels[3];
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (g_items[i] == Py_None) continue;
    if (!THPVariable_Check(a_items[i]) || !THPVariable_Check(g_items[i])) return i;
    const at::Tensor& a = THPVariable_Unpack(a_items[i]);
    const at::Tensor& g = THPVariable_Unpack(g_items[i]);
    if (not_plain_memory(g) || not_plain_memory(a)) return i;
    int code;
    switch (g.scalar_type()) {
      case at::kFloat: code = autoaccum::kFloat32; break;
      case at::kHalf: code = autoaccum::kFloat16; break;
      case at::kBFloat16: code = autoaccum::kBFloat16; break;
      default: return i;
    }
    if (g.layout() != at::kStrided || !g.has_storage() || g.device() != a.device() || g.sizes() != a.sizes() ||
        !g.is_contiguous() || a.scalar_type() != at::kFloat || !a.is_contiguous() || a.numel() != expected[i])
      return i;
    const int64_t numel = g.numel();
    if (numel == 0) continue;
    void* acc_ptr = a.mutable_data_ptr();
    const void* grad_ptr = g.const_data_ptr();
    if (acc_ptr == nullptr || grad_ptr == nullptr) return i;
    if (numels[code].empty()) {  // usually one dtype for the whole list: grow once
      acc_ptrs[code].reserve(n - i);
      grad_ptrs[code].reserve(n - i);
      numels[code].reserve(n - i);
    }
    acc_ptrs[code].push_back(acc_ptr);
    grad_ptrs[code].push_back(const_cast<void*>(grad_ptr));
    numels[code].push_back(numel);
  }
  for (int code = 0; code < 3; ++code) {
    if (!numels[code].empty()) {
      autoaccum::launch_accumulate(code, acc_ptrs[code], grad_ptrs[code], numels[code], static_cast<float>(weight),
                                   assign, reinterpret_cast<void*>(stream));
    }
  }
  return -1;
}

void finalize(const std::vector<at::Tensor>& ptrs, const std::vector<at::Tensor>& numels,
              const std::vector<int64_t>& codes, const at::Tensor& inv_scale, double max_norm, bool apply,
              at::Tensor& result, int64_t stream) {
  TORCH_CHECK(!ptrs.empty() && ptrs.size() == numels.size() && ptrs.size() == codes.size(),
              "autoaccum: finalize needs one (ptrs, numels, code) per gradient dtype");
  TORCH_CHECK(inv_scale.is_cuda() && inv_scale.scalar_type() == at::kFloat && inv_scale.numel() == 1,
              "autoaccum: inv_scale must be a one-element float32 CUDA tensor");
  TORCH_CHECK(result.is_cuda() && result.scalar_type() == at::kFloat && result.numel() == 3 && result.is_contiguous(),
              "autoaccum: result must be a contiguous float32 CUDA tensor of 3 elements");
  std::vector<std::vector<void*>> grads;
  std::vector<std::vector<int64_t>> sizes;
  int64_t count = 0;
  for (size_t k = 0; k < ptrs.size(); ++k) {
    check_code(codes[k]);
    grads.push_back(pointers(ptrs[k], "ptrs"));
    sizes.push_back(int64s(numels[k], "numels"));
    TORCH_CHECK(grads.back().size() == sizes.back().size(), "autoaccum: ptrs and numels differ in length");
    count += autoaccum::norm_partial_count(sizes.back());
  }
  auto options = result.options();
  at::Tensor part_max = at::empty({std::max<int64_t>(count, 1)}, options);
  at::Tensor part_ssq = at::empty({std::max<int64_t>(count, 1)}, options);
  at::Tensor part_bad = at::empty({std::max<int64_t>(count, 1)}, options.dtype(at::kInt));
  void* s = reinterpret_cast<void*>(stream);
  int64_t offset = 0;
  for (size_t k = 0; k < grads.size(); ++k) {
    autoaccum::launch_norm_partials(static_cast<int>(codes[k]), grads[k], sizes[k], part_max.data_ptr<float>(),
                                    part_ssq.data_ptr<float>(), part_bad.data_ptr<int>(), offset, s);
    offset += autoaccum::norm_partial_count(sizes[k]);
  }
  autoaccum::launch_combine(part_max.data_ptr<float>(), part_ssq.data_ptr<float>(), part_bad.data_ptr<int>(), count,
                            inv_scale.data_ptr<float>(), max_norm, result.data_ptr<float>(), s);
  if (apply) {
    for (size_t k = 0; k < grads.size(); ++k) {
      autoaccum::launch_scale(static_cast<int>(codes[k]), grads[k], sizes[k], result.data_ptr<float>(), s);
    }
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "autoaccum's fused gradient kernels (accumulate, finalize) over address tables, and their cache check";
  m.def("accumulate", &accumulate, "acc (+)= weight * float(grad) over address tables of one gradient dtype",
        py::arg("acc_ptrs"), py::arg("grad_ptrs"), py::arg("numels"), py::arg("grad_dtype"), py::arg("weight"),
        py::arg("assign"), py::arg("stream"));
  m.def("finalize", &finalize, "norm + inf check, then scale in place; writes {norm, found_inf, scale}",
        py::arg("ptrs"), py::arg("numels"), py::arg("codes"), py::arg("inv_scale"), py::arg("max_norm"),
        py::arg("apply"), py::arg("result"), py::arg("stream"));
  m.def("accumulate_lists", &accumulate_lists,
        "accumulate() over tensor lists, checking each pair here; -1 when launched, else the first pair not taken",
        py::arg("accs"), py::arg("grads"), py::arg("acc_numels"), py::arg("weight"), py::arg("assign"),
        py::arg("stream"));
  m.def("same_tensors", &same_tensors,
        "SAME: tensors are the objects at ids, each with its data at ptrs; OTHER: other objects; MOVED: data moved",
        py::arg("tensors"), py::arg("ids"), py::arg("ptrs"));
  m.attr("SAME") = static_cast<int>(kSame);
  m.attr("OTHER") = static_cast<int>(kOther);
  m.attr("MOVED") = static_cast<int>(kMoved);
}
