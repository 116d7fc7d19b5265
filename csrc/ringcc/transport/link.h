// The transport interface: one Link per peer, a full-duplex ordered byte stream.
//
// Algorithms never see links; they hand lists of transfers to the Exchanger
// (engine/exchange.h), which frames them and drives links without blocking. Links only
// move bytes and report the peer's state; they do not know which collective runs.
#pragma once

#include <cstddef>
#include <string>

#include "ringcc/engine/protocol.h"

namespace ringcc::transport {

enum class LinkKind { kTcp, kShm };

enum class PeerState {
  kAlive,
  kClosed,   // closed its communicator gracefully; no more bytes will come
  kAborted,  // aborted; peer_abort() has its reason
  kDead,     // its process is gone without closing
};

class Link {
 public:
  Link(int self, int peer) : self_(self), peer_(peer) {}
  virtual ~Link() = default;
  Link(const Link&) = delete;
  Link& operator=(const Link&) = delete;

  virtual LinkKind kind() const = 0;
  int peer() const { return peer_; }

  // Non-blocking stream operations; each returns the bytes moved (0 = would block).
  virtual size_t write_some(const void* data, size_t n) = 0;
  virtual size_t read_some(void* dst, size_t n) = 0;
  // Readable bytes exposed in place (zero-copy reduction from the transport's buffer).
  // When any bytes are readable at least min(8, available) contiguous bytes are exposed,
  // so a reduction never starves on a split element.
  virtual size_t peek(const void** data) = 0;
  virtual void consume(size_t n) = 0;

  // Out-of-band view of the peer. TCP learns about the peer only from the stream (EOF,
  // abort frames), so it reports kAlive until eof() is seen.
  virtual PeerState peer_state() = 0;
  virtual bool eof() const { return false; }
  // Reason and kind published by an aborted peer (shared memory only).
  virtual std::string peer_abort(AbortKind* kind) { (void)kind; return {}; }

  // File descriptor to poll() for the next read (or write), or -1 when the link has no
  // descriptor (shared memory waits on its futex doorbell instead).
  virtual int poll_fd(bool for_write) const { (void)for_write; return -1; }

  // Wakes the peer if it sleeps waiting on this link (shared memory doorbell).
  virtual void wake_peer() {}

  // Set by the exchanger while a frame is half written; an abort frame can only be sent
  // at a frame boundary.
  bool mid_frame = false;

 protected:
  const int self_;
  const int peer_;
};

}  // namespace ringcc::transport
