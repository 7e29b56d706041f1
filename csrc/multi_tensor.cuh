// Multi-tensor launch machinery (the idea of apex's multi_tensor_apply): tensor addresses and sizes
// travel in the kernel's argument block and every CUDA block works on one chunk of one tensor.
//
// A launch covers as many tensors as the argument block holds, and all of their chunks: a block
// finds its tensor by binary search over the tensors' first blocks. The first version kept a
// per-block table in the arguments, which capped a launch at 320 blocks; on an H200 that meant
// five launches per 100M elements in big chunks, 2-3 chunks per SM (uneven: the SMs with three set
// the pace), and 63-90% of copy bandwidth where Triton's single launch of small chunks reached
// 89-99%. Now one launch of small chunks covers up to MaxTensors tensors, whatever their sizes.
//
// Plain C++ apart from check_launch, so `g++ tests/csrc/test_element_math.cpp` runs the same
// planning and lookup the GPU uses.
#pragma once

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#endif

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "element_math.cuh"

namespace autoaccum {

constexpr int kChunk = 16384;     // elements per CUDA block
constexpr int kThreads = 256;     // 64 elements per thread: 4-8 128-bit accesses each

template <int DEPTH> struct MaxTensors;
template <> struct MaxTensors<1> { static constexpr int value = 192; };
template <> struct MaxTensors<2> { static constexpr int value = 128; };

template <int DEPTH>
struct TensorList {
  static constexpr int kMaxTensors = MaxTensors<DEPTH>::value;
  void* addresses[DEPTH][kMaxTensors];
  int64_t sizes[kMaxTensors];
  int first_block[kMaxTensors];  // tensor t's chunks are blocks first_block[t], first_block[t] + 1, ...
  int tensors;
};

// Under 4 KiB of kernel arguments, as the CUDA ABI requires (before CUDA 12.1's larger limit).
static_assert(sizeof(TensorList<1>) <= 4096 && sizeof(TensorList<2>) <= 4096, "kernel arguments over 4 KiB");

// The tensor whose chunks include `block`: the last t with first_block[t] <= block (every tensor
// in a list has at least one chunk, so first blocks rise strictly).
template <int DEPTH>
AA_HD int tensor_of_block(const TensorList<DEPTH>& list, int block) {
  int lo = 0, hi = list.tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (list.first_block[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

#if defined(__CUDACC__)
inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("autoaccum CUDA kernel ") + what + " failed: " + cudaGetErrorString(err));
  }
}
#endif

// Calls launch(list, blocks, first_block_index) once per argument block's worth of tensors (empty
// tensors skipped); first_block_index counts blocks over all launches, so kernels can write
// per-block results into one array.
template <int DEPTH, typename Launch>
void multi_tensor_apply(const std::vector<std::vector<void*>>& addresses, const std::vector<int64_t>& numels,
                        Launch launch) {
  TensorList<DEPTH> list;
  list.tensors = 0;
  int64_t blocks = 0, blocks_before = 0;
  const int n = static_cast<int>(numels.size());
  for (int t = 0; t < n; ++t) {
    if (numels[t] == 0) continue;
    const int64_t chunks = chunks_of(numels[t]);
    if (chunks > INT_MAX) {
      throw std::runtime_error("autoaccum: a tensor of " + std::to_string(numels[t]) + " elements is over 2^31 "
                               "chunks, more blocks than one launch can have");
    }
    if (blocks + chunks > INT_MAX) {  // the grid is full: launch what is there first
      launch(list, static_cast<int>(blocks), blocks_before);
      blocks_before += blocks;
      blocks = 0;
      list.tensors = 0;
    }
    const int k = list.tensors++;
    for (int d = 0; d < DEPTH; ++d) list.addresses[d][k] = addresses[d][t];
    list.sizes[k] = numels[t];
    list.first_block[k] = static_cast<int>(blocks);
    blocks += chunks;
    if (list.tensors == TensorList<DEPTH>::kMaxTensors) {
      launch(list, static_cast<int>(blocks), blocks_before);
      blocks_before += blocks;
      blocks = 0;
      list.tensors = 0;
    }
  }
  if (list.tensors > 0) {
    launch(list, static_cast<int>(blocks), blocks_before);
  }
}

inline int64_t count_blocks(const std::vector<int64_t>& numels) {
  int64_t blocks = 0;
  for (int64_t n : numels) blocks += chunks_of(n);
  return blocks;
}

}  // namespace autoaccum
