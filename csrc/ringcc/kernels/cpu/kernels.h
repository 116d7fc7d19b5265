// CPU kernels used by the collective algorithms. Every entry point dispatches at
// run time to the best instruction set the processor supports (see simd_level()).
#pragma once

#include <cstddef>

#include "ringcc/common/dtype.h"

namespace ringcc::kernels {

// out[i] = a[i] (op) b[i] for i in [0, count).
// `out` may alias `a` or `b` exactly (in-place reduction); partial overlap is not allowed.
// Operand order matters only for NaN payloads; callers that need bitwise-identical
// results on every rank always pass operands in the same (rank) order.
// Semantics:
//  - sum/prod on integers wrap around (two's complement), never undefined behaviour.
//  - min/max on floats propagate NaN (like torch.minimum / numpy.minimum).
//  - bool: sum/max/bor = logical or, prod/min/band = logical and, bxor = logical xor;
//    results are always 0 or 1.
//  - float16/bfloat16: each element is widened to fp32, combined, and rounded once
//    (round to nearest even).
//  - avg is not a kernel op: the algorithms sum and then call divide().
// Throws std::invalid_argument if !op_supported(dtype, op) or op == kAvg.
void reduce(void* out, const void* a, const void* b, size_t count, DataType dtype,
            ReduceOp op);

// buf[i] /= divisor, for floating dtypes (half types computed in fp32, rounded once).
void divide(void* buf, size_t count, DataType dtype, double divisor);

// Elementwise conversion between fp32 and float16 / bfloat16 (either direction), with
// round to nearest even; NaN stays NaN, infinities and signed zeros are preserved.
// Identical dtypes degrade to a copy. Throws std::invalid_argument for other pairs.
void convert(void* dst, DataType dst_type, const void* src, DataType src_type, size_t count);

// Instruction-set levels the kernels are compiled for.
enum class SimdLevel { kGeneric = 0, kAvx2 = 1 };
// The level in use (best supported by this CPU unless forced).
SimdLevel simd_level();
const char* simd_level_name(SimdLevel level);
// Highest level this CPU can run.
SimdLevel best_simd_level();
// Force a level (tests use this to reach every code path). Throws std::invalid_argument
// if the CPU cannot run it.
void set_simd_level(SimdLevel level);

}  // namespace ringcc::kernels
