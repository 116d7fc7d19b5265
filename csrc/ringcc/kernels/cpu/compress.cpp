// Compression and bucketing kernels: argument validation, then the table of the SIMD
// level in use (compress_generic.cpp / compress_avx2.cpp, chosen in kernels.cpp).
#include "ringcc/kernels/cpu/compress.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "ringcc/common/error.h"
#include "ringcc/kernels/cpu/kernel_table.h"

namespace ringcc::kernels {
namespace {

void check_wire_type(const char* fn, DataType t) {
  if (t != DataType::kFloat16 && t != DataType::kBFloat16) {
    RINGCC_THROW(std::invalid_argument, fn, ": wire type '", dtype_name(t),
                 "' is not float16 or bfloat16");
  }
}

// Keeps compressed_bytes() and the byte ranges below from wrapping around.
void check_count(const char* fn, size_t count) {
  if (count > SIZE_MAX / 8) RINGCC_THROW(std::invalid_argument, fn, ": count ", count, " is too large");
}

void check_ptr(const char* fn, const char* what, const void* p) {
  if (p == nullptr) RINGCC_THROW(std::invalid_argument, fn, ": ", what, " is null");
}

bool overlap(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  const uintptr_t x = reinterpret_cast<uintptr_t>(a);
  const uintptr_t y = reinterpret_cast<uintptr_t>(b);
  return x < y + b_bytes && y < x + a_bytes;
}

void check_disjoint(const char* fn, const char* a_name, const void* a, size_t a_bytes,
                    const char* b_name, const void* b, size_t b_bytes) {
  if (overlap(a, a_bytes, b, b_bytes)) {
    RINGCC_THROW(std::invalid_argument, fn, ": ", a_name, " and ", b_name, " overlap");
  }
}

}  // namespace

void compress(void* wire, const float* in, size_t count, DataType wire_type, float prescale) {
  check_wire_type("compress", wire_type);
  check_count("compress", count);
  // A non-finite prescale would turn every block into inf/NaN; it is always a bug.
  if (!std::isfinite(prescale)) {
    RINGCC_THROW(std::invalid_argument, "compress: prescale ", prescale, " is not finite");
  }
  if (count == 0) return;
  check_ptr("compress", "wire", wire);
  check_ptr("compress", "input", in);
  check_disjoint("compress", "input", in, count * sizeof(float), "wire", wire, compressed_bytes(count));
  active_compress_table().compress(wire, in, count, wire_type, prescale);
}

void decompress(float* out, const void* wire, size_t count, DataType wire_type, bool accumulate) {
  check_wire_type("decompress", wire_type);
  check_count("decompress", count);
  if (count == 0) return;
  check_ptr("decompress", "output", out);
  check_ptr("decompress", "wire", wire);
  check_disjoint("decompress", "output", out, count * sizeof(float), "wire", wire,
                 compressed_bytes(count));
  active_compress_table().decompress(out, wire, count, wire_type, accumulate);
}

void error_feedback(float* x, float* residual, size_t count, DataType wire_type) {
  check_wire_type("error_feedback", wire_type);
  check_count("error_feedback", count);
  if (count == 0) return;
  check_ptr("error_feedback", "x", x);
  check_ptr("error_feedback", "residual", residual);
  check_disjoint("error_feedback", "x", x, count * sizeof(float), "residual", residual,
                 count * sizeof(float));
  active_compress_table().error_feedback(x, residual, count, wire_type);
}

void round_trip(float* x, size_t count, DataType wire_type) {
  check_wire_type("round_trip", wire_type);
  check_count("round_trip", count);
  if (count == 0) return;
  check_ptr("round_trip", "x", x);
  active_compress_table().round_trip(x, count, wire_type);
}

namespace {

// Null pointers are fine for empty pieces (an empty tensor may have no storage); all
// pieces are checked before anything is copied.
void check_pieces(const char* fn, const void* flat, const void* const* ptrs, const size_t* offsets,
                  const size_t* bytes, size_t n) {
  check_ptr(fn, "pointer list", ptrs);
  check_ptr(fn, "offset list", offsets);
  check_ptr(fn, "byte-count list", bytes);
  for (size_t i = 0; i < n; ++i) {
    if (bytes[i] == 0) continue;
    check_ptr(fn, "flat", flat);
    if (ptrs[i] == nullptr) RINGCC_THROW(std::invalid_argument, fn, ": piece ", i, " is null");
  }
}

}  // namespace

// One memcpy per piece: memcpy is already vectorized, and the pieces of a bucket are
// large enough that the loop itself costs nothing. No threads: splitting the pieces over
// two threads was slower on the 2-core VM measured (bench/results/compress_kernels_cpu.md).
void pack(void* flat, const void* const* srcs, const size_t* offsets, const size_t* bytes, size_t n) {
  if (n == 0) return;
  check_pieces("pack", flat, srcs, offsets, bytes, n);
  for (size_t i = 0; i < n; ++i) {
    if (bytes[i] != 0) std::memcpy(static_cast<uint8_t*>(flat) + offsets[i], srcs[i], bytes[i]);
  }
}

void unpack(void* const* dsts, const void* flat, const size_t* offsets, const size_t* bytes, size_t n) {
  if (n == 0) return;
  check_pieces("unpack", flat, dsts, offsets, bytes, n);
  for (size_t i = 0; i < n; ++i) {
    if (bytes[i] != 0) std::memcpy(dsts[i], static_cast<const uint8_t*>(flat) + offsets[i], bytes[i]);
  }
}

}  // namespace ringcc::kernels
