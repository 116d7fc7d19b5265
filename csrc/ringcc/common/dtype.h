// Element types and reduction operators understood by the native core.
// The numeric values are part of the wire header: append, never renumber.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ringcc {

enum class DataType : uint8_t {
  kFloat16 = 0,
  kBFloat16 = 1,
  kFloat32 = 2,
  kFloat64 = 3,
  kInt8 = 4,
  kUInt8 = 5,
  kInt32 = 6,
  kInt64 = 7,
  kBool = 8,
};
constexpr int kNumDataTypes = 9;

enum class ReduceOp : uint8_t {
  kSum = 0,
  kAvg = 1,
  kProd = 2,
  kMin = 3,
  kMax = 4,
  kBand = 5,
  kBor = 6,
  kBxor = 7,
};
constexpr int kNumReduceOps = 8;

size_t element_size(DataType t);
const char* dtype_name(DataType t);
const char* reduce_op_name(ReduceOp op);
bool is_floating(DataType t);
// Half types (fp16/bf16) are reduced through an fp32 workspace.
inline bool is_half(DataType t) { return t == DataType::kFloat16 || t == DataType::kBFloat16; }

// Whether the native kernels define `op` for `t` (avg only for floating types,
// bitwise ops only for integers and bool). Python raises TypeError otherwise.
bool op_supported(DataType t, ReduceOp op);

}  // namespace ringcc
