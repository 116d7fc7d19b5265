// Ring reduce-scatter and allgather: each of the n-1 steps moves one chunk per rank to
// its right neighbour, so every link carries (n-1)/n of the buffer per phase — the
// bandwidth optimum. Chunks are cut into frames of segment_bytes so a receiver reduces
// frame k while frame k+1 is still in flight.
#include "ringcc/algorithms/algorithms.h"

namespace ringcc::algorithms {
namespace {

template <typename Fn>
void for_each_segment(size_t elems, size_t esize, size_t segment_bytes, Fn fn) {
  Segments seg(elems, esize, segment_bytes);
  for (size_t k = 0; k < seg.count; ++k) fn(seg.first(k), seg.length(k));
}

}  // namespace

Partition Partition::even(size_t total, int n) {
  Partition p;
  size_t base = total / n, extra = total % n, off = 0;
  for (int c = 0; c < n; ++c) {
    size_t len = base + (static_cast<size_t>(c) < extra ? 1 : 0);
    p.offset.push_back(off);
    p.count.push_back(len);
    off += len;
  }
  return p;
}

Partition Partition::from_counts(const std::vector<size_t>& counts) {
  Partition p;
  size_t off = 0;
  for (size_t c : counts) {
    p.offset.push_back(off);
    p.count.push_back(c);
    off += c;
  }
  return p;
}

void ring_reduce_scatter(OpContext& ctx, char* buf, const Partition& part, size_t esize, size_t segment_bytes) {
  const int n = ctx.size(), r = ctx.rank();
  const int right = ring_index(r + 1, n), left = ring_index(r - 1, n);
  std::vector<Transfer> v;
  // Step s: forward the partial sum of chunk r-1-s (our own data at s = 0) and fold the
  // partial sum of chunk r-2-s from the left into ours. After n-1 steps chunk r holds
  // the contributions of every rank, accumulated in ring order starting at rank r+1.
  for (int s = 0; s < n - 1; ++s) {
    int sc = ring_index(r - 1 - s, n), rc = ring_index(r - 2 - s, n);
    v.clear();
    for_each_segment(part.count[sc], esize, segment_bytes, [&](size_t first, size_t len) {
      v.push_back(Transfer::send(right, buf + (part.offset[sc] + first) * esize, len * esize));
    });
    for_each_segment(part.count[rc], esize, segment_bytes, [&](size_t first, size_t len) {
      v.push_back(Transfer::recv_reduce(left, buf + (part.offset[rc] + first) * esize, len * esize,
                                        /*incoming_first=*/true));
    });
    ctx.exchange(v);
  }
}

void ring_allgather(OpContext& ctx, char* buf, const Partition& part, size_t esize, size_t segment_bytes) {
  const int n = ctx.size(), r = ctx.rank();
  const int right = ring_index(r + 1, n), left = ring_index(r - 1, n);
  std::vector<Transfer> v;
  // Step s: pass on the chunk that arrived in step s-1 (our own, chunk r, at s = 0).
  for (int s = 0; s < n - 1; ++s) {
    int sc = ring_index(r - s, n), rc = ring_index(r - s - 1, n);
    v.clear();
    for_each_segment(part.count[sc], esize, segment_bytes, [&](size_t first, size_t len) {
      v.push_back(Transfer::send(right, buf + (part.offset[sc] + first) * esize, len * esize));
    });
    for_each_segment(part.count[rc], esize, segment_bytes, [&](size_t first, size_t len) {
      v.push_back(Transfer::recv(left, buf + (part.offset[rc] + first) * esize, len * esize));
    });
    ctx.exchange(v);
  }
}

}  // namespace ringcc::algorithms
