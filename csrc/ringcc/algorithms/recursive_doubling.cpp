// Recursive doubling: log2(p) rounds in which partners swap their whole buffers and
// both reduce. Each round costs one latency, so it beats the ring's 2(n-1) steps for
// small messages. With n not a power of two, the first 2*(n-p) ranks pair up first
// (the even one hands its data to the odd one and sits out) and get the result back
// at the end.
#include "ringcc/algorithms/algorithms.h"
#include "ringcc/kernels/cpu/kernels.h"

namespace ringcc::algorithms {

void recursive_doubling_allreduce(OpContext& ctx, char* buf, char* tmp, size_t bytes) {
  const int n = ctx.size(), r = ctx.rank();
  const size_t count = bytes / element_size(ctx.reduce_dtype);
  int p = 1;
  while (p * 2 <= n) p *= 2;
  const int rem = n - p;

  int vrank;
  if (r < 2 * rem) {
    if (r % 2 == 0) {
      Transfer t = Transfer::send(r + 1, buf, bytes);
      ctx.exchange(&t, 1);
      vrank = -1;
    } else {
      // The lower rank's operand goes first on every rank, so all ranks compute the
      // same expression and end with the same bits (this matters for NaN payloads).
      Transfer t = Transfer::recv_reduce(r - 1, buf, bytes, /*incoming_first=*/true);
      ctx.exchange(&t, 1);
      vrank = r / 2;
    }
  } else {
    vrank = r - rem;
  }

  if (vrank >= 0) {
    for (int mask = 1; mask < p; mask <<= 1) {
      int vpeer = vrank ^ mask;
      int peer = vpeer < rem ? vpeer * 2 + 1 : vpeer + rem;
      Transfer t[2] = {Transfer::send(peer, buf, bytes), Transfer::recv(peer, tmp, bytes)};
      ctx.exchange(t, 2);
      if (peer < r) kernels::reduce(buf, tmp, buf, count, ctx.reduce_dtype, ctx.reduce_op);
      else kernels::reduce(buf, buf, tmp, count, ctx.reduce_dtype, ctx.reduce_op);
    }
  }

  if (r < 2 * rem) {
    Transfer t = r % 2 == 0 ? Transfer::recv(r + 1, buf, bytes) : Transfer::send(r - 1, buf, bytes);
    ctx.exchange(&t, 1);
  }
}

}  // namespace ringcc::algorithms
