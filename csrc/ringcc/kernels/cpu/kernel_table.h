// Function-pointer table exported by each instruction-set-specific translation unit.
// The dispatcher (kernels.cpp) validates arguments and then calls through the table of
// the selected level, so the table entries assume valid dtype/op combinations.
#pragma once

#include <cstddef>

#include "ringcc/common/dtype.h"

namespace ringcc::kernels {

struct KernelTable {
  void (*reduce)(void* out, const void* a, const void* b, size_t count, DataType dtype,
                 ReduceOp op);
  void (*divide)(void* buf, size_t count, DataType dtype, double divisor);
  // Only fp32<->fp16, fp32<->bf16 and identical dtypes are passed in.
  void (*convert)(void* dst, DataType dst_type, const void* src, DataType src_type,
                  size_t count);
};

extern const KernelTable kGenericTable;  // kernels_generic.cpp, always built
extern const KernelTable kAvx2Table;     // kernels_avx2.cpp, x86-64 only

}  // namespace ringcc::kernels
