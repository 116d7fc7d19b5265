// A link to a peer on the same host through the two shared-memory rings of the pair.
#pragma once

#include "ringcc/common/clock.h"
#include "ringcc/transport/link.h"
#include "ringcc/transport/shm/shm_segment.h"

namespace ringcc::transport::shm {

class ShmLink final : public Link {
 public:
  // `own` is this rank's segment (holds the inbox ring the peer writes to);
  // `peer_segment` is the peer's (holds the ring this rank writes to).
  ShmLink(int self, int peer, const Segment& own, Segment peer_segment);

  LinkKind kind() const override { return LinkKind::kShm; }
  size_t write_some(const void* data, size_t n) override;
  size_t read_some(void* dst, size_t n) override;
  size_t peek(const void** data) override;
  void consume(size_t n) override;
  PeerState peer_state() override;
  std::string peer_abort(AbortKind* kind) override;
  void wake_peer() override { peer_.ring_doorbell(); }

 private:
  const Segment& own_;
  Segment peer_;
  RingHeader* out_;  // in the peer's segment, written by us
  char* out_data_;
  RingHeader* in_;   // in our segment, written by the peer
  char* in_data_;
  size_t cap_;       // both rings have the same capacity (the layout is checked at open)
  [[noreturn]] void corrupt(const char* which, uint64_t head, uint64_t tail) const;

  bool same_process_;
  int peer_pid_ = 0;
  size_t peeked_ = 0;  // bytes the last peek() exposed: consume() may take no more
  bool dead_ = false;
  Clock::time_point next_pid_check_{};
};

}  // namespace ringcc::transport::shm
