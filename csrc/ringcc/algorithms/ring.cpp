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

// All n-1 steps of a ring phase as one exchange. In step s a rank sends chunk
// send_chunk(s) to its right and receives chunk recv_chunk(s) from its left; the chunk
// received in step s is the one sent in step s+1, so each of its segments is forwarded
// as soon as it has arrived (Transfer::after) rather than when the whole step is done.
// Keeping one exchange also keeps both links busy across step boundaries.
template <typename SendChunk, typename RecvChunk>
void ring_phase(OpContext& ctx, char* buf, const Partition& part, size_t esize, size_t segment_bytes,
                bool reduce, SendChunk send_chunk, RecvChunk recv_chunk) {
  const int n = ctx.size(), r = ctx.rank();
  const int right = ring_index(r + 1, n), left = ring_index(r - 1, n);
  std::vector<Transfer> v;
  std::vector<uint32_t> prev_recv;  // indices of the previous step's receives, by segment
  std::vector<uint32_t> recv;
  for (int s = 0; s < n - 1; ++s) {
    const int sc = send_chunk(s), rc = recv_chunk(s);
    Segments out(part.count[sc], esize, segment_bytes);
    for (size_t k = 0; k < out.count; ++k) {
      Transfer t = Transfer::send(right, buf + (part.offset[sc] + out.first(k)) * esize, out.length(k) * esize);
      if (s > 0) t.after = prev_recv[k] + 1;  // same chunk, same segmentation
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
  ctx.exchange(v);
}

}  // namespace

void ring_reduce_scatter(OpContext& ctx, char* buf, const Partition& part, size_t esize, size_t segment_bytes) {
  const int n = ctx.size(), r = ctx.rank();
  // Step s: forward the partial sum of chunk r-1-s (our own data at s = 0) and fold the
  // partial sum of chunk r-2-s from the left into ours. After n-1 steps chunk r holds
  // the contributions of every rank, accumulated in ring order starting at rank r+1.
  ring_phase(ctx, buf, part, esize, segment_bytes, /*reduce=*/true,
             [&](int s) { return ring_index(r - 1 - s, n); }, [&](int s) { return ring_index(r - 2 - s, n); });
}

void ring_allgather(OpContext& ctx, char* buf, const Partition& part, size_t esize, size_t segment_bytes) {
  const int n = ctx.size(), r = ctx.rank();
  // Step s: pass on the chunk that arrived in step s-1 (our own, chunk r, at s = 0).
  ring_phase(ctx, buf, part, esize, segment_bytes, /*reduce=*/false,
             [&](int s) { return ring_index(r - s, n); }, [&](int s) { return ring_index(r - s - 1, n); });
}

}  // namespace ringcc::algorithms
