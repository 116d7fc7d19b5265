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

// The block-scaled compression kernels (compress.h). A table of their own because they
// live in their own translation units (built with -ffp-contract=off, see CMakeLists.txt);
// the level is chosen by the same simd_level() as KernelTable. Entries assume validated
// arguments, count > 0 and wire_type one of kFloat16 / kBFloat16.
struct CompressTable {
  void (*compress)(void* wire, const float* in, size_t count, DataType wire_type, float prescale);
  void (*decompress)(float* out, const void* wire, size_t count, DataType wire_type,
                     bool accumulate);
  void (*error_feedback)(float* x, float* residual, size_t count, DataType wire_type);
  void (*round_trip)(float* x, size_t count, DataType wire_type);
};

extern const CompressTable kGenericCompressTable;  // compress_generic.cpp, always built
extern const CompressTable kAvx2CompressTable;     // compress_avx2.cpp, x86-64 only

// The compression table of the level in use (kernels.cpp owns the dispatch).
const CompressTable& active_compress_table();

}  // namespace ringcc::kernels
