// Templated kernel implementation shared by every instruction-set translation unit.
//
// Usage: a TU compiled with its own target flags defines RINGCC_KERNEL_NS (e.g. `avx2`)
// and includes this header once. Everything lands in ringcc::kernels::RINGCC_KERNEL_NS,
// so each ISA gets its own, distinctly named copy of every function; nothing from here
// can be merged across TUs by the linker (which would leak AVX2 code into the generic
// path). For the same reason only type traits, never function templates, are used from
// the standard library.
//
// The loops are deliberately plain elementwise loops so the compiler auto-vectorizes them
// for whatever target the including TU is built for. `out` may alias `a`/`b` exactly:
// an elementwise loop reads a[i], b[i] before writing out[i], so exact aliasing is safe
// (GCC's runtime overlap check also accepts it and keeps the vector path).
//
// Argument validation lives in the dispatcher; these functions assume valid input.
#pragma once

#ifndef RINGCC_KERNEL_NS
#error "define RINGCC_KERNEL_NS (the per-ISA namespace) before including kernels_impl.h"
#endif

#include <cstddef>
#include <cstdint>
#include <type_traits>

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#define RINGCC_KERNEL_USE_F16C 1
#endif

#include "ringcc/common/dtype.h"
#include "ringcc/common/hd.h"
#include "ringcc/kernels/cpu/half.h"
#include "ringcc/kernels/cpu/kernel_table.h"

namespace ringcc::kernels::RINGCC_KERNEL_NS {

// ---- elementwise operators ---------------------------------------------------------

#include "ringcc/kernels/elementwise_ops.inc"

template <class Op, class T>
void binary_loop(T* out, const T* a, const T* b, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = Op::template apply<T>(a[i], b[i]);
}

template <class T>
void divide_loop(T* buf, size_t n, T divisor) {
  // True division (not a reciprocal multiply) so results match numpy/torch exactly.
  for (size_t i = 0; i < n; ++i) buf[i] = buf[i] / divisor;
}

// ---- half-precision block converters -----------------------------------------------
// No __restrict: convert() may be asked to narrow in place (dst == src), which a
// forward elementwise loop handles correctly.

struct Fp16 {
  static void widen(const uint16_t* src, float* dst, size_t n) {
    size_t i = 0;
#ifdef RINGCC_KERNEL_USE_F16C
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
#endif
    for (; i < n; ++i) dst[i] = half::fp16_to_fp32(src[i]);
  }
  static void narrow(const float* src, uint16_t* dst, size_t n) {
    size_t i = 0;
#ifdef RINGCC_KERNEL_USE_F16C
    for (; i + 8 <= n; i += 8) {
      // Immediate rounding mode (not MXCSR), so the result never depends on fp state.
      const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
    }
#endif
    for (; i < n; ++i) dst[i] = half::fp32_to_fp16(src[i]);
  }
};

struct Bf16 {
  // Pure integer bit manipulation: vectorizes on every target.
  static void widen(const uint16_t* src, float* dst, size_t n) {
    for (size_t i = 0; i < n; ++i) dst[i] = half::bf16_to_fp32(src[i]);
  }
  static void narrow(const float* src, uint16_t* dst, size_t n) {
    for (size_t i = 0; i < n; ++i) dst[i] = half::fp32_to_bf16(src[i]);
  }
};

// Half types go through small fp32 stack blocks: widen both inputs, combine with the
// fp32 loop (vectorized), round once on the way back. A whole block is read before any
// of it is written, so exact aliasing of out with a or b stays safe.
constexpr size_t kBlock = 256;

template <class H, class Op>
void reduce_half(uint16_t* out, const uint16_t* a, const uint16_t* b, size_t n) {
  alignas(32) float fa[kBlock];
  alignas(32) float fb[kBlock];
  for (size_t off = 0; off < n; off += kBlock) {
    const size_t m = n - off < kBlock ? n - off : kBlock;
    H::widen(a + off, fa, m);
    H::widen(b + off, fb, m);
    binary_loop<Op, float>(fa, fa, fb, m);
    H::narrow(fa, out + off, m);
  }
}

template <class H>
void divide_half(uint16_t* buf, size_t n, float divisor) {
  alignas(32) float f[kBlock];
  for (size_t off = 0; off < n; off += kBlock) {
    const size_t m = n - off < kBlock ? n - off : kBlock;
    H::widen(buf + off, f, m);
    divide_loop<float>(f, m, divisor);
    H::narrow(f, buf + off, m);
  }
}

// ---- per-dtype operator dispatch ---------------------------------------------------

template <class T>
void reduce_float(void* out, const void* a, const void* b, size_t n, ReduceOp op) {
  T* o = static_cast<T*>(out);
  const T* x = static_cast<const T*>(a);
  const T* y = static_cast<const T*>(b);
  switch (op) {
    case ReduceOp::kSum: binary_loop<FSum>(o, x, y, n); break;
    case ReduceOp::kProd: binary_loop<FProd>(o, x, y, n); break;
    case ReduceOp::kMin: binary_loop<FMin>(o, x, y, n); break;
    case ReduceOp::kMax: binary_loop<FMax>(o, x, y, n); break;
    default: break;  // rejected by the dispatcher
  }
}

template <class H>
void reduce_half_op(void* out, const void* a, const void* b, size_t n, ReduceOp op) {
  uint16_t* o = static_cast<uint16_t*>(out);
  const uint16_t* x = static_cast<const uint16_t*>(a);
  const uint16_t* y = static_cast<const uint16_t*>(b);
  switch (op) {
    case ReduceOp::kSum: reduce_half<H, FSum>(o, x, y, n); break;
    case ReduceOp::kProd: reduce_half<H, FProd>(o, x, y, n); break;
    case ReduceOp::kMin: reduce_half<H, FMin>(o, x, y, n); break;
    case ReduceOp::kMax: reduce_half<H, FMax>(o, x, y, n); break;
    default: break;
  }
}

template <class T>
void reduce_int(void* out, const void* a, const void* b, size_t n, ReduceOp op) {
  T* o = static_cast<T*>(out);
  const T* x = static_cast<const T*>(a);
  const T* y = static_cast<const T*>(b);
  switch (op) {
    case ReduceOp::kSum: binary_loop<ISum>(o, x, y, n); break;
    case ReduceOp::kProd: binary_loop<IProd>(o, x, y, n); break;
    case ReduceOp::kMin: binary_loop<IMin>(o, x, y, n); break;
    case ReduceOp::kMax: binary_loop<IMax>(o, x, y, n); break;
    case ReduceOp::kBand: binary_loop<IAnd>(o, x, y, n); break;
    case ReduceOp::kBor: binary_loop<IOr>(o, x, y, n); break;
    case ReduceOp::kBxor: binary_loop<IXor>(o, x, y, n); break;
    default: break;
  }
}

inline void reduce_bool(void* out, const void* a, const void* b, size_t n, ReduceOp op) {
  uint8_t* o = static_cast<uint8_t*>(out);
  const uint8_t* x = static_cast<const uint8_t*>(a);
  const uint8_t* y = static_cast<const uint8_t*>(b);
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kMax:
    case ReduceOp::kBor: binary_loop<BOr>(o, x, y, n); break;
    case ReduceOp::kProd:
    case ReduceOp::kMin:
    case ReduceOp::kBand: binary_loop<BAnd>(o, x, y, n); break;
    case ReduceOp::kBxor: binary_loop<BXor>(o, x, y, n); break;
    default: break;
  }
}

