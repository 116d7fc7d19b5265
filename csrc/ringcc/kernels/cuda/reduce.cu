// Elementwise reduction and division on the GPU (cuda_kernels.h).
//
// Each thread handles one 16-byte vector (16 / sizeof(T) elements) when `out`, `a` and
// `b` are all 16-byte aligned, so loads and stores are single coalesced 128-bit accesses;
// otherwise, and for the tail, one element at a time. Operators come from
// elementwise_ops.inc, the same definitions the CPU kernels use.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "ringcc/common/hd.h"
#include "ringcc/kernels/cpu/half.h"
#include "ringcc/kernels/cuda/cuda_check.h"

namespace ringcc::kernels::cuda {
namespace {

#include "ringcc/kernels/elementwise_ops.inc"

using detail::kThreads;

// Storage type T, computed in C (the type operators see): halves are widened to fp32.
struct Fp16 {
  using Storage = uint16_t;
  static __device__ float widen(uint16_t h) { return half::fp16_to_fp32(h); }
  static __device__ uint16_t narrow(float f) { return half::fp32_to_fp16(f); }
};
struct Bf16 {
  using Storage = uint16_t;
  static __device__ float widen(uint16_t h) { return half::bf16_to_fp32(h); }
  static __device__ uint16_t narrow(float f) { return half::fp32_to_bf16(f); }
};
template <class T>
struct Plain {
  using Storage = T;
  static __device__ T widen(T v) { return v; }
  static __device__ T narrow(T v) { return v; }
};

template <class Op, class Conv>
__device__ typename Conv::Storage apply(typename Conv::Storage x, typename Conv::Storage y) {
  return Conv::narrow(Op::apply(Conv::widen(x), Conv::widen(y)));
}

template <class Op, class Conv>
__global__ void reduce_kernel(typename Conv::Storage* out, const typename Conv::Storage* a,
                              const typename Conv::Storage* b, size_t count, bool vectorized) {
  using T = typename Conv::Storage;
  constexpr size_t kVec = 16 / sizeof(T);
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  size_t first = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  size_t scalar_from = 0;
  if (vectorized) {
    const size_t vectors = count / kVec;
    for (size_t v = first; v < vectors; v += stride) {
      union {
        uint4 raw;
        T e[kVec];
      } x, y;
      x.raw = reinterpret_cast<const uint4*>(a)[v];
      y.raw = reinterpret_cast<const uint4*>(b)[v];
#pragma unroll
      for (size_t j = 0; j < kVec; ++j) x.e[j] = apply<Op, Conv>(x.e[j], y.e[j]);
      reinterpret_cast<uint4*>(out)[v] = x.raw;
    }
    scalar_from = vectors * kVec;
  }
  for (size_t i = scalar_from + first; i < count; i += stride) out[i] = apply<Op, Conv>(a[i], b[i]);
}

template <class Op, class Conv>
void launch(void* out, const void* a, const void* b, size_t count, cudaStream_t stream) {
  using T = typename Conv::Storage;
  const bool vec = detail::aligned16(out) && detail::aligned16(a) && detail::aligned16(b);
  const size_t items = vec ? count / (16 / sizeof(T)) + 16 : count;
  reduce_kernel<Op, Conv><<<detail::grid_for(items), kThreads, 0, stream>>>(
      static_cast<T*>(out), static_cast<const T*>(a), static_cast<const T*>(b), count, vec);
  detail::check_launch("reduce");
}

template <class Conv>
void float_op(void* out, const void* a, const void* b, size_t n, ReduceOp op, cudaStream_t s) {
  switch (op) {
    case ReduceOp::kSum: launch<FSum, Conv>(out, a, b, n, s); break;
    case ReduceOp::kProd: launch<FProd, Conv>(out, a, b, n, s); break;
    case ReduceOp::kMin: launch<FMin, Conv>(out, a, b, n, s); break;
    case ReduceOp::kMax: launch<FMax, Conv>(out, a, b, n, s); break;
    default: break;
  }
}

template <class T>
void int_op(void* out, const void* a, const void* b, size_t n, ReduceOp op, cudaStream_t s) {
  switch (op) {
    case ReduceOp::kSum: launch<ISum, Plain<T>>(out, a, b, n, s); break;
    case ReduceOp::kProd: launch<IProd, Plain<T>>(out, a, b, n, s); break;
    case ReduceOp::kMin: launch<IMin, Plain<T>>(out, a, b, n, s); break;
    case ReduceOp::kMax: launch<IMax, Plain<T>>(out, a, b, n, s); break;
    case ReduceOp::kBand: launch<IAnd, Plain<T>>(out, a, b, n, s); break;
    case ReduceOp::kBor: launch<IOr, Plain<T>>(out, a, b, n, s); break;
    case ReduceOp::kBxor: launch<IXor, Plain<T>>(out, a, b, n, s); break;
    default: break;
  }
}

void bool_op(void* out, const void* a, const void* b, size_t n, ReduceOp op, cudaStream_t s) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kMax:
    case ReduceOp::kBor: launch<BOr, Plain<uint8_t>>(out, a, b, n, s); break;
    case ReduceOp::kProd:
    case ReduceOp::kMin:
    case ReduceOp::kBand: launch<BAnd, Plain<uint8_t>>(out, a, b, n, s); break;
    case ReduceOp::kBxor: launch<BXor, Plain<uint8_t>>(out, a, b, n, s); break;
    default: break;
  }
}

