// Multi-tensor launch machinery (the idea of apex's multi_tensor_apply): tensor addresses and sizes
// travel in the kernel's argument block, every CUDA block maps to one chunk of one tensor, and the
// host relaunches whenever the argument block is full of tensors or of blocks.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace autoaccum {

constexpr int kChunk = 65536;     // elements per CUDA block (16384 reached 54-77% of copy bandwidth on an H200: 20 short launches per 100M)
constexpr int kThreads = 512;
constexpr int kMaxBlocks = 320;

template <int DEPTH> struct MaxTensors;
template <> struct MaxTensors<1> { static constexpr int value = 110; };
template <> struct MaxTensors<2> { static constexpr int value = 64; };

// Under 4 KiB of kernel arguments for every DEPTH, as the CUDA ABI requires.
template <int DEPTH>
struct TensorList {
  static constexpr int kMaxTensors = MaxTensors<DEPTH>::value;
  void* addresses[DEPTH][kMaxTensors];
  int64_t sizes[kMaxTensors];
  unsigned char block_to_tensor[kMaxBlocks];
  int block_to_chunk[kMaxBlocks];
};

inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("autoaccum CUDA kernel ") + what + " failed: " + cudaGetErrorString(err));
  }
}

// Calls launch(list, blocks, first_block_index) for each batch; first_block_index counts blocks
// over all batches, so kernels can write per-block results into one array.
template <int DEPTH, typename Launch>
void multi_tensor_apply(const std::vector<std::vector<void*>>& addresses, const std::vector<int64_t>& numels,
                        Launch launch) {
  TensorList<DEPTH> list;
  int tensors = 0, blocks = 0;
  int64_t blocks_before = 0;
  const int n = static_cast<int>(numels.size());
  for (int t = 0; t < n; ++t) {
    if (numels[t] == 0) continue;
    for (int d = 0; d < DEPTH; ++d) list.addresses[d][tensors] = addresses[d][t];
    list.sizes[tensors] = numels[t];
    ++tensors;
    const int64_t chunks = (numels[t] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      list.block_to_tensor[blocks] = static_cast<unsigned char>(tensors - 1);
      list.block_to_chunk[blocks] = static_cast<int>(c);
      ++blocks;
      const bool blocks_full = blocks == kMaxBlocks;
      const bool tensors_full = tensors == TensorList<DEPTH>::kMaxTensors && c == chunks - 1;
      const bool last = t == n - 1 && c == chunks - 1;
      if (blocks_full || tensors_full || last) {
        launch(list, blocks, blocks_before);
        blocks_before += blocks;
        blocks = 0;
        if (c == chunks - 1) {
          tensors = 0;  // this tensor is done: start the next batch empty
        } else {
          for (int d = 0; d < DEPTH; ++d) list.addresses[d][0] = list.addresses[d][tensors - 1];
          list.sizes[0] = list.sizes[tensors - 1];
          tensors = 1;  // the rest of this tensor's chunks continue in the next batch
        }
      }
    }
  }
  if (blocks > 0) {  // only reached when trailing tensors were empty
    launch(list, blocks, blocks_before);
  }
}

inline int64_t count_blocks(const std::vector<int64_t>& numels) {
  int64_t blocks = 0;
  for (int64_t n : numels) blocks += (n + kChunk - 1) / kChunk;
  return blocks;
}

}  // namespace autoaccum