// ---- table entry points ------------------------------------------------------------

inline void reduce(void* out, const void* a, const void* b, size_t n, DataType t,
                   ReduceOp op) {
  switch (t) {
    case DataType::kFloat16: reduce_half_op<Fp16>(out, a, b, n, op); break;
    case DataType::kBFloat16: reduce_half_op<Bf16>(out, a, b, n, op); break;
    case DataType::kFloat32: reduce_float<float>(out, a, b, n, op); break;
    case DataType::kFloat64: reduce_float<double>(out, a, b, n, op); break;
    case DataType::kInt8: reduce_int<int8_t>(out, a, b, n, op); break;
    case DataType::kUInt8: reduce_int<uint8_t>(out, a, b, n, op); break;
    case DataType::kInt32: reduce_int<int32_t>(out, a, b, n, op); break;
    case DataType::kInt64: reduce_int<int64_t>(out, a, b, n, op); break;
    case DataType::kBool: reduce_bool(out, a, b, n, op); break;
  }
}

inline void divide(void* buf, size_t n, DataType t, double divisor) {
  switch (t) {
    case DataType::kFloat16:
      divide_half<Fp16>(static_cast<uint16_t*>(buf), n, static_cast<float>(divisor));
      break;
    case DataType::kBFloat16:
      divide_half<Bf16>(static_cast<uint16_t*>(buf), n, static_cast<float>(divisor));
      break;
    case DataType::kFloat32:
      divide_loop<float>(static_cast<float*>(buf), n, static_cast<float>(divisor));
      break;
    case DataType::kFloat64: divide_loop<double>(static_cast<double*>(buf), n, divisor); break;
    default: break;
  }
}

inline void convert(void* dst, DataType dst_type, const void* src, DataType src_type,
                    size_t n) {
  const bool to_f32 = dst_type == DataType::kFloat32;
  const DataType half_type = to_f32 ? src_type : dst_type;
  if (to_f32) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    float* d = static_cast<float*>(dst);
    if (half_type == DataType::kFloat16) Fp16::widen(s, d, n);
    else Bf16::widen(s, d, n);
  } else {
    const float* s = static_cast<const float*>(src);
    uint16_t* d = static_cast<uint16_t*>(dst);
    if (half_type == DataType::kFloat16) Fp16::narrow(s, d, n);
    else Bf16::narrow(s, d, n);
  }
}

inline constexpr KernelTable kTable = {&reduce, &divide, &convert};

}  // namespace ringcc::kernels::RINGCC_KERNEL_NS
