// The step structure shared by every ring algorithm (ring.cpp, compressed.cpp).
//
// In step s of a phase a rank sends one chunk to its right and receives one from its
// left; the chunk received in step s is the one sent in step s+1, so each of its
// segments is forwarded as soon as it has arrived (Transfer::after) rather than when
// the whole step is done. Where the bytes of a segment live, and what happens when one
// arrives, is the layout's business:
//
//   size_t segments(int chunk)                 how many frames chunk `chunk` is cut into
//   Transfer send(int chunk, size_t k)         segment k of `chunk`, outgoing
//   Transfer recv(int step, int chunk, size_t k)  segment k of `chunk`, incoming in `step`
//
// (peer and `after` are filled in here).
#pragma once

#include <vector>

#include "ringcc/algorithms/algorithms.h"

namespace ringcc::algorithms {

// Which chunk a rank sends / receives in step s of each phase. Reduce-scatter: forward
// the partial sum of chunk r-1-s (our own data at s = 0) and fold in chunk r-2-s, so
// after n-1 steps chunk r holds every contribution. Allgather: pass on the chunk that
// arrived in the previous step (our own, chunk r, at s = 0).
inline int rs_send_chunk(int r, int s, int n) { return ring_index(r - 1 - s, n); }
inline int rs_recv_chunk(int r, int s, int n) { return ring_index(r - 2 - s, n); }
inline int ag_send_chunk(int r, int s, int n) { return ring_index(r - s, n); }
inline int ag_recv_chunk(int r, int s, int n) { return ring_index(r - s - 1, n); }

// Appends the n-1 steps of one phase to `v`. The first step's sends wait for
// `first_after` (receive indices by segment of the first chunk sent; empty: nothing).
// Returns the last step's receive indices, by segment.
template <class Layout, class SendChunk, class RecvChunk>
std::vector<uint32_t> append_ring_phase(OpContext& ctx, std::vector<Transfer>& v, Layout& layout,
                                        SendChunk send_chunk, RecvChunk recv_chunk,
                                        std::vector<uint32_t> first_after = {}) {
  const int n = ctx.size(), r = ctx.rank();
  const int right = ring_index(r + 1, n), left = ring_index(r - 1, n);
  std::vector<uint32_t> prev_recv = std::move(first_after), recv;
  for (int s = 0; s < n - 1; ++s) {
    const int sc = send_chunk(r, s, n), rc = recv_chunk(r, s, n);
    for (size_t k = 0, m = layout.segments(sc); k < m; ++k) {
      Transfer t = layout.send(sc, k);
      t.peer = right;
      if (!prev_recv.empty()) t.after = prev_recv[k] + 1;  // same chunk, same segmentation
      v.push_back(std::move(t));
    }
    recv.clear();
    for (size_t k = 0, m = layout.segments(rc); k < m; ++k) {
      recv.push_back(static_cast<uint32_t>(v.size()));
      Transfer t = layout.recv(s, rc, k);
      t.peer = left;
      v.push_back(std::move(t));
    }
    prev_recv.swap(recv);
  }
  return prev_recv;
}

}  // namespace ringcc::algorithms
