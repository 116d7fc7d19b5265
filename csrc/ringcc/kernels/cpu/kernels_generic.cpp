// Baseline build of the kernels (no extra target flags): runs on every CPU.
#define RINGCC_KERNEL_NS generic
#include "ringcc/kernels/cpu/kernels_impl.h"

namespace ringcc::kernels {

const KernelTable kGenericTable = generic::kTable;

}  // namespace ringcc::kernels
