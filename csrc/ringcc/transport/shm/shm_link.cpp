#include "ringcc/transport/shm/shm_link.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "ringcc/common/error.h"

namespace ringcc::transport::shm {

ShmLink::ShmLink(int self, int peer, const Segment& own, Segment peer_segment)
    : Link(self, peer), own_(own), peer_(std::move(peer_segment)) {
  out_ = peer_.ring(self);
  out_data_ = peer_.ring_data(self);
  in_ = own_.ring(peer);
  in_data_ = own_.ring_data(peer);
  cap_ = own_.ring_bytes();
  RINGCC_CHECK_ARG(peer_.ring_bytes() == cap_, "rank ", peer, " uses shared-memory rings of ",
                   peer_.ring_bytes(), " bytes but rank ", self, " uses ", cap_,
                   " (RINGCC_SHM_RING_BYTES must be equal on all ranks)");
  peer_pid_ = peer_.pid();
  same_process_ = peer_pid_ == getpid();
}

// The counters live in shared memory that the peer can write: each is read once, and a
// pair that does not describe a ring of cap_ bytes ends the link instead of steering a
// copy outside it.
void ShmLink::corrupt(const char* which, uint64_t head, uint64_t tail) const {
  RINGCC_THROW(PeerError, "rank ", self_, ": the shared-memory ring ", which, " rank ", peer(),
               " is corrupt (consumed ", head, ", produced ", tail, ", capacity ", cap_,
               "): rank ", peer(), " wrote outside its own counter (protocol violation or memory corruption)");
}

size_t ShmLink::write_some(const void* data, size_t n) {
  uint64_t head = out_->head.load(std::memory_order_acquire);
  uint64_t tail = out_->tail.load(std::memory_order_relaxed);
  uint64_t used = 0;
  if (!ring_fill(head, tail, cap_, &used)) corrupt("to", head, tail);
  size_t space = cap_ - static_cast<size_t>(used);
  size_t k = std::min(n, space);
  if (k == 0) return 0;
  size_t pos = static_cast<size_t>(tail % cap_);
  size_t first = std::min(k, cap_ - pos);
  std::memcpy(out_data_ + pos, data, first);
  if (k > first) std::memcpy(out_data_, static_cast<const char*>(data) + first, k - first);
  out_->tail.store(tail + k, std::memory_order_release);
  peer_.ring_doorbell();
  return k;
}

size_t ShmLink::read_some(void* dst, size_t n) {
  uint64_t tail = in_->tail.load(std::memory_order_acquire);
  uint64_t head = in_->head.load(std::memory_order_relaxed);
  uint64_t avail = 0;
  if (!ring_fill(head, tail, cap_, &avail)) corrupt("from", head, tail);
  size_t k = std::min(n, static_cast<size_t>(avail));
  if (k == 0) return 0;
  size_t pos = static_cast<size_t>(head % cap_);
  size_t first = std::min(k, cap_ - pos);
  std::memcpy(dst, in_data_ + pos, first);
  if (k > first) std::memcpy(static_cast<char*>(dst) + first, in_data_, k - first);
  in_->head.store(head + k, std::memory_order_release);
  peer_.ring_doorbell();  // the peer may be waiting for space
  return k;
}

size_t ShmLink::peek(const void** data) {
  uint64_t tail = in_->tail.load(std::memory_order_acquire);
  uint64_t head = in_->head.load(std::memory_order_relaxed);
  uint64_t avail = 0;
  if (!ring_fill(head, tail, cap_, &avail)) corrupt("from", head, tail);
  if (avail == 0) return 0;
  size_t pos = static_cast<size_t>(head % cap_);
  // Frames keep payloads 8-byte aligned and cap_ is a multiple of 64, so the region
  // up to the wrap point always holds whole elements.
  *data = in_data_ + pos;
  peeked_ = std::min(static_cast<size_t>(avail), cap_ - pos);
  return peeked_;
}

void ShmLink::consume(size_t n) {
  if (n == 0) return;
  RINGCC_ASSERT(n <= peeked_);
  peeked_ -= n;
  in_->head.fetch_add(n, std::memory_order_release);
  peer_.ring_doorbell();
}

PeerState ShmLink::peer_state() {
  ControlBlock* c = peer_.control();
  uint32_t s = c->state.load(std::memory_order_acquire);
  if (s == kStateAborted) return PeerState::kAborted;
  if (s == kStateClosed) return PeerState::kClosed;
  // A killed process cannot mark itself; its pid disappearing is the only trace. The
  // check is a syscall, so it runs at most every 20 ms.
  if (!same_process_ && !dead_) {
    auto now = Clock::now();
    if (now >= next_pid_check_) {
      next_pid_check_ = now + std::chrono::milliseconds(20);
      dead_ = kill(peer_pid_, 0) != 0 && errno == ESRCH;  // the pid checked at open, always > 0
    }
  }
  return dead_ ? PeerState::kDead : PeerState::kAlive;
}

std::string ShmLink::peer_abort(AbortKind* kind) {
  ControlBlock* c = peer_.control();
  if (c->state.load(std::memory_order_acquire) != kStateAborted) return {};
  const uint32_t k = c->abort_kind;
  if (kind) *kind = k <= static_cast<uint32_t>(AbortKind::kUser) ? static_cast<AbortKind>(k) : AbortKind::kGeneric;
  char reason[sizeof(c->reason)];
  std::memcpy(reason, c->reason, sizeof(reason));  // one copy: the peer may still be writing
  return peer_text(reason, strnlen(reason, sizeof(reason)));
}

}  // namespace ringcc::transport::shm
