// Block-scaled half compression on the GPU (cuda_kernels.h; format in
// kernels/cpu/compress.h).
//
// One warp per block of 256 values: each lane holds 8 consecutive values in registers,
// the block's largest magnitude comes from a warp shuffle reduction over the bit
// patterns, and the scale from block_scale() — the CPU's own function — so the bytes
// equal the CPU kernels'. Lanes load and store 16 bytes at a time where the buffers'
// alignment allows; consecutive lanes touch consecutive 16-byte pieces (coalesced).
#include <cuda_runtime.h>

#include <cstdint>

#include "ringcc/common/hd.h"
#include "ringcc/kernels/block_scale.h"
#include "ringcc/kernels/cpu/compress.h"
#include "ringcc/kernels/cpu/half.h"
#include "ringcc/kernels/cuda/cuda_check.h"

namespace ringcc::kernels::cuda {
namespace {

using block_scaled::BlockScale;
using block_scaled::block_scale;
using block_scaled::kAbsMask;
using detail::kThreads;

constexpr int kPerLane = 8;  // 32 lanes x 8 = kCompressBlock
static_assert(32 * kPerLane == kCompressBlock, "one warp per compression block");

struct Fp16Wire {
  static __device__ uint16_t narrow(float f) { return half::fp32_to_fp16(f); }
  static __device__ float widen(uint16_t h) { return half::fp16_to_fp32(h); }
};
struct Bf16Wire {
  static __device__ uint16_t narrow(float f) { return half::fp32_to_bf16(f); }
  static __device__ float widen(uint16_t h) { return half::bf16_to_fp32(h); }
};

// Where one block's pieces are, for one lane.
struct Lane {
  size_t block;  // block index
  size_t first;  // index of this lane's first element
  int valid;     // how many of its 8 elements exist (0..8)
};

__device__ Lane lane_of(size_t block, size_t count) {
  const int lane = threadIdx.x & 31;
  const size_t first = block * kCompressBlock + static_cast<size_t>(lane) * kPerLane;
  const int valid = first >= count ? 0 : (count - first >= kPerLane ? kPerLane : static_cast<int>(count - first));
  return {block, first, valid};
}

__device__ uint32_t warp_max(uint32_t v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, d));
  return v;
}

__device__ void load8(float (&v)[kPerLane], const float* p, int valid, bool vec) {
  if (vec && valid == kPerLane) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    return;
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) v[j] = j < valid ? p[j] : 0.0f;
}

__device__ void store8(float* p, const float (&v)[kPerLane], int valid, bool vec) {
  if (vec && valid == kPerLane) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    return;
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j)
    if (j < valid) p[j] = v[j];
}

union Halves {
  uint4 raw;
  uint16_t h[kPerLane];
};

__device__ void load_halves(Halves& u, const uint8_t* p, int valid, bool vec) {
  if (vec && valid == kPerLane) {
    u.raw = *reinterpret_cast<const uint4*>(p);
    return;
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j)
    u.h[j] = j < valid ? static_cast<uint16_t>(p[2 * j] | (p[2 * j + 1] << 8)) : 0;
}

__device__ void store_halves(uint8_t* p, const Halves& u, int valid, bool vec) {
  if (vec && valid == kPerLane) {
    *reinterpret_cast<uint4*>(p) = u.raw;
    return;
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j)
    if (j < valid) p[2 * j] = static_cast<uint8_t>(u.h[j]), p[2 * j + 1] = static_cast<uint8_t>(u.h[j] >> 8);
}

// The wire may sit at any byte address: scales are moved bytewise.
__device__ float load_scale(const uint8_t* p) {
  uint32_t u = p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<uint32_t>(p[3]) << 24);
  return half::bits_to_f32(u);
}
__device__ void store_scale(uint8_t* p, float f) {
  const uint32_t u = half::f32_to_bits(f);
  p[0] = u & 0xff, p[1] = (u >> 8) & 0xff, p[2] = (u >> 16) & 0xff, p[3] = u >> 24;
}

__device__ uint32_t abs_bits(float f) { return half::f32_to_bits(f) & kAbsMask; }

// Encodes y (this lane's 8 values of the block) into the wire; returns the block's
// scale (so callers can decode what they wrote).
template <class W>
__device__ BlockScale encode(uint8_t* scales, uint8_t* values, const Lane& l, const float (&y)[kPerLane],
                             bool vec_values) {
  uint32_t mx = 0;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j)
    if (j < l.valid) mx = max(mx, abs_bits(y[j]));
  const BlockScale s = block_scale(warp_max(mx));
  Halves u;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) u.h[j] = W::narrow(y[j] * s.scale);
  if (l.valid > 0) store_halves(values + 2 * l.first, u, l.valid, vec_values);
  if ((threadIdx.x & 31) == 0) store_scale(scales + 4 * l.block, s.inverse);
  return s;
}

