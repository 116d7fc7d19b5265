// Run-time dispatch of the CPU kernels: validates arguments, then calls through the
// function table of the selected instruction-set level.
#include "ringcc/kernels/cpu/kernels.h"

#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>

#include "ringcc/kernels/cpu/kernel_table.h"

// The AVX2 table exists only where the build compiled kernels_avx2.cpp.
#if defined(__x86_64__) && defined(RINGCC_HAVE_AVX2_TU) && RINGCC_HAVE_AVX2_TU
#define RINGCC_KERNELS_AVX2 1
#else
#define RINGCC_KERNELS_AVX2 0
#endif

namespace ringcc::kernels {
namespace {

bool cpu_has_avx2() {
#if RINGCC_KERNELS_AVX2
  // Needed when we run before main() (static constructors); cheap and idempotent.
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool level_available(SimdLevel level) {
  switch (level) {
    case SimdLevel::kGeneric: return true;
    case SimdLevel::kAvx2: return cpu_has_avx2();
  }
  return false;
}

// -1 = not forced: use best_simd_level(). Atomic so tests may switch levels while other
// threads run kernels (each call reads the level once).
std::atomic<int> g_forced_level{-1};

const KernelTable& table_for(SimdLevel level) {
#if RINGCC_KERNELS_AVX2
  if (level == SimdLevel::kAvx2) return kAvx2Table;
#else
  (void)level;
#endif
  return kGenericTable;
}

const KernelTable& active_table() { return table_for(simd_level()); }

}  // namespace

const CompressTable& active_compress_table() {
#if RINGCC_KERNELS_AVX2
  if (simd_level() == SimdLevel::kAvx2) return kAvx2CompressTable;
#endif
  return kGenericCompressTable;
}

SimdLevel best_simd_level() {
  // Probed once; function-local statics are initialised thread-safely.
  static const SimdLevel best = cpu_has_avx2() ? SimdLevel::kAvx2 : SimdLevel::kGeneric;
  return best;
}

SimdLevel simd_level() {
  const int forced = g_forced_level.load(std::memory_order_relaxed);
  return forced < 0 ? best_simd_level() : static_cast<SimdLevel>(forced);
}

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::kGeneric: return "generic";
    case SimdLevel::kAvx2: return "avx2";
  }
  return "unknown";
}

void set_simd_level(SimdLevel level) {
  if (!level_available(level)) {
    throw std::invalid_argument(std::string("SIMD level '") + simd_level_name(level) +
                                "' is not supported by this CPU or was not compiled in");
  }
  g_forced_level.store(static_cast<int>(level), std::memory_order_relaxed);
}

void reduce(void* out, const void* a, const void* b, size_t count, DataType dtype,
            ReduceOp op) {
  // avg is not a kernel: the algorithms sum and then divide().
  if (op == ReduceOp::kAvg || element_size(dtype) == 0 || !op_supported(dtype, op)) {
    throw std::invalid_argument(std::string("reduce: op '") + reduce_op_name(op) +
                                "' is not supported for dtype '" + dtype_name(dtype) + "'");
  }
  if (count == 0) return;
  active_table().reduce(out, a, b, count, dtype, op);
}

void divide(void* buf, size_t count, DataType dtype, double divisor) {
  if (!is_floating(dtype)) {
    throw std::invalid_argument(std::string("divide: dtype '") + dtype_name(dtype) +
                                "' is not a floating type");
  }
  if (count == 0) return;
  active_table().divide(buf, count, dtype, divisor);
}

void convert(void* dst, DataType dst_type, const void* src, DataType src_type, size_t count) {
  const bool valid_names = element_size(dst_type) != 0 && element_size(src_type) != 0;
  const bool f32_half = (dst_type == DataType::kFloat32 && is_half(src_type)) ||
                        (src_type == DataType::kFloat32 && is_half(dst_type));
  if (!valid_names || (dst_type != src_type && !f32_half)) {
    throw std::invalid_argument(std::string("convert: unsupported conversion from '") +
                                dtype_name(src_type) + "' to '" + dtype_name(dst_type) + "'");
  }
  if (count == 0) return;
  if (dst_type == src_type) {
    // memmove: callers may pass dst == src.
    std::memmove(dst, src, count * element_size(dst_type));
    return;
  }
  active_table().convert(dst, dst_type, src, src_type, count);
}

}  // namespace ringcc::kernels
