// One queued operation as the user described it (raw pointers, element counts).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "ringcc/common/dtype.h"
#include "ringcc/engine/protocol.h"

namespace ringcc {

enum class Algorithm : uint8_t {
  kAuto = 0,
  kRing = 1,               // bandwidth-optimal: reduce-scatter + allgather around the ring
  kRecursiveDoubling = 2,  // latency-optimal: log2(n) full-buffer exchanges
};
const char* algorithm_name(Algorithm a);

// Element counts per collective (n = world size, r = this rank):
//   allreduce      in: count          out: count (out == in: in place)
//   broadcast      in: count (root)   out: count (in may be null or == out)
//   allgather      in: count          out: n * count
//   allgather_v    in: counts[r]      out: sum(counts)
//   reduce_scatter in: sum(counts)    out: counts[r]  (counts = n x count when equal)
//   reduce         in: count          out: count on root, unused elsewhere
//   gather         in: count          out: n * count on root, unused elsewhere
//   scatter        in: n*count (root) out: count
//   alltoall       in: n * count      out: n * count
//   alltoall_v     in: sum(counts)    out: sum(recv_counts)   (counts = send counts)
//   barrier        nothing
//   send / recv    in / out: count, to / from `peer`
struct OpDesc {
  Collective kind = Collective::kBarrier;
  DataType dtype = DataType::kUInt8;
  ReduceOp op = ReduceOp::kSum;
  bool has_op = false;
  int root = -1;
  int peer = -1;
  bool is_send = false;  // send/recv: which side
  int64_t tag = 0;
  const void* in = nullptr;
  size_t in_bytes = 0;
  void* out = nullptr;
  size_t out_bytes = 0;
  size_t count = 0;
  std::vector<size_t> counts;
  std::vector<size_t> recv_counts;
  double timeout_seconds = -1;  // < 0: the communicator's timeout
  Algorithm algorithm = Algorithm::kAuto;
  size_t segment_bytes = 0;  // 0: the communicator's
  Compression compression = Compression::kNone;  // allreduce of float32 with op sum/avg only
};

}  // namespace ringcc
