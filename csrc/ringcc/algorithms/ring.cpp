// Ring reduce-scatter and allgather: each of the n-1 steps moves one chunk per rank to
// its right neighbour, so every link carries (n-1)/n of the buffer per phase — the
// bandwidth optimum. Chunks are cut into frames of segment_bytes so a receiver reduces
// frame k while frame k+1 is still in flight, and a frame is passed on as soon as it
// has arrived, so the steps of a phase overlap.
#include "ringcc/algorithms/algorithms.h"

namespace ringcc::algorithms {

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

namespace {

// Appends all n-1 steps of a ring phase to `v`. In step s a rank sends chunk
// send_chunk(s) to its right and receives chunk recv_chunk(s) from its left; the chunk
// received in step s is the one sent in step s+1, so each of its segments is forwarded
// as soon as it has arrived (Transfer::after) rather than when the whole step is done.
// The first step's sends wait for `first_after` (receive indices by segment; empty:
// nothing). Returns the last step's receive indices, by segment.
template <typename SendChunk, typename RecvChunk>
std::vector<uint32_t> append_ring_phase(OpContext& ctx, std::vector<Transfer>& v, char* buf, const Partition& part,
                                        size_t esize, size_t segment_bytes, bool reduce, SendChunk send_chunk,
                                        RecvChunk recv_chunk, std::vector<uint32_t> first_after = {}) {
  const int n = ctx.size(), r = ctx.rank();
  const int right = ring_index(r + 1, n), left = ring_index(r - 1, n);
  std::vector<uint32_t> prev_recv = std::move(first_after), recv;
  for (int s = 0; s < n - 1; ++s) {
    const int sc = send_chunk(s), rc = recv_chunk(s);
    Segments out(part.count[sc], esize, segment_bytes);
    for (size_t k = 0; k < out.count; ++k) {
      Transfer t = Transfer::send(right, buf + (part.offset[sc] + out.first(k)) * esize, out.length(k) * esize);
      if (!prev_recv.empty()) t.after = prev_recv[k] + 1;  // same chunk, same segmentation
      v.push_back(t);
    }
    Segments in(part.count[rc], esize, segment_bytes);
    recv.clear();
    for (size_t k = 0; k < in.count; ++k) {
      char* dst = buf + (part.offset[rc] + in.first(k)) * esize;
      recv.push_back(static_cast<uint32_t>(v.size()));
      v.push_back(reduce ? Transfer::recv_reduce(left, dst, in.length(k) * esize, /*incoming_first=*/true)
                         : Transfer::recv(left, dst, in.length(k) * esize));
    }
    prev_recv.swap(recv);
  }
  return prev_recv;
}

// Step s of the reduce-scatter: forward the partial sum of chunk r-1-s (our own data at
// s = 0) and fold the partial sum of chunk r-2-s from the left into ours. After n-1
// steps chunk r holds the contributions of every rank, accumulated in ring order
// starting at rank r+1.
std::vector<uint32_t> append_reduce_scatter(OpContext& ctx, std::vector<Transfer>& v, char* buf,
                                            const Partition& part, size_t esize, size_t segment_bytes) {
  const int n = ctx.size(), r = ctx.rank();
  return append_ring_phase(ctx, v, buf, part, esize, segment_bytes, /*reduce=*/true,
                           [&](int s) { return ring_index(r - 1 - s, n); },
                           [&](int s) { return ring_index(r - 2 - s, n); });
}

// Step s of the allgather: pass on the chunk that arrived in step s-1 (our own, chunk r,
// at s = 0, which waits for `own_ready` when that chunk is still being reduced).
void append_allgather(OpContext& ctx, std::vector<Transfer>& v, char* buf, const Partition& part, size_t esize,
                      size_t segment_bytes, std::vector<uint32_t> own_ready = {}) {
  const int n = ctx.size(), r = ctx.rank();
  append_ring_phase(ctx, v, buf, part, esize, segment_bytes, /*reduce=*/false,
                    [&](int s) { return ring_index(r - s, n); }, [&](int s) { return ring_index(r - s - 1, n); },
                    std::move(own_ready));
}

}  // namespace

void ring_reduce_scatter(OpContext& ctx, char* buf, const Partition& part, size_t esize, size_t segment_bytes) {
  std::vector<Transfer> v;
  append_reduce_scatter(ctx, v, buf, part, esize, segment_bytes);
  ctx.exchange(v);
}

void ring_allgather(OpContext& ctx, char* buf, const Partition& part, size_t esize, size_t segment_bytes) {
  std::vector<Transfer> v;
  append_allgather(ctx, v, buf, part, esize, segment_bytes);
  ctx.exchange(v);
}

// Both phases in one exchange: a segment of this rank's own chunk starts around the ring
// again as soon as its last partial sum has arrived, so the links never drain between
// the phases. (A segment's final value can only come back from the left after this
// rank's own send of that segment went out, so no buffer is written while it is read.)
void ring_allreduce(OpContext& ctx, char* buf, const Partition& part, size_t esize, size_t segment_bytes) {
  std::vector<Transfer> v;
  std::vector<uint32_t> own = append_reduce_scatter(ctx, v, buf, part, esize, segment_bytes);
  append_allgather(ctx, v, buf, part, esize, segment_bytes, std::move(own));
  ctx.exchange(v);
}

}  // namespace ringcc::algorithms
