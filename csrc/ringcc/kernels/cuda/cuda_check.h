// Launch helpers shared by the CUDA kernel files (device code only; not installed).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "ringcc/common/error.h"
#include "ringcc/kernels/cuda/cuda_kernels.h"

namespace ringcc::kernels::cuda::detail {

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// Throws CudaError if the launch just made (or an earlier asynchronous error) failed.
inline void check_launch(const char* kernel) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw CudaError(::ringcc::detail::concat("ringcc CUDA kernel ", kernel, " failed to launch: ", cudaGetErrorString(e)));
}

constexpr int kThreads = 256;

// Enough blocks to cover `work_items` at kThreads per block, capped so grid-stride loops
// take over for huge inputs (a few waves on any current GPU).
inline unsigned grid_for(size_t work_items) {
  const size_t blocks = (work_items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<size_t>(1, std::min<size_t>(blocks, 65535u * 4)));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace ringcc::kernels::cuda::detail
