// CUDA kernels: the GPU counterparts of kernels/cpu/kernels.h and compress.h.
//
// Built only when CMake finds a CUDA compiler (RINGCC_WITH_CUDA). Every function
// enqueues work on `stream` (a cudaStream_t passed as void*, nullptr for the legacy
// default stream) and returns without waiting; the caller orders it with its own work by
// choosing the stream. All pointers are device pointers (or managed memory). A launch
// error throws CudaError naming the kernel and CUDA's message; bad arguments throw
// std::invalid_argument before anything is enqueued.
//
// Results are bit-identical to the CPU kernels on the same input: both use the scalar
// helpers of half.h, block_scale.h and elementwise_ops.inc, and the device code is built
// with --fmad=false so no multiply and add are fused where the CPU rounds twice.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

#include "ringcc/common/dtype.h"

namespace ringcc::kernels::cuda {

struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Number of visible devices (0 when there is no driver or no GPU; never throws).
int device_count();

// out[i] = a[i] (op) b[i]; the semantics of kernels::reduce (CPU), half types widened
// to fp32, combined and rounded once. `out` may alias `a` or `b` exactly.
void reduce(void* out, const void* a, const void* b, size_t count, DataType dtype, ReduceOp op, void* stream);

// buf[i] /= divisor (floating dtypes; half types in fp32).
void divide(void* buf, size_t count, DataType dtype, double divisor, void* stream);

// The block-scaled half wire format of kernels/cpu/compress.h, same bytes.
void compress(void* wire, const float* in, size_t count, DataType wire_type, float prescale, void* stream);
void decompress(float* out, const void* wire, size_t count, DataType wire_type, bool accumulate, void* stream);
void error_feedback(float* x, float* residual, size_t count, DataType wire_type, void* stream);
void round_trip(float* x, size_t count, DataType wire_type, void* stream);

// One step of the compressed ring in one pass: y = decode(wire_in) + local (fp32),
// wire_out = encode(y); when sum_out is not null it receives decode(wire_out), the
// values every rank ends up holding. wire_in and wire_out may be the same buffer.
void decompress_add_compress(void* wire_out, const void* wire_in, const float* local, float* sum_out,
                             size_t count, DataType wire_type, void* stream);

// Multi-tensor bucketing in one launch per kMaxPiecesPerLaunch pieces: piece i is
// bytes[i] long at offset offsets[i] of `flat`. The arrays are host memory; the
// pointers in them are device pointers.
constexpr size_t kMaxPiecesPerLaunch = 1024;
void pack(void* flat, const void* const* srcs, const size_t* offsets, const size_t* bytes, size_t n, void* stream);
void unpack(void* const* dsts, const void* flat, const size_t* offsets, const size_t* bytes, size_t n, void* stream);

}  // namespace ringcc::kernels::cuda
