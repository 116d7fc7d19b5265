// Gradient compression and bucketing kernels (CPU).
//
// Wire format of a compressed run of `count` fp32 values ("block-scaled half"):
//
//   [nb x float32 inverse scales][count x 16-bit values (float16 or bfloat16)]
//
// with nb = ceil(count / kCompressBlock). Block b covers elements
// [b * kCompressBlock, min((b + 1) * kCompressBlock, count)). Each block is multiplied by
// a power of two 2^k before it is rounded to 16 bits, chosen so that the block's largest
// finite magnitude lands in [2^14, 2^15) (k clamped to [-126, 126]); the stored inverse
// scale is 2^-k, so decoding is one exact multiply. A power of two keeps the scaling
// itself exact: the only error is the 16-bit rounding (round to nearest even), at most
// 2^-11 (float16) or 2^-8 (bfloat16) of the block's largest magnitude, and values far
// outside float16's range (1e-6 .. 1e6 and beyond) neither overflow nor flush to zero.
// A block containing inf or NaN gets scale 1, so they pass through unchanged; an all-
// zero block gets scale 1. (The finite values of an inf/NaN block are then converted
// unscaled, so with float16 they may overflow or flush like a plain conversion.)
// Like a plain conversion to bfloat16, a finite value within half a 16-bit ulp of
// FLT_MAX rounds up to 2^128 and decodes as inf.
//
// The same encoding serves float16 and bfloat16 (for bfloat16 the scale changes nothing
// but keeps one code path). Every function dispatches at run time like kernels.h, and the
// wire bytes are identical at every SIMD level (ranks may run on different CPUs).
//
// Bad arguments throw std::invalid_argument: an unsupported wire_type, a null pointer
// with count > 0, buffers that overlap where the comments below forbid it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ringcc/common/dtype.h"

namespace ringcc::kernels {

constexpr size_t kCompressBlock = 256;

// Bytes of the wire format for `count` elements.
inline size_t compressed_bytes(size_t count) {
  return (count + kCompressBlock - 1) / kCompressBlock * 4 + count * 2;
}

// wire <- encode(in[i] * prescale). The prescale multiply happens in fp32 before the
// block scale is chosen. `wire_type` is kFloat16 or kBFloat16 (std::invalid_argument
// otherwise). `in` and `wire` must not overlap. A non-finite prescale is rejected.
void compress(void* wire, const float* in, size_t count, DataType wire_type, float prescale = 1.0f);

// out[i] = decode(wire)[i]            (accumulate == false)
// out[i] = out[i] + decode(wire)[i]   (accumulate == true, the add in fp32)
void decompress(float* out, const void* wire, size_t count, DataType wire_type, bool accumulate);

// Error feedback, one pass: y = x + residual; x <- decode(encode(y)); residual <- y - x.
// Afterwards x holds exactly the values the wire format can carry, so compressing x
// again loses nothing, and the rounding error is kept for the next step. x + residual
// is then exactly the fp32 sum y (the subtraction is exact). One corner: when a block's
// largest value rounds up to the next power of two, compressing x again uses half the
// scale, and float16 values below 2^-29 of the block max may round once more (by at
// most 2^-39 of it; likewise bfloat16 values that fall into its subnormal range).
// x and residual must not overlap.
void error_feedback(float* x, float* residual, size_t count, DataType wire_type);

// x <- decode(encode(x)): round x to what the wire carries (every rank then holds the
// same bits as the ranks that only received the encoded values).
void round_trip(float* x, size_t count, DataType wire_type);

// Multi-tensor bucketing: copy n buffers into / out of one flat buffer in one call.
// Piece i is bytes[i] long at offset offsets[i] (bytes) in `flat`. Pieces must not
// overlap each other or the other side (not checked here; ringcc.kernels checks).
// Pointers of empty pieces may be null.
void pack(void* flat, const void* const* srcs, const size_t* offsets, const size_t* bytes, size_t n);
void unpack(void* const* dsts, const void* flat, const size_t* offsets, const size_t* bytes, size_t n);

}  // namespace ringcc::kernels
