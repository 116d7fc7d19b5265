// The exchanger turns a list of transfers (one frame each) into progress on the links.
//
// Algorithms describe a collective (or a step of it) as sends and receives and call
// exchange(); it returns when all of them are done. Transfers to the same peer in the
// same direction run in list order (they share one byte stream); everything else runs
// concurrently, so "send to the right while receiving from the left" never deadlocks.
//
// Waiting: while a shared-memory transfer is pending, spin for a few microseconds (cheap
// when the peer is about to answer); then, and at once for TCP-only waits, block in
// poll() or on the shared-memory futex doorbell, so that ranks sharing cores (and the
// kernel's network stack) do not lose cycles to a busy wait.
#pragma once

#include <atomic>
#include <functional>
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
  // For kReduce: the local operand, when it is not `data` itself (an out-of-place
  // reduction folds incoming (op) operand into data, so the input is never copied
  // first); read at the same offsets as data. nullptr: data is the local operand.
  const char* operand = nullptr;
  int peer = -1;
  char* data = nullptr;
  size_t bytes = 0;
  // The operation this frame belongs to; nullptr: the context's. Set by point-to-point
  // batches, whose transfers belong to different operations.
  const OpHeader* op = nullptr;
  // 1 + the index (in the same exchange) of a receive that must be complete before this
  // send starts; 0: none. Lets a pipelined algorithm forward each segment as soon as it
  // has arrived instead of waiting for a whole step.
  uint32_t after = 0;
  // Runs on the exchanging thread as soon as this transfer is complete, before any send
  // that waits for it (`after`) may start: lets an algorithm transform a received
  // segment (decompress, add, recompress) and forward the result in the same exchange.
  std::function<void()> on_done;

  // Progress state, owned by the exchanger.
  uint8_t stage = 0;
  size_t done = 0;
  alignas(8) char header[kFrameHeaderBytes];
  std::string abort_text;

  static Transfer send(int peer, const void* data, size_t bytes);
  static Transfer recv(int peer, void* data, size_t bytes);
  static Transfer recv_reduce(int peer, void* data, size_t bytes, bool incoming_first);
};

// Point-to-point operations queued while a batch of them runs join that batch, so that
// an isend/irecv pair posted by two ranks in either order progresses at once instead of
// each rank's send waiting for the other's receive. The exchanger asks the feed for
// more transfers whenever it is idle and reports each finished transfer by its index.
class TransferFeed {
 public:
  virtual ~TransferFeed() = default;
  // Appends the transfers of newly queued operations; returns whether it added any.
  virtual bool pull(std::vector<Transfer>& transfers) = 0;
  // transfers[index] is complete (its operation may be finished now).
  virtual void completed(size_t index) = 0;
};

// The headers of this rank's most recent collectives, by sequence number. A peer whose
// frame belongs to an operation this rank has already finished disagreed with it there
// (a rooted operation can end on a rank that never read the odd frame); the receiver
// reports that disagreement, against its own header of the same number, instead of
// comparing the stray frame with whatever operation it runs now.
class OpHistory {
 public:
  void record(const OpHeader& h) { ring_[h.seq % kDepth] = h; }
  // This rank's header with sequence number `seq`, if it is still remembered.
  const OpHeader* find(uint64_t seq) const {
    const OpHeader& h = ring_[seq % kDepth];
    return seq != 0 && h.seq == seq ? &h : nullptr;
  }

 private:
  static constexpr size_t kDepth = 64;
  OpHeader ring_[kDepth];
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
  const OpHistory* history = nullptr;  // this rank's earlier collectives (may be null)

  int rank() const { return mesh->rank(); }
  int size() const { return mesh->size(); }
  void exchange(Transfer* transfers, size_t n);
  void exchange(std::vector<Transfer>& transfers) { exchange(transfers.data(), transfers.size()); }
  // Runs `transfers` and whatever `feed` adds until all are done. The feed keeps
  // `deadline` and `op` at the unfinished operation that expires first.
  void exchange(std::vector<Transfer>& transfers, TransferFeed& feed);
};

// Thrown when a peer told us it aborted; carries the kind so every rank raises the same
// Python exception type with the same text.
struct RemoteAbort {
  AbortKind kind;
  std::string text;
};

}  // namespace ringcc