template <class W>
__device__ void decode(float (&v)[kPerLane], const uint8_t* scales, const uint8_t* values, const Lane& l,
                       bool vec_values) {
  const float inverse = load_scale(scales + 4 * l.block);
  Halves u;
  load_halves(u, values + 2 * l.first, l.valid, vec_values);
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) v[j] = W::widen(u.h[j]) * inverse;
}

// Grid-stride over blocks, one warp each. Every lane of a warp stays in the loop for the
// same blocks (the shuffles need the whole warp).
#define RINGCC_FOR_EACH_BLOCK(nb)                                                              \
  for (size_t block = (static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; block < (nb); \
       block += static_cast<size_t>(gridDim.x) * blockDim.x / 32)

template <class W>
__global__ void compress_kernel(uint8_t* wire, const float* in, size_t count, float prescale, bool vec_in,
                                bool vec_values) {
  const size_t nb = (count + kCompressBlock - 1) / kCompressBlock;
  uint8_t* values = wire + nb * 4;
  RINGCC_FOR_EACH_BLOCK(nb) {
    const Lane l = lane_of(block, count);
    float y[kPerLane];
    load8(y, in + l.first, l.valid, vec_in);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) y[j] = y[j] * prescale;
    encode<W>(wire, values, l, y, vec_values);
  }
}

template <class W, bool kAccumulate>
__global__ void decompress_kernel(float* out, const uint8_t* wire, size_t count, bool vec_out, bool vec_values) {
  const size_t nb = (count + kCompressBlock - 1) / kCompressBlock;
  const uint8_t* values = wire + nb * 4;
  RINGCC_FOR_EACH_BLOCK(nb) {
    const Lane l = lane_of(block, count);
    if (l.valid == 0) continue;  // no shuffles below: idle lanes may leave
    float v[kPerLane];
    decode<W>(v, wire, values, l, vec_values);
    if (kAccumulate) {
      float o[kPerLane];
      load8(o, out + l.first, l.valid, vec_out);
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) v[j] = o[j] + v[j];
    }
    store8(out + l.first, v, l.valid, vec_out);
  }
}

// x <- decode(encode(x + residual)), residual <- (x + residual) - x when kFeedback;
// the plain round trip of x otherwise.
template <class W, bool kFeedback>
__global__ void requantize_kernel(float* x, float* residual, size_t count, bool vec) {
  const size_t nb = (count + kCompressBlock - 1) / kCompressBlock;
  RINGCC_FOR_EACH_BLOCK(nb) {
    const Lane l = lane_of(block, count);
    float y[kPerLane];
    load8(y, x + l.first, l.valid, vec);
    if (kFeedback) {
      float r[kPerLane];
      load8(r, residual + l.first, l.valid, vec);
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) y[j] = y[j] + r[j];
    }
    uint32_t mx = 0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)
      if (j < l.valid) mx = max(mx, abs_bits(y[j]));
    const BlockScale s = block_scale(warp_max(mx));
    float q[kPerLane], r[kPerLane];
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      q[j] = W::widen(W::narrow(y[j] * s.scale)) * s.inverse;
      r[j] = y[j] - q[j];
    }
    store8(x + l.first, q, l.valid, vec);
    if (kFeedback) store8(residual + l.first, r, l.valid, vec);
  }
}

// One compressed-ring step: y = local + decode(wire_in); wire_out = encode(y); sum_out
// (optional) = decode(wire_out). wire_in may equal wire_out: each warp reads its whole
// block before the shuffle in encode() and writes only after it.
template <class W>
__global__ void decompress_add_compress_kernel(uint8_t* wire_out, const uint8_t* wire_in, const float* local,
                                               float* sum_out, size_t count, bool vec_f32, bool vec_values) {
  const size_t nb = (count + kCompressBlock - 1) / kCompressBlock;
  RINGCC_FOR_EACH_BLOCK(nb) {
    const Lane l = lane_of(block, count);
    float in[kPerLane], y[kPerLane];
    decode<W>(in, wire_in, wire_in + nb * 4, l, vec_values);
    load8(y, local + l.first, l.valid, vec_f32);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) y[j] = y[j] + in[j];
    const BlockScale s = encode<W>(wire_out, wire_out + nb * 4, l, y, vec_values);
    if (sum_out && l.valid > 0) {
      float q[kPerLane];
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) q[j] = W::widen(W::narrow(y[j] * s.scale)) * s.inverse;
      store8(sum_out + l.first, q, l.valid, vec_f32);
    }
  }
}

#undef RINGCC_FOR_EACH_BLOCK

unsigned grid_for_blocks(size_t count) {
  const size_t nb = (count + kCompressBlock - 1) / kCompressBlock;
  return detail::grid_for(nb * 32);  // one warp (32 threads) per block
}

bool values_aligned(const void* wire, size_t count) {
  const size_t nb = (count + kCompressBlock - 1) / kCompressBlock;
  return detail::aligned16(static_cast<const uint8_t*>(wire) + nb * 4);
}

void check_wire_type(const char* fn, DataType t) {
  if (t != DataType::kFloat16 && t != DataType::kBFloat16)
    RINGCC_THROW(std::invalid_argument, "cuda ", fn, ": wire type must be float16 or bfloat16, got ", dtype_name(t));
}

}  // namespace

