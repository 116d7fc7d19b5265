// Baseline build of the compression kernels (no extra target flags): runs on every CPU.
#define RINGCC_KERNEL_NS generic
#include "ringcc/kernels/cpu/compress_impl.h"

namespace ringcc::kernels {

const CompressTable kGenericCompressTable = generic::block_scaled::kCompressTable;

}  // namespace ringcc::kernels
