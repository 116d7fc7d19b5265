// The exchanger turns a list of transfers (one frame each) into progress on the links.
//
// Algorithms describe one step of a collective as a few sends and receives and call
// exchange(); it returns when all of them are done. Transfers to the same peer in the
// same direction run in list order (they share one byte stream); everything else runs
// concurrently, so "send to the right while receiving from the left" never deadlocks.
//
// Waiting: spin for a few microseconds (cheap when the peer is about to answer), then
// block in poll() (TCP) or on the shared-memory futex doorbell, so that ranks sharing
// cores do not steal each other's cycles.
#pragma once

#include <atomic>
#include <string>
#include <vector>

#include "ringcc/common/clock.h"
#include "ringcc/engine/mesh.h"
#include "ringcc/engine/protocol.h"

namespace ringcc {

struct Transfer {
  enum class Dir : uint8_t { kSend, kRecv };
  enum class Apply : uint8_t { kCopy, kReduce };

  Dir dir = Dir::kSend;
  Apply apply = Apply::kCopy;
  // For kReduce: the result is incoming (op) local when true, local (op) incoming when
  // false. Algorithms keep the lower rank's operand first so every rank computes the
  // same bits.
  bool incoming_first = false;
  int peer = -1;
  char* data = nullptr;
  size_t bytes = 0;

  // Progress state, owned by the exchanger.
  uint8_t stage = 0;
  size_t done = 0;
  alignas(8) char header[kFrameHeaderBytes];
  std::string abort_text;

  static Transfer send(int peer, const void* data, size_t bytes);
  static Transfer recv(int peer, void* data, size_t bytes);
  static Transfer recv_reduce(int peer, void* data, size_t bytes, bool incoming_first);
};

// Everything an operation's transfers share.
struct OpContext {
  Mesh* mesh = nullptr;
  OpHeader op;
  Deadline deadline;
  DataType reduce_dtype = DataType::kFloat32;  // element type of kReduce transfers
  ReduceOp reduce_op = ReduceOp::kSum;
  const std::atomic<bool>* interrupted = nullptr;  // set by Communicator::abort()
  double spin_seconds = 20e-6;
  // More local ranks than CPUs: spin with sched_yield() so the peer we wait for can run.
  bool yield_while_spinning = false;

  int rank() const { return mesh->rank(); }
  int size() const { return mesh->size(); }
  void exchange(Transfer* transfers, size_t n);
  void exchange(std::vector<Transfer>& transfers) { exchange(transfers.data(), transfers.size()); }
};

// Thrown when a peer told us it aborted; carries the kind so every rank raises the same
// Python exception type with the same text.
struct RemoteAbort {
  AbortKind kind;
  std::string text;
};

}  // namespace ringcc
