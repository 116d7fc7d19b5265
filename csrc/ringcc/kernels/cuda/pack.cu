// Multi-tensor bucketing on the GPU: many pieces copied into (pack) or out of (unpack)
// one flat buffer by a single launch (per kMaxPiecesPerLaunch pieces).
//
// The piece table travels as a kernel parameter (no host-to-device copy, no sync): up to
// 1024 pieces of 24 bytes fit the 32 KiB parameter space of CUDA 12.1+ on sm_70 and
// newer. blockIdx.y picks the piece; blocks along x share its bytes, 16 at a time where
// both sides are 16-byte aligned (single bytes at the unaligned edges otherwise).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ringcc/kernels/cuda/cuda_check.h"

namespace ringcc::kernels::cuda {
namespace {

struct Piece {
  const uint8_t* src;
  uint8_t* dst;
  size_t bytes;
};

struct PieceTable {
  Piece piece[kMaxPiecesPerLaunch];
};
static_assert(sizeof(PieceTable) <= 32764, "the piece table must fit the kernel parameter space");

__global__ void copy_pieces_kernel(const __grid_constant__ PieceTable table) {
  const Piece& p = table.piece[blockIdx.y];
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  const size_t first = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool vec = ((reinterpret_cast<uintptr_t>(p.src) | reinterpret_cast<uintptr_t>(p.dst)) & 15u) == 0;
  size_t tail = 0;
  if (vec) {
    const size_t vectors = p.bytes / 16;
    const uint4* s = reinterpret_cast<const uint4*>(p.src);
    uint4* d = reinterpret_cast<uint4*>(p.dst);
    for (size_t i = first; i < vectors; i += stride) d[i] = s[i];
    tail = vectors * 16;
  }
  for (size_t i = tail + first; i < p.bytes; i += stride) p.dst[i] = p.src[i];
}

void copy_pieces(const Piece* pieces, size_t n, cudaStream_t stream, const char* what) {
  PieceTable table;
  for (size_t at = 0; at < n; at += kMaxPiecesPerLaunch) {
    const size_t k = std::min(n - at, kMaxPiecesPerLaunch);
    size_t largest = 0;
    for (size_t i = 0; i < k; ++i) {
      table.piece[i] = pieces[at + i];
      largest = std::max(largest, pieces[at + i].bytes);
    }
    if (largest == 0) continue;
    // x covers the largest piece at 16 bytes per thread; smaller pieces leave blocks idle.
    const unsigned gx = std::min(detail::grid_for((largest + 15) / 16), 1024u);
    copy_pieces_kernel<<<dim3(gx, static_cast<unsigned>(k)), detail::kThreads, 0, stream>>>(table);
    detail::check_launch(what);
  }
}

}  // namespace

void pack(void* flat, const void* const* srcs, const size_t* offsets, const size_t* bytes, size_t n, void* stream) {
  if (n == 0) return;
  RINGCC_CHECK_ARG(srcs && offsets && bytes, "cuda pack: null piece table with ", n, " pieces");
  std::vector<Piece> pieces(n);
  for (size_t i = 0; i < n; ++i) {
    RINGCC_CHECK_ARG(bytes[i] == 0 || (flat && srcs[i]), "cuda pack: piece ", i, " has a null pointer");
    pieces[i] = {static_cast<const uint8_t*>(srcs[i]), static_cast<uint8_t*>(flat) + offsets[i], bytes[i]};
  }
  copy_pieces(pieces.data(), n, detail::as_stream(stream), "pack");
}

void unpack(void* const* dsts, const void* flat, const size_t* offsets, const size_t* bytes, size_t n, void* stream) {
  if (n == 0) return;
  RINGCC_CHECK_ARG(dsts && offsets && bytes, "cuda unpack: null piece table with ", n, " pieces");
  std::vector<Piece> pieces(n);
  for (size_t i = 0; i < n; ++i) {
    RINGCC_CHECK_ARG(bytes[i] == 0 || (flat && dsts[i]), "cuda unpack: piece ", i, " has a null pointer");
    pieces[i] = {static_cast<const uint8_t*>(flat) + offsets[i], static_cast<uint8_t*>(dsts[i]), bytes[i]};
  }
  copy_pieces(pieces.data(), n, detail::as_stream(stream), "unpack");
}

}  // namespace ringcc::kernels::cuda
