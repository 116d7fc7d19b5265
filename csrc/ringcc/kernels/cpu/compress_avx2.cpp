// AVX2 + F16C build of the compression kernels. Only compiled on x86-64; the dispatcher
// calls into it only after checking the CPU (kernels.cpp, same level as the other kernels).
#if !defined(__x86_64__) || !defined(__AVX2__) || !defined(__F16C__)
#error "compress_avx2.cpp must be compiled for x86-64 with -mavx2 -mf16c"
#endif

#define RINGCC_KERNEL_NS avx2
#include "ringcc/kernels/cpu/compress_impl.h"

namespace ringcc::kernels {

const CompressTable kAvx2CompressTable = avx2::block_scaled::kCompressTable;

}  // namespace ringcc::kernels
