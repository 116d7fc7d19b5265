// Collectives that move data without reducing it, plus barrier and send/recv.
#include <algorithm>
#include <cstring>

#include "ringcc/algorithms/algorithms.h"

namespace ringcc::algorithms {
namespace {

void copy_bytes(void* dst, const void* src, size_t n) {
  if (n && dst != src) std::memmove(dst, src, n);
}

}  // namespace

void broadcast(OpContext& ctx, const OpDesc& d, const Tuning& t) {
  const int n = ctx.size(), r = ctx.rank();
  const size_t esize = element_size(d.dtype), bytes = d.count * esize;
  char* buf = static_cast<char*>(d.out);
  if (r == d.root && d.in) copy_bytes(buf, d.in, bytes);
  if (n == 1) return;
  const int vr = ring_index(r - d.root, n);  // rank relative to the root
  std::vector<Transfer> v;
  if (bytes <= t.small_message_bytes || n == 2) {
    // Binomial tree: log2(n) latencies. Receive from the parent (our lowest set bit
    // cleared), then send to every child at once.
    int mask = 1;
    for (; mask < n; mask <<= 1) {
      if (vr & mask) {
        Transfer x = Transfer::recv(ring_index(vr - mask + d.root, n), buf, bytes);
        ctx.exchange(&x, 1);
        break;
      }
    }
    for (mask >>= 1; mask > 0; mask >>= 1)
      if (vr + mask < n) v.push_back(Transfer::send(ring_index(vr + mask + d.root, n), buf, bytes));
    ctx.exchange(v);
    return;
  }
  // Large messages: a pipelined chain root -> root+1 -> ... Each rank forwards frame k-1
  // while frame k arrives, so the time approaches bytes / link bandwidth for any n.
  const int left = ring_index(r - 1, n), right = ring_index(r + 1, n);
  const bool last = vr == n - 1;
  Segments seg(d.count, esize, t.segment_bytes);
  const size_t nseg = seg.count;
  auto seg_ptr = [&](size_t k) { return buf + seg.first(k) * esize; };
  auto seg_bytes = [&](size_t k) { return seg.length(k) * esize; };
  if (vr == 0) {
    for (size_t k = 0; k < nseg; ++k) v.push_back(Transfer::send(right, seg_ptr(k), seg_bytes(k)));
    ctx.exchange(v);
    return;
  }
  for (size_t k = 0; k < nseg; ++k) {
    v.clear();
    v.push_back(Transfer::recv(left, seg_ptr(k), seg_bytes(k)));
    if (k > 0 && !last) v.push_back(Transfer::send(right, seg_ptr(k - 1), seg_bytes(k - 1)));
    ctx.exchange(v);
  }
  if (!last) {
    Transfer x = Transfer::send(right, seg_ptr(nseg - 1), seg_bytes(nseg - 1));
    ctx.exchange(&x, 1);
  }
}

void allgather(OpContext& ctx, const OpDesc& d, const Tuning& t) {
  const int n = ctx.size(), r = ctx.rank();
  const size_t esize = element_size(d.dtype);
  Partition part = d.kind == Collective::kAllgatherV ? Partition::from_counts(d.counts)
                                                     : Partition::even(d.count * n, n);
  char* out = static_cast<char*>(d.out);
  copy_bytes(out + part.offset[r] * esize, d.in, part.count[r] * esize);
  if (n > 1) ring_allgather(ctx, out, part, esize, t.segment_bytes);
}

void gather(OpContext& ctx, const OpDesc& d) {
  const int n = ctx.size(), r = ctx.rank();
  const size_t bytes = d.count * element_size(d.dtype);
  std::vector<Transfer> v;
  if (r == d.root) {
    char* out = static_cast<char*>(d.out);
    copy_bytes(out + r * bytes, d.in, bytes);
    for (int c = 0; c < n; ++c)
      if (c != r) v.push_back(Transfer::recv(c, out + c * bytes, bytes));
  } else {
    v.push_back(Transfer::send(d.root, d.in, bytes));
  }
  ctx.exchange(v);
}

void scatter(OpContext& ctx, const OpDesc& d) {
  const int n = ctx.size(), r = ctx.rank();
  const size_t bytes = d.count * element_size(d.dtype);
  std::vector<Transfer> v;
  if (r == d.root) {
    const char* in = static_cast<const char*>(d.in);
    copy_bytes(d.out, in + r * bytes, bytes);
    for (int c = 0; c < n; ++c)
      if (c != r) v.push_back(Transfer::send(c, in + c * bytes, bytes));
  } else {
    v.push_back(Transfer::recv(d.root, d.out, bytes));
  }
  ctx.exchange(v);
}

void alltoall(OpContext& ctx, const OpDesc& d) {
  const int n = ctx.size(), r = ctx.rank();
  const size_t esize = element_size(d.dtype);
  std::vector<size_t> sc = d.counts, rc = d.recv_counts;
  if (d.kind == Collective::kAlltoall) sc = rc = std::vector<size_t>(n, d.count);
  Partition sp = Partition::from_counts(sc), rp = Partition::from_counts(rc);
  const char* in = static_cast<const char*>(d.in);
  char* out = static_cast<char*>(d.out);
  copy_bytes(out + rp.offset[r] * esize, in + sp.offset[r] * esize, sc[r] * esize);
  // All pairs at once: the exchanger progresses every link concurrently. Peers are
  // visited starting at our right neighbour so not everyone hits rank 0 first.
  std::vector<Transfer> v;
  for (int k = 1; k < n; ++k) {
    int to = ring_index(r + k, n), from = ring_index(r - k, n);
    v.push_back(Transfer::send(to, in + sp.offset[to] * esize, sc[to] * esize));
    v.push_back(Transfer::recv(from, out + rp.offset[from] * esize, rc[from] * esize));
  }
  ctx.exchange(v);
}

void barrier(OpContext& ctx) {
  // Dissemination barrier: after round k every rank has heard, directly or not, from
  // 2^(k+1) ranks; ceil(log2 n) rounds cover everyone.
  const int n = ctx.size(), r = ctx.rank();
  for (int dist = 1; dist < n; dist <<= 1) {
    Transfer t[2] = {Transfer::send(ring_index(r + dist, n), nullptr, 0), Transfer::recv(ring_index(r - dist, n), nullptr, 0)};
    ctx.exchange(t, 2);
  }
}

Transfer send_recv_transfer(const OpDesc& d) {
  const size_t bytes = d.count * element_size(d.dtype);
  return d.is_send ? Transfer::send(d.peer, d.in, bytes) : Transfer::recv(d.peer, d.out, bytes);
}

}  // namespace ringcc::algorithms
