// Block-scaled compression kernels (compress.h), shared by every instruction-set
// translation unit.
//
// Usage, as with kernels_impl.h: a TU compiled with its own target flags defines
// RINGCC_KERNEL_NS and includes this header once, so each ISA gets its own, distinctly
// named copy. With AVX2 + F16C the loops run 8 lanes of intrinsics and finish the block
// with the scalar code; otherwise the scalar loops are the whole kernel (written
// branch-free so the compiler vectorizes them for the baseline target).
//
// Bit-identical output across levels rests on three things:
//  - the scalar half conversions (half.h) reproduce F16C exactly, NaNs included;
//  - every float operation is the same multiply/add in the same order on every path,
//    and the TUs are built with -ffp-contract=off so no path fuses a multiply-add;
//  - the block maximum and the scale come from integer operations on the bits.
//
// 16-bit values in the wire are accessed with memcpy: the wire is a byte buffer and may
// sit at any address.
#pragma once

#ifndef RINGCC_KERNEL_NS
#error "define RINGCC_KERNEL_NS (the per-ISA namespace) before including compress_impl.h"
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define RINGCC_COMPRESS_AVX2 1
#else
#define RINGCC_COMPRESS_AVX2 0
#endif

#include "ringcc/common/dtype.h"
#include "ringcc/kernels/block_scale.h"
#include "ringcc/kernels/cpu/compress.h"
#include "ringcc/kernels/cpu/half.h"
#include "ringcc/kernels/cpu/kernel_table.h"

namespace ringcc::kernels::RINGCC_KERNEL_NS {
namespace block_scaled {

using ::ringcc::kernels::block_scaled::BlockScale;
using ::ringcc::kernels::block_scaled::block_scale;
using ::ringcc::kernels::block_scaled::kAbsMask;
using ::ringcc::kernels::block_scaled::kInfBits;

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store_u16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, sizeof v); }

// |f| as bits, held in an int32 (it fits in 31 bits): the running maximum is then a plain
// signed max, which the vectorizer recognises as a reduction (SSE2 has a signed compare,
// no unsigned one), where casts around an unsigned max make it give up.
inline int32_t abs_bits(float f) { return static_cast<int32_t>(half::f32_to_bits(f) & kAbsMask); }
inline int32_t max_i32(int32_t a, int32_t b) { return a > b ? a : b; }

#if RINGCC_COMPRESS_AVX2
inline __m256i abs_bits8(__m256 v) {
  return _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(static_cast<int>(kAbsMask)));
}
inline int32_t hmax8(__m256i v) {
  __m128i m = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4e));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xb1));
  return _mm_cvtsi128_si32(m);
}
#endif

// ---- the two 16-bit wire types ------------------------------------------------------

struct Fp16Wire {
  static uint16_t narrow(float f) { return half::fp32_to_fp16(f); }
  static float widen(uint16_t h) { return half::fp16_to_fp32(h); }
#if RINGCC_COMPRESS_AVX2
  // Immediate rounding mode (not MXCSR): round to nearest even whatever the fp state.
  static __m128i narrow8(__m256 v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
  static __m256 widen8(__m128i h) { return _mm256_cvtph_ps(h); }
#endif
};

struct Bf16Wire {
  static uint16_t narrow(float f) { return half::fp32_to_bf16(f); }
  static float widen(uint16_t h) { return half::bf16_to_fp32(h); }
#if RINGCC_COMPRESS_AVX2
  // half::fp32_to_bf16 on 8 lanes: add just under half an ulp plus the lowest kept bit,
  // keep the top 16 bits; NaNs are truncated with the quiet bit forced instead.
  static __m128i narrow8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i hi = _mm256_srli_epi32(u, 16);
    const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
    const __m256i rounded =
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i nan = _mm256_or_si256(hi, _mm256_set1_epi32(0x0040));
    const __m256i is_nan = _mm256_cmpgt_epi32(
        _mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(kAbsMask))),
        _mm256_set1_epi32(static_cast<int>(kInfBits)));
    const __m256i r = _mm256_blendv_epi8(rounded, nan, is_nan);
    // Every lane is <= 0xffff, so the saturating pack is exact; it packs within 128-bit
    // lanes ([r0..3 r0..3 | r4..7 r4..7]), and qwords 0 and 2 hold r0..7 in order.
    const __m256i p = _mm256_packus_epi32(r, r);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(p, 0x08));
  }
  static __m256 widen8(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
#endif
};

// ---- one block (n <= kCompressBlock elements) -----------------------------------------

// h[i] = narrow(in[i] * prescale * 2^k), returns the stored inverse scale.
template <class W>
float compress_block(uint8_t* h, const float* in, size_t n, float prescale) {
  size_t i = 0;
  int32_t mx = 0;
#if RINGCC_COMPRESS_AVX2
  const __m256 p8 = _mm256_set1_ps(prescale);
  __m256i mx8 = _mm256_setzero_si256();
  for (; i + 8 <= n; i += 8) mx8 = _mm256_max_epi32(mx8, abs_bits8(_mm256_mul_ps(_mm256_loadu_ps(in + i), p8)));
  mx = hmax8(mx8);
#endif
  for (; i < n; ++i) mx = max_i32(mx, abs_bits(in[i] * prescale));

  const BlockScale s = block_scale(static_cast<uint32_t>(mx));
  i = 0;
#if RINGCC_COMPRESS_AVX2
  const __m256 s8 = _mm256_set1_ps(s.scale);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(in + i), p8), s8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h + 2 * i), W::narrow8(v));
  }
#endif
  for (; i < n; ++i) store_u16(h + 2 * i, W::narrow(in[i] * prescale * s.scale));
  return s.inverse;
}