void compress(void* wire, const float* in, size_t count, DataType wire_type, float prescale, void* stream) {
  check_wire_type("compress", wire_type);
  RINGCC_CHECK_ARG(prescale == prescale && prescale - prescale == 0.0f, "cuda compress: prescale must be finite");
  if (count == 0) return;
  RINGCC_CHECK_ARG(wire && in, "cuda compress: null pointer with count ", count);
  uint8_t* w = static_cast<uint8_t*>(wire);
  const bool vi = detail::aligned16(in), vv = values_aligned(wire, count);
  auto s = detail::as_stream(stream);
  if (wire_type == DataType::kFloat16)
    compress_kernel<Fp16Wire><<<grid_for_blocks(count), kThreads, 0, s>>>(w, in, count, prescale, vi, vv);
  else
    compress_kernel<Bf16Wire><<<grid_for_blocks(count), kThreads, 0, s>>>(w, in, count, prescale, vi, vv);
  detail::check_launch("compress");
}

void decompress(float* out, const void* wire, size_t count, DataType wire_type, bool accumulate, void* stream) {
  check_wire_type("decompress", wire_type);
  if (count == 0) return;
  RINGCC_CHECK_ARG(wire && out, "cuda decompress: null pointer with count ", count);
  const uint8_t* w = static_cast<const uint8_t*>(wire);
  const bool vo = detail::aligned16(out), vv = values_aligned(wire, count);
  auto s = detail::as_stream(stream);
  const unsigned g = grid_for_blocks(count);
  if (wire_type == DataType::kFloat16) {
    if (accumulate) decompress_kernel<Fp16Wire, true><<<g, kThreads, 0, s>>>(out, w, count, vo, vv);
    else decompress_kernel<Fp16Wire, false><<<g, kThreads, 0, s>>>(out, w, count, vo, vv);
  } else {
    if (accumulate) decompress_kernel<Bf16Wire, true><<<g, kThreads, 0, s>>>(out, w, count, vo, vv);
    else decompress_kernel<Bf16Wire, false><<<g, kThreads, 0, s>>>(out, w, count, vo, vv);
  }
  detail::check_launch("decompress");
}

void error_feedback(float* x, float* residual, size_t count, DataType wire_type, void* stream) {
  check_wire_type("error_feedback", wire_type);
  if (count == 0) return;
  RINGCC_CHECK_ARG(x && residual, "cuda error_feedback: null pointer with count ", count);
  const bool v = detail::aligned16(x) && detail::aligned16(residual);
  auto s = detail::as_stream(stream);
  if (wire_type == DataType::kFloat16)
    requantize_kernel<Fp16Wire, true><<<grid_for_blocks(count), kThreads, 0, s>>>(x, residual, count, v);
  else
    requantize_kernel<Bf16Wire, true><<<grid_for_blocks(count), kThreads, 0, s>>>(x, residual, count, v);
  detail::check_launch("error_feedback");
}

void round_trip(float* x, size_t count, DataType wire_type, void* stream) {
  check_wire_type("round_trip", wire_type);
  if (count == 0) return;
  RINGCC_CHECK_ARG(x, "cuda round_trip: null pointer with count ", count);
  const bool v = detail::aligned16(x);
  auto s = detail::as_stream(stream);
  if (wire_type == DataType::kFloat16)
    requantize_kernel<Fp16Wire, false><<<grid_for_blocks(count), kThreads, 0, s>>>(x, nullptr, count, v);
  else
    requantize_kernel<Bf16Wire, false><<<grid_for_blocks(count), kThreads, 0, s>>>(x, nullptr, count, v);
  detail::check_launch("round_trip");
}

void decompress_add_compress(void* wire_out, const void* wire_in, const float* local, float* sum_out,
                             size_t count, DataType wire_type, void* stream) {
  check_wire_type("decompress_add_compress", wire_type);
  if (count == 0) return;
  RINGCC_CHECK_ARG(wire_out && wire_in && local, "cuda decompress_add_compress: null pointer with count ", count);
  const bool vf = detail::aligned16(local) && (!sum_out || detail::aligned16(sum_out));
  const bool vv = values_aligned(wire_out, count) && values_aligned(wire_in, count);
  auto wo = static_cast<uint8_t*>(wire_out);
  auto wi = static_cast<const uint8_t*>(wire_in);
  auto s = detail::as_stream(stream);
  if (wire_type == DataType::kFloat16)
    decompress_add_compress_kernel<Fp16Wire><<<grid_for_blocks(count), kThreads, 0, s>>>(wo, wi, local, sum_out,
                                                                                       count, vf, vv);
  else
    decompress_add_compress_kernel<Bf16Wire><<<grid_for_blocks(count), kThreads, 0, s>>>(wo, wi, local, sum_out,
                                                                                       count, vf, vv);
  detail::check_launch("decompress_add_compress");
}

}  // namespace ringcc::kernels::cuda
