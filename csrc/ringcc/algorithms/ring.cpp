// Ring reduce-scatter and allgather: each of the n-1 steps moves one chunk per rank to
// its right neighbour, so every link carries (n-1)/n of the buffer per phase — the
// bandwidth optimum. Chunks are cut into frames of segment_bytes so a receiver reduces
// frame k while frame k+1 is still in flight, and a frame is passed on as soon as it
// has arrived, so the steps of a phase overlap.
#include "ringcc/algorithms/ring_phase.h"

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

// A plain buffer: chunk c is part's range c, cut into frames of segment_bytes; a
// reduce-scatter receive folds the incoming partial sum into ours as it streams in.
// With `src` (out-of-place), buf starts unwritten: the reduce-scatter takes this rank's
// contribution from src instead, sending its first chunk straight from there and
// writing incoming (op) src into buf, so the input is never copied up front. (The
// first chunk sent, r-1, is the only one a reduce-scatter never receives; the
// allgather fills it.)
struct PlainLayout {
  char* buf;
  const Partition& part;
  size_t esize, segment_bytes;
  bool reduce;
  const char* src = nullptr;
  int src_chunk = -1;  // the chunk sent from src

  Segments segs(int c) const { return Segments(part.count[c], esize, segment_bytes); }
  size_t offset(int c, size_t k) const { return (part.offset[c] + segs(c).first(k)) * esize; }
  char* at(int c, size_t k) const { return buf + offset(c, k); }
  size_t bytes(int c, size_t k) const { return segs(c).length(k) * esize; }
  size_t segments(int c) const { return segs(c).count; }
  Transfer send(int c, size_t k) const {
    return Transfer::send(-1, src && c == src_chunk ? src + offset(c, k) : at(c, k), bytes(c, k));
  }
  Transfer recv(int, int c, size_t k) const {
    if (!reduce) return Transfer::recv(-1, at(c, k), bytes(c, k));
    Transfer t = Transfer::recv_reduce(-1, at(c, k), bytes(c, k), /*incoming_first=*/true);
    if (src) t.operand = src + offset(c, k);
    return t;
  }
};

std::vector<uint32_t> append_reduce_scatter(OpContext& ctx, std::vector<Transfer>& v, char* buf,
                                            const Partition& part, size_t esize, size_t segment_bytes,
                                            const char* src) {
  PlainLayout layout{buf, part, esize, segment_bytes, /*reduce=*/true, src,
                     rs_send_chunk(ctx.rank(), 0, ctx.size())};
  return append_ring_phase(ctx, v, layout, rs_send_chunk, rs_recv_chunk);
}

// The allgather's first sends wait for `own_ready` when this rank's chunk is still
// being reduced in the same exchange.
void append_allgather(OpContext& ctx, std::vector<Transfer>& v, char* buf, const Partition& part, size_t esize,
                      size_t segment_bytes, std::vector<uint32_t> own_ready = {}) {
  PlainLayout layout{buf, part, esize, segment_bytes, /*reduce=*/false};
  append_ring_phase(ctx, v, layout, ag_send_chunk, ag_recv_chunk, std::move(own_ready));
}

}  // namespace

void ring_reduce_scatter(OpContext& ctx, char* buf, const Partition& part, size_t esize, size_t segment_bytes,
                         const char* src) {
  std::vector<Transfer> v;
  append_reduce_scatter(ctx, v, buf, part, esize, segment_bytes, src);
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
void ring_allreduce(OpContext& ctx, char* buf, const Partition& part, size_t esize, size_t segment_bytes,
                    const char* src) {
  std::vector<Transfer> v;
  std::vector<uint32_t> own = append_reduce_scatter(ctx, v, buf, part, esize, segment_bytes, src);
  append_allgather(ctx, v, buf, part, esize, segment_bytes, std::move(own));
  ctx.exchange(v);
}

}  // namespace ringcc::algorithms
