// Compressed ring allreduce: float32 data, block-scaled fp16/bf16 on the wire
// (kernels/cpu/compress.h), float32 accumulation at every step.
//
// Reduce-scatter: a rank encodes its own chunk r-1 and sends it; every arriving segment
// is decoded and added to the rank's fp32 data, and the new partial sum is encoded again
// for the next hop, so a value is rounded to 16 bits once per hop but never summed in
// 16 bits. The owner of a chunk ends with its fp32 sum (divided by n for avg), encodes it
// once for the allgather and replaces its own copy with the decoded value, so every rank
// holds the same bits. Allgather: encoded segments are forwarded untouched and decoded
// on arrival. Both phases run as one exchange, each segment moving on as soon as it has
// been transformed (Transfer::on_done, Transfer::after).
//
// Chunks and segments start at multiples of the compression block, so a segment's wire
// image is a self-contained run of the format and sits at a fixed place in a per-phase
// image of the whole buffer.
#include <cstring>

#include "ringcc/algorithms/ring_phase.h"
#include "ringcc/kernels/cpu/compress.h"
#include "ringcc/kernels/cpu/kernels.h"

namespace ringcc::algorithms {
namespace {

constexpr size_t kBlock = kernels::kCompressBlock;
const size_t kBlockWire = kernels::compressed_bytes(kBlock);  // bytes of one full block

// One chunk per rank, each a whole number of blocks (the last may end short).
Partition block_partition(size_t count, int n) {
  Partition blocks = Partition::even((count + kBlock - 1) / kBlock, n);
  Partition p;
  for (int c = 0; c < n; ++c) {
    size_t first = std::min(blocks.offset[c] * kBlock, count);
    size_t end = std::min((blocks.offset[c] + blocks.count[c]) * kBlock, count);
    p.offset.push_back(first);
    p.count.push_back(end - first);
  }
  return p;
}

struct CompressedRing {
  OpContext& ctx;
  float* acc;          // the result, accumulated in fp32
  const float* input;  // this rank's contribution: acc itself, or the out-of-place input
  char* rs_wire;       // encoded image of the buffer for the reduce-scatter
  char* ag_wire;       // ... and for the allgather
  const Partition& part;
  size_t seg_elems;    // a multiple of kBlock
  DataType wire_type;
  bool average;

  Segments segs(int c) const { return Segments(part.count[c], 1, seg_elems); }
  size_t first(int c, size_t k) const { return part.offset[c] + segs(c).first(k); }
  size_t length(int c, size_t k) const { return segs(c).length(k); }
  char* image(char* wire, int c, size_t k) const { return wire + first(c, k) / kBlock * kBlockWire; }
  Transfer send(char* wire, int c, size_t k) const {
    return Transfer::send(-1, image(wire, c, k), kernels::compressed_bytes(length(c, k)));
  }
  Transfer recv(char* wire, int c, size_t k) const {
    return Transfer::recv(-1, image(wire, c, k), kernels::compressed_bytes(length(c, k)));
  }
  // Segment k of chunk c of `from` (acc, or the input) into its place in `wire`.
  void encode(char* wire, const float* from, int c, size_t k) const {
    kernels::compress(image(wire, c, k), from + first(c, k), length(c, k), wire_type);
  }
  void decode(char* wire, int c, size_t k, bool accumulate) const {
    kernels::decompress(acc + first(c, k), image(wire, c, k), length(c, k), wire_type, accumulate);
  }

  // A partial sum arrived in reduce-scatter step s: fold it in, then either re-encode
  // it for the next hop or, for the rank's own chunk, finish it for the allgather.
  // Out of place, the input segment is copied into acc only now, while it is about to
  // be read again: no pass over the whole buffer up front.
  void reduced(int s, int c, size_t k) const {
    if (input != acc && length(c, k))
      std::memcpy(acc + first(c, k), input + first(c, k), length(c, k) * sizeof(float));
    decode(rs_wire, c, k, /*accumulate=*/true);
    if (s < ctx.size() - 2) {
      encode(rs_wire, acc, c, k);
      return;
    }
    if (average && length(c, k)) kernels::divide(acc + first(c, k), length(c, k), DataType::kFloat32, ctx.size());
    encode(ag_wire, acc, c, k);
    decode(ag_wire, c, k, /*accumulate=*/false);
  }
};

struct ReduceScatterLayout {
  const CompressedRing& ring;
  size_t segments(int c) const { return ring.segs(c).count; }
  Transfer send(int c, size_t k) const { return ring.send(ring.rs_wire, c, k); }
  Transfer recv(int s, int c, size_t k) const {
    Transfer t = ring.recv(ring.rs_wire, c, k);
    const CompressedRing* r = &ring;
    t.on_done = [r, s, c, k] { r->reduced(s, c, k); };
    return t;
  }
};

struct AllgatherLayout {
  const CompressedRing& ring;
  size_t segments(int c) const { return ring.segs(c).count; }
  Transfer send(int c, size_t k) const { return ring.send(ring.ag_wire, c, k); }
  Transfer recv(int, int c, size_t k) const {
    Transfer t = ring.recv(ring.ag_wire, c, k);
    const CompressedRing* r = &ring;
    t.on_done = [r, c, k] { r->decode(r->ag_wire, c, k, /*accumulate=*/false); };
    return t;
  }
};

}  // namespace

void compressed_allreduce(OpContext& ctx, const OpDesc& d, const Tuning& t, Scratch& s) {
  float* acc = static_cast<float*>(d.out);
  const int n = ctx.size(), r = ctx.rank();
  if (n == 1) {  // nothing travels, so nothing is rounded
    if (d.in != d.out && d.count) std::memmove(acc, d.in, d.count * sizeof(float));
    return;
  }
  const Partition part = block_partition(d.count, n);
  const size_t image_bytes = (d.count + kBlock - 1) / kBlock * kBlockWire;
  CompressedRing ring{ctx,
                      acc,
                      static_cast<const float*>(d.in),
                      s.get(0, image_bytes),
                      s.get(1, image_bytes),
                      part,
                      std::max<size_t>(1, t.segment_bytes / kBlockWire) * kBlock,
                      wire_type(d.compression),
                      d.op == ReduceOp::kAvg};
  // This rank's contribution to the chunk it sends first is encoded up front, straight
  // from the input.
  const int first_chunk = rs_send_chunk(r, 0, n);
  for (size_t k = 0, m = ring.segs(first_chunk).count; k < m; ++k)
    ring.encode(ring.rs_wire, ring.input, first_chunk, k);

  std::vector<Transfer> v;
  ReduceScatterLayout rs{ring};
  AllgatherLayout ag{ring};
  std::vector<uint32_t> own = append_ring_phase(ctx, v, rs, rs_send_chunk, rs_recv_chunk);
  append_ring_phase(ctx, v, ag, ag_send_chunk, ag_recv_chunk, std::move(own));
  ctx.exchange(v);
}

}  // namespace ringcc::algorithms
