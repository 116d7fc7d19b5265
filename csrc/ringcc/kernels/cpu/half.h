// Scalar float16 / bfloat16 <-> fp32 conversions (round to nearest even).
//
// The functions are `static inline` on purpose: this header is included by translation
// units compiled for different instruction sets. With external linkage the linker could
// keep the AVX2-compiled copy of an inline function and hand it to the generic code,
// which would then fault on CPUs without AVX2.
//
// Rounding is done with integer arithmetic (the one float operation is exact), so results
// do not depend on the floating-point environment (rounding mode, FTZ, DAZ).
//
// NaN handling deliberately mirrors the x86 F16C instructions, so scalar tails and the
// generic build produce bit-identical results to the vectorised AVX2 path:
//  - fp16 -> fp32 keeps the payload and sets the quiet bit;
//  - fp32 -> fp16 keeps the top payload bits and sets the quiet bit.
#pragma once

//
// The functions are also compiled for CUDA devices (RINGCC_HD), so the GPU kernels round
// exactly like the CPU ones.
#include <cstdint>
#include <cstring>

#include "ringcc/common/hd.h"

namespace ringcc::half {

static inline RINGCC_HD float bits_to_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

static inline RINGCC_HD uint32_t f32_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// ---- IEEE binary16 -----------------------------------------------------------------

// Branch-free select. Plain `c ? a : b` chains get turned into control flow, and GCC
// then refuses to if-convert the int->float conversion below (-ftrapping-math), which
// blocks vectorization of the conversion loops; a mask keeps them straight-line.
static inline RINGCC_HD uint32_t select_u32(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

static inline RINGCC_HD float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;  // exponent + mantissa
  const uint32_t shifted = em << 13;
  // Normal numbers: rebias the exponent from 15 to 127.
  const uint32_t normal = shifted + ((127u - 15u) << 23);
  // Inf/NaN: exponent becomes all ones; NaNs are quietened (bit 22) like VCVTPH2PS.
  const uint32_t infnan =
      (shifted + ((255u - 31u) << 23)) | (static_cast<uint32_t>(em > 0x7c00u) << 22);
  // Zero and subnormals: the value is em * 2^-24. Both steps are exact and the result is
  // zero or a normal fp32, so no rounding mode / DAZ / FTZ setting can change it.
  const uint32_t subnormal = f32_to_bits(static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f);
  uint32_t r = select_u32(em < 0x0400u, subnormal, normal);
  r = select_u32(em >= 0x7c00u, infnan, r);
  return bits_to_f32(r | sign);
}

static inline RINGCC_HD uint16_t fp32_to_fp16(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;

  // Normal fp16 range: drop 13 mantissa bits with round-to-nearest-even (add just under
  // half an ulp plus the lowest kept bit); a mantissa carry correctly bumps the exponent.
  const uint32_t normal = (a + 0x0fffu + ((a >> 13) & 1u) - ((127u - 15u) << 23)) >> 13;

  // Subnormal fp16 range: the result is the value in units of 2^-24, i.e. the 24-bit
  // significand shifted right by (126 - exponent), rounded the same way. The shift is
  // clamped to [14, 31] so it stays defined for inputs that take another branch; shifts
  // of 25+ correctly give 0 (below half the smallest subnormal).
  const uint32_t exp = a >> 23;
  const uint32_t mant = (a & 0x007fffffu) | 0x00800000u;
  uint32_t shift = 126u - (exp < 112u ? exp : 112u);
  shift = shift < 31u ? shift : 31u;
  const uint32_t subnormal =
      (mant + ((1u << (shift - 1u)) - 1u) + ((mant >> shift) & 1u)) >> shift;

  // NaN: keep the top payload bits and set the quiet bit (as VCVTPS2PH does).
  const uint32_t nan = 0x7e00u | ((a >> 13) & 0x03ffu);

  uint32_t r = select_u32(a >= 0x38800000u, normal, subnormal);  // 2^-14: smallest normal
  r = select_u32(a >= 0x477ff000u, 0x7c00u, r);                  // >= 65520 rounds to inf
  r = select_u32(a > 0x7f800000u, nan, r);
  return static_cast<uint16_t>(r | sign);
}

// ---- bfloat16 ----------------------------------------------------------------------

static inline RINGCC_HD float bf16_to_fp32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

static inline RINGCC_HD uint16_t fp32_to_bf16(float f) {
  const uint32_t u = f32_to_bits(f);
  // Round to nearest even by adding just under half an ulp plus the lowest kept bit;
  // overflow of finite values into infinity is the correct IEEE result.
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  // NaN: truncate and force the quiet bit so a payload in the dropped bits cannot turn
  // it into an infinity.
  const uint32_t nan = (u >> 16) | 0x0040u;
  return static_cast<uint16_t>(select_u32((u & 0x7fffffffu) > 0x7f800000u, nan, rounded));
}

}  // namespace ringcc::half
