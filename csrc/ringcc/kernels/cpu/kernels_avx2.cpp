// AVX2 + F16C + FMA build of the kernels. Only compiled on x86-64; the dispatcher calls
// into it only after checking that the CPU supports all three extensions.
#if !defined(__x86_64__) || !defined(__AVX2__) || !defined(__F16C__) || !defined(__FMA__)
#error "kernels_avx2.cpp must be compiled for x86-64 with -mavx2 -mf16c -mfma"
#endif

#define RINGCC_KERNEL_NS avx2
#include "ringcc/kernels/cpu/kernels_impl.h"

namespace ringcc::kernels {

const KernelTable kAvx2Table = avx2::kTable;

}  // namespace ringcc::kernels
