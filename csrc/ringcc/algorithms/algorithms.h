// Collective algorithms. They see only OpContext::exchange(): no transport, no queue.
#pragma once

#include <algorithm>
#include <vector>

#include "ringcc/engine/exchange.h"
#include "ringcc/engine/op.h"

namespace ringcc::algorithms {

// Reusable scratch memory owned by the communicator's progress thread.
class Scratch {
 public:
  char* get(int slot, size_t bytes) {
    auto& v = buffers_[slot];
    if (v.size() < bytes) v.resize(bytes);
    return v.data();
  }

 private:
  std::vector<char> buffers_[3];
};

// Tunables that come from the communicator (and can be overridden per call).
struct Tuning {
  size_t segment_bytes;        // frame size for pipelined algorithms
  size_t small_message_bytes;  // allreduce/reduce/broadcast: latency algorithm at or below
};

// Element ranges of a buffer split into one chunk per rank.
struct Partition {
  std::vector<size_t> offset, count;  // in elements
  static Partition even(size_t total, int n);
  static Partition from_counts(const std::vector<size_t>& counts);
  size_t total() const { return offset.empty() ? 0 : offset.back() + count.back(); }
};

// Position `a` on a ring of n ranks (a may be negative).
inline int ring_index(int a, int n) { return ((a % n) + n) % n; }

// How a run of `elems` elements is cut into frames of about `segment_bytes`: always at
// least one frame, so a rank with nothing to send still exchanges a header and a
// mismatch cannot go unnoticed.
struct Segments {
  size_t elems, per_segment, count;
  Segments(size_t elems_, size_t esize, size_t segment_bytes)
      : elems(elems_), per_segment(std::max<size_t>(1, segment_bytes / esize)),
        count(std::max<size_t>(1, (elems_ + per_segment - 1) / per_segment)) {}
  size_t first(size_t k) const { return std::min(k * per_segment, elems); }
  size_t length(size_t k) const { return first(k + 1) - first(k); }
};

// Building blocks (ring.cpp, recursive_doubling.cpp). With `src` (not buf) the
// reduce-scatter reads this rank's contribution from src and leaves it untouched: buf
// needs no copy of the input first, and its chunks are written as the ring reaches them.
void ring_reduce_scatter(OpContext& ctx, char* buf, const Partition& part, size_t esize, size_t segment_bytes,
                         const char* src = nullptr);
void ring_allgather(OpContext& ctx, char* buf, const Partition& part, size_t esize, size_t segment_bytes);
// Reduce-scatter and allgather fused into one exchange (no per-chunk work between them).
void ring_allreduce(OpContext& ctx, char* buf, const Partition& part, size_t esize, size_t segment_bytes,
                    const char* src = nullptr);
// float32 allreduce (sum/avg) with d.compression on the wire (compressed.cpp).
void compressed_allreduce(OpContext& ctx, const OpDesc& d, const Tuning& t, Scratch& s);
void recursive_doubling_allreduce(OpContext& ctx, char* buf, char* tmp, size_t bytes);

// One entry point per collective; each validates nothing (the communicator did).
void allreduce(OpContext& ctx, const OpDesc& d, const Tuning& t, Scratch& s);
void reduce(OpContext& ctx, const OpDesc& d, const Tuning& t, Scratch& s);
void reduce_scatter(OpContext& ctx, const OpDesc& d, const Tuning& t, Scratch& s);
void broadcast(OpContext& ctx, const OpDesc& d, const Tuning& t);
void allgather(OpContext& ctx, const OpDesc& d, const Tuning& t);
void gather(OpContext& ctx, const OpDesc& d);
void scatter(OpContext& ctx, const OpDesc& d);
void alltoall(OpContext& ctx, const OpDesc& d);
void barrier(OpContext& ctx);
// A send or receive is one frame; the communicator runs it in a batch with its
// neighbours in the queue (Communicator::run_p2p_batch).
Transfer send_recv_transfer(const OpDesc& d);

}  // namespace ringcc::algorithms
