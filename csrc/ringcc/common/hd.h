// RINGCC_HD marks scalar helpers that CUDA kernels share with the CPU code (half
// conversions, block scales, elementwise operators): one definition, so the GPU and the
// CPU compute the same bits by construction. Without nvcc it expands to nothing.
#pragma once

#if defined(__CUDACC__)
#define RINGCC_HD __host__ __device__
#else
#define RINGCC_HD
#endif