template <class W, bool kAccumulate>
void decompress_block(float* out, const uint8_t* h, size_t n, float inverse) {
  size_t i = 0;
#if RINGCC_COMPRESS_AVX2
  const __m256 inv8 = _mm256_set1_ps(inverse);
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_mul_ps(W::widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + 2 * i))), inv8);
    if (kAccumulate) v = _mm256_add_ps(_mm256_loadu_ps(out + i), v);
    _mm256_storeu_ps(out + i, v);
  }
#endif
  for (; i < n; ++i) {
    const float v = W::widen(load_u16(h + 2 * i)) * inverse;
    out[i] = kAccumulate ? out[i] + v : v;
  }
}

// x <- decode(encode(x + residual)); residual <- (x + residual) - x_new when kFeedback,
// plain round trip of x otherwise.
template <class W, bool kFeedback>
void requantize_block(float* x, float* residual, size_t n) {
  alignas(32) float y[kCompressBlock];
  size_t i = 0;
  int32_t mx = 0;
#if RINGCC_COMPRESS_AVX2
  __m256i mx8 = _mm256_setzero_si256();
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    if (kFeedback) v = _mm256_add_ps(v, _mm256_loadu_ps(residual + i));
    _mm256_store_ps(y + i, v);
    mx8 = _mm256_max_epi32(mx8, abs_bits8(v));
  }
  mx = hmax8(mx8);
#endif
  for (; i < n; ++i) {
    y[i] = kFeedback ? x[i] + residual[i] : x[i];
    mx = max_i32(mx, abs_bits(y[i]));
  }

  const BlockScale s = block_scale(static_cast<uint32_t>(mx));
  i = 0;
#if RINGCC_COMPRESS_AVX2
  const __m256 s8 = _mm256_set1_ps(s.scale);
  const __m256 inv8 = _mm256_set1_ps(s.inverse);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_load_ps(y + i);
    const __m256 q = _mm256_mul_ps(W::widen8(W::narrow8(_mm256_mul_ps(v, s8))), inv8);
    _mm256_storeu_ps(x + i, q);
    if (kFeedback) _mm256_storeu_ps(residual + i, _mm256_sub_ps(v, q));
  }
#endif
  for (; i < n; ++i) {
    const float q = W::widen(W::narrow(y[i] * s.scale)) * s.inverse;
    x[i] = q;
    if (kFeedback) residual[i] = y[i] - q;
  }
}

// ---- whole runs ---------------------------------------------------------------------

inline size_t num_blocks(size_t count) { return (count + kCompressBlock - 1) / kCompressBlock; }

template <class W>
void compress_run(void* wire, const float* in, size_t count, float prescale) {
  uint8_t* scales = static_cast<uint8_t*>(wire);
  uint8_t* values = scales + num_blocks(count) * sizeof(float);
  for (size_t off = 0, b = 0; off < count; off += kCompressBlock, ++b) {
    const size_t n = count - off < kCompressBlock ? count - off : kCompressBlock;
    const float inverse = compress_block<W>(values + 2 * off, in + off, n, prescale);
    std::memcpy(scales + b * sizeof(float), &inverse, sizeof(float));
  }
}

template <class W, bool kAccumulate>
void decompress_run(float* out, const void* wire, size_t count) {
  const uint8_t* scales = static_cast<const uint8_t*>(wire);
  const uint8_t* values = scales + num_blocks(count) * sizeof(float);
  for (size_t off = 0, b = 0; off < count; off += kCompressBlock, ++b) {
    const size_t n = count - off < kCompressBlock ? count - off : kCompressBlock;
    float inverse;
    std::memcpy(&inverse, scales + b * sizeof(float), sizeof(float));
    decompress_block<W, kAccumulate>(out + off, values + 2 * off, n, inverse);
  }
}

template <class W, bool kFeedback>
void requantize_run(float* x, float* residual, size_t count) {
  for (size_t off = 0; off < count; off += kCompressBlock) {
    const size_t n = count - off < kCompressBlock ? count - off : kCompressBlock;
    requantize_block<W, kFeedback>(x + off, kFeedback ? residual + off : nullptr, n);
  }
}

// ---- table entry points (arguments validated by compress.cpp) -------------------------

inline void compress(void* wire, const float* in, size_t count, DataType t, float prescale) {
  if (t == DataType::kFloat16) compress_run<Fp16Wire>(wire, in, count, prescale);
  else compress_run<Bf16Wire>(wire, in, count, prescale);
}

inline void decompress(float* out, const void* wire, size_t count, DataType t, bool accumulate) {
  if (t == DataType::kFloat16) {
    if (accumulate) decompress_run<Fp16Wire, true>(out, wire, count);
    else decompress_run<Fp16Wire, false>(out, wire, count);
  } else {
    if (accumulate) decompress_run<Bf16Wire, true>(out, wire, count);
    else decompress_run<Bf16Wire, false>(out, wire, count);
  }
}

inline void error_feedback(float* x, float* residual, size_t count, DataType t) {
  if (t == DataType::kFloat16) requantize_run<Fp16Wire, true>(x, residual, count);
  else requantize_run<Bf16Wire, true>(x, residual, count);
}

inline void round_trip(float* x, size_t count, DataType t) {
  if (t == DataType::kFloat16) requantize_run<Fp16Wire, false>(x, nullptr, count);
  else requantize_run<Bf16Wire, false>(x, nullptr, count);
}

inline constexpr CompressTable kCompressTable = {&compress, &decompress, &error_feedback,
                                                 &round_trip};

}  // namespace block_scaled
}  // namespace ringcc::kernels::RINGCC_KERNEL_NS
