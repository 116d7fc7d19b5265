// The per-block power-of-two scale of the block-scaled half wire format (compress.h),
// shared by the CPU kernels and the CUDA kernels so both pick the same scale.
#pragma once

#include <cstdint>

#include "ringcc/common/hd.h"
#include "ringcc/kernels/cpu/half.h"

namespace ringcc::kernels::block_scaled {

constexpr uint32_t kAbsMask = 0x7fffffffu;
constexpr uint32_t kInfBits = 0x7f800000u;

// Multiplier and stored inverse of one block, from the largest |value| of the block as
// bits (|floats| order like their bit patterns; >= kInfBits means inf or NaN).
// The exponent k = 14 - floor(log2(max)) brings max into [2^14, 2^15); a subnormal max
// has biased exponent 0 and hits the clamp at 126. Finite maxima give k >= -113, so the
// lower clamp of the format (-126) is never reached. Both powers of two are built from
// exponent bits, so they are exact and independent of the floating-point environment.
struct BlockScale {
  float scale;
  float inverse;
};

static inline RINGCC_HD BlockScale block_scale(uint32_t max_bits) {
  int k = 0;  // inf/NaN or all-zero block: scale 1
  if (max_bits != 0 && max_bits < kInfBits) {
    k = 141 - static_cast<int>(max_bits >> 23);  // 14 - (biased exponent - 127)
    if (k > 126) k = 126;
  }
  return {half::bits_to_f32(static_cast<uint32_t>(127 + k) << 23),
          half::bits_to_f32(static_cast<uint32_t>(127 - k) << 23)};
}

}  // namespace ringcc::kernels::block_scaled