// True division (not a reciprocal multiply), like the CPU kernel and numpy/torch.
template <class Conv, class D>
__global__ void divide_kernel(typename Conv::Storage* buf, size_t count, D divisor) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride)
    buf[i] = Conv::narrow(Conv::widen(buf[i]) / divisor);
}

template <class Conv, class D>
void launch_divide(void* buf, size_t count, D divisor, cudaStream_t s) {
  divide_kernel<Conv, D><<<detail::grid_for(count), kThreads, 0, s>>>(
      static_cast<typename Conv::Storage*>(buf), count, divisor);
  detail::check_launch("divide");
}

}  // namespace

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver / no device: clear the sticky error
    return 0;
  }
  return n;
}

void reduce(void* out, const void* a, const void* b, size_t count, DataType dtype, ReduceOp op, void* stream) {
  if (!op_supported(dtype, op) || op == ReduceOp::kAvg)
    RINGCC_THROW(std::invalid_argument, "cuda reduce: op ", reduce_op_name(op), " is not a kernel op for dtype ",
                 dtype_name(dtype));
  if (count == 0) return;
  RINGCC_CHECK_ARG(out && a && b, "cuda reduce: null pointer with count ", count);
  cudaStream_t s = detail::as_stream(stream);
  switch (dtype) {
    case DataType::kFloat16: float_op<Fp16>(out, a, b, count, op, s); break;
    case DataType::kBFloat16: float_op<Bf16>(out, a, b, count, op, s); break;
    case DataType::kFloat32: float_op<Plain<float>>(out, a, b, count, op, s); break;
    case DataType::kFloat64: float_op<Plain<double>>(out, a, b, count, op, s); break;
    case DataType::kInt8: int_op<int8_t>(out, a, b, count, op, s); break;
    case DataType::kUInt8: int_op<uint8_t>(out, a, b, count, op, s); break;
    case DataType::kInt32: int_op<int32_t>(out, a, b, count, op, s); break;
    case DataType::kInt64: int_op<int64_t>(out, a, b, count, op, s); break;
    case DataType::kBool: bool_op(out, a, b, count, op, s); break;
  }
}

void divide(void* buf, size_t count, DataType dtype, double divisor, void* stream) {
  if (count == 0) return;
  RINGCC_CHECK_ARG(buf, "cuda divide: null pointer with count ", count);
  cudaStream_t s = detail::as_stream(stream);
  const float f = static_cast<float>(divisor);
  switch (dtype) {
    case DataType::kFloat16: launch_divide<Fp16>(buf, count, f, s); break;
    case DataType::kBFloat16: launch_divide<Bf16>(buf, count, f, s); break;
    case DataType::kFloat32: launch_divide<Plain<float>>(buf, count, f, s); break;
    case DataType::kFloat64: launch_divide<Plain<double>>(buf, count, divisor, s); break;
    default: RINGCC_THROW(std::invalid_argument, "cuda divide: dtype ", dtype_name(dtype), " is not floating");
  }
}

}  // namespace ringcc::kernels::cuda
